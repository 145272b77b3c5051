"""
How the chat page looks and how it reads to a keyboard or screen-reader
user (issue 20, items 12 to 14), in Debian's Chromium through Playwright
(tests/browser.py) against a real gateway in this process, on its dev-mode
debug port (no sign-in), with the fake Ollama answering.

Tables scroll sideways on a phone instead of breaking words; maths is
typeset by the vendored KaTeX as MathML (no CSS, fonts or inline styles: the
CSP stays strict), also while a reply streams, and hostile TeX or MathML
runs nothing; the session list is a list; a finished reply and an error are
announced in a polite live region; focus starts in the composer; Esc stops a
reply; the focus ring is clear in both themes; a button scrolls back to the
latest message; and a theme toggle overrides the system's light or dark.
Screenshots go to artifacts/screenshots/look-*.png.
"""

import hashlib
import os
import re

import treq

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from testing.fake_ollama import FakeOllama
from tests.browser import DESKTOP, PHONE, ROOT, run_in_browser
from tests.helpers import serve

DONE = "[data-testid=message-assistant]:not([data-state=streaming])"

HELLO = "Hello! This is the fake model speaking."

WORD = "Antidisestablishmentarianism"
TABLE_REPLY = f"""\
Here is a wide table:

| Name | Description | Category | Status | Owner | Region |
|---|---|---|---|---|---|
| {WORD} | Pneumonoultramicroscopicsilicovolcanoconiosis | Floccinaucinihilipilification | Supercalifragilistic | Hippopotomonstrosesquippedaliophobia | Incomprehensibilities |
| short | a b c | d | e | f | g |

After the table.
"""

MATH_REPLY = r"""Inline \(a^2 + b^2 = c^2\) and $e^{i\pi} + 1 = 0$, a thin space \(a\,b\), and $x_1 + y_1 = z_1$ with underscores.

$$
\int_0^1 x^2\,dx = \frac{1}{3}
$$

\[ \sum_{n=1}^\infty \frac{1}{n^2} = \frac{\pi^2}{6} \]

Prices: $5 and $10 stay text.

Code is never maths: `$x_1$` and `\(y\)`.

```
$$ not maths $$
```

A broken one: $\frac{1$ here.
"""
MATH_TEX = [r"a^2 + b^2 = c^2", r"e^{i\pi} + 1 = 0", r"a\,b", r"x_1 + y_1 = z_1", r"\int_0^1 x^2\,dx = \frac{1}{3}", r"\sum_{n=1}^\infty \frac{1}{n^2} = \frac{\pi^2}{6}"]

HOSTILE_MATH = r"""Links: $\href{javascript:window.__pwned=1}{click}$ and \(\url{javascript:window.__pwned=2}\).

Classes and data: $\htmlClass{evil}{x}$ $\htmlData{onclick=window.__pwned=3}{y}$ $\htmlStyle{background:red}{z}$ $\htmlId{boot}{w}$

Text: $\text{<img src=x onerror="window.__pwned=4">}$ and $\unicode{<script>}$

$$
\href{javascript:window.__pwned=5}{\includegraphics{https://evil.example/x.png}}
$$

Raw: <math><mi xlink:href="javascript:window.__pwned=6">x</mi><mtext><img src=x onerror="window.__pwned=7"></mtext></math>

Loop: $\def\a{\a\a}\a$ and $\rule{9999em}{9999em}$
"""

# Hostile MathML straight into the page's sanitiser (not through Markdown,
# which shows raw HTML as text anyway).
HOSTILE_MATHML = """\
<math><mi xlink:href="javascript:window.__pwned=11" href="javascript:window.__pwned=12">x</mi>\
<mtext><img src=x onerror="window.__pwned=13"></mtext>\
<maction actiontype="statusline"><mi>y</mi><mtext>s</mtext></maction>\
<annotation-xml encoding="text/html"><a href="javascript:window.__pwned=14">z</a><style>*{display:none}</style></annotation-xml>\
<mstyle style="color:red" onclick="window.__pwned=15"><mn>1</mn></mstyle></math>\
<svg><math><mi>nested</mi></math></svg>"""

LONG_REPLY = "\n\n".join(f"Paragraph {i}: " + " ".join(f"word{j}" for j in range(30)) for i in range(40))
SLOW_REPLY = " ".join(f"tok{i}" for i in range(400))


def reply_for(path, body):
    """The fake model's answer, chosen by the last user message."""
    messages = body.get("messages") or []
    last = messages[-1].get("content", "") if messages else ""
    last = last if isinstance(last, str) else ""
    if "table" in last:
        return TABLE_REPLY
    if "hostile" in last:
        return HOSTILE_MATH
    if "maths" in last:
        return MATH_REPLY
    if "long" in last:
        return LONG_REPLY
    if "slow" in last:
        return SLOW_REPLY
    return HELLO


def open_page(browser, url, viewport=DESKTOP, **options):
    page = browser.new_page(viewport=viewport, **options)
    page.goto(url)
    page.get_by_test_id("composer").wait_for(state="visible")
    page.wait_for_load_state("networkidle")
    return page


def send(page, text):
    """Send text and wait for its reply to finish; returns the reply's locator."""
    before = page.get_by_test_id("message-assistant").count()
    page.get_by_test_id("composer").fill(text)
    page.get_by_test_id("send").click()
    page.locator(f"{DONE} >> nth={before}").wait_for(timeout=30000)
    return page.get_by_test_id("message-assistant").nth(before)


# --- tables --------------------------------------------------------------------------

TABLE_FACTS = r"""(reply) => {
    const tables = [...reply.querySelectorAll("table")];
    const wrap = tables[0].parentElement;
    const cell = [...reply.querySelectorAll("td")].find((td) => td.textContent.trim() === WORD);
    const range = document.createRange();
    range.selectNodeContents(cell);
    const lines = new Set([...range.getClientRects()].map((r) => Math.round(r.top)));
    const before = wrap.scrollLeft;
    wrap.scrollLeft = 120;
    const after = wrap.scrollLeft;
    wrap.scrollLeft = before;
    return {
        tables: tables.length,
        wrapped: tables.filter((t) => t.parentElement.classList.contains("table-wrap")).length,
        overflowX: getComputedStyle(wrap).overflowX,
        scrollWidth: wrap.scrollWidth,
        clientWidth: wrap.clientWidth,
        scrolled: after,
        wordLines: lines.size,
        cellWidth: cell.getBoundingClientRect().width,
        // The page itself does not scroll sideways: only the table does.
        pageOverflow: document.documentElement.scrollWidth - document.documentElement.clientWidth,
        conversationOverflow: (() => { const c = document.getElementById("conversation"); return c.scrollWidth - c.clientWidth; })(),
    };
}""".replace("WORD", repr(WORD))


def _tables(browser, url):
    seen = {}
    for name, viewport, options in (("phone", PHONE, {"is_mobile": True, "has_touch": True}), ("desktop", DESKTOP, {})):
        page = open_page(browser, url, viewport, **options)
        reply = send(page, "a wide table, please")
        seen[name] = reply.evaluate(TABLE_FACTS)
        reply.locator(".table-wrap").scroll_into_view_if_needed()
        page.screenshot_as(f"look-table-{name}")
        seen[name]["problems"] = page.problems()
    return seen


# --- maths ---------------------------------------------------------------------------

MATH_FACTS = r"""(reply) => {
    const content = reply.querySelector("[data-testid=message-content]");
    const maths = [...content.querySelectorAll("math")];
    const all = [...content.querySelectorAll("*")];
    return {
        maths: maths.length,
        display: content.querySelectorAll(".math-display math[display=block]").length,
        blockDisplay: content.querySelectorAll(":scope > div.math-display").length,
        sources: maths.map((m) => (m.querySelector("annotation") || {}).textContent),
        laidOut: maths.every((m) => { const r = m.getBoundingClientRect(); return r.width > 0 && r.height > 0; }),
        annotationHidden: [...content.querySelectorAll("annotation")].every((a) => a.getBoundingClientRect().width === 0),
        msub: content.querySelectorAll("msub, msubsup").length,
        emphasis: content.querySelectorAll("em, strong").length,
        codeSpans: [...content.querySelectorAll(":not(pre) > code:not(.math-error)")].map((c) => c.textContent),
        fenced: [...content.querySelectorAll("pre code")].map((c) => c.textContent),
        errors: [...content.querySelectorAll("code.math-error")].map((c) => c.textContent),
        errorColor: (() => { const e = content.querySelector("code.math-error"); return e && getComputedStyle(e).fontFamily; })(),
        text: content.textContent,
        styles: all.filter((e) => e.hasAttribute("style")).length,
        handlers: all.flatMap((e) => [...e.attributes].map((a) => a.name)).filter((n) => n.startsWith("on")),
    };
}"""


def _maths(browser, url):
    seen = {}
    for name, viewport, options in (("desktop", DESKTOP, {}), ("phone", PHONE, {"is_mobile": True, "has_touch": True})):
        page = open_page(browser, url, viewport, **options)
        reply = send(page, "some maths, please")
        seen[name] = reply.evaluate(MATH_FACTS)
        page.screenshot_as(f"look-maths-{name}")
        seen[name]["problems"] = page.problems()
    return seen


HOSTILE_FACTS = r"""async ([reply, mathml]) => {
    const { sanitize } = await import("/static/render.js");
    const audit = (root) => {
        const all = [...root.querySelectorAll("*")];
        const attrs = all.flatMap((e) => [...e.attributes].map((a) => [e.tagName.toLowerCase(), a.name, a.value]));
        return {
            tags: [...new Set(all.map((e) => e.tagName.toLowerCase()))],
            handlers: attrs.filter(([, n]) => n.toLowerCase().startsWith("on")),
            links: attrs.filter(([, n]) => /(^|:)href$/i.test(n)),
            scripty: attrs.filter(([, , v]) => /javascript:|<script|<img/i.test(v)),
            styles: attrs.filter(([, n]) => n === "style"),
            sources: attrs.filter(([, n]) => n === "src"),
            classes: [...new Set(all.flatMap((e) => [...e.classList]))],
            ids: attrs.filter(([, n]) => n === "id"),
        };
    };
    // Click every piece of maths, as a curious user would.
    for (const m of reply.querySelectorAll("math, math *")) m.dispatchEvent(new MouseEvent("click", { bubbles: true }));
    const host = document.createElement("div");
    if (mathml) host.append(sanitize(mathml));
    document.getElementById("messages").append(host);
    for (const m of host.querySelectorAll("*")) m.dispatchEvent(new MouseEvent("click", { bubbles: true }));
    await new Promise((r) => setTimeout(r, 300));
    const out = { reply: audit(reply), direct: audit(host), directHtml: host.innerHTML, pwned: window.__pwned ?? null,
                  errors: [...reply.querySelectorAll("code.math-error")].map((c) => c.textContent),
                  maths: reply.querySelectorAll("math").length, text: reply.textContent };
    host.remove();
    return out;
}"""


def _hostile_maths(browser, url):
    page = open_page(browser, url)
    reply = send(page, "hostile maths")
    seen = page.evaluate(HOSTILE_FACTS, [reply.get_by_test_id("message-content").element_handle(), None])
    page.screenshot_as("look-maths-hostile")
    seen["problems"] = page.problems()
    # Straight into the sanitiser, in a page of its own: DOMPurify parses the
    # HTML in an inert document under the page's CSP, which reports (and
    # blocks) the handlers and styles it meets there before they are
    # stripped; nothing may get further than that.
    direct = open_page(browser, url)
    seen["direct"] = direct.evaluate(HOSTILE_FACTS, [direct.get_by_test_id("messages").element_handle(), HOSTILE_MATHML])["direct"]
    seen["direct_pwned"] = direct.evaluate("window.__pwned ?? null")
    seen["direct_problems"] = [p for p in direct.problems() if "/static/vendor/purify.es.mjs" not in p]
    return seen


# Streams Markdown with maths into a MarkdownStream a few characters at a
# time: an unfinished formula is text, a finished one maths, and each step
# is the DOM one render of the text so far gives.
STREAM_MATHS = r"""async (text) => {
    const { MarkdownStream } = await import("/static/markdown-stream.js");
    const { renderMarkdown } = await import("/static/render.js");
    const oneShot = (t) => { const box = document.createElement("div"); box.append(renderMarkdown(t)); return box.innerHTML; };
    const host = document.createElement("div");
    const stream = new MarkdownStream(host);
    const seen = { steps: 0, mismatches: [], partial: null, partialMaths: null, whole: null };
    for (let pos = 1; pos <= text.length; pos++) {
        const prefix = text.slice(0, pos);
        stream.update(prefix);
        seen.steps++;
        if (host.innerHTML !== oneShot(prefix)) seen.mismatches.push(pos);
        // Inside the display formula, before its closing $$.
        if (seen.partial === null && prefix.endsWith("\\frac{1}")) {
            seen.partial = host.textContent;
            seen.partialMaths = host.querySelectorAll("math").length;
        }
    }
    stream.update(text, { final: true });
    seen.final = host.innerHTML === oneShot(text);
    seen.maths = host.querySelectorAll("math").length;
    return seen;
}"""

STREAMED_MATHS = "First $a_1$ then:\n\n$$\n\\int_0^1 x\\,dx = \\frac{1}{2}\n$$\n\nand \\(b_2\\) done.\n\n- item $c^2$\n"


def _stream_maths(browser, url):
    page = open_page(browser, url)
    seen = page.evaluate(STREAM_MATHS, STREAMED_MATHS)
    seen["problems"] = page.problems()
    return seen


# --- accessibility -------------------------------------------------------------------

ACTIVE = "document.activeElement && document.activeElement.dataset.testid"


def _list_and_focus(browser, url):
    seen = {}
    page = open_page(browser, url)
    seen["focus_at_open"] = page.evaluate(ACTIVE)
    send(page, "hello")
    page.get_by_test_id("new-session").click()
    send(page, "hello again")
    page.get_by_test_id("session-item").nth(1).wait_for()
    seen["list"] = page.evaluate(
        r"""() => {
            const nav = document.querySelector("nav[data-testid=session-list]");
            const items = [...document.querySelectorAll("[data-testid=session-item]")];
            const lists = [...nav.querySelectorAll("ul")];
            return {
                items: items.length,
                itemsAreLi: items.every((i) => i.tagName === "LI" && i.parentElement.tagName === "UL" && nav.contains(i)),
                lists: lists.length,
                listChildren: lists.flatMap((u) => [...u.children].map((c) => c.tagName)),
                headings: [...nav.querySelectorAll("h2.session-group")].map((h) => h.textContent),
                labelled: lists.map((u) => (document.getElementById(u.getAttribute("aria-labelledby")) || {}).textContent),
                role: getComputedStyle(lists[0]).listStyleType,
            };
        }"""
    )
    # Opening a chat from the list (a click puts focus on the item) hands focus to the composer.
    page.get_by_test_id("session-item").nth(1).locator(".session-open").click()
    page.wait_until("location.hash.startsWith('#s=')")
    page.wait_until(f"({ACTIVE}) === 'composer'", timeout=5)
    seen["focus_after_open"] = page.evaluate(ACTIVE)
    # The same by keyboard: Tab to the other chat, Enter.
    page.get_by_test_id("session-item").nth(0).locator(".session-open").focus()
    page.keyboard.press("Enter")
    page.wait_until(f"({ACTIVE}) === 'composer'", timeout=5)
    seen["focus_after_keyboard_open"] = page.evaluate(ACTIVE)
    page.screenshot_as("look-session-list")
    seen["problems"] = page.problems()

    phone = open_page(browser, url, PHONE, is_mobile=True, has_touch=True)
    seen["phone_focus_at_open"] = phone.evaluate(ACTIVE)
    seen["phone_problems"] = phone.problems()
    return seen


def _live_region(browser, url, fake):
    seen = {}
    page = open_page(browser, url)
    region = page.get_by_test_id("live-region")
    seen["attrs"] = region.evaluate("(r) => ({live: r.getAttribute('aria-live'), box: [r.getBoundingClientRect().width, r.getBoundingClientRect().height], display: getComputedStyle(r).display})")
    seen["empty_at_start"] = region.text_content()
    # While a reply streams the region stays quiet; when it ends it holds the whole reply.
    fake.behave(pace=0.01)
    page.get_by_test_id("composer").fill("long answer please")
    page.get_by_test_id("send").click()
    page.locator("[data-testid=message-assistant][data-state=streaming]").wait_for()
    page.wait_until("document.querySelector('[data-testid=message-content]').textContent.includes('Paragraph 2')")
    seen["while_streaming"] = region.text_content()
    page.locator(DONE).first.wait_for(timeout=30000)
    page.wait_until("document.getElementById('live-region').textContent.length > 0")
    seen["after_reply"] = region.text_content()
    seen["reply_text"] = page.get_by_test_id("message-content").first.text_content()
    fake.behave()
    # An error is announced too.
    fake.behave(times=1, status_error=500, error_message="model runner crashed")
    page.get_by_test_id("composer").fill("hello")
    page.get_by_test_id("send").click()
    page.get_by_test_id("message-error").first.wait_for(timeout=30000)
    page.wait_until("document.getElementById('live-region').textContent.length > 0 && !document.getElementById('live-region').textContent.includes('Paragraph')")
    seen["error_shown"] = page.get_by_test_id("message-error").first.text_content()
    seen["after_error"] = region.text_content()
    seen["problems"] = page.problems()
    return seen


def _escape_stops(browser, url, fake):
    seen = {}
    page = open_page(browser, url)
    fake.behave(pace=0.05)
    page.get_by_test_id("composer").fill("slow answer please")
    page.get_by_test_id("send").click()
    streaming = page.locator("[data-testid=message-assistant][data-state=streaming]")
    streaming.wait_for()
    page.wait_until("document.querySelector('[data-testid=message-content]').textContent.includes('tok3')")
    # With a dialog open, Esc is the dialog's: it closes, the reply goes on.
    page.get_by_test_id("open-keys").click()
    page.get_by_test_id("keys-dialog").wait_for(state="visible")
    page.keyboard.press("Escape")
    page.get_by_test_id("keys-dialog").wait_for(state="hidden")
    seen["streaming_after_dialog_esc"] = streaming.count()
    # Without one, Esc stops the reply (the Stop button's action).
    page.get_by_test_id("composer").focus()
    page.keyboard.press("Escape")
    page.locator(DONE).first.wait_for(timeout=10000)
    seen["state"] = page.get_by_test_id("message-assistant").first.get_attribute("data-state")
    seen["status"] = page.get_by_test_id("message-status").first.text_content()
    seen["stop_visible"] = page.get_by_test_id("stop").is_visible()
    seen["send_visible"] = page.get_by_test_id("send").is_visible()
    seen["text_length"] = len(page.get_by_test_id("message-content").first.text_content())
    fake.behave()
    seen["problems"] = page.problems()
    return seen


FOCUS_FACTS = r"""() => {
    const e = document.activeElement;
    const s = getComputedStyle(e);
    return { testid: e.dataset.testid || e.id, width: s.outlineWidth, style: s.outlineStyle, color: s.outlineColor,
             background: getComputedStyle(document.body).backgroundColor, focusVisible: e.matches(":focus-visible") };
}"""


def _focus_ring(browser, url):
    seen = {}
    for scheme in ("light", "dark"):
        page = open_page(browser, url, color_scheme=scheme)
        # From the composer, Shift+Tab reaches the "attach" button by keyboard.
        page.get_by_test_id("composer").focus()
        page.keyboard.press("Shift+Tab")
        page.wait_until("document.activeElement && document.activeElement.tagName === 'BUTTON'")
        seen[scheme] = page.evaluate(FOCUS_FACTS)
        page.screenshot_as(f"look-focus-{scheme}")
        # And a chat in the list.
        send(page, "hello")
        page.get_by_test_id("session-item").first.wait_for()
        page.get_by_test_id("new-session").focus()
        page.keyboard.press("Tab")
        page.keyboard.press("Tab")
        page.keyboard.press("Tab")
        seen[scheme + "_later"] = page.evaluate(FOCUS_FACTS)
        seen[scheme + "_problems"] = page.problems()
    return seen


# --- scroll-to-bottom and theme ------------------------------------------------------

SCROLL_FACTS = "(() => { const c = document.getElementById('conversation'); return c.scrollHeight - c.scrollTop - c.clientHeight; })()"


def _scroll_button(browser, url):
    seen = {}
    page = open_page(browser, url)
    button = page.get_by_test_id("scroll-bottom")
    seen["hidden_at_start"] = button.is_hidden()
    send(page, "a long answer please")
    page.wait_until(f"{SCROLL_FACTS} < 5")
    seen["hidden_at_bottom"] = button.is_hidden()
    # A little way up: still hidden.
    page.evaluate("document.getElementById('conversation').scrollTop -= 100")
    page.wait_until(f"{SCROLL_FACTS} >= 95")
    page.wait_for_timeout(200)
    seen["hidden_near_bottom"] = button.is_hidden()
    # Far up: shown.
    page.get_by_test_id("conversation").hover()
    page.mouse.wheel(0, -1500)
    page.wait_until(f"{SCROLL_FACTS} > 400")
    button.wait_for(state="visible")
    seen["label"] = button.get_attribute("aria-label")
    page.screenshot_as("look-scroll-bottom")
    button.click()
    page.wait_until(f"{SCROLL_FACTS} < 5")
    button.wait_for(state="hidden")
    seen["hidden_after_click"] = button.is_hidden()
    seen["problems"] = page.problems()
    return seen


THEME_FACTS = r"""() => {
    const media = (id) => document.getElementById(id).media;
    const keyword = document.querySelector("#theme-probe .hljs-keyword");
    return {
        theme: document.documentElement.dataset.theme || null,
        background: getComputedStyle(document.body).backgroundColor,
        text: getComputedStyle(document.body).color,
        hljsLight: media("hljs-light"),
        hljsDark: media("hljs-dark"),
        hljsLightOn: matchMedia(media("hljs-light")).matches,
        hljsDarkOn: matchMedia(media("hljs-dark")).matches,
        keyword: keyword ? getComputedStyle(keyword).color : null,
        colorScheme: document.querySelector("meta[name=color-scheme]").content,
        themeColor: [...document.querySelectorAll("meta[name=theme-color]")].filter((m) => matchMedia(m.media || "all").matches).map((m) => m.content),
        stored: localStorage.getItem("clawdbot.theme"),
        select: document.querySelector("[data-testid=theme-toggle]").value,
    };
}"""

CODE_PROBE = r"""async () => {
    const { renderMarkdown } = await import("/static/render.js");
    const host = document.createElement("div");
    host.className = "markdown";
    host.id = "theme-probe";
    host.append(renderMarkdown("```python\ndef f(x):\n    return x\n```"));
    document.getElementById("messages").append(host);
    document.getElementById("empty").hidden = true;
}"""


def _theme(browser, url):
    seen = {}
    page = open_page(browser, url, color_scheme="light")
    page.evaluate(CODE_PROBE)
    toggle = page.get_by_test_id("theme-toggle")
    seen["options"] = toggle.locator("option").all_inner_texts()
    seen["visible"] = toggle.is_visible()
    seen["system_light"] = page.evaluate(THEME_FACTS)
    toggle.select_option("dark")
    seen["dark"] = page.evaluate(THEME_FACTS)
    page.wait_for_timeout(400)  # colour transitions settle before the picture
    page.screenshot_as("look-theme-dark")
    page.reload()
    page.get_by_test_id("composer").wait_for(state="visible")
    # The page fills its conversation after its first requests answer: probe
    # once it has, or that render wipes the probe (a flake seen in CI).
    page.wait_for_load_state("networkidle")
    page.evaluate(CODE_PROBE)
    page.wait_until("document.querySelector('#theme-probe .hljs-keyword') !== null")
    seen["dark_after_reload"] = page.evaluate(THEME_FACTS)
    toggle.select_option("system")
    seen["back_to_system"] = page.evaluate(THEME_FACTS)
    page.get_by_test_id("lang-switch").select_option("zh-CN")
    seen["options_zh"] = toggle.locator("option").all_inner_texts()
    page.get_by_test_id("lang-switch").select_option("en")
    seen["problems"] = page.problems()

    # The system is dark; the user wants light.
    dark = open_page(browser, url, color_scheme="dark")
    dark.evaluate(CODE_PROBE)
    seen["system_dark"] = dark.evaluate(THEME_FACTS)
    dark.get_by_test_id("theme-toggle").select_option("light")
    seen["light"] = dark.evaluate(THEME_FACTS)
    dark.wait_for_timeout(400)  # colour transitions settle before the picture
    dark.screenshot_as("look-theme-light")
    seen["dark_problems"] = dark.problems()
    return seen


def _rgb(css):
    return tuple(int(x) for x in re.findall(r"\d+", css)[:3])


def _contrast(a, b):
    def luminance(rgb):
        def channel(c):
            c = c / 255
            return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

        r, g, b = (channel(c) for c in rgb)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    la, lb = sorted((luminance(_rgb(a)), luminance(_rgb(b))), reverse=True)
    return (la + 0.05) / (lb + 0.05)


MARKDOWN_ATTRS = r"""async () => {
    const { renderMarkdown } = await import("/static/render.js");
    const host = document.createElement("div");
    host.append(renderMarkdown("3. third\n4. fourth\n\n| left | right |\n|:--|--:|\n| a | b |\n\n[site](https://example.test/ \"The title\")\n\n![a cat](data:image/png;base64,iVBORw0KGgo=)"));
    const ol = host.querySelector("ol");
    const cells = [...host.querySelectorAll("th, td")].map((c) => c.getAttribute("align"));
    const img = host.querySelector("img");
    const a = host.querySelector("a");
    return { start: ol && ol.getAttribute("start"), cells, alt: img && img.getAttribute("alt"), title: a && a.getAttribute("title") };
}"""


def _markdown_attrs(browser, url):
    page = open_page(browser, url)
    seen = page.evaluate(MARKDOWN_ATTRS)
    seen["problems"] = page.problems(origin=url)
    return seen


class PageLookTests(TestCase):
    timeout = 300

    def setUp(self):
        self.fake = FakeOllama()
        self.fake.listen(reactor)
        self.addCleanup(self.fake.stop)
        self.fake.reply_hook = reply_for
        self.gw = serve(self, extra=f'backend: {{url: "{self.fake.url}"}}\nrate_limit: {{requests_per_minute: 0}}')
        self.url = self.gw.debug_url + "/"

    async def settled(self):
        """Every answer the fake started is over, and the gateway has stored its turn."""
        for request in list(self.fake.requests):
            await request.when_closed()
        await deferLater(reactor, 0.5, lambda: None)

    async def test_vendored_katex_is_pinned(self):
        """
        KaTeX is vendored like the other libraries: vendor/README.md names
        its exact version and npm integrity, its licence file is there, the
        SHA-256 of every vendored file matches the README, and the page
        serves the module as JavaScript and preloads it.
        """
        vendor = os.path.join(ROOT, "share", "static", "vendor")
        with open(os.path.join(vendor, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        self.assertIn("| `katex.mjs` | `katex` | 0.19.1 | `dist/katex.mjs` (ES module build) | MIT | `katex.LICENSE` |", readme)
        self.assertRegex(readme, r"- `katex@0\.19\.1`: `sha512-[A-Za-z0-9+/=]{88}`")
        with open(os.path.join(vendor, "katex.LICENSE"), encoding="utf-8") as f:
            self.assertIn("MIT License", f.read())
        sums = dict((name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.M))
        self.assertIn("katex.mjs", sums)
        for name, digest in sums.items():
            with open(os.path.join(vendor, name), "rb") as f:
                self.assertEqual(hashlib.sha256(f.read()).hexdigest(), digest, name)
        response = await treq.get(self.gw.url + "/static/vendor/katex.mjs", persistent=False)
        body = await response.content()
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("text/javascript"))
        self.assertIn(b"export {", body)
        response = await treq.get(self.gw.url + "/", persistent=False)
        page = (await response.content()).decode()
        self.assertIn('<link rel="modulepreload" href="/static/vendor/katex.mjs">', page)

    async def test_tables_scroll_sideways(self):
        """
        Every table sits in a wrapper that scrolls sideways (on a phone the
        wide table overflows it and it scrolls; the page does not), and a
        cell keeps a long word on one line instead of breaking it.
        """
        seen = await run_in_browser(_tables, self.url)
        for name in ("phone", "desktop"):
            facts = seen[name]
            self.assertEqual(facts["problems"], [], name)
            self.assertEqual(facts["tables"], 1, name)
            self.assertEqual(facts["wrapped"], 1, name)
            self.assertEqual(facts["overflowX"], "auto", name)
            self.assertEqual(facts["wordLines"], 1, name)
            self.assertLessEqual(facts["pageOverflow"], 0, name)
            self.assertLessEqual(facts["conversationOverflow"], 0, name)
        phone = seen["phone"]
        self.assertGreater(phone["scrollWidth"], phone["clientWidth"])
        self.assertGreater(phone["scrolled"], 0)

    async def test_maths_is_typeset(self):
        """
        $$…$$ and \\[…\\] are displayed, \\(…\\) and $…$ inline, typeset as
        MathML the browser lays out, with their TeX intact (Markdown ate no
        backslash or underscore); "$5 and $10", code spans and fenced code
        stay text; a broken formula shows as its source in code style; no
        inline style and no CSP violation.
        """
        seen = await run_in_browser(_maths, self.url)
        for name in ("desktop", "phone"):
            facts = seen[name]
            self.assertEqual(facts["problems"], [], name)
            self.assertEqual(facts["maths"], 6, name)
            self.assertEqual(facts["display"], 2, name)
            self.assertEqual(facts["blockDisplay"], 2, name)
            self.assertEqual([s.strip() for s in facts["sources"]], MATH_TEX, name)
            self.assertTrue(facts["laidOut"], name)
            self.assertTrue(facts["annotationHidden"], name)
            self.assertGreaterEqual(facts["msub"], 3, name)
            self.assertEqual(facts["emphasis"], 0, name)
            self.assertEqual(facts["codeSpans"], ["$x_1$", "\\(y\\)"], name)
            self.assertEqual(facts["fenced"], ["$$ not maths $$\n"], name)
            self.assertEqual(facts["errors"], ["$\\frac{1$"], name)
            self.assertIn("monospace", facts["errorColor"], name)
            self.assertIn("Prices: $5 and $10 stay text.", facts["text"], name)
            self.assertNotIn("\\(", facts["text"].replace("\\(y\\)", ""), name)
            self.assertEqual(facts["styles"], 0, name)
            self.assertEqual(facts["handlers"], [], name)

    async def test_hostile_maths_runs_nothing(self):
        """
        TeX that asks for links, classes, data, styles or HTML, and raw
        MathML with script links and handlers, run nothing: KaTeX (trust off)
        shows untrusted commands as unsupported, its limits end expansion
        loops and huge rules, raw HTML is text, and the sanitiser keeps
        MathML but strips links, handlers, styles and foreign content.
        """
        seen = await run_in_browser(_hostile_maths, self.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["direct_problems"], [])
        self.assertIsNone(seen["pwned"])
        self.assertIsNone(seen["direct_pwned"])
        for where in ("reply", "direct"):
            audit = seen[where]
            self.assertEqual(audit["handlers"], [], where)
            self.assertEqual(audit["links"], [], where)
            self.assertEqual(audit["scripty"], [], where)
            self.assertEqual(audit["styles"], [], where)
            self.assertEqual(audit["ids"], [], where)
            self.assertEqual(audit["sources"], [], where)
            for tag in ("a", "script", "style", "annotation-xml", "maction", "svg"):
                self.assertNotIn(tag, audit["tags"], where)
            self.assertNotIn("evil", audit["classes"], where)
        self.assertNotIn("img", seen["reply"]["tags"])  # (the sanitiser alone leaves an <img> with no src)
        self.assertIn("math", seen["reply"]["tags"])
        self.assertIn("math", seen["direct"]["tags"])
        self.assertIn("mi", seen["direct"]["tags"])
        self.assertGreaterEqual(seen["maths"], 8)
        # The loop ends in an error shown as source; raw MathML is shown as text.
        self.assertIn("$\\def\\a{\\a\\a}\\a$", seen["errors"])
        self.assertIn('<math><mi xlink:href="javascript:window.__pwned=6">', seen["text"])

    async def test_maths_while_streaming(self):
        """
        Streamed a few characters at a time, a formula is text until its
        closing delimiter arrives and maths after, and every step is the
        DOM one render of the text so far gives.
        """
        seen = await run_in_browser(_stream_maths, self.url)
        self.assertEqual(seen["problems"], [])
        self.assertGreater(seen["steps"], 20)
        self.assertEqual(seen["mismatches"], [])
        self.assertTrue(seen["final"])
        self.assertEqual(seen["maths"], 4)
        self.assertEqual(seen["partialMaths"], 1)  # a_1 only
        # Still text (Markdown's, so "\\," reads ","), not yet maths.
        self.assertIn("$$\n\\int_0^1 x", seen["partial"])
        self.assertTrue(seen["partial"].endswith("\\frac{1}\n"), seen["partial"])

    async def test_session_list_and_focus(self):
        """
        The session list is a list (ul/li in the nav, one per date group,
        named by its heading); focus starts in the composer when the app
        opens on a desktop (not on a phone) and goes back to it after a chat
        is opened, by mouse or keyboard.
        """
        seen = await run_in_browser(_list_and_focus, self.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["phone_problems"], [])
        self.assertEqual(seen["focus_at_open"], "composer")
        listed = seen["list"]
        self.assertEqual(listed["items"], 2)
        self.assertTrue(listed["itemsAreLi"])
        self.assertEqual(listed["lists"], 1)
        self.assertEqual(listed["listChildren"], ["LI", "LI"])
        self.assertEqual(listed["headings"], ["Today"])
        self.assertEqual(listed["labelled"], ["Today"])
        self.assertEqual(listed["role"], "none")
        self.assertEqual(seen["focus_after_open"], "composer")
        self.assertEqual(seen["focus_after_keyboard_open"], "composer")
        self.assertNotEqual(seen["phone_focus_at_open"], "composer")

    async def test_live_region_announces(self):
        """
        A visually hidden polite live region stays quiet while a reply
        streams, then holds the finished reply's text; an error is announced
        there too.
        """
        seen = await run_in_browser(_live_region, self.url, self.fake)
        await self.settled()
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["attrs"]["live"], "polite")
        self.assertNotEqual(seen["attrs"]["display"], "none")
        self.assertLessEqual(max(seen["attrs"]["box"]), 1)
        self.assertEqual(seen["empty_at_start"], "")
        self.assertEqual(seen["while_streaming"], "")
        said = " ".join(seen["after_reply"].split())
        self.assertEqual(said, " ".join(seen["reply_text"].split()))
        self.assertIn("Paragraph 39", said)
        # The error's sentence (without the labels of buttons beside it).
        said = " ".join(seen["after_error"].split())
        self.assertIn("model backend", said)
        self.assertNotIn("Retry", said)
        self.assertTrue(" ".join(seen["error_shown"].split()).startswith(said))

    async def test_escape_stops_a_reply(self):
        """
        Esc stops a streaming reply, as the Stop button does, unless a
        dialog is open (then Esc closes the dialog and the reply goes on).
        """
        seen = await run_in_browser(_escape_stops, self.url, self.fake)
        await self.settled()
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["streaming_after_dialog_esc"], 1)
        self.assertEqual(seen["state"], "incomplete")
        self.assertEqual(seen["status"], "Stopped")
        self.assertFalse(seen["stop_visible"])
        self.assertTrue(seen["send_visible"])
        self.assertLess(seen["text_length"], len(SLOW_REPLY))

    async def test_focus_ring_is_clear(self):
        """
        What the keyboard focuses gets a solid outline at least 2px wide
        whose colour stands out from the page (3:1 or more) in light and
        dark.
        """
        seen = await run_in_browser(_focus_ring, self.url)
        for scheme in ("light", "dark"):
            self.assertEqual(seen[scheme + "_problems"], [], scheme)
            for facts in (seen[scheme], seen[scheme + "_later"]):
                self.assertTrue(facts["focusVisible"], facts)
                self.assertEqual(facts["style"], "solid", facts)
                self.assertGreaterEqual(float(facts["width"].rstrip("px")), 2, facts)
                self.assertGreaterEqual(_contrast(facts["color"], facts["background"]), 3, facts)
        self.assertEqual(seen["light"]["testid"], "attach")
        self.assertNotEqual(seen["light"]["background"], seen["dark"]["background"])

    async def test_markdown_keeps_plain_attributes(self):
        """A list that starts at 3, a table's column alignment, an image's alt text and a link's title survive the sanitiser (words and numbers, not URLs)."""
        seen = await run_in_browser(_markdown_attrs, self.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["start"], "3")
        self.assertEqual(seen["cells"], ["left", "right", "left", "right"])
        self.assertEqual(seen["alt"], "a cat")
        self.assertEqual(seen["title"], "The title")

    async def test_scroll_to_bottom_button(self):
        """
        The button shows when the conversation is scrolled up more than
        about 200px from its end, not at or near the end, and a click
        scrolls to the end (and hides it).
        """
        seen = await run_in_browser(_scroll_button, self.url)
        self.assertEqual(seen["problems"], [])
        self.assertTrue(seen["hidden_at_start"])
        self.assertTrue(seen["hidden_at_bottom"])
        self.assertTrue(seen["hidden_near_bottom"])
        self.assertEqual(seen["label"], "Scroll to the latest message")
        self.assertTrue(seen["hidden_after_click"])

    async def test_theme_toggle(self):
        """
        The theme select (System, Light, Dark; translated) sets data-theme
        on <html>: Dark takes the dark palette on a light system and Light
        the light one on a dark system; highlight.js's stylesheets and the
        color-scheme and theme-color metas follow; the choice is remembered
        across a reload, and System forgets it.
        """
        seen = await run_in_browser(_theme, self.url)
        self.assertEqual(seen["problems"], [])
        self.assertEqual(seen["dark_problems"], [])
        self.assertTrue(seen["visible"])
        self.assertEqual(seen["options"], ["System theme", "Light theme", "Dark theme"])
        self.assertEqual(seen["options_zh"], ["主题跟随系统", "浅色主题", "深色主题"])
        white, dark_bg = "rgb(255, 255, 255)", "rgb(24, 24, 27)"
        light_keyword, dark_keyword = "rgb(215, 58, 73)", "rgb(255, 123, 114)"  # github / github-dark

        system = seen["system_light"]
        self.assertEqual((system["theme"], system["background"], system["select"], system["stored"]), (None, white, "system", None))
        self.assertTrue(system["hljsLightOn"])
        self.assertFalse(system["hljsDarkOn"])
        self.assertEqual(system["keyword"], light_keyword)
        self.assertEqual(system["colorScheme"], "light dark")
        self.assertEqual(system["themeColor"], ["#ffffff"])

        for name in ("dark", "dark_after_reload"):
            dark = seen[name]
            self.assertEqual((dark["theme"], dark["background"], dark["select"], dark["stored"]), ("dark", dark_bg, "dark", "dark"), name)
            self.assertEqual((dark["hljsLightOn"], dark["hljsDarkOn"]), (False, True), name)
            self.assertEqual(dark["keyword"], dark_keyword, name)
            self.assertEqual(dark["colorScheme"], "dark", name)
            self.assertEqual(dark["themeColor"], ["#18181b"], name)

        back = seen["back_to_system"]
        self.assertEqual((back["theme"], back["background"], back["stored"], back["keyword"]), (None, white, None, light_keyword))

        os_dark = seen["system_dark"]
        self.assertEqual((os_dark["theme"], os_dark["background"], os_dark["keyword"]), (None, dark_bg, dark_keyword))
        light = seen["light"]
        self.assertEqual((light["theme"], light["background"], light["stored"]), ("light", white, "light"))
        self.assertEqual((light["hljsLightOn"], light["hljsDarkOn"]), (True, False))
        self.assertEqual(light["keyword"], light_keyword)
        self.assertEqual(light["colorScheme"], "light")
        self.assertEqual(light["themeColor"], ["#ffffff"])


class DarkPaletteTests(TestCase):
    """app.css holds the dark palette twice (the OS setting, the theme switch): the two must not drift apart."""

    def test_the_two_dark_palettes_are_equal(self):
        with open(os.path.join(ROOT, "share", "static", "app.css"), encoding="utf-8") as f:
            css = f.read()

        def palette(selector):
            body = css[css.index(selector) :]
            body = body[body.index("{") + 1 : body.index("}")]
            return dict(re.findall(r"(--[\w-]+):\s*([^;]+);", body))

        system = palette(':root:not([data-theme="light"])')
        chosen = palette(':root[data-theme="dark"]')
        self.assertGreater(len(system), 10)
        self.assertEqual(system, chosen)
