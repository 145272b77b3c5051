"""
The chat page end to end: Debian's Chromium driven by Playwright
(tests/browser.py) against a real gateway started in this process, the real
OpenID Connect provider (tests/idp.py, oidc-provider under node) and the
fake Ollama (testing/fake_ollama.py).

Every test signs in the way a person does -- the page's "Sign in" button,
the provider's login form, back through the gateway's /callback -- and then
uses the page only through what a person sees and clicks (the stable
C{data-testid}s), checking what the model backend received on the other
side.  Screenshots of the main states, at desktop (1280x800) and phone
(390x844) widths, go to artifacts/screenshots/e2e-*.png.
"""

import base64
import io
import json

from PIL import Image
from playwright.sync_api import expect
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread
from twisted.trial.unittest import TestCase

from clawdbot.auth import session
from clawdbot.auth.tokens import mint
from tests.browser import DESKTOP, PHONE, run_in_browser
from testing.fake_ollama import FakeOllama
from tests.helpers import bearer, get_json, reserved_port, serve
from tests.idp import IdP

CLIENT_ID = "clawdbot-web"
CLIENT_SECRET = "e2e-client-secret-0123456789abcdef"
USERS = [
    {"sub": "alice", "email": "alice@example.test", "name": "Alice Example", "groups": ["team-a"]},
    {"sub": "bob", "email": "bob@example.test", "name": "Bob Builder", "groups": ["team-a"]},
    {"sub": "root", "email": "root@example.test", "name": "Rita Root", "groups": ["ops"]},
]
FINAL = "[data-testid=message-assistant]:not([data-state=streaming])"

MARKDOWN_REPLY = """\
## Sorting in Python

Use **`sorted()`** for a *new* list:

- it is stable
- it takes a `key`

```python
def by_length(words):
    return sorted(words, key=len)
```
"""

# What a hostile (or tricked) model might send back.
XSS_REPLY = """\
Here you go: <script>window.__pwned=1</script>

<img src=x onerror="window.__pwned=2">

[click](javascript:window.__pwned=3) and <a href="javascript:window.__pwned=4">this</a>

[spaced]( JaVaScRiPt:window.__pwned=5) <javascript:window.__pwned=6>

![pic](x" onerror="window.__pwned=7)

<svg onload="window.__pwned=8"></svg><iframe srcdoc="<script>parent.__pwned=9</script>"></iframe>

<details open ontoggle="window.__pwned=10">x</details>
"""


STREAMED = " ".join(f"w{i:02d}" for i in range(40))  # 40 tokens
LONG_STORY = " ".join(f"story{i}" for i in range(300))


def reply_for(path, body):
    """The fake model's answer, chosen by the last user message."""
    messages = body.get("messages") or []
    last = messages[-1].get("content", "") if messages else ""
    if "markdown" in last:
        return MARKDOWN_REPLY
    if "hostile" in last:
        return XSS_REPLY
    if "long story" in last:
        return LONG_STORY
    if "stream" in last:
        return STREAMED
    return None  # the fake's reply_text


# --- browser steps (run in the Playwright worker thread) ---------------------------


def sign_in(browser, url, user="alice", **options):
    """A new page (own cookies) signed in through the page's button and the IdP's form."""
    page = browser.new_page(**options)
    page.goto(url + "/")
    page.get_by_test_id("signin").click()
    page.locator("input[name=login]").fill(user)
    page.locator("button[type=submit]").click()
    page.get_by_test_id("composer").wait_for(state="visible")
    page.wait_for_load_state("networkidle")
    return page


def send(page, text):
    """Type text, send it, and wait for the reply to finish; returns the reply's locator."""
    before = page.get_by_test_id("message-assistant").count()
    page.get_by_test_id("composer").fill(text)
    page.get_by_test_id("send").click()
    reply = page.get_by_test_id("message-assistant").nth(before)
    reply.wait_for()
    page.locator(f"{FINAL} >> nth={before}").wait_for(timeout=20000)
    return reply


def current_session_id(page):
    """The open chat's id, from the page's #s=<id> address."""
    return page.evaluate("decodeURIComponent((location.hash.match(/^#s=(.+)$/) || [])[1] || '')")


def small_png(width, height):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 90, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def on_reactor(f, *args):
    """From the browser thread: run the coroutine function f(*args) on the reactor and wait for it."""
    return blockingCallFromThread(reactor, lambda: Deferred.fromCoroutine(f(*args)))


def session_item(page, title):
    return page.get_by_test_id("session-item").filter(has=page.get_by_test_id("session-title").get_by_text(title, exact=True))


# Every attribute of every element in a message, and what must never be there.
DOM_AUDIT = r"""(node) => {
    const all = [node, ...node.querySelectorAll("*")];
    const attrs = all.flatMap(e => [...e.attributes].map(a => [e.tagName.toLowerCase(), a.name, a.value]));
    return {
        tags: [...new Set(all.map(e => e.tagName.toLowerCase()))],
        handlers: attrs.filter(([, n]) => n.toLowerCase().startsWith("on")),
        scripty: attrs.filter(([, n, v]) => /^\s*(javascript|vbscript|data:text)/i.test(v.replace(/[\u0000-\u0020]/g, "")) || n === "srcdoc"),
        links: [...node.querySelectorAll("a")].map(a => [a.textContent, a.getAttribute("href")]),
        text: node.textContent,
    };
}"""


def signed_in_gateway(testcase, extra="", backend=None):
    """
    For C{testcase}: the fake Ollama (C{.fake}), the real IdP (C{.idp}) and a
    gateway signing in through it (C{.gw}, at C{.origin}), with C{extra} config
    and C{backend} (what the C{backend} section holds, given the fake's URL;
    default: the fake alone).  The IdP's C{ops} group grants C{admin}.
    """
    testcase.fake = FakeOllama()
    testcase.fake.listen(reactor)
    testcase.addCleanup(testcase.fake.stop)

    port = reserved_port(testcase)  # the gateway's own URL is in its config
    testcase.origin = origin = f"http://127.0.0.1:{port}"
    testcase.idp = IdP().start(
        clients=[
            {
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "redirect_uris": [origin + "/callback"],
                "post_logout_redirect_uris": [origin + "/"],
            }
        ],
        users=USERS,
    )
    testcase.addCleanup(testcase.idp.stop)
    testcase.gw = serve(
        testcase,
        extra=f"""
server: {{listen: "tcp:{port}:interface=127.0.0.1", public_url: "{origin}"}}
backend: {{{backend(testcase.fake.url) if backend else f'url: "{testcase.fake.url}"'}}}
rate_limit: {{requests_per_minute: 0}}
oauth2:
  enabled: true
  provider: oidc
  client_id: {CLIENT_ID}
  client_secret: {CLIENT_SECRET}
  redirect_uri: "{origin}/callback"
  issuer_url: "{testcase.idp.issuer}"
  default_scopes: ["chat:read", "chat:write"]
  group_scopes: {{team-a: ["history:team-a"], ops: ["admin"]}}
  post_logout_redirect_uri: "{origin}/"
{extra}
""",
    )
    testcase.assertEqual(testcase.gw.url, origin)


# --- the tests ----------------------------------------------------------------------


class PageE2E(TestCase):
    """A gateway with single sign-on through the real IdP, in front of the fake Ollama."""

    timeout = 120

    def setUp(self):
        signed_in_gateway(self)
        self.fake.reply_hook = reply_for

    def api_as(self, sub, scope="chat:read chat:write history:team-a"):
        """
        Headers for calling the API directly as sub of the IdP the page signs
        in through (a session JWT as /auth/refresh mints it), so the same
        owner as that user on the page: an operator-issued token's sub is
        someone else (SPEC §6).
        """
        config = self.gw.parts.runtime.config
        return bearer(mint(session.session_signing_key(config), session.session_issuer(config), session.SESSION_AUDIENCE, sub, scope, 3600, idp=self.idp.issuer))

    def chat_requests(self):
        return [r.body for r in self.fake.requests_to("/api/chat")]

    async def test_sign_in_and_sign_out(self):
        """
        Sign in: the page's button goes through the provider's login form and
        back, and the page shows the user (no dev badge).  Sign out: the
        provider's end-session page, then back to the sign-in screen; a reload
        stays signed out and the old refresh cookie is refused.
        """

        def script(browser, url):
            seen = {}
            page = browser.new_page(viewport=DESKTOP)
            page.goto(url + "/")
            page.get_by_test_id("signin").wait_for(state="visible")
            page.screenshot_as("e2e-signin")
            page.get_by_test_id("signin").click()
            page.locator("input[name=login]").wait_for()
            seen["idp_url"] = page.url
            page.locator("input[name=login]").fill("alice")
            page.locator("button[type=submit]").click()
            page.get_by_test_id("composer").wait_for(state="visible")
            page.wait_for_load_state("networkidle")
            seen["back_at"] = page.url
            seen["user"] = page.get_by_test_id("user-name").inner_text()
            seen["signout_visible"] = page.get_by_test_id("signout").is_visible()
            seen["dev_badge_visible"] = page.get_by_test_id("dev-badge").is_visible()
            seen["teams"] = page.get_by_test_id("team-filter").locator("option").all_inner_texts()
            seen["cookies"] = {c["name"]: c for c in page.context.cookies(url + "/auth/refresh")}
            # The session JWT is kept in memory only.
            seen["storage"] = page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]")
            page.screenshot_as("e2e-signed-in")

            page.get_by_test_id("signout").click()
            # The provider asks to confirm ending its own session, then sends us back.
            page.locator("button[name=logout]").click()
            page.get_by_test_id("signin-screen").wait_for(state="visible")
            seen["after_signout_url"] = page.url
            seen["signin_visible"] = page.get_by_test_id("signin").is_visible()
            seen["app_visible"] = page.get_by_test_id("composer").is_visible()
            page.reload()
            page.get_by_test_id("signin").wait_for(state="visible")
            page.wait_for_load_state("networkidle")
            seen["after_reload_app_visible"] = page.get_by_test_id("composer").is_visible()
            seen["cookies_after"] = [c["name"] for c in page.context.cookies(url + "/auth/refresh")]
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertTrue(seen["idp_url"].startswith(self.idp.issuer + "/interaction/"), seen["idp_url"])
        self.assertEqual(seen["back_at"].split("#")[0], self.origin + "/")
        self.assertEqual(seen["user"], "Alice Example")
        self.assertTrue(seen["signout_visible"])
        self.assertFalse(seen["dev_badge_visible"])
        self.assertEqual(seen["teams"], ["All chats", "Team: team-a"])
        self.assertEqual(seen["storage"], [0, 0, ""])
        # The refresh credential: HttpOnly, SameSite=Strict, scoped to /auth.
        refresh_cookie = seen["cookies"][session.REFRESH_COOKIE]
        self.assertEqual((refresh_cookie["httpOnly"], refresh_cookie["sameSite"], refresh_cookie["path"]), (True, "Strict", "/auth"))

        self.assertEqual(seen["after_signout_url"].split("#")[0], self.origin + "/")
        self.assertTrue(seen["signin_visible"])
        self.assertFalse(seen["app_visible"])
        self.assertFalse(seen["after_reload_app_visible"])
        self.assertNotIn(refresh_cookie["name"], seen["cookies_after"])
        self.assertEqual(seen["problems"], [])

        # The refresh credential the browser held is dead, not just forgotten.
        code, _, body = await get_json(
            self.gw.url + "/auth/refresh",
            method="POST",
            headers={"X-Requested-With": "XMLHttpRequest", "Cookie": f"{refresh_cookie['name']}={refresh_cookie['value']}"},
        )
        self.assertEqual(code, 401, body)

    async def test_reply_streams(self):
        """
        A message sent from the composer streams back: the assistant message
        is "streaming" with a stop button while its text grows chunk by
        chunk, then "done" with the whole reply; the new chat is saved and
        titled after its first message.
        """
        self.fake.behave(pace=0.05)

        def script(browser, url):
            seen = {"samples": []}
            page = sign_in(browser, url)
            seen["empty_state"] = page.get_by_test_id("empty-state").is_visible()
            page.get_by_test_id("composer").fill("please stream a reply")
            page.get_by_test_id("send").click()
            page.get_by_test_id("message-assistant").wait_for()
            shot = False
            while True:
                state, text = page.evaluate(
                    """() => { const m = document.querySelector("[data-testid=message-assistant]");
                              return [m.dataset.state, m.querySelector("[data-testid=message-content]").textContent.trim()]; }"""
                )
                seen["samples"].append((state, text))
                if state != "streaming":
                    break
                if not shot and len(text.split()) >= 10:
                    seen["stop_visible_while_streaming"] = page.get_by_test_id("stop").is_visible()
                    seen["send_visible_while_streaming"] = page.get_by_test_id("send").is_visible()
                    page.screenshot_as("e2e-streaming")
                    shot = True
                page.wait_for_timeout(30)
            seen["user_message"] = page.get_by_test_id("message-user").inner_text()
            seen["stop_visible_after"] = page.get_by_test_id("stop").is_visible()
            seen["send_visible_after"] = page.get_by_test_id("send").is_visible()
            seen["session_id"] = current_session_id(page)
            expect(page.get_by_test_id("session-title")).to_have_text("please stream a reply")
            expect(page.get_by_test_id("chat-title")).to_have_text("please stream a reply")
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertTrue(seen["empty_state"])
        self.assertEqual(seen["user_message"], "please stream a reply")
        self.assertTrue(seen["stop_visible_while_streaming"])
        self.assertFalse(seen["send_visible_while_streaming"])
        self.assertFalse(seen["stop_visible_after"])
        self.assertTrue(seen["send_visible_after"])

        streaming = [text for state, text in seen["samples"] if state == "streaming"]
        final_state, final_text = seen["samples"][-1]
        self.assertEqual(final_state, "done")
        self.assertEqual(final_text, STREAMED)
        # The text grew in several steps while streaming, each a prefix of the whole.
        partial = sorted({len(t) for t in streaming if 0 < len(t) < len(STREAMED)})
        self.assertGreaterEqual(len(partial), 4, seen["samples"])
        for text in streaming:
            self.assertTrue(STREAMED.startswith(text), text)

        [sent] = self.chat_requests()
        self.assertEqual(sent["messages"], [{"role": "user", "content": "please stream a reply"}])
        code, _, stored = await get_json(f"{self.gw.url}/v1/sessions/{seen['session_id']}", headers=self.api_as("alice"))
        self.assertEqual(code, 200, stored)
        self.assertEqual(stored["title"], "please stream a reply")
        self.assertEqual([(m["role"], m["content"], m["incomplete"]) for m in stored["messages"]],
                         [("user", "please stream a reply", False), ("assistant", STREAMED, False)])

    async def test_markdown_code_and_copy(self):
        """
        A Markdown reply is rendered (heading, emphasis, list, inline code)
        with its code block highlighted by highlight.js and labelled with its
        language; the block's Copy button puts the code on the clipboard and
        says "Copied".  On a phone the chat list is a drawer and the code
        block does not widen the page.
        """

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
            reply = send(page, "show me some markdown")
            content = reply.get_by_test_id("message-content")
            seen["state"] = reply.get_attribute("data-state")
            seen["h2"] = content.locator("h2").all_inner_texts()
            seen["strong"] = content.locator("strong").all_inner_texts()
            seen["em"] = content.locator("em").all_inner_texts()
            seen["li"] = content.locator("li").all_inner_texts()
            seen["inline_code"] = content.locator(":not(pre) > code").all_inner_texts()
            seen["hljs_blocks"] = content.locator("pre code.hljs").count()
            seen["hljs_spans"] = content.locator("pre code.hljs span[class^=hljs-]").count()
            seen["keyword"] = content.locator("pre code .hljs-keyword").all_inner_texts()
            seen["lang"] = content.locator(".code-lang").inner_text()
            copy = content.get_by_test_id("code-copy")
            seen["copy_before"] = copy.inner_text()
            copy.click()
            expect(copy).to_have_text("Copied")
            seen["clipboard"] = page.evaluate("navigator.clipboard.readText()")
            page.screenshot_as("e2e-code")
            expect(copy).to_have_text("Copy", timeout=5000)  # the feedback goes away
            seen["problems"] = page.problems(origin=url)
            session_id = current_session_id(page)

            phone = sign_in(browser, url, viewport=PHONE, is_mobile=True, has_touch=True)
            seen["phone_sidebar_closed"] = not phone.get_by_test_id("sidebar").is_visible()
            phone.get_by_test_id("sidebar-toggle").click()
            phone.get_by_test_id("session-item").first.wait_for(state="visible")
            phone.wait_until("document.getElementById('sidebar').getBoundingClientRect().left === 0")
            phone.screenshot_as("e2e-phone-sessions")
            phone.locator(f"[data-session-id='{session_id}'] .session-open").click()
            phone.get_by_test_id("code-copy").wait_for(state="visible")
            phone.get_by_test_id("sidebar").wait_for(state="hidden")  # the drawer slides away
            seen["phone_width"] = phone.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            seen["phone_code_highlighted"] = phone.locator("pre code.hljs span[class^=hljs-]").count()
            phone.screenshot_as("e2e-phone")
            seen["phone_problems"] = phone.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["state"], "done")
        self.assertEqual(seen["h2"], ["Sorting in Python"])
        self.assertEqual(seen["strong"], ["sorted()"])
        self.assertEqual(seen["em"], ["new"])
        self.assertEqual(seen["li"], ["it is stable", "it takes a key"])
        self.assertEqual(seen["inline_code"], ["sorted()", "key"])
        self.assertEqual(seen["hljs_blocks"], 1)
        self.assertGreater(seen["hljs_spans"], 2)
        self.assertIn("def", seen["keyword"])
        self.assertEqual(seen["lang"], "python")
        self.assertEqual(seen["copy_before"], "Copy")
        self.assertEqual(seen["clipboard"], "def by_length(words):\n    return sorted(words, key=len)\n")

        self.assertEqual(seen["phone_problems"], [])
        self.assertTrue(seen["phone_sidebar_closed"])
        scroll_width, width = seen["phone_width"]
        self.assertLessEqual(scroll_width, width)
        self.assertGreater(seen["phone_code_highlighted"], 2)

    async def test_stop_reply(self):
        """
        Stop while a reply streams: the message becomes "incomplete" with a
        "Stopped" note and keeps the text so far; the gateway closes its
        connection to the model, and the session keeps the cut-off reply
        marked incomplete, shown as such when the chat is opened again.
        """
        self.fake.behave(pace=0.1)

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            page.get_by_test_id("composer").fill("tell me a long story")
            page.get_by_test_id("send").click()
            reply = page.get_by_test_id("message-assistant").first
            page.wait_until("(document.querySelector('[data-testid=message-content]')?.textContent || '').trim().split(/\\s+/).length >= 5")
            page.get_by_test_id("stop").click()
            page.locator("[data-testid=message-assistant][data-state=incomplete]").wait_for(timeout=5000)
            seen["status"] = reply.get_by_test_id("message-status").inner_text()
            seen["text"] = reply.get_by_test_id("message-content").inner_text().strip()
            seen["send_visible"] = page.get_by_test_id("send").is_visible()
            seen["stop_visible"] = page.get_by_test_id("stop").is_visible()
            page.screenshot_as("e2e-stopped")
            seen["session_id"] = session_id = current_session_id(page)

            # The gateway records the cut-off reply once the model's stream is closed.
            record = self.fake.requests_to("/api/chat")[-1]
            seen["outcome"] = blockingCallFromThread(reactor, lambda: record.when_closed().addTimeout(10, reactor))
            seen["lines_sent"] = record.lines_sent

            async def stored():
                for _ in range(100):
                    code, _, body = await get_json(f"{url}/v1/sessions/{session_id}", headers=self.api_as("alice"))
                    if code == 200 and len(body["messages"]) == 2:
                        return body
                    await deferLater(reactor, 0.05)
                return body

            seen["stored"] = on_reactor(stored)
            page.reload()
            page.locator("[data-testid=message-assistant][data-state=incomplete]").wait_for()
            seen["reopened_status"] = page.get_by_test_id("message-status").inner_text()
            seen["reopened_text"] = page.get_by_test_id("message-content").inner_text().strip()
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["status"], "Stopped")
        self.assertTrue(seen["send_visible"])
        self.assertFalse(seen["stop_visible"])
        self.assertTrue(LONG_STORY.startswith(seen["text"]), seen["text"])
        self.assertGreaterEqual(len(seen["text"].split()), 5)
        self.assertLess(len(seen["text"]), len(LONG_STORY))

        self.assertEqual(seen["outcome"], "client_disconnected")
        self.assertLess(seen["lines_sent"], 100)
        self.assertEqual(len(self.fake.disconnects), 1)

        messages = seen["stored"]["messages"]
        self.assertEqual([(m["role"], m["incomplete"]) for m in messages], [("user", False), ("assistant", True)])
        self.assertTrue(LONG_STORY.startswith(messages[1]["content"]))
        self.assertTrue(messages[1]["content"].startswith(seen["text"]))
        self.assertEqual(seen["reopened_status"], "Incomplete reply")
        self.assertEqual(seen["reopened_text"], messages[1]["content"].strip())

    async def test_create_rename_delete_sessions(self):
        """
        "New chat" opens an empty chat, saved as a session that shows in the
        list with its first message; a title is renamed in place (Enter
        saves, Escape cancels); delete asks for confirmation (cancel keeps
        the chat, confirm deletes it).  Each change is what the gateway
        stores.
        """

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            seen["initial_items"] = page.get_by_test_id("session-item").count()
            page.get_by_test_id("new-session").click()
            seen["chat_title"] = page.get_by_test_id("chat-title").inner_text()
            seen["items_before_sending"] = page.get_by_test_id("session-item").count()
            send(page, "plan the quarter")
            expect(session_item(page, "plan the quarter")).to_have_count(1)
            seen["first_id"] = current_session_id(page)
            page.get_by_test_id("new-session").click()
            send(page, "lunch ideas")
            expect(page.get_by_test_id("session-item")).to_have_count(2)
            seen["second_id"] = current_session_id(page)
            expect(session_item(page, "lunch ideas")).to_have_count(1)
            page.screenshot_as("e2e-sessions")

            # Rename in place: Enter saves.
            item = page.locator(f"[data-session-id='{seen['first_id']}']")
            item.hover()
            item.get_by_test_id("rename").click()
            rename = item.get_by_test_id("rename-input")
            seen["rename_value"] = rename.input_value()
            rename.fill("Quarterly plan")
            page.screenshot_as("e2e-rename")
            rename.press("Enter")
            expect(item.get_by_test_id("session-title")).to_have_text("Quarterly plan")
            seen["rename_input_gone"] = item.get_by_test_id("rename-input").count() == 0
            # Escape cancels.
            other = page.locator(f"[data-session-id='{seen['second_id']}']")
            other.hover()
            other.get_by_test_id("rename").click()
            other.get_by_test_id("rename-input").fill("never saved")
            other.get_by_test_id("rename-input").press("Escape")
            expect(other.get_by_test_id("session-title")).to_have_text("lunch ideas")
            seen["stored_titles"] = on_reactor(self.titles, url)

            # Delete: cancel first, then confirm.
            item.hover()
            item.get_by_test_id("delete").click()
            dialog = page.get_by_test_id("confirm-dialog")
            dialog.wait_for(state="visible")
            seen["dialog_text"] = dialog.inner_text()
            page.screenshot_as("e2e-confirm-delete")
            page.get_by_test_id("cancel-delete").click()
            dialog.wait_for(state="hidden")
            seen["after_cancel"] = page.get_by_test_id("session-item").count()
            item.hover()
            item.get_by_test_id("delete").click()
            dialog.wait_for(state="visible")
            page.get_by_test_id("confirm-delete").click()
            expect(page.get_by_test_id("session-item")).to_have_count(1)
            seen["toast"] = page.get_by_test_id("toast").inner_text()
            seen["remaining"] = page.get_by_test_id("session-title").all_inner_texts()
            page.reload()
            page.get_by_test_id("session-item").first.wait_for()
            page.wait_for_load_state("networkidle")
            seen["after_reload"] = page.get_by_test_id("session-title").all_inner_texts()
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["initial_items"], 0)
        self.assertTrue(seen["first_id"])
        self.assertEqual((seen["items_before_sending"], seen["chat_title"]), (0, "New chat"))
        self.assertNotEqual(seen["first_id"], seen["second_id"])
        self.assertEqual(seen["rename_value"], "plan the quarter")
        self.assertTrue(seen["rename_input_gone"])
        self.assertEqual(seen["stored_titles"], {seen["first_id"]: "Quarterly plan", seen["second_id"]: "lunch ideas"})
        self.assertIn("Delete chat?", seen["dialog_text"])
        self.assertIn("“Quarterly plan” will be deleted permanently.", seen["dialog_text"])
        self.assertEqual(seen["after_cancel"], 2)
        self.assertEqual(seen["toast"], "Chat deleted.")
        self.assertEqual(seen["remaining"], ["lunch ideas"])
        self.assertEqual(seen["after_reload"], ["lunch ideas"])
        code, _, _ = await get_json(f"{self.gw.url}/v1/sessions/{seen['first_id']}", headers=self.api_as("alice"))
        self.assertEqual(code, 404)
        self.assertEqual(await self.titles(self.gw.url), {seen["second_id"]: "lunch ideas"})

    async def titles(self, url, sub="alice"):
        """{id: title} of the sessions sub owns, as the gateway stores them."""
        code, _, body = await get_json(f"{url}/v1/sessions", headers=self.api_as(sub, "chat:read"))
        self.assertEqual(code, 200, body)
        return {s["id"]: s["title"] for s in body["data"] if s["owner"] == sub}

    async def test_team_filter(self):
        """
        A user whose IdP group team-a maps to history:team-a can pick
        "Team: team-a" in the filter and sees the team's sessions, one made
        by a teammate through the API included, and not anyone's private
        chats; a chat started under the team filter belongs to the team, so
        the teammate sees it.
        """
        bob = self.api_as("bob")
        code, _, team_chat = await get_json(f"{self.gw.url}/v1/sessions", method="POST", headers=bob, body={"title": "Team-a roadmap", "team": "team-a"})
        self.assertEqual(code, 201, team_chat)
        code, _, _ = await get_json(f"{self.gw.url}/v1/sessions", method="POST", headers=bob, body={"title": "Bob private"})
        self.assertEqual(code, 201)
        code, _, _ = await get_json(f"{self.gw.url}/v1/sessions", method="POST", headers=self.api_as("alice"), body={"title": "Alice private"})
        self.assertEqual(code, 201)

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            page.get_by_test_id("session-item").first.wait_for()
            seen["default_filter"] = page.get_by_test_id("team-filter").input_value()
            seen["all"] = sorted(page.get_by_test_id("session-title").all_inner_texts())
            page.get_by_test_id("team-filter").select_option(label="Team: team-a")
            expect(page.get_by_test_id("session-item")).to_have_count(1)
            seen["team"] = page.get_by_test_id("session-title").all_inner_texts()
            seen["team_item_meta"] = page.get_by_test_id("session-item").inner_text()
            page.get_by_test_id("session-item").locator(".session-open").click()
            expect(page.get_by_test_id("chat-title")).to_have_text("Team-a roadmap")
            seen["opened_id"] = current_session_id(page)
            page.screenshot_as("e2e-team")
            # A new chat under the team filter is the team's.
            page.get_by_test_id("new-session").click()
            send(page, "a team question")
            expect(page.get_by_test_id("session-item")).to_have_count(2)
            seen["new_id"] = current_session_id(page)
            page.get_by_test_id("team-filter").select_option(label="All chats")
            expect(page.get_by_test_id("session-title").filter(has_text="Alice private")).to_have_count(1)
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["default_filter"], "")
        self.assertNotIn("Bob private", seen["all"])
        self.assertIn("Alice private", seen["all"])
        self.assertEqual(seen["team"], ["Team-a roadmap"])
        self.assertIn("bob", seen["team_item_meta"])
        self.assertEqual(seen["opened_id"], team_chat["id"])
        code, _, body = await get_json(f"{self.gw.url}/v1/sessions?team=team-a", headers=bob)
        self.assertEqual(code, 200, body)
        by_id = {s["id"]: s for s in body["data"]}
        self.assertEqual(by_id[seen["new_id"]]["team"], "team-a")
        self.assertEqual(by_id[seen["new_id"]]["owner"], "alice")

    async def test_image_upload_is_shrunk(self):
        """
        An image picked with the file input shows as an attachment and goes
        with the message; the model receives it re-encoded as base64 JPEG no
        larger than images.max_side (1568) on its long side, same aspect,
        with its metadata stripped.  Images dropped on or pasted into the
        composer are attached too, and a removed one is not sent.
        """
        picture = Image.new("RGB", (3000, 2000))
        picture.paste((200, 40, 40), (0, 0, 1500, 1000))
        picture.paste((40, 160, 60), (1500, 1000, 3000, 2000))
        exif = Image.Exif()
        exif[0x010E] = "secret description"  # ImageDescription
        exif[0x8298] = "secret copyright"  # Copyright
        buffer = io.BytesIO()
        picture.save(buffer, "PNG", exif=exif)
        png = buffer.getvalue()

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            page.get_by_test_id("file-input").set_input_files({"name": "big.png", "mimeType": "image/png", "buffer": png})
            page.get_by_test_id("attachment").wait_for()
            seen["attachments"] = page.get_by_test_id("attachment").count()
            page.get_by_test_id("composer").fill("what is in this picture?")
            page.screenshot_as("e2e-image")
            page.get_by_test_id("send").click()
            page.locator(FINAL).wait_for(timeout=20000)
            seen["state"] = page.get_by_test_id("message-assistant").get_attribute("data-state")
            seen["user_images"] = page.get_by_test_id("message-user").locator("img").count()
            seen["attachments_after"] = page.get_by_test_id("attachment").count()
            page.screenshot_as("e2e-image-sent")

            # Dropped on the composer and pasted into it; one removed again.
            page.evaluate(
                """([dropped, pasted]) => {
                    const file = (b64, name) => new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], name, {type: "image/png"});
                    const drop = new DataTransfer();
                    drop.items.add(file(dropped, "dropped.png"));
                    const box = document.querySelector("[data-testid=composer-box]");
                    box.dispatchEvent(new DragEvent("dragenter", {dataTransfer: drop, bubbles: true, cancelable: true}));
                    box.dispatchEvent(new DragEvent("drop", {dataTransfer: drop, bubbles: true, cancelable: true}));
                    const paste = new DataTransfer();
                    paste.items.add(file(pasted, "pasted.png"));
                    document.querySelector("[data-testid=composer]").dispatchEvent(
                        new ClipboardEvent("paste", {clipboardData: paste, bubbles: true, cancelable: true}));
                }""",
                [base64.b64encode(small_png(120, 60)).decode(), base64.b64encode(small_png(90, 90)).decode()],
            )
            expect(page.get_by_test_id("attachment")).to_have_count(2)
            seen["chip_names"] = [chip.get_attribute("title") for chip in page.get_by_test_id("attachment").all()]
            page.get_by_test_id("attachment").first.get_by_test_id("attachment-remove").click()
            expect(page.get_by_test_id("attachment")).to_have_count(1)
            send(page, "and this one?")
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["attachments"], 1)
        self.assertEqual(seen["state"], "done")
        self.assertEqual(seen["user_images"], 1)
        self.assertEqual(seen["attachments_after"], 0)

        self.assertEqual(seen["chip_names"], ["dropped.png", "pasted.png"])
        sent, second = self.chat_requests()
        [pasted] = second["messages"][-1]["images"]
        self.assertEqual(Image.open(io.BytesIO(base64.b64decode(pasted))).size, (90, 90))
        last = sent["messages"][-1]
        self.assertEqual((last["role"], last["content"]), ("user", "what is in this picture?"))
        [b64] = last["images"]
        raw = base64.b64decode(b64, validate=True)
        self.assertLess(len(raw), len(png))
        received = Image.open(io.BytesIO(raw))
        self.assertEqual(received.format, "JPEG")
        self.assertLessEqual(max(received.size), 1568)
        self.assertEqual(received.size[0], 1568)
        self.assertAlmostEqual(received.size[0] / received.size[1], 1.5, places=2)
        self.assertFalse(received.getexif())
        self.assertNotIn(b"secret", raw)
        # Still the same picture: red top left, green bottom right.
        r, g, _ = received.convert("RGB").getpixel((100, 100))
        self.assertGreater(r, 150)
        r, g, _ = received.convert("RGB").getpixel((received.size[0] - 100, received.size[1] - 100))
        self.assertGreater(g, 120)

    async def test_clear_context(self):
        """
        "Clear context" asks first ("Clear this chat?"); confirmed, it sends
        {"session_id": ..., "messages": []}, empties the conversation, and
        the next turn reaches the model with only the new message.
        """

        def script(browser, url):
            seen = {}
            page = sign_in(browser, url)
            send(page, "first question")
            send(page, "second question")
            seen["session_id"] = current_session_id(page)
            page.get_by_test_id("clear-context").click()
            expect(page.get_by_test_id("confirm-dialog")).to_be_visible()
            seen["confirm_title"] = page.locator("#confirm-title").inner_text()
            with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions") and r.method == "POST") as caught:
                page.get_by_test_id("confirm-delete").click()
            seen["clear_body"] = json.loads(caught.value.post_data)
            expect(page.get_by_test_id("toast")).to_have_text("Context cleared.")
            page.get_by_test_id("empty-state").wait_for(state="visible")
            seen["messages_after_clear"] = page.get_by_test_id("messages").locator("article").count()
            seen["same_session"] = current_session_id(page)
            page.screenshot_as("e2e-cleared")
            send(page, "fresh start")
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["confirm_title"], "Clear this chat?")
        self.assertEqual(seen["clear_body"], {"session_id": seen["session_id"], "messages": []})
        self.assertEqual(seen["messages_after_clear"], 0)
        self.assertEqual(seen["same_session"], seen["session_id"])
        requests = self.chat_requests()
        self.assertEqual(len(requests), 3)
        self.assertEqual([m["content"] for m in requests[1]["messages"]], ["first question", self.fake.reply_text, "second question"])
        self.assertEqual(requests[2]["messages"], [{"role": "user", "content": "fresh start"}])

    async def test_hostile_reply_executes_nothing(self):
        """
        A model reply carrying <script>, event handlers, javascript: links
        (Markdown and raw HTML), SVG, iframe srcdoc and ontoggle executes
        nothing, live or when the chat is reopened: no handler attribute,
        script-capable element or javascript: URL reaches the DOM, raw HTML
        shows as text, clicking the links goes nowhere, and no dialog,
        console error or CSP violation occurs.
        """

        def script(browser, url):
            seen = {"dialogs": [], "popups": []}
            page = sign_in(browser, url)
            page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
            page.context.on("page", lambda p: seen["popups"].append(p.url))
            reply = send(page, "a hostile reply please")
            content = reply.get_by_test_id("message-content")
            seen["live"] = content.evaluate(DOM_AUDIT)
            seen["live_html"] = content.inner_html()
            address = page.url
            for name in ("click", "spaced"):
                content.get_by_text(name, exact=True).click()
            page.wait_for_timeout(300)
            seen["address_unchanged"] = page.url == address
            seen["pwned"] = page.evaluate("window.__pwned === undefined ? null : window.__pwned")
            page.screenshot_as("e2e-xss")
            page.reload()
            page.locator(FINAL).wait_for()
            seen["stored"] = page.get_by_test_id("message-content").evaluate(DOM_AUDIT)
            page.wait_for_timeout(300)
            seen["pwned_after_reload"] = page.evaluate("window.__pwned === undefined ? null : window.__pwned")
            seen["problems"] = page.problems(origin=url)
            return seen

        seen = await run_in_browser(script, self.gw.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["dialogs"], [])
        self.assertEqual(seen["popups"], [])
        self.assertIsNone(seen["pwned"])
        self.assertIsNone(seen["pwned_after_reload"])
        self.assertTrue(seen["address_unchanged"])
        for when in ("live", "stored"):
            audit = seen[when]
            self.assertEqual(audit["handlers"], [], when)
            self.assertEqual(audit["scripty"], [], when)
            for tag in ("script", "img", "svg", "iframe", "details", "object", "embed"):
                self.assertNotIn(tag, audit["tags"], when)
            # The javascript: links are left without a target.
            links = dict(audit["links"])
            self.assertIsNone(links["click"], when)
            self.assertIsNone(links["spaced"], when)
            for href in links.values():
                self.assertTrue(href is None or href.startswith(("http:", "https:", "mailto:")), href)
            # Raw HTML is shown as text.
            self.assertIn("<script>window.__pwned=1</script>", audit["text"])
            self.assertIn('<img src=x onerror="window.__pwned=2">', audit["text"])
            self.assertIn('<a href="javascript:window.__pwned=4">', audit["text"])
        self.assertNotIn("<script", seen["live_html"])
        self.assertNotIn("<img", seen["live_html"])
