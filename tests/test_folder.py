"""Image-folder sources: scanning, splits, colour conversion and every kind of bad file."""

import io
import os
import warnings

import pytest
import torch
from PIL import Image

from nfnet.data.folder import (
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    TooManyBadFiles,
    decode_rgb,
    scan_image_folder,
)

H, W = 6, 8


def _rgb_array():
    # A deterministic 6x8 RGB pattern with distinct channels.
    y = torch.arange(H).view(H, 1, 1)
    x = torch.arange(W).view(1, W, 1)
    c = torch.tensor([0, 1, 2]).view(1, 1, 3)
    return ((y * 37 + x * 11 + c * 70) % 256).to(torch.uint8)


def _pil(arr, mode="RGB"):
    return Image.frombytes(mode, (arr.shape[1], arr.shape[0]), arr.contiguous().numpy().tobytes())


def _chw(hwc):
    return hwc.permute(2, 0, 1)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A folder with every supported colour/format case and every kind of bad file."""
    root = tmp_path_factory.mktemp("messy")
    good, other = root / "good", root / "other"
    good.mkdir(), other.mkdir()
    rgb = _pil(_rgb_array())
    rgb.save(good / "a_rgb.png")
    rgb.convert("L").save(good / "b_gray.png")
    rgb.convert("RGBA").save(good / "c_rgba.png")
    rgb.convert("P").save(good / "d_palette.png")
    rgb.convert("CMYK").save(good / "e_cmyk.jpg", quality=95)
    rgb.save(good / "f_rgb.JPG", quality=95)  # upper-case extension
    frames = [rgb.convert("P"), _pil(255 - _rgb_array()).convert("P")]
    frames[0].save(good / "g_anim.gif", save_all=True, append_images=frames[1:])
    rgb.save(good / "h_lossless.webp", lossless=True)
    rgb.save(good / "i_rgb.bmp")
    sixteen = (_rgb_array()[:, :, 0].to(torch.int32) * 257).to(torch.int32)
    Image.fromarray(sixteen.numpy().astype("uint16")).save(good / "j_16bit.png")
    # Bad files: zero-byte, not an image, truncated JPEG, truncated PNG, corrupt PNG body.
    (good / "k_zero.jpg").write_bytes(b"")
    (good / "l_text.jpg").write_text("<html>not an image</html>")
    jpg = (good / "f_rgb.JPG").read_bytes()
    (good / "m_truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    png = (good / "a_rgb.png").read_bytes()
    (good / "n_truncated.png").write_bytes(png[: len(png) // 2])
    (good / "o_garbled.png").write_bytes(png[:16] + bytes(200))
    # Not image files at all: ignored (hidden silently, others with a warning).
    (good / "notes.txt").write_text("labels were checked by hand")
    (good / ".DS_Store").write_bytes(b"\0\0")
    rgb.save(other / "z.png")
    return root


def test_scan_sorted_classes_and_samples(messy):
    with pytest.warns(UserWarning, match="notes.txt"):
        classes, samples = scan_image_folder(messy)
    assert classes == ["good", "other"]
    names = [os.path.basename(p) for p, _ in samples]
    assert names == [
        "a_rgb.png", "b_gray.png", "c_rgba.png", "d_palette.png", "e_cmyk.jpg", "f_rgb.JPG",
        "g_anim.gif", "h_lossless.webp", "i_rgb.bmp", "j_16bit.png", "k_zero.jpg", "l_text.jpg",
        "m_truncated.jpg", "n_truncated.png", "o_garbled.png", "z.png",
    ]  # fmt: skip
    assert [label for _, label in samples] == [0] * 15 + [1]
    assert samples == sorted(samples)
    assert ".bmp" in IMAGE_EXTENSIONS and ".webp" in IMAGE_EXTENSIONS


def test_scan_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        scan_image_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="no class subfolders"):
        scan_image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.md").write_text("x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no image files"):
            scan_image_folder(tmp_path)


def test_colour_modes_become_rgb(messy):
    ref = _chw(_rgb_array())
    load = lambda name: decode_rgb((messy / "good" / name).read_bytes())  # noqa: E731
    assert torch.equal(load("a_rgb.png"), ref)
    assert torch.equal(load("c_rgba.png"), ref)  # alpha dropped
    assert torch.equal(load("h_lossless.webp"), ref)
    assert torch.equal(load("i_rgb.bmp"), ref)
    gray = load("b_gray.png")
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    # Palette: the palette colours themselves, as PIL expands them.
    pal = torch.frombuffer(
        bytearray(Image.open(messy / "good" / "d_palette.png").convert("RGB").tobytes()),
        dtype=torch.uint8,
    ).view(H, W, 3)
    assert torch.equal(load("d_palette.png"), _chw(pal))
    # 16-bit grey v*257 scales back to v.
    assert torch.equal(load("j_16bit.png")[0], ref[0])
    # GIF: the first frame only (its colours are quantised to the palette, so compare loosely).
    gif = load("g_anim.gif")
    assert gif.shape == (3, H, W)
    assert (gif.int() - ref.int()).abs().float().mean() < 40
    # CMYK and RGB JPEGs: lossy, so compare with Pillow's decode of the same file.
    for name in ("e_cmyk.jpg", "f_rgb.JPG"):
        img = load(name)
        pil = Image.open(messy / "good" / name).convert("RGB")
        ref_jpg = _chw(torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8).view(H, W, 3))
        assert img.shape == (3, H, W) and img.dtype == torch.uint8
        assert (img.int() - ref_jpg.int()).abs().max() <= 3, name


def _dataset(messy, quiet=True, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classes, samples = scan_image_folder(messy)
    if not quiet:
        return ImageFolderDataset(samples, classes, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ImageFolderDataset(samples, classes, **kw)


def test_bad_files_skipped_with_warnings(messy, caplog):
    with pytest.warns(UserWarning) as rec:
        ds = _dataset(messy, quiet=False, max_bad_fraction=0.5)
    text = "\n".join(str(r.message) for r in rec)
    # Up front: the zero-byte and the non-image file, each named, and the count.
    assert "k_zero.jpg (zero-byte file)" in text and "l_text.jpg (not an image" in text
    assert "skipped 2 of 16 files" in text
    assert ds.num_bad == 2 and len(ds) == 14
    # Lazily: every corrupt file met while loading is warned once and replaced by the next
    # decodable sample; nothing raises.
    with pytest.warns(UserWarning) as rec:
        items = [ds[i] for i in range(len(ds))]
    text = "\n".join(str(r.message) for r in rec)
    for name in ("m_truncated.jpg", "n_truncated.png", "o_garbled.png"):
        assert text.count(name) == 1, name
    assert ds.num_bad == 5
    for img, label in items:
        assert img.dtype == torch.uint8 and img.shape == (3, H, W)
    # m, n and o (indices 10-12) are all replaced by z.png, the next decodable one (class 1).
    names = [os.path.basename(p) for p, _ in ds.samples]
    z = names.index("z.png")
    for bad in ("m_truncated.jpg", "n_truncated.png", "o_garbled.png"):
        assert torch.equal(items[names.index(bad)][0], items[z][0])
        assert items[names.index(bad)][1] == 1
    # A second pass warns no more.
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds[names.index("m_truncated.jpg")]
    assert not any("m_truncated" in str(r.message) for r in rec)
    assert any("k_zero.jpg" in r.getMessage() for r in caplog.records)


def test_too_many_bad_files_is_a_clear_error_before_training(messy):
    with pytest.raises(TooManyBadFiles, match=r"2 of 16 files .* data\.max_bad_fraction=0\.1 "):
        _dataset(messy, max_bad_fraction=0.1)
    # Lazily found corrupt files count too: at 4/16 > 0.2 the run stops with the same message.
    ds = _dataset(messy, max_bad_fraction=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TooManyBadFiles, match="data.max_bad_fraction"):
            for i in range(len(ds)):
                ds[i]


def test_transform_applied(messy):
    ds = _dataset(messy, max_bad_fraction=0.5, transform=lambda x: x[:, :2, :3])
    img, label = ds[0]
    assert img.shape == (3, 2, 3) and label == 0


def test_empty_split_rejected():
    with pytest.raises(ValueError, match="empty"):
        ImageFolderDataset([], ["a"])


def test_decode_rejects_garbage():
    # decode_rgb's contract: RuntimeError, ValueError or OSError, which the dataset counts as bad files.
    with pytest.raises((RuntimeError, ValueError, OSError)):
        decode_rgb(b"definitely not an image")
    buf = io.BytesIO()
    _pil(_rgb_array()).save(buf, "PNG")
    assert decode_rgb(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)).shape == (
        3, H, W,
    )  # fmt: skip
