"""
Images in chat requests (clawdbot.backend.images): hostile files are refused with a
curated reason, good ones come out upright, shrunk, metadata-free and
re-encoded in the configured format.

Every hostile file is made here, in memory.
"""

import base64
import io
import os
import struct
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image, ImageFile
from twisted.trial.unittest import SynchronousTestCase

from clawdbot.config import ConfigError, parse_config
from clawdbot.errors import APIError
from clawdbot.backend.images import DAMAGED, EMPTY, TOO_MANY_PIXELS, UNSUPPORTED, encode_images, process_image
from clawdbot.backend.translate import chat_request
from tests.helpers import BASE_CONFIG, merge_yaml

CURATED = {DAMAGED, EMPTY, TOO_MANY_PIXELS, UNSUPPORTED}


def config(extra=""):
    return parse_config(merge_yaml(BASE_CONFIG, extra), {})


DEFAULTS = config().images


def images_config(**keys):
    lines = "".join(f"  {k}: {v}\n" for k, v in keys.items())
    return config("images:\n" + lines).images


# --- making files ---------------------------------------------------------------


def encode(img, fmt, **options):
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def noise(size, mode="RGB"):
    """An image of random pixels (compresses badly, so truncation bites)."""
    bands = len(mode)
    return Image.frombytes(mode, size, os.urandom(size[0] * size[1] * bands))


def two_colours(size, first="red", second="blue", mode="RGB"):
    """Left half C{first}, right half C{second}."""
    img = Image.new(mode, size, first)
    img.paste(Image.new(mode, (size[0] // 2, size[1]), second), (size[0] - size[0] // 2, 0))
    return img


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width, height, idat, bit_depth=8, colour_type=0):
    """A PNG written by hand: any IHDR, any IDAT payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def bomb_png(side):
    """
    A complete, valid 1-bit greyscale PNG of C{side} x C{side} black pixels:
    a few KB on the wire, C{side}**2 pixels once decoded.
    """
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return raw_png(side, side, idat, bit_depth=1)


def decode_output(data):
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def close(colour, expected, tolerance=12):
    return all(abs(a - b) <= tolerance for a, b in zip(colour, expected))


class RefusalMixin:
    def refused(self, raw, settings=DEFAULTS):
        """The curated reason C{raw} is refused with."""
        with self.assertRaises(APIError) as caught:
            process_image(raw, settings)
        err = caught.exception
        self.assertEqual((err.code, err.status), ("INVALID_REQUEST", 400))
        return err.details


# --- hostile files ----------------------------------------------------------------


class HostileTests(RefusalMixin, SynchronousTestCase):
    def test_oversize_bytes_refused_before_parsing(self):
        """More than images.max_bytes of input is refused by its length; Pillow never sees it."""
        small = images_config(max_bytes="2KB")
        raw = encode(noise((64, 64)), "PNG")
        self.assertGreater(len(raw), 2000)

        def never(*args, **kwargs):
            raise AssertionError("Image.open was called")

        self.patch(Image, "open", never)
        self.assertEqual(self.refused(raw, small), "the image is larger than 2000 bytes")
        self.assertEqual(self.refused(b"x" * (DEFAULTS.max_bytes + 1)), "the image is larger than 10000000 bytes")

    def test_pixel_flood_refused_before_decoding(self):
        """A tiny PNG declaring 30000x30000 is refused by its declared size, not decoded."""
        flood = raw_png(30000, 30000, zlib.compress(b"\x00" * 100))
        self.assertLess(len(flood), 200)
        self.assertEqual(self.refused(flood), TOO_MANY_PIXELS)
        # The same for a GIF whose logical screen is 65535x65535.
        gif = bytearray(encode(Image.new("P", (4, 4)), "GIF"))
        gif[6:10] = struct.pack("<HH", 65535, 65535)
        self.assertEqual(self.refused(bytes(gif)), TOO_MANY_PIXELS)

    def test_max_pixels_is_the_configured_limit(self):
        """images.max_pixels is the limit: 100x100 passes at 10000 and is refused at 9999."""
        raw = encode(Image.new("RGB", (100, 100), "green"), "PNG")
        process_image(raw, images_config(max_pixels=10000))
        self.assertEqual(self.refused(raw, images_config(max_pixels=9999)), TOO_MANY_PIXELS)

    def test_decompression_bomb_refused(self):
        """A complete, valid 10000x10000 PNG of a few KB (100 megapixels decoded) is refused."""
        bomb = bomb_png(10000)
        self.assertLess(len(bomb), 40_000)
        self.assertEqual(self.refused(bomb), TOO_MANY_PIXELS)
        # Even at the highest allowed max_pixels.
        self.assertEqual(self.refused(bomb, images_config(max_pixels=80_000_000)), TOO_MANY_PIXELS)

    def test_pillow_bomb_checks_become_refusals(self):
        """Pillow's DecompressionBombWarning and DecompressionBombError are refusals with the curated reason."""
        self.patch(Image, "MAX_IMAGE_PIXELS", 1000)
        warned = encode(Image.new("RGB", (40, 40)), "PNG")  # 1600 pixels: Pillow warns
        failed = encode(Image.new("RGB", (50, 50)), "PNG")  # 2500 pixels: Pillow raises
        self.assertEqual(self.refused(warned), TOO_MANY_PIXELS)
        self.assertEqual(self.refused(failed), TOO_MANY_PIXELS)

    def test_max_pixels_stays_below_pillows_own_limit(self):
        """images.max_pixels cannot be set above what Pillow decodes without its bomb warning."""
        self.assertLess(80_000_000, Image.MAX_IMAGE_PIXELS)
        with self.assertRaises(ConfigError) as caught:
            images_config(max_pixels=90_000_000)
        self.assertEqual(caught.exception.path, "images.max_pixels")

    def test_truncated_files_refused(self):
        """Truncated JPEG, PNG, GIF, WebP and BMP files are refused as damaged."""
        picture = noise((200, 150))
        for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP"):
            raw = encode(picture, fmt)
            for cut in (16, len(raw) // 2, len(raw) - 40):
                self.assertEqual(self.refused(raw[:cut]), DAMAGED, (fmt, cut))

    def test_truncated_refused_even_if_pillow_was_told_to_load_them(self):
        """A truncated image is refused even when someone turned on ImageFile.LOAD_TRUNCATED_IMAGES."""
        self.patch(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
        raw = encode(noise((200, 150)), "JPEG")
        self.assertEqual(self.refused(raw[: len(raw) // 2]), DAMAGED)
        self.assertFalse(ImageFile.LOAD_TRUNCATED_IMAGES)

    def test_corrupt_files_refused(self):
        """Bytes flipped inside the compressed data, or a header with nothing after it, are refused as damaged."""
        png = bytearray(encode(noise((100, 100)), "PNG"))
        middle = len(png) // 2
        png[middle : middle + 16] = bytes(b ^ 0xFF for b in png[middle : middle + 16])
        self.assertEqual(self.refused(bytes(png)), DAMAGED)
        self.assertEqual(self.refused(raw_png(10, 10, b"not zlib data at all")), DAMAGED)
        self.assertEqual(self.refused(b"\x89PNG\r\n\x1a\n"), DAMAGED)
        self.assertEqual(self.refused(b"\xff\xd8\xff\xe0" + b"\x00" * 20), DAMAGED)

    def test_wrong_types_refused(self):
        """SVG, HTML, PDF, plain text, TIFF, ICO, PSD-like and empty payloads are not supported images."""
        svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><script>alert(1)</script></svg>'
        html = b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>"
        pdf = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
        text = "just some text, 你好".encode()
        tiff = encode(Image.new("RGB", (8, 8)), "TIFF")
        ico = encode(Image.new("RGB", (16, 16)), "ICO")
        psd = b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03\x00\x00\x00\x10\x00\x00\x00\x10\x00\x08\x00\x03"
        for raw in (svg, html, pdf, text, tiff, ico, psd):
            self.assertEqual(self.refused(raw), UNSUPPORTED, raw[:20])
        self.assertEqual(self.refused(b""), EMPTY)

    def test_allowed_formats_is_the_list(self):
        """A format left out of images.allowed_formats is refused, even though Pillow reads it."""
        only_png = images_config(allowed_formats='["png"]')
        self.assertEqual(self.refused(encode(Image.new("RGB", (8, 8)), "JPEG"), only_png), UNSUPPORTED)
        self.assertEqual(self.refused(encode(Image.new("RGB", (8, 8)), "BMP"), only_png), UNSUPPORTED)
        process_image(encode(Image.new("RGB", (8, 8)), "PNG"), only_png)
        none = images_config(allowed_formats="[]")
        self.assertEqual(self.refused(encode(Image.new("RGB", (8, 8)), "PNG"), none), UNSUPPORTED)
        with self.assertRaises(ConfigError):
            images_config(allowed_formats='["svg"]')

    def test_gif_header_with_script_refused(self):
        """A GIF header followed by script, not an image, is refused."""
        polyglot = b"GIF89a/*\x00\x00\x00\x00\x00*/=1;alert(document.cookie);//"
        self.assertIn(self.refused(polyglot), (DAMAGED, UNSUPPORTED))

    def test_valid_gif_polyglot_loses_its_payload(self):
        """
        A valid GIF that is also script (its width spells C{/*}, its comment and
        trailing bytes carry code) is accepted as a picture, and the output is a
        fresh JPEG without any of the script.
        """
        gif = bytearray(encode(Image.new("P", (0x2A2F, 2)), "GIF", comment=b"*/alert('comment')/*"))
        self.assertEqual(bytes(gif[6:8]), b"/*")
        gif += b"*/=1;alert('trailer');//"
        out = process_image(bytes(gif), DEFAULTS)
        self.assertNotIn(b"alert", out)
        self.assertEqual(decode_output(out).format, "JPEG")
        self.assertEqual(decode_output(out).size[0], 1568)

    def test_refusals_never_leak_library_text(self):
        """Every refusal reason is one of the curated ones, whatever Pillow said."""
        samples = [
            raw_png(30000, 30000, b""),
            raw_png(0, 0, b""),
            raw_png(10, 10, zlib.compress(b"\x00"), bit_depth=3),
            b"BM" + b"\xff" * 60,
            b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 30,
            b"GIF87a" + b"\x00" * 30,
        ]
        for raw in samples:
            self.assertIn(self.refused(raw), CURATED, raw[:20])

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.sampled_from(["PNG", "JPEG", "GIF", "WEBP", "BMP"]),
        st.lists(st.tuples(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=255)), max_size=8),
        st.integers(min_value=0, max_value=10**6),
    )
    def test_mangled_files_are_refused_or_clean(self, fmt, flips, cut):
        """
        Any file made by flipping bytes of a good image and cutting it short
        is either refused with a curated 400 or comes out as a clean JPEG
        within the limits: never another exception.
        """
        raw = bytearray(GOOD[fmt])
        for position, value in flips:
            raw[position % len(raw)] = value
        raw = bytes(raw[: max(1, cut % (len(raw) + 1))])
        try:
            out = process_image(raw, SMALL)
        except APIError as err:
            self.assertEqual(err.code, "INVALID_REQUEST")
            self.assertIn(err.details, CURATED)
            return
        img = decode_output(out)
        self.assertEqual(img.format, "JPEG")
        self.assertLessEqual(max(img.size), SMALL.max_side)


GOOD = {fmt: encode(two_colours((96, 64)).convert("P") if fmt == "GIF" else two_colours((96, 64)), fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP")}
SMALL = images_config(max_side=48, max_pixels=1_000_000)


# --- what good images become ---------------------------------------------------------


class ProcessingTests(RefusalMixin, SynchronousTestCase):
    def test_every_allowed_format_is_accepted_and_reencoded(self):
        """PNG, JPEG, GIF, WebP and BMP in come out as a JPEG of the same picture."""
        for fmt, raw in GOOD.items():
            img = decode_output(process_image(raw, DEFAULTS))
            self.assertEqual((img.format, img.mode, img.size), ("JPEG", "RGB", (96, 64)), fmt)
            self.assertTrue(close(img.getpixel((5, 32)), (255, 0, 0), 40), fmt)
            self.assertTrue(close(img.getpixel((90, 32)), (0, 0, 255), 40), fmt)

    def test_multi_picture_jpeg_accepted_as_jpeg(self):
        """A multi-picture JPEG (MPO, as some phone cameras write) is a JPEG: its first picture is used."""
        raw = encode(two_colours((96, 64)), "MPO", save_all=True, append_images=[Image.new("RGB", (96, 64), "lime")])
        self.assertEqual(Image.open(io.BytesIO(raw)).format, "MPO")
        img = decode_output(process_image(raw, DEFAULTS))
        self.assertEqual((img.format, img.size), ("JPEG", (96, 64)))
        self.assertTrue(close(img.getpixel((5, 32)), (255, 0, 0), 40))

    def test_declared_type_is_ignored(self):
        """The format is found from the bytes: a JPEG labelled image/png in the data URL is read as a JPEG."""
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(GOOD["JPEG"]).decode()}}]}]}
        out = processed(body, config())
        self.assertEqual(decode_output(base64.b64decode(out["messages"][0]["images"][0])).size, (96, 64))

    def test_output_is_the_configured_format(self):
        """images.format decides the output: jpeg, png or webp, and the quality setting applies."""
        raw = encode(noise((300, 200)), "PNG")
        for fmt, pillow in (("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")):
            out = process_image(raw, images_config(format=fmt))
            self.assertEqual(decode_output(out).format, pillow)
        low = process_image(raw, images_config(quality=10))
        high = process_image(raw, images_config(quality=95))
        self.assertLess(len(low), len(high))

    def test_metadata_stripped(self):
        """EXIF with GPS, camera make, ICC profile, comment and XMP in a JPEG are all gone after processing."""
        exif = Image.Exif()
        exif[ExifTags.Base.Make] = "SpyCam-Make"
        exif[ExifTags.Base.ImageDescription] = "home-address"
        gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
        gps[ExifTags.GPS.GPSLatitudeRef] = "N"
        gps[ExifTags.GPS.GPSLatitude] = (52.0, 22.0, 7.5)
        gps[ExifTags.GPS.GPSLongitudeRef] = "E"
        gps[ExifTags.GPS.GPSLongitude] = (4.0, 53.0, 1.0)
        raw = encode(
            noise((120, 80)),
            "JPEG",
            exif=exif,
            icc_profile=b"ICC-PROFILE-MARKER",
            comment=b"secret-comment",
            xmp=b"<x:xmpmeta>secret-xmp</x:xmpmeta>",
        )
        before = Image.open(io.BytesIO(raw))
        self.assertEqual(before.getexif().get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef], "N")
        for fmt in ("jpeg", "png", "webp"):
            out = process_image(raw, images_config(format=fmt))
            img = decode_output(out)
            self.assertEqual(dict(img.getexif()), {}, fmt)
            self.assertEqual(img.getexif().get_ifd(ExifTags.IFD.GPSInfo), {}, fmt)
            for key in ("exif", "icc_profile", "comment", "xmp", "XML:com.adobe.xmp"):
                self.assertNotIn(key, img.info, fmt)
            for marker in (b"Exif", b"SpyCam", b"home-address", b"ICC-PROFILE", b"secret-comment", b"secret-xmp"):
                self.assertNotIn(marker, out, fmt)

    def test_png_text_chunks_stripped(self):
        """tEXt, zTXt and iTXt chunks of a PNG do not reach the output, even in PNG."""
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("Author", "secret-author")
        info.add_text("Comment", "secret-ztxt", zip=True)
        info.add_itxt("Description", "secret-itxt")
        raw = encode(noise((50, 50)), "PNG", pnginfo=info)
        out = process_image(raw, images_config(format="png"))
        self.assertEqual(decode_output(out).text, {})
        for chunk in (b"tEXt", b"zTXt", b"iTXt", b"secret"):
            self.assertNotIn(chunk, out)

    def test_exif_orientation_applied(self):
        """A landscape JPEG tagged orientation 6 (rotate 90 degrees clockwise) comes out portrait, upright."""
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = 6
        raw = encode(two_colours((200, 100)), "JPEG", exif=exif, quality=95)
        img = decode_output(process_image(raw, DEFAULTS))
        self.assertEqual(img.size, (100, 200))
        self.assertTrue(close(img.getpixel((50, 20)), (255, 0, 0), 40), img.getpixel((50, 20)))
        self.assertTrue(close(img.getpixel((50, 180)), (0, 0, 255), 40), img.getpixel((50, 180)))

    def test_animated_images_give_their_first_frame(self):
        """An animated GIF or WebP (red, green, blue frames) becomes a still JPEG of the red frame."""
        frames = [Image.new("RGB", (60, 40), colour) for colour in ("red", "lime", "blue")]
        for fmt in ("GIF", "WEBP"):
            raw = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
            self.assertEqual(Image.open(io.BytesIO(raw)).n_frames, 3, fmt)
            img = decode_output(process_image(raw, DEFAULTS))
            self.assertEqual((img.format, img.size, getattr(img, "n_frames", 1)), ("JPEG", (60, 40), 1), fmt)
            self.assertTrue(close(img.getpixel((30, 20)), (255, 0, 0), 30), (fmt, img.getpixel((30, 20))))

    def test_big_images_shrunk_to_max_side(self):
        """The longest side is shrunk to images.max_side, keeping the aspect; small images keep their size."""
        big_jpeg = encode(two_colours((4000, 3000)), "JPEG")
        self.assertEqual(decode_output(process_image(big_jpeg, DEFAULTS)).size, (1568, 1176))
        tall_png = encode(two_colours((200, 3000)), "PNG")
        self.assertEqual(decode_output(process_image(tall_png, DEFAULTS)).size, (105, 1568))
        self.assertEqual(decode_output(process_image(big_jpeg, images_config(max_side=64))).size, (64, 48))
        sliver = encode(Image.new("RGB", (6000, 1)), "PNG")
        self.assertEqual(decode_output(process_image(sliver, DEFAULTS)).size, (1568, 1))
        self.assertEqual(decode_output(process_image(GOOD["PNG"], DEFAULTS)).size, (96, 64))

    def test_shrunk_jpeg_keeps_its_picture(self):
        """A big JPEG decoded at reduced scale still shows the same picture at the right size."""
        big = encode(two_colours((6000, 4000)), "JPEG")
        img = decode_output(process_image(big, DEFAULTS))
        self.assertEqual(img.size, (1568, 1045))
        self.assertTrue(close(img.getpixel((100, 500)), (255, 0, 0), 40))
        self.assertTrue(close(img.getpixel((1468, 500)), (0, 0, 255), 40))

    def test_transparency_flattened_over_white_for_jpeg(self):
        """RGBA PNG and transparent GIF become JPEG over white: clear pixels white, half-clear grey."""
        rgba = Image.new("RGBA", (40, 20), (255, 0, 0, 0))
        rgba.paste(Image.new("RGBA", (20, 20), (0, 0, 0, 128)), (20, 0))
        img = decode_output(process_image(encode(rgba, "PNG"), DEFAULTS))
        self.assertEqual((img.format, img.mode), ("JPEG", "RGB"))
        self.assertTrue(close(img.getpixel((5, 10)), (255, 255, 255)), img.getpixel((5, 10)))
        self.assertTrue(close(img.getpixel((35, 10)), (127, 127, 127)), img.getpixel((35, 10)))

        palette = Image.new("P", (20, 20), 0)
        palette.putpalette([0, 0, 0, 255, 0, 0])
        palette.paste(1, (10, 0, 20, 20))
        gif = encode(palette, "GIF", transparency=0)
        img = decode_output(process_image(gif, DEFAULTS))
        self.assertTrue(close(img.getpixel((2, 10)), (255, 255, 255)), img.getpixel((2, 10)))
        self.assertTrue(close(img.getpixel((17, 10)), (255, 0, 0), 30), img.getpixel((17, 10)))

    def test_transparency_kept_for_png_and_webp(self):
        """With images.format png or webp, an image with alpha keeps it; an opaque one is plain RGB."""
        rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
        for fmt in ("png", "webp"):
            img = decode_output(process_image(encode(rgba, "PNG"), images_config(format=fmt)))
            self.assertEqual(img.mode, "RGBA", fmt)
            self.assertEqual(img.getpixel((5, 5))[3], 0, fmt)
            opaque = decode_output(process_image(GOOD["BMP"], images_config(format=fmt)))
            self.assertEqual(opaque.mode, "RGB", fmt)

    def test_other_modes_converted(self):
        """Greyscale, 16-bit greyscale, 1-bit, palette and CMYK images come out as RGB with the right shade."""
        cases = [
            (Image.new("L", (8, 8), 100), "PNG", (100, 100, 100)),
            (Image.new("I;16", (8, 8), 40000), "PNG", (156, 156, 156)),
            (Image.new("1", (8, 8), 1), "PNG", (255, 255, 255)),
            (Image.new("RGB", (8, 8), "red").convert("P"), "PNG", (255, 0, 0)),
            (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
            (Image.new("LA", (8, 8), (0, 255)), "PNG", (0, 0, 0)),
        ]
        for source, fmt, colour in cases:
            img = decode_output(process_image(encode(source, fmt), DEFAULTS))
            self.assertEqual(img.mode, "RGB", source.mode)
            self.assertTrue(close(img.getpixel((4, 4)), colour, 20), (source.mode, img.getpixel((4, 4))))


# --- through the translator and the gateway ------------------------------------------------


def processed(body, cfg):
    """C{chat_request}, then the request's image job run here, synchronously (what an image worker does)."""
    out = chat_request(body, cfg)[0]
    for message in out["messages"]:
        if message.get("images"):
            message["images"] = encode_images(message["images"], cfg.images)
    return out


def image_body(raw, declared="image/png"):
    url = f"data:{declared};base64," + base64.b64encode(raw).decode("ascii")
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]}


class TranslatorTests(SynchronousTestCase):
    def test_translation_parses_no_image(self):
        """
        chat_request stays pure and cheap: images come out as the raw bytes
        of their data URLs (which no JSON encoder takes, so they cannot reach
        the backend unprocessed), and Pillow is never called.
        """
        def never(*args, **kwargs):
            raise AssertionError("Image.open was called")

        self.patch(Image, "open", never)
        raw = b"\x89PNG\r\n\x1a\nnot really a png"
        out = chat_request(image_body(raw), config())[0]
        self.assertEqual(out["messages"][0]["images"], [raw])

    def test_image_count_capped_in_translation(self):
        """More than images.max_per_request images over all messages is a 400 from chat_request itself."""
        cfg = config("images: {max_per_request: 2}")
        one = image_body(GOOD["PNG"])["messages"][0]
        chat_request({"messages": [one, one]}, cfg)
        with self.assertRaises(APIError) as caught:
            chat_request({"messages": [one, one, one]}, cfg)
        self.assertEqual((caught.exception.status, caught.exception.details), (400, "a request may carry at most 2 images"))
        with self.assertRaises(APIError) as caught:
            chat_request({"messages": [one]}, config("images: {max_per_request: 0}"))
        self.assertEqual(caught.exception.details, "this gateway does not accept images")

    def test_chat_request_sends_shrunk_reencoded_image(self):
        """A big PNG data URL reaches Ollama's body as base64 of a JPEG shrunk to max_side (no data: prefix)."""
        cfg = config()
        raw = encode(two_colours((3000, 2000)), "PNG")
        out = processed(image_body(raw), cfg)
        (message,) = out["messages"]
        self.assertEqual(message["content"], "What is this?")
        (encoded,) = message["images"]
        self.assertFalse(encoded.startswith("data:"))
        img = decode_output(base64.b64decode(encoded, validate=True))
        self.assertEqual((img.format, img.size), ("JPEG", (1568, 1045)))

    def test_config_decides_through_the_translator(self):
        """The images section of the config given to the filter applies: max_side 256, format webp."""
        cfg = config("images: {max_side: 256, format: webp}")
        raw = encode(two_colours((1000, 500)), "JPEG")
        out = processed(image_body(raw, "image/jpeg"), cfg)
        img = decode_output(base64.b64decode(out["messages"][0]["images"][0]))
        self.assertEqual((img.format, img.size), ("WEBP", (256, 128)))

    def test_hostile_image_is_a_400(self):
        """A pixel flood, an SVG labelled as an image, or a truncated JPEG in a chat request is a 400 with the curated reason."""
        cfg = config()
        truncated = encode(noise((200, 200)), "JPEG")
        svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
        for raw, declared, reason in (
            (raw_png(30000, 30000, zlib.compress(b"\x00")), "image/png", TOO_MANY_PIXELS),
            (svg, "image/svg+xml", UNSUPPORTED),
            (svg, "image/png", UNSUPPORTED),
            (truncated[: len(truncated) // 2], "image/jpeg", DAMAGED),
        ):
            with self.assertRaises(APIError) as caught:
                processed(image_body(raw, declared), cfg)
            err = caught.exception
            self.assertEqual((err.status, err.code, err.details), (400, "INVALID_REQUEST", reason))
            self.assertEqual(err.as_dict()["error"]["type"], "invalid_request_error")
