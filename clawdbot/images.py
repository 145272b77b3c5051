"""
Images in chat requests: validated, shrunk and re-encoded before they go to
the model (SPEC.md section 7).

L{process_image} is a pure function of the raw bytes and the C{images}
config section: no Twisted, no I/O.  L{image_filter} wraps it into the
C{filter(raw_bytes) -> base64 text} callable that
L{clawdbot.translate.translate_messages} calls for each image.

What it does to every image, in order:

  1. refuses more than C{max_bytes} of input before anything parses it;
  2. identifies the format by content, trying only the Pillow plugins of
     C{allowed_formats} (a data URL's declared MIME type is never used), so
     SVG, TIFF, PSD, PDF, HTML and the like are refused as unsupported;
  3. refuses more than C{max_pixels} declared pixels before decoding, and
     turns Pillow's own decompression-bomb warning and error into the same
     refusal;
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

Cost: this runs synchronously on the calling (reactor) thread.  It is
bounded by the limits: at the defaults (10MB, 40 megapixels) the worst case
is decoding one 40-megapixel frame, a few hundred MB of memory and well under
a few seconds of CPU; JPEGs, the common large case, decode at 1/2 to 1/8
scale when they are big.  Refusals by byte size, by format and by declared
size cost almost nothing because they happen before decoding.

Refusals are L{clawdbot.errors.invalid} (400 INVALID_REQUEST) with one of the
curated reasons below, never Pillow's exception text.
"""

import base64
import io
import warnings

from PIL import ExifTags, Image, ImageFile

from clawdbot.errors import invalid

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


def too_many_bytes(limit):
    return f"the image is larger than {limit} bytes"


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


def process_image(raw, settings):
    """
    Validate, shrink and re-encode one image.

    @param raw: the image's bytes, as decoded from the data URL.
    @param settings: the C{images} config section (L{clawdbot.config.ImagesConfig}).
    @return: the re-encoded image's bytes, in C{settings.format}.
    @raise clawdbot.errors.APIError: INVALID_REQUEST with a curated reason.
    """
    if len(raw) > settings.max_bytes:
        raise _refuse(too_many_bytes(settings.max_bytes))
    if not raw:
        raise _refuse(EMPTY)
    # Never decode a partial image: the flag is process-wide, so assert it
    # here rather than trust whoever imported Pillow before us.
    ImageFile.LOAD_TRUNCATED_IMAGES = False

    with warnings.catch_warnings():
        # Pillow's complaints about hostile input (corrupt EXIF and the like)
        # are not worth a log line each; its bomb warning is a refusal.
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open(raw, settings.allowed_formats)
        with img:
            width, height = img.size
            if width <= 0 or height <= 0:
                raise _refuse(DAMAGED)
            if width * height > settings.max_pixels:
                raise _refuse(TOO_MANY_PIXELS)
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


def image_filter(settings):
    """
    The C{filter(raw_bytes) -> base64 text} that
    L{clawdbot.translate.translate_messages} applies to each image.
    """

    def encode(raw):
        return base64.b64encode(process_image(raw, settings)).decode("ascii")

    return encode
