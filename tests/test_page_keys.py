"""
The chat page's "API keys" panel and its remaining-quota line, end to end:
Debian's Chromium driven by Playwright (tests/browser.py) against a real
gateway started in this process, signing in through the real OpenID
Connect provider (tests/idp.py) as tests/test_page_e2e.py does, with the
fake Ollama (testing/fake_ollama.py) behind it.

A key is created, copied, used and revoked only through what a person sees
and clicks; the key the page showed is then tried from Python as a bearer
credential.  Its secret must be nowhere in the page (storage, DOM, an
input's value) once the panel is closed.  Screenshots go to
artifacts/screenshots/keys-*.png and quota-*.png.
"""

import json
import os
import re

from playwright.sync_api import expect
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread
from twisted.trial.unittest import TestCase

from clawdbot.auth import session
from clawdbot.auth.tokens import mint
from clawdbot.http import tree
from tests.browser import PHONE, ROOT, run_in_browser
from tests.helpers import bearer, get_json
from tests.test_page_e2e import FINAL, on_reactor, send, sign_in, signed_in_gateway

# The page under test is this checkout's (not a copy installed with the package).
CHECKOUT_PAGE = os.path.join(ROOT, "share", "static")

TOKENS_PER_DAY = 100000
REQUESTS_PER_DAY = 2

# Everything the page keeps in storage and cookies it can read, as one string.
STORAGE = """() => {
    const dump = (s) => { const out = {}; for (let i = 0; i < s.length; i++) { const k = s.key(i); out[k] = s.getItem(k); } return out; };
    return JSON.stringify([dump(window.localStorage), dump(window.sessionStorage), document.cookie]);
}"""

# Where in the document a string is: markup, text, attributes, form values, the selection.
FIND_IN_DOM = """(needle) => {
    const all = [...document.querySelectorAll("*")];
    return {
        html: document.documentElement.outerHTML.includes(needle),
        text: document.documentElement.textContent.includes(needle),
        attrs: all.some(e => [...e.attributes].some(a => a.value.includes(needle))),
        values: [...document.querySelectorAll("input, textarea, select")].some(e => String(e.value).includes(needle)),
        selection: String(window.getSelection()).includes(needle),
    };
}"""

NOWHERE = {"html": False, "text": False, "attrs": False, "values": False, "selection": False}


class SignedInPage:
    """setUp: a gateway with single sign-on through the real IdP (as in test_page_e2e), plus EXTRA config."""

    timeout = 180
    EXTRA = ""

    def setUp(self):
        self.assertEqual(os.path.realpath(tree.static_dir()), os.path.realpath(CHECKOUT_PAGE))
        signed_in_gateway(self, self.EXTRA)

    def api_as(self, sub, scope="chat:read chat:write history:team-a"):
        """Headers for calling the API as sub of the IdP the page signs in through (a session JWT)."""
        config = self.gw.parts.runtime.config
        return bearer(mint(session.session_signing_key(config), session.session_issuer(config), session.SESSION_AUDIENCE, sub, scope, 3600, idp=self.idp.issuer))

    def flush_batches(self):
        """From the browser thread: write usage and keys' last use now (as every usage.flush_interval)."""
        blockingCallFromThread(reactor, self.gw.parts.batches.run)

    async def models_with(self, key):
        code, _, body = await get_json(f"{self.gw.url}/v1/models", headers=bearer(key))
        return code, body


def open_keys(page):
    """Open the panel from the sidebar (the drawer first, on a phone)."""
    if not page.get_by_test_id("open-keys").is_visible():
        page.get_by_test_id("sidebar-toggle").click()
        page.wait_until("document.getElementById('sidebar').getBoundingClientRect().left === 0")
    page.get_by_test_id("open-keys").click()
    page.get_by_test_id("keys-dialog").wait_for(state="visible")


class PageKeys(SignedInPage, TestCase):
    async def test_create_copy_use_and_revoke_a_key(self):
        """
        The panel lists nothing at first; the form offers the user's own
        scopes (all checked) and teams.  Creating a key shows its secret
        once with a note and a working Copy button; the key works as a
        bearer on /v1/models, is listed with its name, prefix, scopes, team
        and dates (its last use once recorded), and is in no storage.  After
        the panel closes the secret is nowhere in the page, and reopening
        does not show it.  Revoking asks first (cancel keeps it); once
        revoked the key gets 401 at once.  No quota: no quota line.
        """

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
            send(page, "hello there")
            seen["quota_hidden"] = not page.get_by_test_id("quota").is_visible()

            open_keys(page)
            dialog = page.get_by_test_id("keys-dialog")
            seen["title"] = dialog.locator("h2").inner_text()
            expect(page.get_by_test_id("keys-status")).to_have_text("You have no API keys yet.")
            boxes = page.get_by_test_id("key-scope")
            seen["scopes"] = [boxes.nth(i).get_attribute("value") for i in range(boxes.count())]
            seen["scopes_checked"] = [boxes.nth(i).is_checked() for i in range(boxes.count())]
            seen["teams"] = page.get_by_test_id("key-team").locator("option").all_inner_texts()
            seen["expiry"] = page.get_by_test_id("key-expiry").input_value()
            seen["expiry_options"] = page.get_by_test_id("key-expiry").locator("option").evaluate_all("os => os.map(o => o.value)")

            # A name is required.
            page.get_by_test_id("key-create").click()
            seen["no_name"] = page.get_by_test_id("key-form-error").inner_text()

            page.get_by_test_id("key-name").fill("laptop script")
            page.locator("[data-testid=key-scope][value='history:team-a']").uncheck()
            page.get_by_test_id("key-team").select_option("team-a")
            page.get_by_test_id("key-expiry").select_option("30d")
            with page.expect_response(lambda r: r.url.endswith("/v1/keys") and r.request.method == "POST") as created:
                page.get_by_test_id("key-create").click()
            seen["create_status"] = created.value.status
            seen["create_body"] = created.value.json()
            page.get_by_test_id("key-secret-box").wait_for(state="visible")
            secret = page.get_by_test_id("key-secret").input_value()
            seen["secret"] = secret
            seen["note"] = page.get_by_test_id("key-secret-note").inner_text()
            seen["name_after"] = page.get_by_test_id("key-name").input_value()
            expect(page.get_by_test_id("key-item")).to_have_count(1)
            page.screenshot_as("keys-created")

            page.get_by_test_id("key-copy").click()
            expect(page.get_by_test_id("key-copy")).to_have_text("Copied")
            seen["clipboard"] = page.evaluate("navigator.clipboard.readText()")

            item = page.get_by_test_id("key-item")
            seen["item_name"] = item.get_by_test_id("key-item-name").inner_text()
            seen["item_prefix"] = item.get_by_test_id("key-prefix").inner_text()
            seen["item_scopes"] = item.get_by_test_id("key-scope-badge").all_inner_texts()
            seen["item_team"] = item.get_by_test_id("key-team-badge").inner_text()
            seen["item_dates"] = item.get_by_test_id("key-dates").inner_text()
            seen["storage_open"] = page.evaluate(STORAGE)
            seen["dom_open"] = page.evaluate(FIND_IN_DOM, secret)

            seen["models_with_key"] = on_reactor(self.models_with, secret)
            self.flush_batches()  # its last use is written

            page.get_by_test_id("keys-close").click()
            page.get_by_test_id("keys-dialog").wait_for(state="hidden")
            seen["storage_closed"] = page.evaluate(STORAGE)
            seen["dom_closed"] = page.evaluate(FIND_IN_DOM, secret)
            seen["cookies_closed"] = json.dumps(page.context.cookies())

            # Reopened: the key is listed (now with its last use), its secret is not shown.
            open_keys(page)
            expect(page.get_by_test_id("key-item")).to_have_count(1)
            seen["secret_box_reopened"] = page.get_by_test_id("key-secret-box").is_visible()
            seen["dom_reopened"] = page.evaluate(FIND_IN_DOM, secret)
            seen["dates_reopened"] = page.get_by_test_id("key-dates").inner_text()
            page.screenshot_as("keys-list")

            # Revoke: cancel keeps it; confirm revokes it.
            page.get_by_test_id("key-revoke").click()
            confirm = page.get_by_test_id("revoke-dialog")
            confirm.wait_for(state="visible")
            seen["confirm_text"] = confirm.inner_text()
            page.screenshot_as("keys-revoke-confirm")
            page.get_by_test_id("cancel-revoke").click()
            confirm.wait_for(state="hidden")
            seen["after_cancel"] = page.get_by_test_id("key-item").count()
            seen["dialog_open_after_cancel"] = page.get_by_test_id("keys-dialog").is_visible()
            seen["models_after_cancel"] = on_reactor(self.models_with, secret)[0]
            page.get_by_test_id("key-revoke").click()
            confirm.wait_for(state="visible")
            with page.expect_response(lambda r: "/v1/keys/" in r.url and r.request.method == "DELETE") as deleted:
                page.get_by_test_id("confirm-revoke").click()
            seen["delete_status"] = deleted.value.status
            expect(page.get_by_test_id("key-item")).to_have_count(0)
            expect(page.get_by_test_id("keys-status")).to_have_text("You have no API keys yet.")
            seen["models_after_revoke"] = on_reactor(self.models_with, secret)
            page.keyboard.press("Escape")
            page.get_by_test_id("keys-dialog").wait_for(state="hidden")
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertTrue(seen["quota_hidden"])
        self.assertEqual(seen["title"], "API keys")
        self.assertEqual(seen["scopes"], ["chat:read", "chat:write", "history:team-a"])
        self.assertEqual(seen["scopes_checked"], [True, True, True])
        self.assertEqual(seen["teams"], ["No team", "team-a"])
        self.assertEqual(seen["expiry"], "90d")
        self.assertEqual(seen["expiry_options"], ["30d", "90d", "365d"])
        self.assertEqual(seen["no_name"], "Give the key a name.")

        secret = seen["secret"]
        self.assertRegex(secret, r"^cb-[0-9A-Za-z]{43}$")
        self.assertEqual(seen["create_status"], 201)
        made = seen["create_body"]
        self.assertEqual(made["key"], secret)
        self.assertEqual((made["name"], made["scopes"], made["team"]), ("laptop script", ["chat:read", "chat:write"], "team-a"))
        self.assertIn("will not be shown again", seen["note"])
        self.assertEqual(seen["name_after"], "")
        self.assertEqual(seen["clipboard"], secret)

        self.assertEqual(seen["item_name"], "laptop script")
        self.assertEqual(seen["item_prefix"], made["prefix"] + "…")
        self.assertTrue(secret.startswith(made["prefix"]))
        self.assertEqual(seen["item_scopes"], ["chat:read", "chat:write"])
        self.assertEqual(seen["item_team"], "Team: team-a")
        self.assertIn("Created", seen["item_dates"])
        self.assertIn("Expires", seen["item_dates"])
        self.assertIn("Never used", seen["item_dates"])

        # The secret: in the open panel's field only, in no storage, gone once closed.
        self.assertTrue(seen["dom_open"]["values"])
        self.assertFalse(seen["dom_open"]["html"] or seen["dom_open"]["attrs"])
        for where in ("storage_open", "storage_closed", "cookies_closed"):
            self.assertNotIn(secret, seen[where], where)
            self.assertNotIn(secret[3:], seen[where], where)
        self.assertEqual(seen["dom_closed"], NOWHERE)
        self.assertEqual(seen["dom_reopened"], NOWHERE)
        self.assertFalse(seen["secret_box_reopened"])
        self.assertIn("Last used", seen["dates_reopened"])

        code, body = seen["models_with_key"]
        self.assertEqual(code, 200, body)
        self.assertTrue(body["data"])

        self.assertIn("Revoke key?", seen["confirm_text"])
        self.assertIn("“laptop script”", seen["confirm_text"])
        self.assertIn(made["prefix"], seen["confirm_text"])
        self.assertEqual(seen["after_cancel"], 1)
        self.assertTrue(seen["dialog_open_after_cancel"])
        self.assertEqual(seen["models_after_cancel"], 200)
        self.assertEqual(seen["delete_status"], 204)
        code, body = seen["models_after_revoke"]
        self.assertEqual(code, 401, body)
        self.assertIn("error", body)

        # The gateway agrees: alice has no live key.
        code, _, listed = await get_json(f"{self.gw.url}/v1/keys", headers=self.api_as("alice"))
        self.assertEqual((code, listed["data"]), (200, []))

    async def test_panel_on_a_dark_phone_in_chinese(self):
        """
        On a phone (dark, Chinese) the panel opens from the drawer, speaks
        Chinese, fits the screen width (the form and the secret's row
        included), and a key made there shows its secret; closing forgets it.
        """

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url, viewport=PHONE, locale="zh-CN", color_scheme="dark", is_mobile=True, has_touch=True)
            open_keys(page)
            expect(page.get_by_test_id("sidebar")).to_be_hidden()  # the drawer made way
            seen["title"] = page.get_by_test_id("keys-dialog").locator("h2").inner_text()
            seen["create_label"] = page.get_by_test_id("key-create").inner_text()
            expect(page.get_by_test_id("keys-status")).to_have_text("你还没有 API 密钥。")
            page.screenshot_as("keys-phone-zh-dark")
            page.get_by_test_id("key-name").fill("手机脚本")
            page.get_by_test_id("key-create").click()
            page.get_by_test_id("key-secret-box").wait_for(state="visible")
            secret = page.get_by_test_id("key-secret").input_value()
            seen["note"] = page.get_by_test_id("key-secret-note").inner_text()
            expect(page.get_by_test_id("key-item")).to_have_count(1)
            seen["item_name"] = page.get_by_test_id("key-item-name").inner_text()
            seen["item_dates"] = page.get_by_test_id("key-dates").inner_text()
            seen["fits"] = page.evaluate(
                """() => {
                    const d = document.querySelector("[data-testid=keys-dialog]");
                    const r = d.getBoundingClientRect();
                    const inside = [...d.querySelectorAll("input, select, button, .key-item")].every(e => {
                        const b = e.getBoundingClientRect();
                        return b.left >= r.left - 0.5 && b.right <= r.right + 0.5;
                    });
                    return {dialog: r.left >= 0 && r.right <= window.innerWidth, scroll: d.scrollWidth <= d.clientWidth, inside,
                            page: document.documentElement.scrollWidth <= window.innerWidth};
                }"""
            )
            seen["background"] = page.evaluate("getComputedStyle(document.querySelector('[data-testid=keys-dialog]')).backgroundColor")
            page.screenshot_as("keys-phone-zh-dark-created")
            page.get_by_test_id("keys-close").click()
            page.get_by_test_id("keys-dialog").wait_for(state="hidden")
            seen["dom_closed"] = page.evaluate(FIND_IN_DOM, secret)
            seen["storage_closed"] = page.evaluate(STORAGE)
            seen["secret"] = secret
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["title"], "API 密钥")
        self.assertEqual(seen["create_label"], "创建密钥")
        self.assertIn("不会再次显示", seen["note"])
        self.assertEqual(seen["item_name"], "手机脚本")
        self.assertIn("从未使用", seen["item_dates"])
        self.assertEqual(seen["fits"], {"dialog": True, "scroll": True, "inside": True, "page": True})
        # Dark: the panel's background is the dark elevated colour (#232327).
        self.assertEqual(seen["background"], "rgb(35, 35, 39)")
        self.assertEqual(seen["dom_closed"], NOWHERE)
        self.assertNotIn(seen["secret"], seen["storage_closed"])


class PageQuota(SignedInPage, TestCase):
    EXTRA = f"quotas: {{tokens_per_day: {TOKENS_PER_DAY}, requests_per_day: {REQUESTS_PER_DAY}}}"

    async def usage_total(self):
        """alice's tokens today as the gateway accounts them (after a flush)."""
        await self.gw.parts.batches.run()
        code, _, body = await get_json(f"{self.gw.url}/v1/usage", headers=self.api_as("alice"))
        self.assertEqual(code, 200, body)
        return sum(r["prompt_tokens"] + r["completion_tokens"] for r in body["data"])

    async def test_quota_line_after_each_reply(self):
        """
        With quotas: {tokens_per_day, requests_per_day}, nothing shows before
        the first reply; after each reply a line under the composer says
        how many tokens and requests are left (the reply's own included, as
        the gateway accounts them) and when that resets; it follows the
        language.  Once the requests are spent, the next message is refused
        with 429 QUOTA_EXCEEDED, shown in the conversation as errors are,
        naming the quota.
        """

        def left(text):
            tokens = re.search(r"Tokens left: ([\d,]+)", text)
            requests = re.search(r"Requests left: ([\d,]+)", text)
            return int(tokens.group(1).replace(",", "")), int(requests.group(1).replace(",", ""))

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            seen["before"] = page.get_by_test_id("quota").is_visible()
            with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions") and r.request.method == "POST") as first:
                send(page, "hello there")
            seen["headers"] = {k: v for k, v in first.value.headers.items() if k.startswith("x-clawdbot-quota")}
            quota = page.get_by_test_id("quota")
            quota.wait_for(state="visible")
            seen["first"] = quota.inner_text()
            seen["first_title"] = quota.get_attribute("title")
            seen["usage_first"] = on_reactor(self.usage_total)
            page.screenshot_as("quota-line")

            send(page, "and again")
            expect(quota).not_to_have_text(seen["first"])
            seen["second"] = quota.inner_text()
            seen["usage_second"] = on_reactor(self.usage_total)

            page.get_by_test_id("lang-switch").select_option("zh-CN")
            # The line is painted again after the switch, not at once.
            expect(quota).to_contain_text("剩余")
            seen["zh"] = quota.inner_text()
            page.get_by_test_id("lang-switch").select_option("en")

            with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions") and r.request.method == "POST") as refused:
                page.get_by_test_id("composer").fill("one more")
                page.get_by_test_id("send").click()
            seen["refused_status"] = refused.value.status
            seen["refused_body"] = refused.value.json()
            page.get_by_test_id("message-error").wait_for()
            seen["error"] = page.get_by_test_id("message-error").inner_text()
            seen["after_refusal"] = quota.inner_text()
            seen["finished"] = page.locator(FINAL).count()
            seen["retry"] = page.get_by_test_id("retry-send").count()
            page.screenshot_as("quota-refused")
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertFalse(seen["before"])
        # The first call: every token left before it, and one request fewer with it.
        self.assertEqual(seen["headers"]["x-clawdbot-quota-remaining-tokens"], str(TOKENS_PER_DAY))
        self.assertEqual(seen["headers"]["x-clawdbot-quota-remaining-requests"], str(REQUESTS_PER_DAY - 1))
        self.assertGreater(int(seen["headers"]["x-clawdbot-quota-reset"]), 0)

        self.assertGreater(seen["usage_first"], 0)
        self.assertEqual(left(seen["first"]), (TOKENS_PER_DAY - seen["usage_first"], REQUESTS_PER_DAY - 1))
        self.assertEqual(left(seen["second"]), (TOKENS_PER_DAY - seen["usage_second"], 0))
        self.assertRegex(seen["first"], r"resets in \d+ (day|hr|min|sec)")
        self.assertIn(f"{TOKENS_PER_DAY - seen['usage_first']:,}", seen["first"])
        self.assertTrue(seen["first_title"])
        self.assertIn("剩余 token", seen["zh"])
        self.assertIn("后重置", seen["zh"])

        self.assertEqual(seen["refused_status"], 429)
        self.assertEqual(seen["refused_body"]["error"]["code"], "QUOTA_EXCEEDED")
        self.assertIn("You have used up your quota", seen["error"])
        self.assertIn("requests_per_day", seen["error"])
        self.assertEqual(seen["after_refusal"], seen["second"])
        # The refused message was never taken: it stays, with Retry, and no reply is added for it.
        self.assertEqual(seen["finished"], 2)
        self.assertEqual(seen["retry"], 1)
