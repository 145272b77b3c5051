"""
A streamed reply is rendered incrementally (share/static/markdown-stream.js):
blocks that are finished keep their DOM while the reply grows, only the tail
is rendered again, and the result is the DOM one render of the whole
Markdown gives.

Both tests run in Debian's Chromium through Playwright (tests/browser.py):
one drives the renderer on Markdown that is hard to cut into blocks (loose
lists, fenced code and HTML comments with blank lines, link reference
definitions, CRLF), the other streams a long reply through the gateway from
the fake Ollama and watches the page's DOM with a MutationObserver.
"""

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.browser import DESKTOP, run_in_browser
from testing.fake_ollama import FakeOllama
from tests.helpers import serve


def long_markdown(sections):
    """A reply of 7 * sections + 1 top-level blocks of every common kind."""
    parts = []
    for i in range(sections):
        parts += [
            f"## Part {i}",
            f"Paragraph {i} with **bold**, *emphasis*, `code` and a [link](https://example.com/{i}).\nIts second line.",
            "- first\n- second\n- third",
            "1. step one\n\n   more about step one\n\n2. step two",
            f"```python\ndef part_{i}(x):\n    y = x * {i}\n\n    return y\n```",
            f"> quoted {i}, over\n> two lines",
            "| a | b |\n|---|---|\n| 1 | 2 |",
        ]
    parts.append("The end.")
    return "\n\n".join(parts) + "\n"


SECTIONS = 12
LONG = long_markdown(SECTIONS)
LONG_BLOCKS = 7 * SECTIONS + 1

# Markdown whose block boundaries are easy to get wrong, with the steps (in
# characters) it grows by.
HARD = {
    "lists": (
        "- a\n\n- b\n\npara\n\n1. x\n\n   more\n\n2. y\n\n* s\n* t\n\n+ u\n\nend\n\n10. ten\n11. eleven\n\n-\n\n1\n\n12) twelve\n",
        [1, 3, 2, 5],
    ),
    "fences": (
        "```python\ndef f():\n\n    return 1\n```\n\ntext\n\n~~~\n\n```\nstill code\n\n~~~~\n\nafter\n\n"
        "1. step\n\n   ```bash\n   cmd\n\n   more\n   ```\n\n2. next\n\n````\n```\n\nx\n````\n\ndone",
        [1, 2, 7],
    ),
    "html": ("<!-- a\n\nb -->\n\ntext\n\n<div>\nx\n</div>\n\ny\n\n<pre>\n\nz\n\n</pre>\n\n<script>\n\n</script>\n\nlast", [1, 4]),
    "indented": ("para\n\n    code\n\n    more\n\nnext\n\n- item\n\n      code in item\n\n  continued\n\nout", [1, 3]),
    "blocks": (
        "| a | b |\n|---|---|\n| 1 | 2 |\n\n> q\n\n> r\n\n---\n\n# H\n\nSetext\n===\n\ntext\n    lazy\n\n"
        "- [ ] task\n- [x] done\n\n![pic](https://example.com/p.png)\n\n***",
        [1, 5],
    ),
    "crlf": ("line one\r\n\r\n- a\r\n- b\r\n\r\n```\r\nx\r\n\r\n```\r\n\r\ntext\r\n", [1, 2]),
    "long": (LONG, [29, 64, 17]),
}
WITH_DEFINITIONS = "see [foo] and [bar]\n\ntext\n\n[foo]: https://example.com/a\n\n> [bar]: https://example.com/b\n\nmore [foo]\n"

DRIVE_RENDERER = r"""async ([docs, definitions]) => {
    const { MarkdownStream } = await import("/static/markdown-stream.js");
    const { renderMarkdown } = await import("/static/render.js");
    const oneShot = (text) => {
        const box = document.createElement("div");
        box.append(renderMarkdown(text));
        return box.innerHTML;
    };
    // Stream text, growing by steps; compare with one render of each prefix
    // (unless link definitions make them differ until the end).
    const drive = (text, steps, prefixes) => {
        const host = document.createElement("div");
        const stream = new MarkdownStream(host);
        const kept = new Set(); // nodes that outlived an update that changed the DOM
        let before = [];
        const seen = { problems: [], updates: 0 };
        for (let pos = 0, i = 0; pos < text.length; i++) {
            pos = Math.min(text.length, pos + steps[i % steps.length]);
            const prefix = text.slice(0, pos);
            stream.update(prefix);
            seen.updates++;
            const now = [...host.childNodes];
            for (const node of kept) if (!now.includes(node)) seen.problems.push(`a finished block went at ${pos}: ${node.textContent.slice(0, 40)}`);
            const changed = now.length !== before.length || now.some((node, k) => node !== before[k]);
            if (changed) for (const node of now) if (before.includes(node)) kept.add(node);
            before = now;
            if (prefixes && host.innerHTML !== oneShot(prefix)) {
                seen.problems.push({ at: pos, prefix, got: host.innerHTML, want: oneShot(prefix) });
                break;
            }
        }
        stream.update(text, { final: true });
        seen.final = host.innerHTML === oneShot(text) ? "same" : { got: host.innerHTML, want: oneShot(text) };
        seen.sameNodes = [...host.children].filter((e) => kept.has(e)).length;
        seen.elements = host.children.length;
        seen.links = host.querySelectorAll("a[href]").length;
        return seen;
    };
    const out = {};
    for (const [name, [text, steps]] of Object.entries(docs)) out[name] = drive(text, steps, name !== "long");
    out.definitions = drive(definitions, [2, 3], false);
    return out;
}"""


def _drive_renderer(browser, url):
    page = browser.new_page(viewport=DESKTOP)
    page.goto(url)
    page.get_by_test_id("composer").wait_for(state="visible")
    seen = page.evaluate(DRIVE_RENDERER, [HARD, WITH_DEFINITIONS])
    seen["problems"] = page.problems()
    return seen


# Watches the streamed reply's [data-testid=message-content]: its children
# present at two renders in a row are finished blocks, which must never be
# removed or changed afterwards.
WATCH_REPLY = r"""() => {
    const watch = window.__watch = { renders: 0, kept: new Set(), before: [], problems: [] };
    const inside = (node, root) => root !== node && root.contains(node);
    new MutationObserver((records) => {
        const content = document.querySelector("[data-testid=message-assistant] [data-testid=message-content]");
        if (!content || !records.some((r) => r.target === content || content.contains(r.target))) return;
        watch.renders++;
        for (const r of records) {
            for (const node of r.removedNodes) if (watch.kept.has(node)) watch.problems.push(`removed: ${node.textContent.slice(0, 40)}`);
            for (const node of watch.kept) if (inside(r.target, node)) watch.problems.push(`changed: ${node.textContent.slice(0, 40)}`);
        }
        const now = [...content.childNodes].filter((n) => !(n.classList && n.classList.contains("typing")));
        for (const node of now) if (watch.before.includes(node)) watch.kept.add(node);
        watch.before = now;
    }).observe(document.getElementById("messages"), { childList: true, subtree: true, characterData: true, attributes: true });
}"""

CHECK_REPLY = r"""async (text) => {
    const { renderMarkdown } = await import("/static/render.js");
    const content = document.querySelector("[data-testid=message-content]");
    const box = document.createElement("div");
    box.append(renderMarkdown(text));
    const watch = window.__watch;
    return {
        renders: watch.renders,
        problems: watch.problems,
        same: content.innerHTML === box.innerHTML,
        sameNodes: [...content.childNodes].length === [...box.childNodes].length &&
                   [...content.childNodes].every((n, i) => n.isEqualNode(box.childNodes[i])),
        elements: content.children.length,
        kept: [...content.children].filter((e) => watch.kept.has(e)).length,
    };
}"""


def _stream_long_reply(browser, url):
    page = browser.new_page(viewport=DESKTOP)
    page.goto(url)
    page.get_by_test_id("composer").wait_for(state="visible")
    page.wait_for_load_state("networkidle")
    page.evaluate(WATCH_REPLY)
    page.get_by_test_id("composer").fill("a long answer, please")
    page.get_by_test_id("send").click()
    page.locator("[data-testid=message-assistant][data-state=done]").wait_for(timeout=60000)
    seen = page.evaluate(CHECK_REPLY, LONG)
    seen["problems_seen"] = page.problems()
    return seen


class StreamedMarkdownTests(TestCase):
    timeout = 300

    def setUp(self):
        self.fake = FakeOllama()
        self.fake.listen(reactor)
        self.addCleanup(self.fake.stop)
        self.fake.reply_hook = lambda path, body: LONG
        self.gw = serve(self, extra=f'backend: {{url: "{self.fake.url}"}}\nrate_limit: {{requests_per_minute: 0}}')

    async def test_incremental_render_is_one_render(self):
        """
        Growing a little at a time, Markdown that is hard to cut into blocks
        renders at every step exactly as one render of the text so far; a
        block that outlived one step is never rendered again; and with link
        reference definitions, which reach across blocks, the complete text
        renders as one render of it.
        """
        seen = await run_in_browser(_drive_renderer, self.gw.debug_url + "/")
        self.assertEqual(seen.pop("problems"), [])
        for name, result in seen.items():
            self.assertEqual(result["problems"], [], name)
            self.assertEqual(result["final"], "same", name)
            self.assertGreater(result["updates"], 10, name)
        self.assertEqual(seen["long"]["elements"], LONG_BLOCKS)
        self.assertGreaterEqual(seen["long"]["sameNodes"], LONG_BLOCKS - 5)
        self.assertEqual(seen["definitions"]["links"], 3)

    async def test_streamed_reply_keeps_finished_blocks(self):
        """
        A long reply streamed from the model through the gateway: while it
        grows, the page never removes or changes a block it has finished
        (every block but the last few is kept from render to render), and
        the reply's final DOM is node for node the DOM of one render of the
        whole Markdown.
        """
        self.fake.behave(pace=0.003)
        seen = await run_in_browser(_stream_long_reply, self.gw.debug_url + "/")
        self.assertEqual(seen["problems_seen"], [])
        self.assertEqual(seen["problems"], [])
        self.assertGreater(seen["renders"], 20)
        self.assertTrue(seen["same"])
        self.assertTrue(seen["sameNodes"])
        self.assertEqual(seen["elements"], LONG_BLOCKS)
        self.assertGreaterEqual(seen["kept"], LONG_BLOCKS - 5)
