"""JPEG and PNG headers read without decoding: the size the decoders produce, on files written
by torchvision's and Pillow's encoders; None for anything that is not a readable header."""

import io

import pytest
import torch
from PIL import Image
from torchvision.io import encode_jpeg, encode_png

from nfnet.data.folder import decode_rgb
from nfnet.data.headers import ends_complete, image_header, jpeg_header, png_header


def _random(channels, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, height, width), dtype=torch.uint8, generator=g)


def _pil_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("height, width", [(1, 1), (7, 13), (375, 500), (500, 333), (16, 4096)])
@pytest.mark.parametrize("channels", [1, 3])
def test_torchvision_jpegs(height, width, channels):
    data = encode_jpeg(_random(channels, height, width), quality=90).numpy().tobytes()
    header = image_header(data)
    assert header == jpeg_header(data)
    assert (header.format, header.height, header.width) == ("jpeg", height, width)
    assert (header.channels, header.bits, header.process) == (channels, 8, "baseline")
    assert decode_rgb(data).shape == (3, height, width)


@pytest.mark.parametrize("channels", [1, 3])
def test_torchvision_pngs(channels):
    data = encode_png(_random(channels, 21, 34)).numpy().tobytes()
    header = image_header(data)
    assert header == png_header(data)
    assert (header.format, header.height, header.width) == ("png", 21, 34)
    assert (header.channels, header.bits, header.process) == (channels, 8, "")
    assert decode_rgb(data).shape == (3, 21, 34)


def test_pillow_progressive_cmyk_exif_palette_and_alpha():
    rgb = Image.fromarray(_random(3, 30, 41).permute(1, 2, 0).numpy())
    progressive = image_header(_pil_bytes(rgb, "JPEG", progressive=True))
    assert (progressive.height, progressive.width, progressive.process) == (30, 41, "progressive")
    cmyk = image_header(_pil_bytes(rgb.convert("CMYK"), "JPEG"))
    assert (cmyk.height, cmyk.width, cmyk.channels) == (30, 41, 4)
    # An EXIF segment (APP1) and a comment (COM) come before the frame header: both skipped.
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation "rotate 90": stored size reported, as the decoders ignore it
    data = _pil_bytes(rgb, "JPEG", exif=exif.tobytes(), comment=b"x" * 300)
    assert data.find(b"\xff\xe1") < data.find(b"\xff\xc0")
    assert image_header(data)[1:3] == (30, 41) == tuple(decode_rgb(data).shape[1:])
    palette = image_header(_pil_bytes(rgb.convert("P"), "PNG"))
    assert (palette.format, palette.height, palette.width, palette.channels) == ("png", 30, 41, 3)
    rgba = image_header(_pil_bytes(rgb.convert("RGBA"), "PNG"))
    assert (rgba.height, rgba.width, rgba.channels) == (30, 41, 4)


def test_fill_bytes_and_standalone_markers_are_skipped():
    data = encode_jpeg(_random(3, 9, 11)).numpy().tobytes()
    # Fill bytes (0xFF) may precede any marker; RST/TEM markers have no length field.
    padded = data[:2] + b"\xff\xff\xff\xd0\xff\x01" + data[2:]
    assert jpeg_header(padded)[1:3] == (9, 11)


def test_what_is_not_a_readable_header():
    jpeg = encode_jpeg(_random(3, 9, 11)).numpy().tobytes()
    sof = jpeg.find(b"\xff\xc0")
    png = encode_png(_random(3, 9, 11)).numpy().tobytes()
    not_headers = [
        b"",
        b"<html>not an image</html>",
        jpeg[: sof + 6],  # truncated inside the frame header
        jpeg[:sof] + b"\xff\xda\x00\x08" + jpeg[sof + 4 :],  # scan data before any frame header
        jpeg[: sof + 5] + b"\x00\x00" + jpeg[sof + 7 :],  # height 0 (defined later by DNL)
        png[:20],
        png[:12] + b"IDAT" + png[16:],  # the first chunk must be IHDR
        _pil_bytes(Image.new("RGB", (5, 5)), "GIF"),
        _pil_bytes(Image.new("RGB", (5, 5)), "BMP"),
    ]
    for data in not_headers:
        assert image_header(data) is None, data[:32]


def test_a_truncated_stream_does_not_end_complete():
    jpeg = encode_jpeg(_random(3, 9, 11)).numpy().tobytes()
    png = encode_png(_random(3, 9, 11)).numpy().tobytes()
    assert ends_complete(jpeg, "jpeg") and ends_complete(png, "png")
    for cut in (1, 10, len(jpeg) // 2):
        assert not ends_complete(jpeg[:-cut], "jpeg")
    assert not ends_complete(png[:-13], "png") and not ends_complete(png[:-1], "png")
    assert not ends_complete(jpeg + b"junk", "jpeg")
