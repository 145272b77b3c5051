"""
The chat page's send and navigation flows, end to end (issue 20, items 5-8,
11 and 14 in part): Debian's Chromium through Playwright (tests/browser.py)
against a real gateway in this process, signed in through the real IdP
(tests/idp.py), in front of the fake Ollama.

- Images stay with their turn: shown again after a reload, sent again as
  context and when the turn is regenerated.
- A send the server never got keeps its text: Retry, and the composer
  after a reload.
- Leaving a chat while its reply streams does not cut the reply off; Stop
  still does.
- "New chat" saves nothing until its first message is accepted.
- Drafts survive an expired sign-in, and the page returns to the chat.
- Regenerate the last reply; edit a message and resend it as a new chat.

Screenshots of each new state go to artifacts/screenshots/flow-*.png.
"""

import json
import re

import yaml
from playwright.sync_api import expect
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread
from twisted.trial.unittest import TestCase

from testing.fake_ollama import FakeOllama
from tests.browser import run_in_browser
from tests.helpers import get_json, reserved_port
from tests import test_page_e2e as e2e
from tests.test_page_e2e import FINAL, current_session_id, on_reactor, send, sign_in, signed_in_gateway, small_png

STORY = " ".join(f"tale{i:02d}" for i in range(30))


def story_for(path, body):
    """The fake model's answer: a story when asked for one, else its usual reply."""
    messages = body.get("messages") or []
    last = messages[-1].get("content", "") if messages else ""
    return STORY if "story" in last else None


def drafts(page):
    """The page's sessionStorage, as {key: parsed value}."""
    return page.evaluate("Object.fromEntries(Object.keys(sessionStorage).map((k) => [k, JSON.parse(sessionStorage.getItem(k))]))")


def wait_words(page, n, nth=-1):
    """Wait until the nth assistant message shows at least n words."""
    page.wait_until(
        "(() => { const all = document.querySelectorAll('[data-testid=message-assistant] [data-testid=message-content]');"
        f" const m = all[{nth} < 0 ? all.length + ({nth}) : {nth}];"
        f" return m && m.textContent.trim().split(/\\s+/).filter(Boolean).length >= {n}; }})()",
        timeout=20,
    )


class Flow(TestCase):
    timeout = 180
    api_as = e2e.PageE2E.api_as  # a session JWT for a user of the IdP

    def setUp(self):
        signed_in_gateway(self)
        self.fake.reply_hook = story_for

    def chat_requests(self):
        return [r.body for r in self.fake.requests_to("/api/chat")]

    async def stored(self, sid, sub="alice"):
        code, _, body = await get_json(f"{self.gw.url}/v1/sessions/{sid}", headers=self.api_as(sub))
        self.assertEqual(code, 200, body)
        return body

    async def owned(self, sub="alice"):
        code, _, body = await get_json(f"{self.gw.url}/v1/sessions", headers=self.api_as(sub, "chat:read"))
        self.assertEqual(code, 200, body)
        return [s for s in body["data"] if s["owner"] == sub]

    def released_when_stored(self, url, sid, count):
        """From the browser thread: the session's stored messages once it has count of them and is not replying."""

        async def wait():
            body = None
            for _ in range(200):
                code, _, body = await get_json(f"{url}/v1/sessions/{sid}", headers=self.api_as("alice"))
                if code == 200 and len(body["messages"]) >= count and not body.get("replying"):
                    return body
                await deferLater(reactor, 0.05)
            return body

        return on_reactor(wait)

    async def test_images_stay_with_their_turn(self):
        """
        An uploaded image goes with its turn: regenerating that reply sends
        it again, a follow-up question reaches the model with it in the
        context, and after a reload the user's message still shows it.
        """
        png = small_png(160, 100)

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            page.get_by_test_id("file-input").set_input_files({"name": "blue.png", "mimeType": "image/png", "buffer": png})
            page.get_by_test_id("attachment").wait_for()
            send(page, "what is in this picture?")
            page.get_by_test_id("regenerate").click()
            page.wait_until("document.querySelectorAll('[data-testid=message-assistant]').length === 1 && !document.querySelector('[data-testid=message-assistant][data-state=streaming]')")
            page.get_by_test_id("regenerate").wait_for()
            send(page, "and what colour is it?")
            seen["sid"] = current_session_id(page)
            page.reload()
            page.locator(FINAL).nth(1).wait_for()
            user = page.get_by_test_id("message-user").first
            seen["images_after_reload"] = user.locator("img").evaluate_all("imgs => imgs.map(i => [i.getAttribute('src').slice(0, 16), i.naturalWidth > 0])")
            seen["placeholders"] = page.locator(".msg-image-placeholder").count()
            seen["texts"] = page.get_by_test_id("message-user").all_inner_texts()
            page.screenshot_as("flow-image-history")
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        first, regenerated, follow_up = self.chat_requests()
        # Regenerate: the same turn, its image included.
        self.assertEqual(regenerated["messages"][-1]["content"], "what is in this picture?")
        self.assertEqual(len(regenerated["messages"][-1].get("images") or []), 1)
        self.assertEqual([m["role"] for m in regenerated["messages"]], ["user"])
        # The follow-up: the image is in the context, with its turn.
        self.assertEqual([(m["role"], len(m.get("images") or [])) for m in follow_up["messages"]], [("user", 1), ("assistant", 0), ("user", 0)])
        self.assertEqual(follow_up["messages"][-1]["content"], "and what colour is it?")
        self.assertEqual(seen["images_after_reload"], [["data:image/jpeg;", True]])
        self.assertEqual(seen["placeholders"], 0)
        self.assertEqual(seen["texts"], ["what is in this picture?", "and what colour is it?"])
        stored = await self.stored(seen["sid"])
        self.assertEqual(len(stored["messages"]), 4)
        self.assertIsInstance(stored["messages"][0]["content"], list)

    async def test_leaving_a_chat_does_not_cut_its_reply(self):
        """
        A reply goes on on the server when its chat is left: switching to
        another chat and back shows "Still writing a reply…" until it is
        done, then the whole reply (not "Incomplete reply"); the same after
        a reload mid-reply.  Stop still stops it, stored incomplete.
        """

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            send(page, "hello there")
            seen["other"] = other = current_session_id(page)
            page.get_by_test_id("new-session").click()
            expect(page.get_by_test_id("message-assistant")).to_have_count(0)

            # Leave while the reply streams, come back.
            blockingCallFromThread(reactor, lambda: self.fake.hold(after=6, times=1))
            page.get_by_test_id("composer").fill("tell me a story")
            with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as caught:
                page.get_by_test_id("send").click()
            seen["body"] = json.loads(caught.value.post_data)
            wait_words(page, 3)
            seen["sid"] = sid = current_session_id(page)
            page.locator(f"[data-session-id='{other}'] .session-open").click()
            expect(page.get_by_test_id("message-user")).to_have_text(["hello there"])
            page.locator(f"[data-session-id='{sid}'] .session-open").click()
            page.get_by_test_id("reply-pending").wait_for()
            seen["pending_text"] = page.get_by_test_id("reply-pending").inner_text()
            seen["stop_while_pending"] = page.get_by_test_id("stop").is_visible()
            page.screenshot_as("flow-reply-pending")
            blockingCallFromThread(reactor, self.fake.release)
            page.locator(FINAL).wait_for(timeout=20000)
            expect(page.get_by_test_id("reply-pending")).to_have_count(0)
            seen["back"] = [page.get_by_test_id("message-assistant").get_attribute("data-state"), page.get_by_test_id("message-content").inner_text().strip()]

            # Reload while the next reply streams.
            blockingCallFromThread(reactor, lambda: self.fake.hold(after=6, times=1))
            page.get_by_test_id("composer").fill("another story please")
            page.get_by_test_id("send").click()
            wait_words(page, 3, nth=1)
            page.reload()
            page.get_by_test_id("reply-pending").wait_for()
            blockingCallFromThread(reactor, self.fake.release)
            page.locator(f"{FINAL} >> nth=1").wait_for(timeout=20000)
            seen["reloaded"] = [(m.get_attribute("data-state"), m.get_by_test_id("message-content").inner_text().strip()) for m in page.get_by_test_id("message-assistant").all()]

            # Stop still stops (on the server too).
            blockingCallFromThread(reactor, lambda: self.fake.hold(after=6, times=1))
            page.get_by_test_id("composer").fill("one more story")
            page.get_by_test_id("send").click()
            wait_words(page, 3, nth=2)
            page.get_by_test_id("stop").click()
            page.locator("[data-testid=message-assistant][data-state=incomplete]").wait_for(timeout=10000)
            seen["stopped_status"] = page.get_by_test_id("message-status").inner_text()
            seen["stored"] = self.released_when_stored(url, sid, 6)
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertIs(seen["body"]["finish_on_disconnect"], True)
        self.assertEqual(seen["body"]["session_id"], seen["sid"])
        self.assertEqual(seen["pending_text"], "Still writing a reply…")
        self.assertTrue(seen["stop_while_pending"])
        self.assertEqual(seen["back"], ["done", STORY])
        self.assertEqual(seen["reloaded"], [("done", STORY), ("done", STORY)])
        self.assertEqual(seen["stopped_status"], "Stopped")
        messages = seen["stored"]["messages"]
        self.assertEqual([(m["role"], m["incomplete"]) for m in messages], [("user", False), ("assistant", False)] * 2 + [("user", False), ("assistant", True)])
        self.assertEqual([m["content"] for m in messages[:4]], ["tell me a story", STORY, "another story please", STORY])
        self.assertTrue(STORY.startswith(messages[5]["content"]))
        self.assertLess(len(messages[5]["content"]), len(STORY))
        self.assertFalse((await self.stored(seen["sid"]))["replying"])

    async def test_leaving_a_temporary_chat_asks_first(self):
        """
        Without history (the gateway answers 404 for /v1/sessions) a chat is
        temporary: "New chat" while its reply streams asks first (Cancel
        keeps the reply going, Leave cuts it off), and leaving the page
        gets the browser's "leave this page?" prompt.
        """
        not_found = json.dumps({"error": {"message": "Not found", "type": "invalid_request_error", "param": None, "code": "NOT_FOUND"}})

        def script(browser, url):
            seen = {"dialogs": []}
            page = browser.new_page()
            page.route(re.compile(r".*/v1/sessions(\?.*)?$"), lambda route: route.fulfill(status=404, content_type="application/json", body=not_found))
            page.goto(url + "/")
            page.get_by_test_id("signin").click()
            page.locator("input[name=login]").fill("alice")
            page.locator("button[type=submit]").click()
            page.get_by_test_id("composer").wait_for(state="visible")
            page.wait_for_load_state("networkidle")
            blockingCallFromThread(reactor, lambda: self.fake.hold(after=6, times=1))
            page.get_by_test_id("composer").fill("tell me a story")
            with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as caught:
                page.get_by_test_id("send").click()
            seen["body"] = json.loads(caught.value.post_data)
            wait_words(page, 3)
            page.get_by_test_id("new-session").click()
            dialog = page.get_by_test_id("confirm-dialog")
            dialog.wait_for(state="visible")
            seen["dialog"] = dialog.inner_text()
            page.screenshot_as("flow-leave-temporary")
            page.get_by_test_id("cancel-delete").click()
            dialog.wait_for(state="hidden")
            seen["after_cancel"] = [page.get_by_test_id("message-user").count(), page.get_by_test_id("stop").is_visible()]

            page.on("dialog", lambda d: (seen["dialogs"].append(d.type), d.dismiss()))
            page.close(run_before_unload=True)
            page.wait_for_timeout(500)
            seen["still_open"] = not page.is_closed()

            page.get_by_test_id("new-session").click()
            dialog.wait_for(state="visible")
            page.get_by_test_id("confirm-delete").click()
            expect(page.get_by_test_id("message-user")).to_have_count(0)
            seen["stop_after_leave"] = page.get_by_test_id("stop").is_visible()
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.fake.release()
        self.assertEqual(seen["problems"], [])
        self.assertNotIn("session_id", seen["body"])
        self.assertNotIn("finish_on_disconnect", seen["body"])
        self.assertIn("Stop this reply?", seen["dialog"])
        self.assertIn("Leave", seen["dialog"])
        self.assertEqual(seen["after_cancel"], [1, True])
        self.assertEqual(seen["dialogs"], ["beforeunload"])
        self.assertTrue(seen["still_open"])
        self.assertFalse(seen["stop_after_leave"])

    async def test_regenerate_and_edit(self):
        """
        Regenerate asks again for the last reply (the old answer is gone,
        here and on the server); editing an earlier message and sending it
        forks the chat: a new chat, first in the list, with the messages
        before the edited one and the edited text, while the original chat
        stays as it was.
        """
        answers = iter(f"answer number {i}" for i in range(1, 10))
        self.fake.reply_hook = lambda path, body: next(answers)

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            send(page, "first question")
            send(page, "second question")
            seen["sid"] = current_session_id(page)
            seen["regenerate_buttons"] = page.get_by_test_id("regenerate").count()
            seen["regenerate_on_last"] = page.get_by_test_id("message-assistant").nth(1).get_by_test_id("regenerate").count()
            page.get_by_test_id("regenerate").click()
            page.locator("[data-testid=message-assistant][data-state=done]").filter(has_text="answer number 3").wait_for()
            seen["after_regenerate"] = page.get_by_test_id("message-content").all_inner_texts()
            page.screenshot_as("flow-regenerated")

            first = page.get_by_test_id("message-user").first
            first.hover()
            first.get_by_test_id("edit-message").click()
            edit = page.get_by_test_id("edit-input")
            seen["edit_value"] = edit.input_value()
            edit.fill("first question, put better")
            page.screenshot_as("flow-edit")
            page.get_by_test_id("edit-cancel").click()
            seen["after_cancel"] = [page.get_by_test_id("edit-input").count(), first.inner_text()]
            seen["focus_after_cancel"] = page.evaluate("document.activeElement.dataset.testid")
            # Esc in the box cancels too, and leaves focus on Edit (not on the page, where Esc stops a reply).
            first.get_by_test_id("edit-message").click()
            page.get_by_test_id("edit-input").press("Escape")
            seen["focus_after_escape"] = page.evaluate("document.activeElement.dataset.testid")
            # While a reply is being written, Edit waits.
            blockingCallFromThread(reactor, lambda: self.fake.hold(after=2, times=1))
            page.get_by_test_id("composer").fill("a slow one")
            page.get_by_test_id("send").click()
            page.get_by_test_id("stop").wait_for()
            seen["edit_while_busy"] = first.get_by_test_id("edit-message").is_disabled()
            blockingCallFromThread(reactor, self.fake.release)
            page.get_by_test_id("send").wait_for()
            expect(first.get_by_test_id("edit-message")).to_be_enabled()
            first.hover()
            first.get_by_test_id("edit-message").click()
            page.get_by_test_id("edit-input").fill("first question, put better")
            page.get_by_test_id("edit-send").click()
            page.wait_until(f"location.hash && !location.hash.includes({json.dumps(seen['sid'])})")
            page.locator(FINAL).wait_for(timeout=20000)
            seen["fork"] = current_session_id(page)
            seen["fork_messages"] = [page.get_by_test_id("message-user").all_inner_texts(), page.get_by_test_id("message-content").all_inner_texts()]
            seen["first_in_list"] = page.get_by_test_id("session-item").first.get_attribute("data-session-id")
            page.screenshot_as("flow-edited-fork")
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual((seen["regenerate_buttons"], seen["regenerate_on_last"]), (1, 1))
        self.assertEqual(seen["after_regenerate"], ["answer number 1", "answer number 3"])
        requests = self.chat_requests()
        self.assertEqual([m["content"] for m in requests[2]["messages"]], ["first question", "answer number 1", "second question"])
        original = await self.stored(seen["sid"])
        self.assertEqual([m["content"] for m in original["messages"][:4]], ["first question", "answer number 1", "second question", "answer number 3"])

        self.assertEqual(seen["edit_value"], "first question")
        self.assertEqual(seen["after_cancel"], [0, "first question"])
        self.assertEqual((seen["focus_after_cancel"], seen["focus_after_escape"]), ("edit-message", "edit-message"))
        self.assertTrue(seen["edit_while_busy"])
        self.assertNotEqual(seen["fork"], seen["sid"])
        self.assertEqual(seen["fork_messages"], [["first question, put better"], ["answer number 5"]])
        self.assertEqual(seen["first_in_list"], seen["fork"])
        self.assertEqual(requests[4]["messages"], [{"role": "user", "content": "first question, put better"}])
        fork = await self.stored(seen["fork"])
        self.assertEqual([m["content"] for m in fork["messages"]], ["first question, put better", "answer number 5"])
        # The original chat has only the slow turn added since.
        after = await self.stored(seen["sid"])
        self.assertEqual([m["content"] for m in after["messages"][4:]], ["a slow one", "answer number 4"])
        self.assertEqual(len(after["messages"]), 6)

    async def test_drafts_survive_an_expired_sign_in(self):
        """
        What the composer holds is kept per chat in sessionStorage: when the
        sign-in expires, signing in again reopens the chat that was open,
        with its draft; a reload keeps the draft too; signing out on
        purpose forgets the user's drafts.
        """
        # Short session tokens: the page renews them every 15 s.
        with open(self.gw.config_path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        config["oauth2"]["session_ttl"] = 30
        with open(self.gw.config_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(config, f)
        self.gw.parts.runtime.reload()

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            send(page, "a chat to come back to")
            seen["sid"] = sid = current_session_id(page)
            page.get_by_test_id("composer").fill("half-written thought")
            page.wait_until(f"sessionStorage.getItem('clawdbot.draft.alice.{sid}') !== null")
            seen["stored"] = drafts(page)
            page.reload()
            page.locator(FINAL).wait_for()
            seen["after_reload"] = page.get_by_test_id("composer").input_value()
            # Elsewhere, the new chat's own draft.
            page.get_by_test_id("new-session").click()
            seen["new_chat_composer"] = page.get_by_test_id("composer").input_value()
            page.get_by_test_id("composer").fill("a new chat's draft")
            page.locator(f"[data-session-id='{sid}'] .session-open").click()
            page.locator(FINAL).wait_for()
            seen["back_in_chat"] = page.get_by_test_id("composer").input_value()

            # The sign-in expires: the refresh cookie is gone when the token is renewed.
            page.context.clear_cookies()
            page.get_by_test_id("signin-screen").wait_for(state="visible", timeout=60000)
            seen["signin_message"] = page.get_by_test_id("signin-message").inner_text()
            page.screenshot_as("flow-signin-expired")
            page.get_by_test_id("signin").click()
            page.locator("input[name=login]").fill("alice")
            page.locator("button[type=submit]").click()
            page.get_by_test_id("composer").wait_for(state="visible")
            page.locator(FINAL).wait_for()
            expect(page.get_by_test_id("composer")).to_have_value("half-written thought")
            seen["returned_to"] = current_session_id(page)
            seen["messages"] = page.get_by_test_id("message-user").all_inner_texts()
            page.screenshot_as("flow-draft-after-signin")
            page.get_by_test_id("new-session").click()
            seen["new_chat_after_signin"] = page.get_by_test_id("composer").input_value()

            page.get_by_test_id("signout").click()
            page.locator("button[name=logout]").click()
            page.get_by_test_id("signin-screen").wait_for(state="visible")
            seen["after_signout"] = drafts(page)

            # Someone else's draft left in the tab (an expired sign-in, then another user) is gone once bob signs in.
            page.evaluate("sessionStorage.setItem('clawdbot.draft.alice.sess_left', JSON.stringify({text: 'alice private draft', images: []}))")
            page.get_by_test_id("signin").click()
            page.locator("input[name=login]").fill("bob")
            page.locator("button[type=submit]").click()
            page.get_by_test_id("composer").wait_for(state="visible")
            seen["after_bob"] = drafts(page)
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        sid = seen["sid"]
        self.assertEqual(seen["stored"], {f"clawdbot.draft.alice.{sid}": {"text": "half-written thought", "images": []}})
        self.assertEqual(seen["after_reload"], "half-written thought")
        self.assertEqual(seen["new_chat_composer"], "")
        self.assertEqual(seen["back_in_chat"], "half-written thought")
        self.assertEqual(seen["signin_message"], "Your session has ended. Please sign in again.")
        self.assertEqual(seen["returned_to"], sid)
        self.assertEqual(seen["messages"], ["a chat to come back to"])
        self.assertEqual(seen["new_chat_after_signin"], "a new chat's draft")
        self.assertEqual(seen["after_signout"], {})
        self.assertEqual(seen["after_bob"], {})


class FlowWithBackendDown(TestCase):
    """The model backend is down (the gateway answers 502) until the test starts it."""

    timeout = 180
    api_as = e2e.PageE2E.api_as  # a session JWT for a user of the IdP
    owned = Flow.owned

    def setUp(self):
        port = reserved_port(self)
        self.back = FakeOllama()
        self.addCleanup(self.back.stop)
        signed_in_gateway(self, backend=lambda fake: f'url: "http://127.0.0.1:{port}"')
        self.back_port = port

    def backend_comes_back(self):
        """From the browser thread: the model backend starts listening."""
        blockingCallFromThread(reactor, lambda: self.back.listen(reactor, port=self.back_port))

    async def test_failed_send_keeps_the_message(self):
        """
        A send the gateway refuses (the backend is down) keeps the message:
        it stays in the conversation with the error and Retry, and as the
        chat's draft, so a reload puts it back in the composer.  Once the
        backend is back, Retry sends the same text and images; then the
        draft is gone.
        """
        png = small_png(80, 60)

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            page.get_by_test_id("file-input").set_input_files({"name": "chart.png", "mimeType": "image/png", "buffer": png})
            page.get_by_test_id("attachment").wait_for()
            page.get_by_test_id("composer").fill("please keep this message")
            page.get_by_test_id("send").click()
            page.get_by_test_id("retry-send").wait_for()
            seen["error"] = page.get_by_test_id("message-error").inner_text()
            seen["user"] = [page.get_by_test_id("message-user").inner_text(), page.get_by_test_id("message-user").locator("img").count()]
            seen["composer"] = page.get_by_test_id("composer").input_value()
            page.screenshot_as("flow-send-failed")

            page.reload()
            page.get_by_test_id("composer").wait_for(state="visible")
            expect(page.get_by_test_id("composer")).to_have_value("please keep this message")
            seen["attachments_after_reload"] = page.get_by_test_id("attachment").count()
            page.screenshot_as("flow-draft-restored")
            page.get_by_test_id("send").click()
            page.get_by_test_id("retry-send").wait_for()

            self.backend_comes_back()
            page.get_by_test_id("retry-send").click()
            page.locator(FINAL).wait_for(timeout=20000)
            seen["after_retry"] = [
                page.get_by_test_id("message-user").all_inner_texts(),
                page.get_by_test_id("message-error").count(),
                page.get_by_test_id("message-assistant").get_attribute("data-state"),
            ]
            seen["sid"] = current_session_id(page)
            page.reload()
            page.locator(FINAL).wait_for()
            seen["composer_after"] = page.get_by_test_id("composer").input_value()
            seen["storage_after"] = page.evaluate("Object.keys(sessionStorage)")
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertIn("unavailable", seen["error"].lower())
        self.assertIn("Retry", seen["error"])
        self.assertEqual(seen["user"], ["please keep this message", 1])
        self.assertEqual(seen["composer"], "")
        self.assertEqual(seen["attachments_after_reload"], 1)
        self.assertEqual(seen["after_retry"], [["please keep this message"], 0, "done"])
        [sent] = [r.body for r in self.back.requests_to("/api/chat")]
        self.assertEqual(sent["messages"][-1]["content"], "please keep this message")
        self.assertEqual(len(sent["messages"][-1]["images"]), 1)
        self.assertEqual(seen["composer_after"], "")
        self.assertEqual(seen["storage_after"], [])
        self.assertEqual([s["id"] for s in await self.owned()], [seen["sid"]])

    async def test_new_chat_saves_nothing_until_a_message_is_accepted(self):
        """
        "New chat" opens an empty chat without saving anything; a first
        message the gateway refuses leaves no chat behind (the session made
        for it is deleted again) and the page on the unsaved chat with the
        message kept; once a message is accepted, there is exactly one chat.
        """

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            page.get_by_test_id("new-session").click()
            page.get_by_test_id("new-session").click()
            page.wait_for_load_state("networkidle")
            seen["items_after_new"] = page.get_by_test_id("session-item").count()
            seen["posts_after_new"] = len([r for r in page.responses if r[1].endswith("/v1/sessions")])
            page.get_by_test_id("composer").fill("a first message that fails")
            page.get_by_test_id("send").click()
            page.get_by_test_id("retry-send").wait_for()
            page.wait_for_load_state("networkidle")
            seen["items_after_failure"] = page.get_by_test_id("session-item").count()
            seen["hash"] = page.evaluate("location.hash")
            seen["chat_title"] = page.get_by_test_id("chat-title").inner_text()
            seen["kept"] = page.get_by_test_id("message-user").inner_text()
            seen["owned_after_failure"] = on_reactor(self.owned)
            page.screenshot_as("flow-new-chat-failed")
            page.reload()
            page.get_by_test_id("composer").wait_for(state="visible")
            page.wait_for_load_state("networkidle")
            seen["items_after_reload"] = page.get_by_test_id("session-item").count()
            seen["composer_after_reload"] = page.get_by_test_id("composer").input_value()
            page.get_by_test_id("new-session").click()

            self.backend_comes_back()
            send(page, "a first message that fails")
            expect(page.get_by_test_id("session-item")).to_have_count(1)
            seen["sid"] = current_session_id(page)
            page.get_by_test_id("new-session").click()
            page.get_by_test_id("new-session").click()
            page.reload()
            page.get_by_test_id("session-item").first.wait_for()
            page.wait_for_load_state("networkidle")
            seen["items_at_end"] = page.get_by_test_id("session-item").count()
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual((seen["items_after_new"], seen["posts_after_new"]), (0, 0))
        self.assertEqual(seen["items_after_failure"], 0)
        self.assertEqual(seen["owned_after_failure"], [])
        self.assertEqual((seen["hash"], seen["chat_title"]), ("", "New chat"))
        self.assertEqual(seen["kept"], "a first message that fails")
        self.assertEqual(seen["items_after_reload"], 0)
        self.assertEqual(seen["composer_after_reload"], "a first message that fails")
        self.assertEqual(seen["items_at_end"], 1)
        self.assertEqual([s["id"] for s in await self.owned()], [seen["sid"]])
