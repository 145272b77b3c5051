"""
The chat page's everyday features (issue 20, items 9, 10 and 14), end to
end: Debian's Chromium driven by Playwright (tests/browser.py) against a
real gateway signing in through the real OpenID Connect provider, with the
fake Ollama behind it, as in tests/test_page_e2e.py.

The model picker (only models that can chat, the choice remembered, the
"couldn't load the model list" notice gone once the backend is back),
"Clear context" asking first, copying a whole reply, searching chats,
exporting a chat, and a chat's own system prompt and temperature.  Each
is used only through what a person sees and clicks, and checked on the
other side (what the model received, what the server stored).
Screenshots go to artifacts/screenshots/features-*.png.
"""

import json

from playwright.sync_api import expect
from twisted.trial.unittest import TestCase

from clawdbot.auth import session
from clawdbot.auth.tokens import mint
from tests.browser import PHONE, run_in_browser
from tests.helpers import bearer, get_json
from tests.test_page_e2e import FINAL, MARKDOWN_REPLY, current_session_id, reply_for, send, sign_in, signed_in_gateway

MODELS_NOTICE = "[data-testid=notice][data-notice=models]"


def model_options(page):
    return page.get_by_test_id("model-picker").locator("option").evaluate_all("os => os.map(o => o.value)")


class Features(TestCase):
    timeout = 180

    def setUp(self):
        signed_in_gateway(self)
        self.fake.reply_hook = reply_for

    def api_as(self, sub, scope="chat:read chat:write history:team-a"):
        """Headers for calling the API as sub of the IdP the page signs in through (a session JWT)."""
        config = self.gw.parts.runtime.config
        return bearer(mint(session.session_signing_key(config), session.session_issuer(config), session.SESSION_AUDIENCE, sub, scope, 3600, idp=self.idp.issuer))

    def chat_requests(self):
        return [r.body for r in self.fake.requests_to("/api/chat")]

    async def new_session(self, sub, title, team=None, said=()):
        """A session of sub's made through the API, with a turn for each text in said."""
        headers = self.api_as(sub)
        body = {"title": title}
        if team:
            body["team"] = team
        code, _, made = await get_json(f"{self.gw.url}/v1/sessions", method="POST", headers=headers, body=body)
        self.assertEqual(code, 201, made)
        for text in said:
            code, _, answer = await get_json(
                f"{self.gw.url}/v1/chat/completions",
                method="POST",
                headers=headers,
                body={"model": "qwen3:32b", "session_id": made["id"], "messages": [{"role": "user", "content": text}]},
            )
            self.assertEqual(code, 200, answer)
        return made

    # --- item 9: the model picker -----------------------------------------------------

    async def test_model_picker(self):
        """
        The picker offers the models that can chat, not the embedding model
        the backend also lists; the choice is remembered across a reload and
        used for the next message.  While the model list cannot be loaded a
        notice says so, and it goes once the list loads again: after a reply
        came through, when the window gets the focus, and on its own every
        15 s.
        """
        self.fake.add_model("llama3.2:latest")  # the newest, so listed first
        tags_fail = dict(status_error=500, paths=("/api/tags",))

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            expect(page.get_by_test_id("model-picker")).to_be_enabled()
            seen["offered"] = model_options(page)
            seen["first_pick"] = page.get_by_test_id("model-picker").input_value()
            seen["storage_before"] = page.evaluate("localStorage.getItem('clawdbot.model')")
            page.get_by_test_id("model-picker").select_option("qwen3:32b")
            seen["stored"] = page.evaluate("localStorage.getItem('clawdbot.model')")
            page.reload()
            page.get_by_test_id("composer").wait_for(state="visible")
            expect(page.get_by_test_id("model-picker")).to_be_enabled()
            seen["after_reload"] = page.get_by_test_id("model-picker").input_value()
            send(page, "which model are you?")

            # The backend's model list fails: the notice, then a reply brings the list back.
            self.fake.behave(**tags_fail)
            page.reload()
            page.get_by_test_id("composer").wait_for(state="visible")
            expect(page.locator(MODELS_NOTICE)).to_be_visible()
            seen["notice"] = page.locator(MODELS_NOTICE).inner_text()
            seen["picker_while_failed"] = [page.get_by_test_id("model-picker").is_disabled(), model_options(page)]
            page.screenshot_as("features-models-failed")
            self.fake.behave()
            send(page, "are you there?")
            expect(page.locator(MODELS_NOTICE)).to_have_count(0)
            seen["after_reply"] = [model_options(page), page.get_by_test_id("model-picker").input_value()]

            # ... the window getting the focus ...
            self.fake.behave(**tags_fail)
            page.reload()
            expect(page.locator(MODELS_NOTICE)).to_be_visible()
            self.fake.behave()
            page.evaluate("window.dispatchEvent(new Event('focus'))")
            expect(page.locator(MODELS_NOTICE)).to_have_count(0)
            seen["after_focus"] = page.get_by_test_id("model-picker").input_value()

            # ... and the retry every 15 s (the page's clock moved on rather than waited for).
            self.fake.behave(**tags_fail)
            page.clock.install()
            page.reload()
            expect(page.locator(MODELS_NOTICE)).to_be_visible()
            self.fake.behave()
            page.clock.run_for(16000)
            expect(page.locator(MODELS_NOTICE)).to_have_count(0)
            seen["after_timer"] = page.get_by_test_id("model-picker").input_value()
            page.screenshot_as("features-models-recovered")
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["offered"], ["llama3.2:latest", "qwen3:32b"])
        self.assertEqual(seen["first_pick"], "llama3.2:latest")
        self.assertIsNone(seen["storage_before"])  # nothing stored until the user picks
        self.assertEqual(seen["stored"], "qwen3:32b")
        self.assertEqual(seen["after_reload"], "qwen3:32b")
        self.assertEqual(self.chat_requests()[0]["model"], "qwen3:32b")
        self.assertIn("Couldn't load the model list", seen["notice"])
        self.assertEqual(seen["picker_while_failed"], [True, [""]])
        self.assertEqual(seen["after_reply"], [["llama3.2:latest", "qwen3:32b"], "qwen3:32b"])
        self.assertEqual(seen["after_focus"], "qwen3:32b")
        self.assertEqual(seen["after_timer"], "qwen3:32b")

    # --- item 10: clear context asks first -------------------------------------------

    async def test_clear_context_asks_first(self):
        """
        "Clear context" opens the confirmation dialog titled "Clear this
        chat?" with a "Clear" button: Cancel keeps every message (on the page
        and on the server), Clear empties the chat.  Deleting a chat still
        asks "Delete chat?" with a "Delete" button.
        """

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            send(page, "first question")
            send(page, "second question")
            seen["session_id"] = current_session_id(page)
            clears = []
            page.on("request", lambda r: clears.append(r.post_data) if r.url.endswith("/v1/chat/completions") else None)

            page.get_by_test_id("clear-context").click()
            dialog = page.get_by_test_id("confirm-dialog")
            expect(dialog).to_be_visible()
            seen["dialog"] = [dialog.locator("h2").inner_text(), page.get_by_test_id("confirm-delete").inner_text()]
            page.screenshot_as("features-clear-confirm")
            page.get_by_test_id("cancel-delete").click()
            expect(dialog).to_be_hidden()
            page.wait_for_load_state("networkidle")
            seen["after_cancel"] = page.get_by_test_id("messages").locator("article").count()
            seen["posts_after_cancel"] = len(clears)

            page.get_by_test_id("clear-context").click()
            page.get_by_test_id("confirm-delete").click()
            expect(page.get_by_test_id("toast")).to_have_text("Context cleared.")
            page.get_by_test_id("empty-state").wait_for(state="visible")
            seen["after_clear"] = page.get_by_test_id("messages").locator("article").count()
            seen["posts_after_clear"] = [json.loads(p) for p in clears]

            # The delete confirmation keeps its own words.
            item = page.get_by_test_id("session-item").first
            item.hover()
            item.get_by_test_id("delete").click()
            expect(dialog).to_be_visible()
            seen["delete_dialog"] = [dialog.locator("h2").inner_text(), page.get_by_test_id("confirm-delete").inner_text()]
            page.get_by_test_id("cancel-delete").click()
            expect(page.get_by_test_id("session-item")).to_have_count(1)
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["dialog"], ["Clear this chat?", "Clear"])
        self.assertEqual(seen["after_cancel"], 4)
        self.assertEqual(seen["posts_after_cancel"], 0)
        self.assertEqual(seen["after_clear"], 0)
        self.assertEqual(seen["posts_after_clear"], [{"session_id": seen["session_id"], "messages": []}])
        self.assertEqual(seen["delete_dialog"], ["Delete chat?", "Delete"])
        code, _, stored = await get_json(f"{self.gw.url}/v1/sessions/{seen['session_id']}", headers=self.api_as("alice"))
        self.assertEqual(code, 200, stored)
        self.assertEqual(stored["messages"], [])

    async def test_cancel_keeps_the_chat_on_the_server(self):
        """Cancelling "Clear context" sends nothing: the server still has both turns."""

        def script(browser, url):
            page = sign_in(browser, url)
            send(page, "keep me")
            page.get_by_test_id("clear-context").click()
            page.keyboard.press("Escape")  # Esc cancels as the button does
            expect(page.get_by_test_id("confirm-dialog")).to_be_hidden()
            page.wait_for_load_state("networkidle")
            return current_session_id(page), page.get_by_test_id("messages").locator("article").count(), page.problems(origin=url)

        sid, shown, problems = await run_in_browser(script, self.gw.url)
        self.assertEqual(problems, [])
        self.assertEqual(shown, 2)
        code, _, stored = await get_json(f"{self.gw.url}/v1/sessions/{sid}", headers=self.api_as("alice"))
        self.assertEqual(code, 200, stored)
        self.assertEqual([m["content"] for m in stored["messages"]], ["keep me", self.fake.reply_text])

    # --- item 14: copy a whole reply ------------------------------------------------------

    async def test_copy_reply(self):
        """
        A finished reply has a Copy button (none while it streams) that puts
        the reply's Markdown on the clipboard and says "Copied" for a
        moment; where the clipboard API refuses, the page copies through a
        selected text instead.  A reply read back from history copies too.
        """
        self.fake.behave(pace=0.05)

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
            page.get_by_test_id("composer").fill("please stream a reply")
            page.get_by_test_id("send").click()
            page.locator("[data-testid=message-assistant][data-state=streaming]").wait_for()
            seen["copy_while_streaming"] = page.get_by_test_id("copy-reply").first.is_visible()
            page.locator(FINAL).wait_for(timeout=20000)
            self.fake.behave()

            reply = send(page, "show me some markdown")
            copy = reply.get_by_test_id("copy-reply")
            seen["copy_label"] = copy.inner_text()
            copy.click()
            expect(copy).to_have_text("Copied")
            seen["clipboard"] = page.evaluate("navigator.clipboard.readText()")
            page.screenshot_as("features-copy-reply")
            expect(copy).to_have_text("Copy", timeout=5000)

            # The clipboard API refuses: the fallback copies all the same.
            page.evaluate("navigator.clipboard.writeText('something else')")
            page.evaluate("() => { navigator.clipboard.writeText = () => Promise.reject(new DOMException('denied', 'NotAllowedError')); }")
            first = page.get_by_test_id("message-assistant").first.get_by_test_id("copy-reply")
            first.click()
            expect(first).to_have_text("Copied")
            seen["clipboard_fallback"] = page.evaluate("navigator.clipboard.readText()")

            # From history.
            page.reload()
            page.get_by_test_id("composer").wait_for(state="visible")
            page.get_by_test_id("session-item").first.locator(".session-open").click()
            stored = page.get_by_test_id("message-assistant").nth(1)
            stored.get_by_test_id("copy-reply").click()
            expect(stored.get_by_test_id("copy-reply")).to_have_text("Copied")
            seen["clipboard_history"] = page.evaluate("navigator.clipboard.readText()")
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertFalse(seen["copy_while_streaming"])
        self.assertEqual(seen["copy_label"], "Copy")
        self.assertEqual(seen["clipboard"], MARKDOWN_REPLY)
        self.assertEqual(seen["clipboard_fallback"], " ".join(f"w{i:02d}" for i in range(40)))
        self.assertEqual(seen["clipboard_history"], MARKDOWN_REPLY)

    # --- item 14: search chats ----------------------------------------------------------

    async def test_search_chats(self):
        """
        The search field above the list asks the server (GET /v1/sessions?q=)
        once typing pauses: a title matches; a message's text matches with
        the text around it shown; a teammate's team chat is found as the
        list shows it, his private chat never; under the team filter the
        search carries the team and finds only the team's chats; nothing
        found says so; Escape (or emptying the field) brings the list back.
        A result opens its chat.
        """
        await self.new_session("alice", "Quarterly planning")
        trip = await self.new_session("alice", "Trip notes", said=["Remember the zebra crossing near the old station."])
        await self.new_session("bob", "Team sync", team="team-a", said=["The zebra migration is on the team agenda."])
        await self.new_session("bob", "Bob private zebra")
        # Lowercasing "İ" gives two characters: the mark must still cover "zebra" exactly.
        await self.new_session("alice", "İİİ zebra crossing")

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            expect(page.get_by_test_id("session-item")).to_have_count(4)
            field = page.get_by_test_id("session-search")
            seen["field"] = [field.get_attribute("type"), field.get_attribute("placeholder")]
            results = page.get_by_test_id("search-result")

            with page.expect_request(lambda r: "/v1/sessions?" in r.url and "q=" in r.url) as asked:
                field.fill("QUARTERLY")
            seen["title_query"] = asked.value.url.split("?", 1)[1]
            expect(results).to_have_count(1)
            seen["title_hit"] = [results.get_by_test_id("search-result-title").inner_text(), results.get_by_test_id("search-match").count()]
            seen["list_hidden"] = page.get_by_test_id("session-list").is_hidden()

            field.fill("zebra")
            expect(results).to_have_count(3)
            seen["dotted_marked"] = results.filter(has_text="İİİ").get_by_test_id("search-result-title").locator("mark").all_inner_texts()
            seen["zebra_all"] = sorted(results.get_by_test_id("search-result-title").all_inner_texts())
            trip = results.filter(has_text="Trip notes")
            seen["snippet"] = trip.get_by_test_id("search-match").inner_text()
            seen["marked"] = trip.get_by_test_id("search-match").locator("mark").all_inner_texts()
            page.screenshot_as("features-search")

            with page.expect_request(lambda r: "/v1/sessions?" in r.url and "q=zebra" in r.url) as asked:
                page.get_by_test_id("team-filter").select_option(label="Team: team-a")
            seen["team_query"] = asked.value.url.split("?", 1)[1]
            expect(results.get_by_test_id("search-result-title")).to_have_text(["Team sync"])
            seen["team_snippet"] = results.get_by_test_id("search-match").inner_text()
            page.get_by_test_id("team-filter").select_option(label="All chats")
            expect(results).to_have_count(3)

            results.filter(has_text="Trip notes").locator(".session-open").click()
            expect(page.get_by_test_id("chat-title")).to_have_text("Trip notes")
            seen["opened"] = current_session_id(page)
            expect(page.get_by_test_id("message-user")).to_have_text(["Remember the zebra crossing near the old station."])

            field.fill("xylophone")
            expect(page.get_by_test_id("search-empty")).to_have_text("No chats match")
            page.screenshot_as("features-search-empty")
            field.press("Escape")
            seen["field_after_escape"] = field.input_value()
            expect(page.get_by_test_id("session-list")).to_be_visible()
            expect(page.get_by_test_id("search-results")).to_be_hidden()
            seen["list_after"] = sorted(page.get_by_test_id("session-title").all_inner_texts())

            field.fill("zebra")
            expect(results).to_have_count(3)
            field.fill("")
            expect(page.get_by_test_id("session-list")).to_be_visible()
            seen["problems"] = page.problems(origin=url)

            phone = sign_in(browser, url, viewport=PHONE, is_mobile=True, has_touch=True)
            phone.get_by_test_id("sidebar-toggle").click()
            phone.wait_until("document.getElementById('sidebar').getBoundingClientRect().left === 0")
            phone.get_by_test_id("session-search").fill("zebra")
            expect(phone.get_by_test_id("search-result")).to_have_count(3)
            phone.screenshot_as("features-search-phone")
            seen["phone_problems"] = phone.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["phone_problems"], [])
        self.assertEqual(seen["field"], ["search", "Search chats"])
        self.assertIn("q=QUARTERLY", seen["title_query"])
        self.assertNotIn("team=", seen["title_query"])
        self.assertEqual(seen["title_hit"], ["Quarterly planning", 0])
        self.assertTrue(seen["list_hidden"])
        self.assertEqual(seen["zebra_all"], ["Team sync", "Trip notes", "İİİ zebra crossing"])
        self.assertEqual(seen["dotted_marked"], ["zebra"])
        self.assertIn("zebra crossing", seen["snippet"])
        self.assertEqual(seen["marked"], ["zebra"])
        self.assertIn("team=team-a", seen["team_query"])
        self.assertIn("zebra migration", seen["team_snippet"])
        self.assertEqual(seen["opened"], trip["id"])
        self.assertEqual(seen["field_after_escape"], "")
        self.assertEqual(seen["list_after"], ["Quarterly planning", "Team sync", "Trip notes", "İİİ zebra crossing"])

    # --- item 14: export ------------------------------------------------------------------

    async def test_export_chat(self):
        """
        A saved chat has an Export button (a new chat has none) offering
        Markdown and JSON; each downloads the server's export, with the
        bearer token, under the server's file name.
        """

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            seen["export_on_new_chat"] = page.get_by_test_id("export-chat").is_visible()
            send(page, "show me some markdown")
            expect(page.get_by_test_id("chat-title")).to_have_text("show me some markdown")
            page.get_by_test_id("export-chat").click()
            expect(page.get_by_test_id("export-markdown")).to_be_visible()
            page.screenshot_as("features-export-menu")
            # Tabbing out of the menu closes it.
            for _ in range(3):
                page.keyboard.press("Tab")
            expect(page.get_by_test_id("export-menu")).to_be_hidden()
            seen["focus_after_tab"] = page.evaluate("document.activeElement.closest('.export-wrap') === null")
            page.get_by_test_id("export-chat").click()
            expect(page.get_by_test_id("export-markdown")).to_be_visible()
            with page.expect_download() as md:
                page.get_by_test_id("export-markdown").click()
            seen["md_name"] = md.value.suggested_filename
            with open(md.value.path(), encoding="utf-8") as f:
                seen["md"] = f.read()
            expect(page.get_by_test_id("export-menu")).to_be_hidden()

            page.get_by_test_id("export-chat").click()
            with page.expect_download() as js:
                page.get_by_test_id("export-json").click()
            seen["json_name"] = js.value.suggested_filename
            with open(js.value.path(), encoding="utf-8") as f:
                seen["json"] = json.load(f)
            seen["session_id"] = current_session_id(page)

            # The menu closes with Escape, and by a click elsewhere.
            page.get_by_test_id("export-chat").click()
            page.get_by_test_id("export-json").wait_for(state="visible")
            page.keyboard.press("Escape")
            expect(page.get_by_test_id("export-menu")).to_be_hidden()
            page.get_by_test_id("export-chat").click()
            page.get_by_test_id("chat-title").click()
            expect(page.get_by_test_id("export-menu")).to_be_hidden()
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertFalse(seen["export_on_new_chat"])
        # The chat's title itself (the server's UTF-8 file name).
        self.assertTrue(seen["focus_after_tab"])
        self.assertEqual(seen["md_name"], "show me some markdown.md")
        self.assertEqual(seen["json_name"], "show me some markdown.json")
        self.assertTrue(seen["md"].startswith("# show me some markdown\n"), seen["md"][:200])
        self.assertIn("show me some markdown", seen["md"])
        self.assertIn("def by_length(words):", seen["md"])
        self.assertEqual(seen["json"]["id"], seen["session_id"])
        self.assertEqual([m["role"] for m in seen["json"]["messages"]], ["user", "assistant"])
        self.assertEqual(seen["json"]["messages"][1]["content"], MARKDOWN_REPLY)
        code, _, body = await get_json(f"{self.gw.url}/v1/sessions/{seen['session_id']}/export?format=json", headers=self.api_as("alice"))
        self.assertEqual(code, 200)
        self.assertEqual(body, seen["json"])

    # --- item 14: a chat's system prompt and temperature -----------------------------------

    async def test_chat_settings(self):
        """
        The settings dialog of a new chat keeps a system prompt and a
        temperature until the chat is saved with its first message; the model
        then gets the system prompt first and the temperature.  Reopened, the
        dialog shows them; changed (the temperature emptied), they are saved
        at once and the next turn follows them.  A temperature out of 0-2 is
        refused in the dialog.  After a reload the chat still has them.
        """

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            page.get_by_test_id("chat-settings").click()
            dialog = page.get_by_test_id("settings-dialog")
            expect(dialog).to_be_visible()
            seen["empty"] = [page.get_by_test_id("settings-system-prompt").input_value(), page.get_by_test_id("settings-temperature").input_value()]
            page.get_by_test_id("settings-system-prompt").fill("You are a pirate. Answer like one.")
            page.get_by_test_id("settings-temperature").fill("0.3")
            page.screenshot_as("features-settings")
            page.get_by_test_id("settings-save").click()
            expect(dialog).to_be_hidden()
            with page.expect_request(lambda r: r.url.endswith("/v1/sessions") and r.method == "POST") as created:
                send(page, "hello there")
            seen["create_body"] = json.loads(created.value.post_data)
            seen["session_id"] = current_session_id(page)

            page.get_by_test_id("chat-settings").click()
            expect(dialog).to_be_visible()
            seen["reopened"] = [page.get_by_test_id("settings-system-prompt").input_value(), page.get_by_test_id("settings-temperature").input_value()]

            page.get_by_test_id("settings-temperature").fill("5")
            page.get_by_test_id("settings-save").click()
            expect(page.get_by_test_id("settings-error")).to_be_visible()
            seen["invalid"] = page.get_by_test_id("settings-error").inner_text()
            page.screenshot_as("features-settings-invalid")

            page.get_by_test_id("settings-system-prompt").fill("Be brief.")
            page.get_by_test_id("settings-temperature").fill("")
            with page.expect_request(lambda r: "/v1/sessions/" in r.url and r.method == "PATCH") as patched:
                page.get_by_test_id("settings-save").click()
            seen["patch_body"] = json.loads(patched.value.post_data)
            expect(dialog).to_be_hidden()
            send(page, "and again")

            # Cancel changes nothing.
            page.get_by_test_id("chat-settings").click()
            page.get_by_test_id("settings-system-prompt").fill("Something else")
            page.get_by_test_id("settings-cancel").click()
            expect(dialog).to_be_hidden()

            page.reload()
            page.get_by_test_id("composer").wait_for(state="visible")
            page.get_by_test_id("session-item").first.locator(".session-open").click()
            expect(page.get_by_test_id("message-user")).to_have_count(2)
            page.get_by_test_id("chat-settings").click()
            expect(dialog).to_be_visible()
            seen["after_reload"] = [page.get_by_test_id("settings-system-prompt").input_value(), page.get_by_test_id("settings-temperature").input_value()]
            page.get_by_test_id("settings-cancel").click()

            # A new chat starts with none.
            page.get_by_test_id("new-session").click()
            expect(page.get_by_test_id("empty-state")).to_be_visible()
            page.get_by_test_id("chat-settings").click()
            seen["new_chat"] = [page.get_by_test_id("settings-system-prompt").input_value(), page.get_by_test_id("settings-temperature").input_value()]
            page.get_by_test_id("settings-cancel").click()
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["empty"], ["", ""])
        self.assertEqual(seen["create_body"]["system_prompt"], "You are a pirate. Answer like one.")
        self.assertEqual(seen["create_body"]["temperature"], 0.3)
        self.assertEqual(seen["reopened"], ["You are a pirate. Answer like one.", "0.3"])
        self.assertEqual(seen["invalid"], "The temperature must be a number from 0 to 2.")
        self.assertEqual(seen["patch_body"], {"system_prompt": "Be brief.", "temperature": None})
        self.assertEqual(seen["after_reload"], ["Be brief.", ""])
        self.assertEqual(seen["new_chat"], ["", ""])

        first, second = self.chat_requests()
        self.assertEqual(first["messages"][0], {"role": "system", "content": "You are a pirate. Answer like one."})
        self.assertEqual(first["messages"][-1]["content"], "hello there")
        self.assertEqual(first["options"]["temperature"], 0.3)
        self.assertEqual(second["messages"][0], {"role": "system", "content": "Be brief."})
        self.assertEqual([m["role"] for m in second["messages"]], ["system", "user", "assistant", "user"])
        self.assertNotIn("temperature", second.get("options") or {})

        code, _, stored = await get_json(f"{self.gw.url}/v1/sessions/{seen['session_id']}", headers=self.api_as("alice"))
        self.assertEqual(code, 200, stored)
        self.assertEqual((stored["system_prompt"], stored["temperature"]), ("Be brief.", None))
        self.assertNotIn("system", [m["role"] for m in stored["messages"]])
