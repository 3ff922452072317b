"""Image size and coding from a JPEG or PNG header, without decoding the image.

The GPU input pipeline's loader workers draw each raw image's crop from its size alone and
leave the decoding to the device (nfnet.data.plans), so they read the size here: a JPEG's
frame header (the SOFn segment that follows the APPn/DQT/DHT... segments), a PNG's IHDR chunk.
Anything else, or a header that does not parse, gives None and the worker decodes the file on
the CPU instead.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# SOFn markers (ITU T.81 table B.1) and the coding process each one starts. 0xC4 (DHT),
# 0xC8 (reserved) and 0xCC (DAC) share the range but are not frame headers.
_JPEG_PROCESSES = {
    0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless",
    0xC5: "hierarchical", 0xC6: "hierarchical", 0xC7: "hierarchical",
    0xC9: "arithmetic", 0xCA: "arithmetic", 0xCB: "arithmetic",
    0xCD: "arithmetic", 0xCE: "arithmetic", 0xCF: "arithmetic",
}  # fmt: skip
# Markers that stand alone, without a length field: TEM, RST0-7 (SOI and EOI are handled apart).
_STANDALONE = {0x01, *range(0xD0, 0xD8)}
_SOS, _EOI = 0xDA, 0xD9

# PNG colour types -> samples per pixel (a palette index is one sample of three colours).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


class ImageHeader(NamedTuple):
    """What a header says: ``format`` ("jpeg" or "png"), the stored size (EXIF orientation is
    not applied, as the decoders here do not apply it), the number of channels (JPEG
    components: 1 grey, 3 YCbCr or RGB, 4 CMYK or YCCK; PNG: samples per pixel, alpha
    included), bits per sample and, for JPEG, the coding process ("baseline", "extended",
    "progressive", "lossless", "hierarchical" or "arithmetic"; "" for PNG)."""

    format: str
    height: int
    width: int
    channels: int
    bits: int
    process: str


def _u16(data, at: int) -> int:
    return (data[at] << 8) | data[at + 1]


def _u32(data, at: int) -> int:
    return (_u16(data, at) << 16) | _u16(data, at + 2)


def jpeg_header(data: bytes | bytearray | memoryview) -> Optional[ImageHeader]:
    """The frame header of a JPEG stream, or None when there is none before the scan data
    (not a JPEG, truncated, or a height of 0, which would be defined later by a DNL marker)."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        if marker in (_SOS, _EOI):
            return None  # scan data or the end without a frame header
        length = _u16(data, at + 2)
        if length < 2:
            return None
        if marker in _JPEG_PROCESSES:
            if length < 8 or at + 10 > len(data):
                return None
            bits, height, width = data[at + 4], _u16(data, at + 5), _u16(data, at + 7)
            channels = data[at + 9]
            if height == 0 or width == 0 or channels == 0:
                return None
            return ImageHeader("jpeg", height, width, channels, bits, _JPEG_PROCESSES[marker])
        at += 2 + length
    return None


def png_header(data: bytes | bytearray | memoryview) -> Optional[ImageHeader]:
    """The IHDR chunk of a PNG stream (the first chunk, by the PNG specification), or None."""
    if len(data) < 29 or bytes(data[:8]) != PNG_SIGNATURE or bytes(data[12:16]) != b"IHDR":
        return None
    width, height = _u32(data, 16), _u32(data, 20)
    bits, colour_type = data[24], data[25]
    if width == 0 or height == 0 or colour_type not in _PNG_CHANNELS:
        return None
    return ImageHeader("png", height, width, _PNG_CHANNELS[colour_type], bits, "")


def image_header(data: bytes | bytearray | memoryview) -> Optional[ImageHeader]:
    """:func:`jpeg_header` or :func:`png_header`, by the file's signature; None for anything else."""
    if data[:2] == b"\xff\xd8":
        return jpeg_header(data)
    return png_header(data)


def ends_complete(data: bytes | bytearray | memoryview, format: str) -> bool:
    """Whether a ``format`` stream ends with its end marker (JPEG EOI, PNG's IEND chunk). A
    truncated file, the commonest corruption, does not; torchvision's CPU decoder rejects a
    truncated JPEG (libjpeg's "premature end"), so a worker that ships bytes without decoding
    checks this to find the files the CPU pipeline would skip. (A file with bytes after its end
    marker fails the check too, and is merely decoded on the CPU.)"""
    if format == "jpeg":
        return bytes(data[-2:]) == b"\xff\xd9"
    return bytes(data[-8:-4]) == b"IEND"
