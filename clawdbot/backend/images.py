"""
Images in chat requests: validated, shrunk and re-encoded before they go to
the model (SPEC.md section 7), on a small pool of worker threads, never on
the reactor.

L{process_image} is a pure function of one image's raw bytes and the
C{images} config section.  L{encode_images} is the pure, synchronous job for
all of one request's images: the per-request caps, then L{process_image} on
each.  L{ImageWorkers} runs that job on its own bounded thread pool under a
deadline; the HTTP handlers await it before they call the backend:
L{ImageWorkers.process_messages} (the OpenAI route, whose translated messages
carry raw bytes, see L{clawdbot.backend.translate.translate_messages}) and
L{ImageWorkers.process_base64} (Ollama's native routes, whose C{images} are
base64 strings).

Per request, before anything is decoded (only headers are read):

  - at most C{max_per_request} images: 400 INVALID_REQUEST;
  - every image passes the per-image checks 1-3 below, and their declared
    sizes (width x height) add up to at most C{max_total_pixels}: 413
    PAYLOAD_TOO_LARGE.  A 413 because the request as a whole is too heavy
    (like a body over C{limits.max_body}); each image on its own is fine,
    and the remedy is fewer or smaller images.

What it does to every image, in order:

  1. refuses more than C{max_bytes} of input before anything parses it;
  2. identifies the format by content, trying only the Pillow plugins of
     C{allowed_formats} (a data URL's declared MIME type is never used), so
     SVG, TIFF, PSD, PDF, HTML and the like are refused as unsupported;
  3. refuses more than C{max_pixels} declared pixels before decoding, and
     turns Pillow's own decompression-bomb limits into the same refusal;
  4. decodes the first frame only (animated GIF and WebP), refusing
     truncated or damaged data (Pillow's C{LOAD_TRUNCATED_IMAGES} is forced
     off), letting libjpeg decode big JPEGs at a reduced scale when that
     still leaves enough pixels;
  5. shrinks the longest side to C{max_side} with Lanczos, then applies the
     EXIF (or XMP) orientation, as C{PIL.ImageOps.exif_transpose} would, to
     the small picture, and converts the mode (alpha composited over white
     for JPEG; kept for PNG and WebP);
  6. copies the pixels into a fresh image, so no metadata (EXIF, GPS, ICC
     profiles, comments, text chunks, XMP) survives, and encodes it as
     C{format}.

Cost: decoding runs on C{images.workers} threads (Pillow releases the GIL
while it decodes, resizes and encodes, so the reactor keeps answering).  One
request's images are one job, done one after another on one thread, so a
single request never holds more than one thread, and the pool bounds the
memory in use (about C{workers} decoded frames at a time).  The caps bound a
job: at the defaults, 8 images and 80 megapixels of declared size, about a
second of CPU.  Refusals by count, byte size, format and declared size cost
almost nothing because they happen before decoding.

Deadline: C{images.timeout} runs from the moment a request hands its images
over, waiting for a free thread included.  When it passes, the request gets
413 PAYLOAD_TOO_LARGE "the images took too long to process" if its job had
started (its images are too costly), or 503 GATEWAY_BUSY with C{Retry-After}
if every thread was still busy with other requests' images (not the
caller's fault).  A thread cannot be killed: the job checks a cancelled flag
before each header and each image and stops there, so a request that expired
or whose client went away costs at most the one image being decoded.

Refusals of an image are L{clawdbot.errors.invalid} (400 INVALID_REQUEST) with
one of the curated reasons below, never Pillow's exception text.
"""

import base64
import binascii
import io
import threading
import warnings

from PIL import ExifTags, Image, ImageFile
from twisted.internet.defer import CancelledError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from clawdbot.errors import APIError, invalid
from clawdbot.workers import Workers, shutting_down

log = Logger(namespace="clawdbot.images")

# Pillow's complaints about hostile input (corrupt EXIF, its bomb warning and
# the like) are not worth a log line each, and each distinct text would stay
# in a warnings registry for good.  warnings.catch_warnings() cannot scope
# this to a call: it swaps process-wide state and is not thread-safe (before
# Python 3.14), and the images are processed on several threads.  So Pillow's
# warnings are ignored once, here; the bomb limit is checked directly
# (_declared_size).
warnings.filterwarnings("ignore", module=r"PIL(\.|$)")

# Config names (images.allowed_formats) -> the one Pillow plugin that may try
# to read such a file, and the format names an opened image may then report.
# A JPEG with several pictures (common from phone cameras) is read by the JPEG
# plugin and reports MPO.
PILLOW_PLUGINS = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP"}
PILLOW_FORMATS = {
    "png": ("PNG",),
    "jpeg": ("JPEG", "MPO"),
    "gif": ("GIF",),
    "webp": ("WEBP",),
    "bmp": ("BMP",),
}

# The curated refusal reasons.
UNSUPPORTED = "the image format is not supported"
TOO_MANY_PIXELS = "the image is too large in pixels"
DAMAGED = "the image is damaged or truncated"
EMPTY = "the image is empty"
TOO_SLOW = "the images took too long to process"
BUSY = "the image workers are busy; retry shortly"


def too_many_bytes(limit):
    return f"the image is larger than {limit} bytes"


def too_many_images(limit):
    return f"a request may carry at most {limit} images" if limit else "this gateway does not accept images"


def too_many_total_pixels(limit):
    return f"the images in a request may add up to at most {limit} pixels"


def check_count(count, settings):
    """400 INVALID_REQUEST when C{count} images are more than C{settings.max_per_request}."""
    if count > settings.max_per_request:
        raise invalid(too_many_images(settings.max_per_request))


def _refuse(reason):
    return invalid(reason)


def _open(raw, allowed):
    """The lazily opened image, its format identified by content among C{allowed}."""
    plugins = [PILLOW_PLUGINS[fmt] for fmt in allowed]
    if not plugins:
        raise _refuse(UNSUPPORTED)
    try:
        img = Image.open(io.BytesIO(raw), formats=plugins)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _refuse(TOO_MANY_PIXELS) from None
    except Image.UnidentifiedImageError:
        # Pillow also says "unidentified" when a plugin recognised the magic
        # bytes but could not parse the header: that is a damaged image.
        raise _refuse(DAMAGED if _looks_like(raw, plugins) else UNSUPPORTED) from None
    except Exception:
        # A known header with a broken body (bad chunk, impossible values).
        raise _refuse(DAMAGED) from None
    if not any(img.format in PILLOW_FORMATS[fmt] for fmt in allowed):
        img.close()
        raise _refuse(UNSUPPORTED)
    return img


def _looks_like(raw, plugins):
    """Whether the magic bytes of C{raw} are those of one of C{plugins}."""
    prefix = raw[:16]
    for name in plugins:
        accept = Image.OPEN.get(name, (None, None))[1]
        try:
            if accept is not None and accept(prefix):
                return True
        except Exception:
            pass
    return False


def _has_alpha(img):
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or img.has_transparency_data


def _working_mode(img):
    """
    C{img} as L, RGB or RGBA, so that it resizes well (palette and 1-bit
    images would be resized with nearest-neighbour) and keeps any alpha.
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit greyscale (PNG): scale to 8 bits instead of clipping to white.
        return img.convert("I").point(lambda v: v / 257).convert("L")
    if img.mode in ("1", "L", "F") and not _has_alpha(img):
        return img.convert("L")
    if _has_alpha(img):
        return img.convert("RGBA") if img.mode != "RGBA" else img
    return img.convert("RGB") if img.mode != "RGB" else img


def _output_mode(img, output):
    """RGB, or RGBA when C{output} keeps transparency; JPEG gets alpha flattened over white."""
    if img.mode == "RGBA":
        if output != "jpeg":
            return img
        flat = Image.new("RGB", img.size, (255, 255, 255))
        flat.paste(img, mask=img.getchannel("A"))
        return flat
    return img.convert("RGB") if img.mode != "RGB" else img


# EXIF orientation -> the transposition that turns the picture upright (the
# table of PIL.ImageOps.exif_transpose).
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(img):
    """
    The transposition the image's EXIF (or XMP) orientation asks for, or
    C{None}.  Read before any processing and applied after shrinking, so the
    full-size picture is never copied just to turn it; unreadable EXIF is
    ignored (it is dropped anyway).
    """
    try:
        return _ORIENTATIONS.get(img.getexif().get(ExifTags.Base.Orientation))
    except Exception:
        return None


def _target_size(size, max_side):
    width, height = size
    longest = max(width, height)
    if longest <= max_side:
        return size
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _opened(raw, settings):
    """
    The lazily opened image after checks 1-3 (bytes, format, declared size):
    only its header has been read.
    """
    if len(raw) > settings.max_bytes:
        raise _refuse(too_many_bytes(settings.max_bytes))
    if not raw:
        raise _refuse(EMPTY)
    # Never decode a partial image: the flag is process-wide, so assert it
    # here rather than trust whoever imported Pillow before us.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    img = _open(raw, settings.allowed_formats)
    try:
        _declared_size(img, settings)
    except BaseException:
        img.close()
        raise
    return img


def _declared_size(img, settings):
    width, height = img.size
    if width <= 0 or height <= 0:
        raise _refuse(DAMAGED)
    pixels = width * height
    # Pillow's own bomb threshold (it only warns below twice that, and its
    # warnings are ignored): a refusal too, wherever the config puts ours.
    bomb = Image.MAX_IMAGE_PIXELS
    if pixels > settings.max_pixels or (bomb is not None and pixels > bomb):
        raise _refuse(TOO_MANY_PIXELS)
    return pixels


def declared_pixels(raw, settings):
    """
    Width x height of one image as its header declares it, after the
    per-image checks 1-3; nothing is decoded.

    @raise clawdbot.errors.APIError: INVALID_REQUEST with a curated reason.
    """
    with _opened(raw, settings) as img:
        return img.size[0] * img.size[1]


def process_image(raw, settings):
    """
    Validate, shrink and re-encode one image.  Synchronous and CPU-bound:
    call it on a worker thread (L{ImageWorkers}), never on the reactor.

    @param raw: the image's bytes, as decoded from the data URL.
    @param settings: the C{images} config section (L{clawdbot.config.ImagesConfig}).
    @return: the re-encoded image's bytes, in C{settings.format}.
    @raise clawdbot.errors.APIError: INVALID_REQUEST with a curated reason.
    """
    img = _opened(raw, settings)
    with img:
        try:
            # Frame 0 is the current frame after open; only it is decoded.
            # For JPEG, let libjpeg scale down by 1/2..1/8 while keeping at
            # least twice the target size (Pillow's thumbnail does the same).
            target = _target_size(img.size, settings.max_side)
            if target != img.size:
                img.draft(None, (target[0] * 2, target[1] * 2))
            img.load()
            turn = _orientation(img)
            img = _working_mode(img)
            target = _target_size(img.size, settings.max_side)
            if target != img.size:
                img = img.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
            if turn is not None:
                img = img.transpose(turn)
            img = _output_mode(img, settings.format)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError, MemoryError):
            raise _refuse(TOO_MANY_PIXELS) from None
        except Exception:
            raise _refuse(DAMAGED) from None

    # A fresh image holds the pixels and nothing else: no info dict, no EXIF,
    # no ICC profile, no text chunks, no XMP reach the encoder.
    clean = Image.new(img.mode, img.size)
    clean.paste(img)
    out = io.BytesIO()
    if settings.format == "jpeg":
        clean.save(out, "JPEG", quality=settings.quality, optimize=True)
    elif settings.format == "webp":
        clean.save(out, "WEBP", quality=settings.quality, method=4)
    else:
        clean.save(out, "PNG", compress_level=6)
    return out.getvalue()


# --- one request's images: the job a worker runs ----------------------------------


class Abandoned(Exception):
    """The job was cancelled (deadline passed, client gone, shutdown): nobody waits for its answer."""


def _never():
    return False


def encode_images(raws, settings, cancelled=_never):
    """
    All of one request's images, validated and re-encoded: pure and
    synchronous, the job L{ImageWorkers} runs on a worker thread.

    First the per-request caps, reading headers only: the count, then each
    image's per-image checks 1-3 and the running sum of the declared sizes
    against C{max_total_pixels}.  Only then is anything decoded, one image
    after another.

    @param raws: the images' bytes, in request order.
    @param cancelled: C{() -> bool}, asked before each header and each
        image; when it answers true the job stops there with L{Abandoned}
        (a thread cannot be killed, so this is how a job ends early).
    @return: the base64 text of each re-encoded image, in order.
    @raise clawdbot.errors.APIError: 400 INVALID_REQUEST (count, or one
        image's curated reason) or 413 PAYLOAD_TOO_LARGE (total pixels).
    """
    check_count(len(raws), settings)
    total = 0
    for raw in raws:
        if cancelled():
            raise Abandoned()
        total += declared_pixels(raw, settings)
        if total > settings.max_total_pixels:
            raise APIError("PAYLOAD_TOO_LARGE", details=too_many_total_pixels(settings.max_total_pixels))
    out = []
    for raw in raws:
        if cancelled():
            raise Abandoned()
        out.append(base64.b64encode(process_image(raw, settings)).decode("ascii"))
    return out


def decode_base64(texts, settings, cancelled=_never):
    """
    L{encode_images} for images given as base64 text (Ollama's native
    C{images}): each is decoded first (line breaks ignored, as Go's decoder
    does; anything else that is not base64 is a 400).
    """
    raws = []
    for i, text in enumerate(texts):
        if cancelled():
            raise Abandoned()
        try:
            raws.append(base64.b64decode(text.replace("\r", "").replace("\n", ""), validate=True))
        except (binascii.Error, ValueError):
            raise invalid(f"images[{i}]: the image data is not valid base64") from None
    return encode_images(raws, settings, cancelled)


class _Job:
    """One request's images on their way through the pool."""

    def __init__(self):
        self.started = False
        self._cancelled = threading.Event()

    def cancel(self):
        self._cancelled.set()

    def cancelled(self):
        return self._cancelled.is_set()

    def run(self, work, items, settings):
        """On a worker thread."""
        if self.cancelled():
            raise Abandoned()
        self.started = True
        return work(items, settings, self.cancelled)


class ImageWorkers(Workers):
    """
    The bounded thread pool that decodes images, so the reactor never does.

    The pool starts with the first job and has C{images.workers} threads at
    most (a reload applies to the next job); L{stop} ends it at gateway
    shutdown.  Each request's images are one job (L{encode_images}) under
    the deadline C{images.timeout}; see the module docstring for what a
    caller gets when it passes.

    The cost is charged before this runs: the routes that take images are
    C{rate_limited}, so L{clawdbot.http.resource.APIResource._run} takes the caller's
    request budget before the handler asks for any image work, and a request
    refused here has still spent it.
    """

    name = "clawdbot-images"

    def _pool_for(self, settings):
        return self.pool(settings.workers)

    async def process_all(self, raws, settings):
        """
        Raw image bytes to the base64 text of the re-encoded images, on the
        pool, within C{settings.timeout}.

        @param settings: the request's C{images} config section.
        @raise clawdbot.errors.APIError: 400 or 413 from L{encode_images};
            413 PAYLOAD_TOO_LARGE when the job passed the deadline; 503
            GATEWAY_BUSY when it never got a thread before the deadline.
        """
        raws = list(raws)
        if not raws:
            return []
        check_count(len(raws), settings)
        return await self._run(encode_images, raws, settings)

    async def process_base64(self, texts, settings):
        """
        L{process_all} for a native request's C{images}: a list of base64
        strings (no C{data:} prefix), as Ollama's C{/api/chat} and
        C{/api/generate} take them.  Returns the re-encoded images as base64
        text, in order, for the body forwarded to Ollama.

        @raise clawdbot.errors.APIError: 400 INVALID_REQUEST when C{texts} is
            not a list of strings or one is not base64, and as L{process_all}.
        """
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise invalid("'images' must be a list of base64 strings")
        if not texts:
            return []
        check_count(len(texts), settings)
        return await self._run(decode_base64, texts, settings)

    async def process_base64_lists(self, lists, settings):
        """
        L{process_base64} for every C{images} list of one native request at
        once (the caps are per request, not per message): each list is
        replaced in place (C{lst[:] = ...}) by its re-encoded images.
        """
        if not all(isinstance(texts, list) for texts in lists):
            raise invalid("'images' must be a list of base64 strings")
        flat = [text for texts in lists for text in texts]
        encoded = iter(await self.process_base64(flat, settings))
        for texts in lists:
            texts[:] = [next(encoded) for _ in texts]

    async def process_messages(self, messages, settings):
        """
        Replace, in place, the raw bytes in each translated message's
        C{images} (L{clawdbot.backend.translate.chat_request}) with the base64 text
        of the re-encoded images: all of the request's images are one job.
        """
        raws = [raw for message in messages for raw in message.get("images") or ()]
        if not raws:
            return
        encoded = iter(await self.process_all(raws, settings))
        for message in messages:
            if message.get("images"):
                message["images"] = [next(encoded) for _ in message["images"]]

    async def _run(self, work, items, settings):
        job = _Job()
        pool = self._pool_for(settings)
        # deferToThreadPool's Deferred has no canceller: cancelling it fails
        # it at once with CancelledError and drops the thread's late answer.
        done = deferToThreadPool(self.reactor, pool, job.run, work, items, settings)
        expired = []

        def expire():
            expired.append(True)
            done.cancel()

        timer = self.reactor.callLater(settings.timeout, expire)
        self._jobs.add(job)
        try:
            return await done
        except CancelledError:
            # The deadline, or the client went away: the thread stops before
            # its next image.
            job.cancel()
            if not expired:
                raise
            if job.started:
                log.info("Image work passed its deadline of {timeout}s; refused", timeout=settings.timeout, images=len(items))
                raise APIError("PAYLOAD_TOO_LARGE", details=TOO_SLOW) from None
            log.warn("No image worker was free within {timeout}s; refused", timeout=settings.timeout, workers=settings.workers)
            raise APIError("GATEWAY_BUSY", details=BUSY, headers={"Retry-After": "1"}) from None
        except Abandoned:
            # Cancelled by stop(): the gateway is going down.
            raise shutting_down() from None
        finally:
            self._jobs.discard(job)
            if timer.active():
                timer.cancel()
