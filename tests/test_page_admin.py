"""
The admin page end to end (issue 19): Debian's Chromium driven by
Playwright (tests/browser.py) against a gateway signing in through the real
OpenID Connect provider, as tests/test_page_e2e.py does.  An admin sees a
stream appear and go, a backend marked down, a failed reload with its error,
usage after a few calls, and revokes a key that then stops working; a user
without the admin scope gets no admin data.  Screenshots go to
artifacts/screenshots/admin-*.png (docs/admin-page.png is a copy of
admin-desktop.png, refreshed by hand when the page changes: a test run
leaves the checkout as it found it).
"""

from playwright.sync_api import expect
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread
from twisted.trial.unittest import TestCase

from tests.browser import PHONE, run_in_browser
from tests.helpers import bearer, closed_port, get_json, stream_call
from tests.test_page_e2e import on_reactor, sign_in, signed_in_gateway
from tests.test_page_keys import SignedInPage

HI = {"model": "qwen3:32b", "messages": [{"role": "user", "content": "hi"}]}


def open_admin(browser, url, user="root", **options):
    page = sign_in(browser, url, user, **options)
    page.goto(url + "/admin")
    return page


class AdminPageTests(SignedInPage, TestCase):
    def setUp(self):
        down = f"http://127.0.0.1:{closed_port(self)}"
        self.down = down
        signed_in_gateway(self, "", backend=lambda fake: f'urls: ["{fake}", "{down}"]')

    async def test_an_admin_watches_and_acts(self):
        """Live streams, a backend down, a failed reload, usage, and a revoked key, all through the page."""
        alice = self.api_as("alice")
        _, _, made = await get_json(self.gw.url + "/v1/keys", method="POST", headers=alice, body={"name": "build bot"})
        key = made["key"]
        held = {}

        def start_stream():
            self.fake.hold(after=2, times=1)
            held["stream"] = stream_call(self.gw.url + "/v1/chat/completions", dict(HI, stream=True), alice)
            return held["stream"].when_seen(b"data: ")

        async def calls(n):
            for _ in range(n):
                await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=alice, body=HI)

        def bad_reload():
            with open(self.gw.config_path, encoding="utf-8") as f:
                good = f.read()
            with open(self.gw.config_path, "w", encoding="utf-8") as f:
                f.write(good + "\nlimits: {max_queue: -1}\n")
            self.gw.parts.runtime.reload()
            with open(self.gw.config_path, "w", encoding="utf-8") as f:
                f.write(good)

        def script(browser, url):
            seen = {}
            page = open_admin(browser, url)
            page.get_by_test_id("now-table").wait_for()
            expect(page.get_by_test_id("admin-user")).to_have_text("Rita Root")
            expect(page.get_by_test_id("now-streams")).to_have_text("0")
            # A stream appears, then goes.
            blockingCallFromThread(reactor, start_stream)
            expect(page.get_by_test_id("now-streams")).to_have_text("1", timeout=5000)
            seen["stream_rows"] = page.get_by_test_id("now-user").all_inner_texts()
            page.screenshot_as("admin-live")
            blockingCallFromThread(reactor, self.fake.release)
            blockingCallFromThread(reactor, lambda: held["stream"].done)
            expect(page.get_by_test_id("now-streams")).to_have_text("0", timeout=5000)
            # Calls until one meets the closed backend: it shows down.
            on_reactor(calls, 4)
            expect(page.locator("[data-testid=backend] td[data-state=down]")).to_have_count(1, timeout=5000)
            seen["down_row"] = page.locator("[data-testid=backend] >> nth=1").inner_text()
            # A reload that failed, with its error.
            blockingCallFromThread(reactor, bad_reload)
            expect(page.get_by_test_id("reload")).to_have_attribute("data-result", "error", timeout=5000)
            seen["reload"] = page.get_by_test_id("reload").inner_text()
            # Usage after those calls (read every 10 s; the page is reloaded to see it now).
            self.flush_batches()
            page.reload()
            page.get_by_test_id("usage-row").first.wait_for(timeout=10000)
            seen["usage"] = page.get_by_test_id("usage-row").all_inner_texts()
            seen["chart_bars"] = page.locator("#usage-chart rect").count()
            page.get_by_test_id("person").first.wait_for()
            seen["people"] = page.get_by_test_id("person").all_inner_texts()
            # Revoke the key.
            row = page.locator("[data-testid=key]", has_text="build bot")
            page.once("dialog", lambda d: d.accept())
            row.get_by_test_id("revoke").click()
            expect(row.locator("td[data-status]")).to_have_attribute("data-status", "revoked", timeout=10000)
            seen["audit"] = page.get_by_test_id("audit-row").all_inner_texts()
            page.screenshot_as("admin-desktop", full_page=True)
            seen["problems"] = page.problems(origin=url)
            phone = open_admin(browser, url, viewport=PHONE, locale="zh-CN", color_scheme="dark")
            phone.get_by_test_id("now-table").wait_for()
            phone.wait_until("document.getElementById('now-streams').textContent !== ''")
            seen["phone_title"] = phone.locator("h1").inner_text()
            seen["phone_width"] = phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            phone.screenshot_as("admin-phone-zh-dark", full_page=True)
            return seen

        seen = await run_in_browser(script, self.origin)
        self.assertEqual(seen["problems"], [])
        self.assertTrue(any("alice" in r for r in seen["stream_rows"]), seen["stream_rows"])
        self.assertIn(self.down, seen["down_row"])
        self.assertIn("limits.max_queue", seen["reload"])
        self.assertTrue(any(r.startswith("alice") for r in seen["usage"]), seen["usage"])
        self.assertGreaterEqual(seen["chart_bars"], 1)
        self.assertTrue(any("alice" in p for p in seen["people"]), seen["people"])
        self.assertEqual(seen["phone_title"], "Clawdbot 管理")
        self.assertTrue(seen["phone_width"])
        code, _ = await self.models_with(key)
        self.assertEqual(code, 401)

    async def test_no_admin_page_without_the_admin_scope(self):
        """A signed-in user without admin sees only the refusal; the page asked no admin API for data it got."""

        def script(browser, url):
            page = open_admin(browser, url, user="alice")
            expect(page.get_by_test_id("admin-message")).to_have_text("This page is for administrators (the admin scope).", timeout=10000)
            return {"main_hidden": page.locator("#admin-main").is_hidden(), "rows": page.locator("tbody tr").count()}

        seen = await run_in_browser(script, self.origin)
        self.assertEqual(seen, {"main_hidden": True, "rows": 0})
        code, _, body = await get_json(self.gw.url + "/v1/admin/status", headers=bearer(self.api_as("alice")["Authorization"].split(" ", 1)[1]))
        self.assertEqual((code, body["error"]["code"]), (403, "AUTH_INSUFFICIENT_SCOPE"))
