"""
A real browser for page tests: Debian's Chromium driven by Playwright for
Python.

Playwright's sync API runs its own event loop and cannot share a thread with
Twisted's reactor, so each test runs its whole browser script in a worker
thread (L{run_in_browser}, through C{deferToThread}) while the reactor goes
on serving the gateway under test.  Nothing here downloads a browser: the
executable is C{/usr/bin/chromium} from Debian (tests/setup-deps.sh installs
it).
"""

import os
import time
from urllib.parse import urlsplit

from twisted.internet import threads

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCREENSHOTS = os.path.join(ROOT, "artifacts", "screenshots")
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

# Installed before any page script runs; Playwright injects it outside the
# page's CSP.  Collects the page's own CSP violation reports.
_WATCH_CSP = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(e.violatedDirective + " blocked " + (e.blockedURI || "inline") + " at " + e.sourceFile + ":" + e.lineNumber);
});
"""


def run_in_browser(script, *args, **kwargs):
    """
    Run C{script(browser, *args, **kwargs)} in a worker thread with a fresh
    headless Chromium (its own temporary profile); returns a Deferred that
    fires with what the script returns, or fails with what it raised.
    """
    return threads.deferToThread(_run, script, args, kwargs)


def _run(script, args, kwargs):
    from playwright.sync_api import sync_playwright

    if not os.access(CHROMIUM, os.X_OK):
        raise AssertionError(f"{CHROMIUM} is missing: run tests/setup-deps.sh (apt-get install chromium)")
    with sync_playwright() as p:
        # launch() gives the browser a fresh temporary user data dir, removed on close.
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            return script(Browser(browser), *args, **kwargs)
        finally:
            browser.close()


class Browser:
    """
    The running browser.  L{new_page} opens a page in a new browser context
    (its own cookies and storage), watched for console errors, uncaught
    exceptions, CSP violations and failed responses.
    """

    def __init__(self, browser):
        self.browser = browser

    def new_page(self, viewport=DESKTOP, locale="en-US", color_scheme="light", **options):
        context = self.browser.new_context(viewport=viewport, locale=locale, color_scheme=color_scheme, **options)
        return WatchedPage(context.new_page())


class WatchedPage:
    """A page and everything it complained about."""

    def __init__(self, page):
        self.page = page
        self.console = []  # (type, text, url)
        self.page_errors = []
        self.responses = []  # (status, url)
        self.failed_requests = []
        page.add_init_script(_WATCH_CSP)
        page.on("console", lambda m: self.console.append((m.type, m.text, (m.location or {}).get("url", ""))))
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.on("response", lambda r: self.responses.append((r.status, r.url)))
        page.on("requestfailed", lambda r: self.failed_requests.append((r.url, r.failure)))

    def __getattr__(self, name):
        return getattr(self.page, name)

    def csp_violations(self):
        try:
            return list(self.page.evaluate("window.__cspViolations || []"))
        except Exception:
            return []

    def problems(self, allowed_http_errors=("/v1/", "/auth/"), origin=None):
        """
        Console errors, uncaught exceptions and CSP violations, as strings.
        A console "Failed to load resource" for an API path in
        C{allowed_http_errors} is not a problem: the browser logs every
        4xx/5xx fetch that way, and the page handles those answers itself.
        With C{origin} (C{"http://host:port"}), console messages and
        responses from other origins (an identity provider's pages the
        page passed through, say) are left out.
        """
        def ours(url):
            parts = urlsplit(url or "")
            if origin is None or not parts.netloc:
                return True
            return f"{parts.scheme}://{parts.netloc}" == origin.rstrip("/")

        found = []
        for kind, text, url in self.console:
            if kind != "error" or not ours(url):
                continue
            if text.startswith("Failed to load resource") and urlsplit(url).path.startswith(tuple(allowed_http_errors)):
                continue
            found.append(f"console error: {text} ({url})")
        found += [f"uncaught exception: {e}" for e in self.page_errors]
        found += [f"CSP violation: {v}" for v in self.csp_violations()]
        for status, url in self.responses:
            path = urlsplit(url).path
            if ours(url) and status >= 400 and not path.startswith(tuple(allowed_http_errors)):
                found.append(f"HTTP {status} for {url}")
        for url, failure in self.failed_requests:
            if ours(url) and not urlsplit(url).path.startswith(tuple(allowed_http_errors)):
                found.append(f"request failed: {url} ({failure})")
        return found

    def wait_until(self, expression, timeout=10.0):
        """
        Poll a JavaScript expression until it is truthy.  (Playwright's
        wait_for_function compiles its predicate with eval, which the page's
        CSP forbids; evaluate goes through the DevTools protocol instead.)
        """
        deadline = time.monotonic() + timeout
        while True:
            value = self.page.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"still false after {timeout}s: {expression}")
            self.page.wait_for_timeout(50)

    def screenshot_as(self, name, **kwargs):
        """Save a screenshot to artifacts/screenshots/<name>.png; returns the path."""
        os.makedirs(SCREENSHOTS, exist_ok=True)
        path = os.path.join(SCREENSHOTS, f"{name}.png")
        self.page.screenshot(path=path, **kwargs)
        return path
