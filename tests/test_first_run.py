"""
A newcomer's first minutes (issue 20, first items): what the gateway says
at start, and the page on each port in dev mode, in Debian's Chromium
driven by Playwright (tests/browser.py), with the fake Ollama behind.
"""

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from testing.fake_ollama import FakeOllama
from tests import helpers
from tests.browser import run_in_browser
from tests.helpers import serve
from tests.test_page_e2e import FINAL


class DevModeFirstRunTests(TestCase):
    timeout = 120

    async def test_the_printed_address_works_and_the_other_says_what_to_do(self):
        """The debug port's line says to open it; its page chats with no sign-in. The secure port's page, with no single sign-on set up, hides Sign in and says where to go instead."""
        fake = FakeOllama()
        fake.listen(reactor)
        self.addCleanup(fake.stop)
        gw = serve(self, f'backend: {{url: "{fake.url}"}}')
        debug_line = [line for line in gw.said if line.startswith("Debug port listening on")]
        self.assertEqual(len(debug_line), 1)
        self.assertTrue(debug_line[0].endswith("open it in a browser to chat"), debug_line)
        await helpers.until(lambda: any("Ollama at" in line for line in gw.said), what="the start-up check")
        self.assertIn(f"Ollama at {fake.url} answers", gw.said)

        def script(browser, secure, debug):
            seen = {}
            page = browser.new_page()
            page.goto(secure + "/")
            page.get_by_test_id("signin").wait_for(state="attached")
            page.locator("#signin-message").wait_for(state="visible")
            seen["message"] = page.locator("#signin-message").inner_text()
            seen["signin_visible"] = page.get_by_test_id("signin").is_visible()
            page.screenshot_as("first-run-secure-port")
            seen["secure_problems"] = page.problems(origin=secure)
            chat = browser.new_page()
            chat.goto(debug + "/")
            chat.get_by_test_id("composer").wait_for(state="visible")
            chat.get_by_test_id("composer").fill("hello")
            chat.get_by_test_id("send").click()
            chat.locator(FINAL).first.wait_for(timeout=20000)
            seen["reply"] = chat.locator(FINAL).first.inner_text()
            chat.screenshot_as("first-run-debug-port")
            seen["debug_problems"] = chat.problems(origin=debug)
            return seen

        seen = await run_in_browser(script, gw.url, gw.debug_url)
        self.assertIn("isn't set up", seen["message"])
        self.assertIn("18789", seen["message"])
        self.assertFalse(seen["signin_visible"])
        self.assertEqual(seen["secure_problems"], [])
        self.assertIn(fake.reply_text.split()[0], seen["reply"])
        self.assertEqual(seen["debug_problems"], [])
