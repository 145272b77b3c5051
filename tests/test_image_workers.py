"""
Image work runs on a bounded pool of worker threads under a deadline, never
on the reactor, and each request's images are capped by count and by total
declared pixels before anything is decoded (clawdbot.backend.images.ImageWorkers,
issue 13 finding 2).

Real sockets: a gateway in front of the fake Ollama.  Workers are held with
threading events where a test needs an ordering; nothing is ordered by
sleeping and no timing is asserted (latencies are measured and printed).
"""

import base64
import io
import json
import os
import threading
import time

import treq
from PIL import Image
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from clawdbot.backend import images as images_module
from clawdbot.config import ConfigError, load_config, parse_config
from clawdbot.errors import APIError
from clawdbot.backend.images import BUSY, TOO_SLOW, UNSUPPORTED, ImageWorkers, encode_images
from testing.fake_ollama import FakeOllama
from tests.helpers import BASE_CONFIG, ROOT, bearer, get_json, merge_yaml, serve, token

ALL = "chat:read chat:write admin"


def png(size, mode="L"):
    """A one-colour PNG: a few KB on the wire, C{size[0] * size[1]} pixels once decoded."""
    out = io.BytesIO()
    Image.new(mode, size).save(out, "PNG")
    return out.getvalue()


SMALL = png((8, 8), "RGB")


def user_message(raws, text="What is this?"):
    parts = [{"type": "text", "text": text}]
    for raw in raws:
        parts.append({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(raw).decode("ascii")}})
    return {"role": "user", "content": parts}


def chat_body(*messages, stream=False):
    return {"model": "qwen3:32b", "messages": list(messages), "stream": stream}


def images_config(**keys):
    lines = "".join(f"  {k}: {v}\n" for k, v in keys.items())
    return parse_config(merge_yaml(BASE_CONFIG, "images:\n" + lines), {}).images


class Spy:
    """
    Wraps C{clawdbot.images.process_image} (the per-image decode): records
    the thread of every call, signals the first call, and can hold a call
    until the test releases it.

    @param hold_at: the 1-based calls that wait for L{release} before
        decoding (C{"all"} for every call).
    """

    def __init__(self, testcase, hold_at=()):
        self.real = images_module.process_image
        self.threads = []
        self.entered = threading.Event()
        self.holding = threading.Event()
        self.release = threading.Event()
        self.hold_at = hold_at
        testcase.patch(images_module, "process_image", self)
        # Whatever happens, never leave a worker waiting.
        testcase.addCleanup(self.release.set)

    def __call__(self, raw, settings):
        self.threads.append(threading.current_thread())
        self.entered.set()
        if self.hold_at == "all" or len(self.threads) in self.hold_at:
            self.holding.set()
            self.release.wait(30)
        return self.real(raw, settings)

    @property
    def calls(self):
        return len(self.threads)


def wait_for(event):
    """A Deferred that fires when the threading C{event} is set (waited for off the reactor)."""
    return deferToThread(event.wait, 30)


class Backed(TestCase):
    timeout = 120

    def start(self, extra=""):
        self.fake = FakeOllama()
        self.fake.listen(reactor)
        self.addCleanup(self.fake.stop)
        self.gw = serve(self, extra=merge_yaml(f'backend: {{url: "{self.fake.url}"}}', extra))
        self.auth = bearer(token(scope=ALL))
        return self.gw

    def chat(self, body):
        return get_json(self.gw.url + "/v1/chat/completions", self.auth, method="POST", body=body)


def sse_text(raw):
    text, done = [], False
    for block in raw.split(b"\n\n"):
        if not block.startswith(b"data: "):
            continue
        payload = block[6:]
        if payload == b"[DONE]":
            done = True
            continue
        for choice in json.loads(payload).get("choices") or []:
            text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text), done


class ReactorStaysFreeTests(Backed):
    async def test_worst_legal_request_leaves_healthz_and_streams_answering(self):
        """
        The worst request the default caps allow (8 images of 10 megapixels
        each, 80,000,000 declared pixels, 9 KB each on the wire) is decoded
        on the image workers: while it is being processed, /healthz and a
        concurrent streamed chat answer, and both finish before the image
        request does.  The image request then succeeds with 8 shrunk JPEGs.
        Latencies are printed, not asserted.
        """
        self.start("images: {timeout: 60s}")
        big = png((4000, 2500))
        # The eighth image waits for the test, so the image request is
        # certainly still in progress when the other requests are measured;
        # images 1-7 are really decoded meanwhile.
        spy = Spy(self, hold_at=(8,))
        image_done = []
        started = time.perf_counter()
        image_request = Deferred.fromCoroutine(self.chat(chat_body(user_message([big] * 8))))
        image_request.addBoth(lambda result: image_done.append(time.perf_counter()) or result)
        await wait_for(spy.entered)

        stream_times = {}

        async def streamed_chat():
            t0 = time.perf_counter()
            response = await treq.post(
                self.gw.url + "/v1/chat/completions",
                json.dumps(chat_body({"role": "user", "content": "hi"}, stream=True)).encode(),
                headers={**self.auth, "Content-Type": "application/json"},
                persistent=False,
            )
            raw = await response.content()
            stream_times["total"] = time.perf_counter() - t0
            return response.code, raw

        stream = Deferred.fromCoroutine(streamed_chat())
        healthz = []
        while len(healthz) < 20:
            t0 = time.perf_counter()
            code, _, body = await get_json(self.gw.url + "/healthz")
            healthz.append((time.perf_counter() - t0, spy.calls, spy.holding.is_set()))
            self.assertEqual(code, 200)
        code, raw = await stream
        text, done = sse_text(raw)
        self.assertEqual((code, text, done), (200, self.fake.reply_text, True))

        # Both answered while the image request was still in progress.
        self.assertEqual(image_done, [])
        self.assertFalse(image_request.called)
        spy.release.set()
        code, _, reply = await image_request
        self.assertEqual(code, 200, reply)

        [sent] = [r for r in self.fake.requests_to("/api/chat") if r.body["messages"][0].get("images")]
        encoded = sent.body["messages"][0]["images"]
        self.assertEqual(len(encoded), 8)
        for item in encoded:
            img = Image.open(io.BytesIO(base64.b64decode(item, validate=True)))
            self.assertEqual((img.format, img.size), ("JPEG", (1568, 980)))
        self.assertEqual(spy.calls, 8)
        for thread in spy.threads:
            self.assertIsNot(thread, threading.main_thread())

        latencies = sorted(h[0] for h in healthz)
        while_decoding = [h for h in healthz if not h[2]]
        print(
            f"\n[image workers] image request {image_done[0] - started:.3f}s (held at image 8 until released); "
            f"/healthz x{len(healthz)}: median {latencies[len(latencies) // 2] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms, "
            f"{len(while_decoding)} answered while images 1-7 were being decoded; "
            f"streamed chat {stream_times['total'] * 1000:.1f} ms"
        )

    async def test_images_are_decoded_off_the_reactor_thread(self):
        """Every image is decoded on a thread of the clawdbot-images pool, never the reactor's (main) thread."""
        self.start()
        spy = Spy(self)
        code, _, reply = await self.chat(chat_body(user_message([SMALL, SMALL])))
        self.assertEqual(code, 200, reply)
        self.assertEqual(spy.calls, 2)
        for thread in spy.threads:
            self.assertIsNot(thread, threading.main_thread())
            self.assertNotEqual(thread, threading.current_thread())
            self.assertIn("clawdbot-images", thread.name)


class CapTests(Backed):
    async def test_too_many_images_refused_before_any_work(self):
        """
        More than images.max_per_request (8) images in one request, counted
        over all its messages, is a 400 before anything is parsed or decoded,
        and nothing reaches the backend; exactly 8 is accepted.
        """
        self.start()
        spy = Spy(self)
        headers_read = []
        real = images_module.declared_pixels
        self.patch(images_module, "declared_pixels", lambda raw, settings: headers_read.append(1) or real(raw, settings))
        three = user_message([SMALL] * 3)
        for body in (chat_body(user_message([SMALL] * 9)), chat_body(three, three, three), chat_body(three, three, three, stream=True)):
            code, _, reply = await self.chat(body)
            self.assertEqual(code, 400, reply)
            self.assertEqual(reply["error"]["code"], "INVALID_REQUEST")
            self.assertEqual(reply["error"]["details"], "a request may carry at most 8 images")
        self.assertEqual((spy.calls, headers_read, self.fake.requests_to("/api/chat")), (0, [], []))

        code, _, reply = await self.chat(chat_body(user_message([SMALL] * 5), user_message([SMALL] * 3)))
        self.assertEqual(code, 200, reply)
        self.assertEqual(spy.calls, 8)

    async def test_total_pixels_refused_before_decoding(self):
        """
        Images each within images.max_pixels whose declared sizes add up to
        more than images.max_total_pixels (80,000,000) are refused with 413
        PAYLOAD_TOO_LARGE from their headers alone: no image is decoded, and
        nothing reaches the backend.
        """
        self.start()
        # 3 x 30.25 megapixels: each is allowed, together they are not.
        bomb = png((5500, 5500), "1")
        self.assertLess(len(bomb), 10_000)
        spy = Spy(self)
        loads = []
        real_load = Image.Image.load
        self.patch(Image.Image, "load", lambda img: loads.append(img.size) or real_load(img))
        code, _, reply = await self.chat(chat_body(user_message([bomb] * 3)))
        self.assertEqual(code, 413, reply)
        self.assertEqual(reply["error"]["code"], "PAYLOAD_TOO_LARGE")
        self.assertEqual(reply["error"]["details"], "the images in a request may add up to at most 80000000 pixels")
        self.assertEqual((spy.calls, loads, self.fake.requests_to("/api/chat")), (0, [], []))

    async def test_bad_image_keeps_its_reason_and_nothing_is_sent(self):
        """A request with one good image and one SVG is a 400 with the per-image reason; the backend gets nothing."""
        self.start()
        svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
        code, _, reply = await self.chat(chat_body(user_message([SMALL, svg])))
        self.assertEqual((code, reply["error"]["code"], reply["error"]["details"]), (400, "INVALID_REQUEST", UNSUPPORTED))
        self.assertEqual(self.fake.requests_to("/api/chat"), [])

    async def test_refused_image_request_still_spends_the_request_budget(self):
        """
        The request budget is taken before any image work: a request refused
        for its images has spent one unit of rate_limit.requests_per_minute,
        so with a budget of 1 the next request is a 429.
        """
        self.start("rate_limit: {requests_per_minute: 1}")
        code, headers, reply = await self.chat(chat_body(user_message([SMALL] * 9)))
        self.assertEqual(code, 400, reply)
        self.assertEqual(headers.getRawHeaders("x-ratelimit-remaining"), ["0"])
        code, _, reply = await self.chat(chat_body({"role": "user", "content": "hi"}))
        self.assertEqual((code, reply["error"]["code"]), (429, "RATE_LIMITED"))
        self.assertEqual(self.fake.requests_to("/api/chat"), [])


class DeadlineTests(Backed):
    async def test_deadline_refuses_and_the_worker_stops_early(self):
        """
        With one worker and images.timeout 1s: a request whose images are
        still being processed at the deadline gets 413 "the images took too
        long to process"; a request that was still waiting for the busy
        worker gets 503 GATEWAY_BUSY with Retry-After.  The worker, once its
        current image is done, does not start the next one, and the waiting
        job never starts.  Nothing reaches the backend.
        """
        self.start("images: {workers: 1, timeout: 1s}")
        spy = Spy(self, hold_at="all")
        first = Deferred.fromCoroutine(self.chat(chat_body(user_message([SMALL] * 3))))
        await wait_for(spy.entered)
        second = Deferred.fromCoroutine(self.chat(chat_body(user_message([SMALL]))))
        code, _, reply = await first
        self.assertEqual((code, reply["error"]["code"], reply["error"]["details"]), (413, "PAYLOAD_TOO_LARGE", TOO_SLOW))
        code, headers, reply = await second
        self.assertEqual((code, reply["error"]["code"], reply["error"]["details"]), (503, "GATEWAY_BUSY", BUSY))
        self.assertEqual(headers.getRawHeaders("retry-after"), ["1"])
        spy.release.set()
        # Stopping the pool waits for its thread to finish what it is doing.
        self.gw.parts.images.stop()
        self.assertEqual(spy.calls, 1)
        self.assertEqual(self.fake.requests_to("/api/chat"), [])

    async def test_client_leaving_stops_the_work(self):
        """A client that disconnects while its images are processed stops the job before its next image."""
        self.start("images: {workers: 1}")
        spy = Spy(self, hold_at=(1,))
        cancelled = threading.Event()
        real_cancel = images_module._Job.cancel
        self.patch(images_module._Job, "cancel", lambda job: (real_cancel(job), cancelled.set()))
        request = treq.post(
            self.gw.url + "/v1/chat/completions",
            json.dumps(chat_body(user_message([SMALL] * 4))).encode(),
            headers={**self.auth, "Content-Type": "application/json"},
            persistent=False,
        )
        request.addErrback(lambda f: None)
        await wait_for(spy.holding)
        request.cancel()
        await wait_for(cancelled)
        spy.release.set()
        self.gw.parts.images.stop()
        self.assertEqual(spy.calls, 1)
        self.assertEqual(self.fake.requests_to("/api/chat"), [])


class WorkersTests(TestCase):
    """L{ImageWorkers} on its own: the API the native routes use, and shutdown."""

    timeout = 60

    def setUp(self):
        self.workers = ImageWorkers(reactor)
        self.addCleanup(self.workers.stop)
        self.settings = images_config()

    async def refused(self, coro):
        try:
            await coro
        except APIError as err:
            return err
        raise AssertionError("accepted")

    async def test_process_base64(self):
        """Base64 strings (the native routes' images) come back re-encoded as base64 JPEG; line breaks are ignored."""
        text = base64.b64encode(png((3000, 100), "RGB")).decode()
        [out] = await self.workers.process_base64([text[:50] + "\n" + text[50:]], self.settings)
        img = Image.open(io.BytesIO(base64.b64decode(out, validate=True)))
        self.assertEqual((img.format, img.size), ("JPEG", (1568, 52)))

    async def test_process_base64_refusals(self):
        """Not base64, not a list of strings, too many, a bad image: each a 400 with a curated reason."""
        good = base64.b64encode(SMALL).decode()
        svg = base64.b64encode(b"<svg/>").decode()
        cases = [
            (["***"], "images[0]: the image data is not valid base64"),
            ([good, "data:image/png;base64," + good], "images[1]: the image data is not valid base64"),
            ([1], "'images' must be a list of base64 strings"),
            (good, "'images' must be a list of base64 strings"),
            ([good] * 9, "a request may carry at most 8 images"),
            ([svg], UNSUPPORTED),
        ]
        for texts, reason in cases:
            err = await self.refused(self.workers.process_base64(texts, self.settings))
            self.assertEqual((err.status, err.code, err.details), (400, "INVALID_REQUEST", reason), texts if len(texts) < 3 else reason)

    async def test_process_base64_lists_caps_the_whole_request(self):
        """Several messages' image lists are replaced in place, and the count cap applies to all of them together."""
        good = base64.b64encode(SMALL).decode()
        lists = [[good, good], [good]]
        await self.workers.process_base64_lists(lists, self.settings)
        self.assertEqual([len(x) for x in lists], [2, 1])
        self.assertTrue(all(Image.open(io.BytesIO(base64.b64decode(x))).format == "JPEG" for x in lists[0] + lists[1]))
        err = await self.refused(self.workers.process_base64_lists([[good] * 5, [good] * 4], self.settings))
        self.assertEqual(err.details, "a request may carry at most 8 images")

    async def test_stop_ends_the_threads(self):
        """After stop (gateway shutdown) the pool's threads are gone and new work is refused with 503 SHUTTING_DOWN."""
        await self.workers.process_all([SMALL], self.settings)
        pool = self.workers._pool
        self.assertTrue(pool.started)
        self.workers.stop()
        self.assertFalse(pool.started)
        self.assertFalse(any(thread.is_alive() for thread in pool.threads))
        err = await self.refused(self.workers.process_all([SMALL], self.settings))
        self.assertEqual((err.status, err.code), (503, "SHUTTING_DOWN"))

    async def test_pool_size_follows_the_config(self):
        """The pool has at most images.workers threads, and a reloaded value applies to the next job."""
        await self.workers.process_all([SMALL], images_config(workers=3))
        self.assertEqual(self.workers._pool.max, 3)
        await self.workers.process_all([SMALL], images_config(workers=1))
        self.assertEqual(self.workers._pool.max, 1)


class PureTests(TestCase):
    def test_total_pixels_boundary(self):
        """images.max_total_pixels is inclusive: two 100x100 images pass at 20000 and are refused at 19999, undecoded."""
        raw = png((100, 100))
        self.assertEqual(len(encode_images([raw, raw], images_config(max_total_pixels=20000))), 2)
        loads = []
        real_load = Image.Image.load
        self.patch(Image.Image, "load", lambda img: loads.append(img.size) or real_load(img))
        with self.assertRaises(APIError) as caught:
            encode_images([raw, raw], images_config(max_total_pixels=19999))
        self.assertEqual((caught.exception.status, caught.exception.code), (413, "PAYLOAD_TOO_LARGE"))
        self.assertEqual(loads, [])

    def test_cancelled_job_stops_before_the_next_image(self):
        """A job whose cancelled flag is up stops before its next image (a thread cannot be killed)."""
        done = []
        real = images_module.process_image
        self.patch(images_module, "process_image", lambda raw, s: done.append(1) or real(raw, s))
        with self.assertRaises(images_module.Abandoned):
            encode_images([SMALL] * 3, images_config(), cancelled=lambda: len(done) >= 1)
        self.assertEqual(done, [1])

    def test_config_keys_and_defaults(self):
        """The four keys exist with the documented defaults, in the code and in etc/clawdbot.yaml, and are range-checked."""
        for settings in (images_config(), load_config(os.path.join(ROOT, "etc", "clawdbot.yaml"), {}).images):
            self.assertEqual((settings.max_per_request, settings.max_total_pixels, settings.workers, settings.timeout), (8, 80_000_000, 2, 10.0))
        for key, value in (("workers", 0), ("workers", 33), ("max_per_request", -1), ("max_total_pixels", 0), ("timeout", "0s")):
            with self.assertRaises(ConfigError) as caught:
                images_config(**{key: value})
            self.assertEqual(caught.exception.path, f"images.{key}")
