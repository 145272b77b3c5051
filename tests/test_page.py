"""
The chat page in a real browser: Debian's Chromium driven by Playwright
(tests/browser.py), against the real gateway started in this process.

Smoke tests: the page loads under the gateway's strict Content-Security-Policy
with no console error, uncaught exception or CSP violation; runs without
sign-in on the dev-mode debug port and shows sign-in on the secure port;
degrades with a clear message where an API route is missing or the model
backend is down; speaks English and Chinese; and renders untrusted Markdown
safely.  Screenshots go to artifacts/screenshots/.
"""


import treq
from twisted.trial.unittest import TestCase

from tests.browser import DESKTOP, PHONE, run_in_browser
from tests.helpers import closed_port, serve

FINAL_STATES = "[data-testid=message-assistant]:not([data-state=streaming]), [data-testid=message-error]"


def _dev_mode(browser, url):
    """The debug port: no sign-in, the whole UI, English then Chinese."""
    seen = {}
    page = browser.new_page(viewport=DESKTOP, locale="en-US")
    response = page.goto(url)
    seen["csp"] = response.headers.get("content-security-policy")
    page.get_by_test_id("composer").wait_for(state="visible")
    # Let the first API calls (models, sessions) answer.
    page.wait_for_load_state("networkidle")

    seen["signin_visible"] = page.get_by_test_id("signin").is_visible()
    seen["signout_visible"] = page.get_by_test_id("signout").is_visible()
    seen["dev_badge"] = page.get_by_test_id("dev-badge").inner_text()
    seen["visible"] = {
        tid: page.get_by_test_id(tid).is_visible()
        for tid in ("new-session", "team-filter", "model-picker", "composer", "send", "attach", "clear-context", "lang-switch", "session-list")
    }
    seen["html_lang"] = page.evaluate("document.documentElement.lang")
    seen["new_session_text"] = page.get_by_test_id("new-session").inner_text()
    seen["placeholder"] = page.get_by_test_id("composer").get_attribute("placeholder")
    seen["model_options"] = page.get_by_test_id("model-picker").locator("option").all_inner_texts()
    seen["model_picker_disabled"] = page.get_by_test_id("model-picker").is_disabled()
    seen["notices"] = page.get_by_test_id("notice").all_inner_texts()
    seen["session_items"] = page.get_by_test_id("session-item").count()
    seen["session_status"] = page.get_by_test_id("sessions-status").all_inner_texts()
    page.screenshot_as("desktop-en")

    # Sending works end to end as far as the gateway goes: with no model
    # backend (or no chat route yet) the reply is a clear error in the
    # conversation, and the page stays usable.
    page.get_by_test_id("composer").fill("Hello from the smoke test")
    page.get_by_test_id("send").click()
    page.get_by_test_id("message-user").first.wait_for()
    page.locator(FINAL_STATES).first.wait_for(timeout=30000)
    seen["user_message"] = page.get_by_test_id("message-user").first.inner_text()
    seen["errors_shown"] = page.get_by_test_id("message-error").all_inner_texts()
    seen["send_visible_after"] = page.get_by_test_id("send").is_visible()
    seen["stop_visible_after"] = page.get_by_test_id("stop").is_visible()
    page.screenshot_as("desktop-en-after-send")

    page.get_by_test_id("lang-switch").select_option("zh-CN")
    seen["zh"] = {
        "html_lang": page.evaluate("document.documentElement.lang"),
        "new_session": page.get_by_test_id("new-session").inner_text(),
        "placeholder": page.get_by_test_id("composer").get_attribute("placeholder"),
        "title": page.get_by_test_id("chat-title").inner_text(),
    }
    page.screenshot_as("desktop-zh")
    page.get_by_test_id("lang-switch").select_option("en")
    seen["back_to_en"] = page.get_by_test_id("new-session").inner_text()
    seen["problems"] = page.problems()

    # A phone in Chinese (from navigator.language), dark: the session list
    # is a drawer, closed until asked for.
    phone = browser.new_page(viewport=PHONE, locale="zh-CN", color_scheme="dark", is_mobile=True, has_touch=True)
    phone.goto(url)
    phone.get_by_test_id("composer").wait_for(state="visible")
    phone.wait_for_load_state("networkidle")
    seen["phone"] = {
        "html_lang": phone.evaluate("document.documentElement.lang"),
        "placeholder": phone.get_by_test_id("composer").get_attribute("placeholder"),
        "sidebar_visible": phone.get_by_test_id("sidebar").is_visible(),
    }
    phone.screenshot_as("phone-zh")
    phone.get_by_test_id("sidebar-toggle").click()
    phone.get_by_test_id("new-session").wait_for(state="visible")
    phone.wait_until("document.getElementById('sidebar').getBoundingClientRect().left === 0")  # slid in
    seen["phone"]["sidebar_opened"] = phone.get_by_test_id("sidebar").is_visible()
    seen["phone"]["new_session"] = phone.get_by_test_id("new-session").inner_text()
    phone.screenshot_as("phone-zh-sessions")
    phone.get_by_test_id("sidebar-backdrop").click(position={"x": 370, "y": 400})
    phone.get_by_test_id("new-session").wait_for(state="hidden")
    seen["phone"]["sidebar_closed"] = not phone.get_by_test_id("sidebar").is_visible()
    seen["phone"]["problems"] = phone.problems()
    return seen


def _secure_port(browser, url):
    """The secure port without a session: the sign-in screen, nothing else."""
    seen = {}
    page = browser.new_page(viewport=DESKTOP, locale="en-US")
    response = page.goto(url)
    seen["csp"] = response.headers.get("content-security-policy")
    page.locator("#signin").wait_for(state="visible")
    page.wait_for_load_state("networkidle")
    seen["signin_text"] = page.get_by_test_id("signin").text_content()
    seen["signin_visible"] = page.get_by_test_id("signin").is_visible()
    message = page.get_by_test_id("signin-message")
    seen["signin_message"] = message.inner_text() if message.is_visible() else ""
    seen["app_visible"] = page.get_by_test_id("composer").is_visible()
    seen["signout_visible"] = page.get_by_test_id("signout").is_visible()
    seen["lang_visible"] = page.get_by_test_id("lang-switch").is_visible()
    page.screenshot_as("signin-desktop")
    page.get_by_test_id("lang-switch").select_option("zh-CN")
    seen["signin_text_zh"] = page.get_by_test_id("signin").text_content()
    seen["problems"] = page.problems()

    phone = browser.new_page(viewport=PHONE, locale="en-US", is_mobile=True, has_touch=True)
    phone.goto(url)
    phone.locator("#signin").wait_for(state="visible")
    phone.wait_for_load_state("networkidle")
    phone.screenshot_as("signin-phone")
    seen["phone_problems"] = phone.problems()
    return seen


HOSTILE_MARKDOWN = """\
# Title

[ok](https://example.com/a) [mail](mailto:a@example.com) [js](javascript:alert(1))
[js2]( JaVaScRiPt:alert(2)) [rel](/relative) [data](data:text/html,hello)

<a href="javascript:alert(4)">raw link</a> <img src=x onerror="alert(5)"> <script>alert(6)</script>
<span style="color:red" onclick="alert(7)">styled</span><style>body{display:none}</style>

![tracker](https://evil.example/pixel.png)

```python
def hello():
    return "<b>not html</b>"
```
"""


def _render(browser, url):
    """render.js on hostile Markdown, and the Copy button of a code block."""
    page = browser.new_page(viewport=DESKTOP, locale="en-US")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url.rstrip("/"))
    page.goto(url)
    page.get_by_test_id("composer").wait_for(state="visible")
    page.wait_for_load_state("networkidle")
    seen = page.evaluate(
        """async (text) => {
            const m = await import("/static/render.js");
            const host = document.createElement("article");
            host.className = "markdown";
            host.id = "render-probe";
            host.append(m.renderMarkdown(text));
            document.getElementById("messages").append(host);
            document.getElementById("empty").hidden = true;
            const all = [...host.querySelectorAll("*")];
            return {
                links: [...host.querySelectorAll("a")].map(a => ({text: a.textContent, href: a.getAttribute("href"),
                                                                 rel: a.getAttribute("rel"), target: a.getAttribute("target")})),
                tags: [...new Set(all.map(e => e.tagName.toLowerCase()))],
                handlers: all.flatMap(e => [...e.attributes].map(a => a.name)).filter(n => n.startsWith("on") || n === "style"),
                images: [...host.querySelectorAll("img")].map(i => i.getAttribute("src")),
                blocked: [...host.querySelectorAll(".blocked-image")].map(e => e.textContent),
                text: host.textContent,
                highlighted: host.querySelectorAll("pre code.hljs span[class^=hljs-]").length,
                codeLang: host.querySelector(".code-lang")?.textContent,
                safe: [" javascript:x", "java\\tscript:x", "JAVASCRIPT:x", "vbscript:x", "data:text/html,x", "/x", "https://a.b/", "mailto:x@y.z"]
                        .map(h => [h, m.isSafeLink(h)]),
            };
        }""",
        HOSTILE_MARKDOWN,
    )
    copy = page.locator("#render-probe").get_by_test_id("code-copy")
    copy.click()
    page.wait_until("document.querySelector('#render-probe [data-testid=code-copy]').textContent.includes('Copied')")
    seen["copy_label"] = copy.inner_text()
    seen["clipboard"] = page.evaluate("navigator.clipboard.readText()")
    page.screenshot_as("render-hostile-markdown")
    seen["problems"] = page.problems()
    return seen


class ChatPageTests(TestCase):
    timeout = 300

    def setUp(self):
        # Never a real Ollama that may run on this machine: the page must
        # cope with the backend being down.
        self.gw = serve(self, extra=f'backend: {{url: "http://127.0.0.1:{closed_port(self)}"}}')

    async def test_page_and_assets_are_served_with_csp(self):
        """/ and the page's files are served with their types, and the page with the CSP."""
        for base in (self.gw.url, self.gw.debug_url):
            response = await treq.get(base + "/", persistent=False)
            await response.content()
            self.assertEqual(response.code, 200)
            csp = response.headers.getRawHeaders("content-security-policy")[0]
            for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"):
                self.assertIn(directive, csp)
        for path, ctype in [
            ("/static/app.js", "text/javascript"),
            ("/static/api.js", "text/javascript"),
            ("/static/render.js", "text/javascript"),
            ("/static/i18n.js", "text/javascript"),
            *[(f"/static/{name}.js", "text/javascript") for name in (
                "store", "dom", "auth", "sessions", "conversation", "reply", "markdown-stream", "composer", "chat", "notify")],
            ("/static/app.css", "text/css"),
            ("/static/icon.svg", "image/svg+xml"),
            ("/static/vendor/marked.esm.js", "text/javascript"),
            ("/static/vendor/purify.es.mjs", "text/javascript"),
            ("/static/vendor/highlight.es.min.js", "text/javascript"),
            ("/static/vendor/highlight-github.min.css", "text/css"),
            ("/static/vendor/highlight-github-dark.min.css", "text/css"),
        ]:
            response = await treq.get(self.gw.url + path, persistent=False)
            body = await response.content()
            self.assertEqual(response.code, 200, path)
            self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith(ctype), path)
            self.assertTrue(body, path)

    async def test_dev_mode_page(self):
        """
        On the debug port the page runs without sign-in, shows every control
        the dev principal's scopes allow, degrades clearly where the API or
        the model backend is missing, and switches between English and
        Chinese; on a phone the session list is a drawer.
        """
        seen = await run_in_browser(_dev_mode, self.gw.debug_url + "/")
        self.assertIn("script-src 'self'", seen["csp"])
        self.assertEqual(seen["problems"], [])
        self.assertFalse(seen["signin_visible"])
        self.assertFalse(seen["signout_visible"])
        self.assertEqual(seen["dev_badge"], "Dev mode")
        self.assertEqual(seen["visible"], dict.fromkeys(seen["visible"], True))
        self.assertEqual(seen["html_lang"], "en")
        self.assertEqual(seen["new_session_text"], "New chat")
        self.assertEqual(seen["placeholder"], "Message Clawdbot…")
        # The models: a list, or the default with a message saying why.
        self.assertTrue(seen["model_options"])
        if seen["model_picker_disabled"]:
            self.assertEqual(seen["model_options"], ["Default model"])
            self.assertTrue(any("model list" in n for n in seen["notices"]), seen["notices"])
        # The session list: sessions, or a line saying what there is.
        self.assertTrue(seen["session_items"] or seen["session_status"])
        # Sending: the user's turn shows, and the outcome is final, never a hang.
        self.assertEqual(seen["user_message"], "Hello from the smoke test")
        for shown in seen["errors_shown"]:
            self.assertTrue(shown.strip())
        self.assertTrue(seen["send_visible_after"])
        self.assertFalse(seen["stop_visible_after"])

        self.assertEqual(
            seen["zh"],
            {"html_lang": "zh-CN", "new_session": "新对话", "placeholder": "给 Clawdbot 发消息…", "title": seen["zh"]["title"]},
        )
        self.assertEqual(seen["back_to_en"], "New chat")

        phone = seen["phone"]
        self.assertEqual(phone["problems"], [])
        self.assertEqual(phone["html_lang"], "zh-CN")
        self.assertEqual(phone["placeholder"], "给 Clawdbot 发消息…")
        self.assertFalse(phone["sidebar_visible"])
        self.assertTrue(phone["sidebar_opened"])
        self.assertEqual(phone["new_session"], "新对话")
        self.assertTrue(phone["sidebar_closed"])

    async def test_secure_port_shows_sign_in(self):
        """Without a session the secure port shows only the sign-in screen."""
        seen = await run_in_browser(_secure_port, self.gw.url + "/")
        self.assertIn("script-src 'self'", seen["csp"])
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["phone_problems"], [])
        self.assertEqual(seen["signin_text"], "Sign in")
        # No sign-in is configured in this test's gateway: if it has no
        # /auth/refresh at all, the page says so.
        if seen["signin_message"]:
            # ...and hides the Sign in button, which would lead nowhere.
            self.assertIn("sign-on", seen["signin_message"])
            self.assertFalse(seen["signin_visible"])
        else:
            self.assertTrue(seen["signin_visible"])
        self.assertEqual(seen["signin_text_zh"], "登录")
        self.assertFalse(seen["app_visible"])
        self.assertFalse(seen["signout_visible"])
        self.assertTrue(seen["lang_visible"])

    async def test_model_output_is_sanitised(self):
        """
        Markdown from the model: links only to http(s) and mailto, opening
        without opener or referrer; raw HTML shown as text; no script, style,
        event handler or remote image; code highlighted, with a Copy button.
        """
        seen = await run_in_browser(_render, self.gw.debug_url + "/")
        self.assertEqual(seen["problems"], [])
        links = {link["text"]: link for link in seen["links"]}
        self.assertEqual(links["ok"], {"text": "ok", "href": "https://example.com/a", "rel": "noopener noreferrer", "target": "_blank"})
        self.assertEqual(links["mail"]["href"], "mailto:a@example.com")
        for name in ("js", "js2", "rel", "data"):
            self.assertIsNone(links[name]["href"], name)
            self.assertIsNone(links[name]["target"], name)
        self.assertNotIn("raw link", links)
        for tag in ("script", "style", "iframe", "form", "input", "img"):
            self.assertNotIn(tag, seen["tags"])
        self.assertEqual(seen["handlers"], [])
        self.assertEqual(seen["images"], [])
        self.assertEqual(len(seen["blocked"]), 1)
        self.assertIn("tracker", seen["blocked"][0])
        # Raw HTML is shown as text.
        self.assertIn('<img src=x onerror="alert(5)">', seen["text"])
        self.assertIn("<script>alert(6)</script>", seen["text"])
        self.assertGreater(seen["highlighted"], 0)
        self.assertEqual(seen["codeLang"], "python")
        self.assertEqual(
            dict(seen["safe"]),
            {
                " javascript:x": False,
                "java\tscript:x": False,
                "JAVASCRIPT:x": False,
                "vbscript:x": False,
                "data:text/html,x": False,
                "/x": False,
                "https://a.b/": True,
                "mailto:x@y.z": True,
            },
        )
        self.assertEqual(seen["copy_label"], "Copied")
        self.assertEqual(seen["clipboard"], 'def hello():\n    return "<b>not html</b>"\n')
