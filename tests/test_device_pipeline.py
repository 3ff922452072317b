"""The GPU input pipeline (workers: bytes + draws, nfnet.data.plans; device: batched decode, crop,
resize, mixing, RandAugment, nfnet.data.device_pipeline) against the CPU pipeline it replaces:
the same draws under the same seeds, the same pixels and targets, on CPU tensors."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.io import encode_jpeg, encode_png

import nfnet.data.mixing as mixing
import nfnet.data.randaugment as ra_mod
from nfnet.data.device_pipeline import BicubicTapTable, DeviceAugment, crop_resize, decode_images
from nfnet.data.folder import ImageFolderDataset, load_rgb
from nfnet.data.mixing import OfficialCollate
from nfnet.data.plans import JPEG, PIXELS, PNG, EncodedImageDataset, PlanCollate
from nfnet.data.randaugment import OP_NAMES, RandAugment
from nfnet.data.randaugment_levels import parse_ra_level
from nfnet.data.sampling import ResumableSampler, SeededCollate, SeededDataset
from nfnet.data.transforms import InceptionCrop, bicubic_taps, resize_bicubic

SIZE = 32
CLASSES = ["a", "b", "c", "d"]
# The batched resize reproduces the loader's sgemm bit for bit where sgemm sums each output's
# taps in order with fused multiply-adds (nfnet.data.device_pipeline.crop_resize).
SGEMM = "premise: this machine's sgemm accumulates the banded resize matrices in order with FMA"


def photo(h, w, seed):
    """Smooth colour fields plus texture, as photos have (flat JPEG blocks would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 5, 6, generator=g) * 255, (h, w), mode="bicubic")[0]
    return (smooth + torch.randn(3, h, w, generator=g) * 12).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> list[tuple[str, int]]:
    """20 baseline JPEGs of varied sizes (one grey), a PNG, a CMYK and a progressive JPEG."""
    root = tmp_path_factory.mktemp("encoded")
    samples = []
    for i in range(20):
        img = photo(40 + 9 * i, 100 - 3 * i, seed=i)
        if i == 7:
            img = img[:1]
        path = root / f"{i:02d}.jpg"
        path.write_bytes(encode_jpeg(img, quality=90).numpy().tobytes())
        samples.append((str(path), i % 4))
    png = root / "20.png"
    png.write_bytes(encode_png(photo(50, 70, seed=20)).numpy().tobytes())
    cmyk = root / "21.jpg"
    Image.fromarray(photo(61, 45, seed=21).permute(1, 2, 0).numpy()).convert("CMYK").save(cmyk, "JPEG")
    progressive = root / "22.jpg"
    Image.fromarray(photo(47, 66, seed=22).permute(1, 2, 0).numpy()).save(progressive, "JPEG", progressive=True)
    return samples + [(str(png), 0), (str(cmyk), 1), (str(progressive), 2)]


def pipelines(samples, level, mixup=True, cutmix=True, encoded_formats=("jpeg",)):
    """(CPU dataset, CPU collate) as the datamodule builds them, and the GPU pipeline's
    (dataset, collate, device stage), for the same configuration."""
    ra = (lambda: RandAugment(*parse_ra_level(level))) if level else (lambda: None)
    cpu = SeededDataset(ImageFolderDataset(samples, CLASSES, InceptionCrop(SIZE, dtype=torch.float32)))
    cpu_collate = SeededCollate(OfficialCollate(4, randaugment=ra(), mixup=mixup, cutmix=cutmix))
    encoded = SeededDataset(EncodedImageDataset(samples, CLASSES, SIZE, encoded_formats=encoded_formats))
    plan_collate = SeededCollate(PlanCollate(4, SIZE, randaugment=ra(), mixup=mixup, cutmix=cutmix))
    return cpu, cpu_collate, encoded, plan_collate, DeviceAugment(SIZE, ra())


def keys_of_batch(n, batch, seed, reads=2, examples=8):
    sampler = ResumableSampler(n, examples, seed, start_batch=batch, reads_per_example=reads)
    return list(sampler)[: reads * examples]


@pytest.mark.parametrize("level", [None, 405, 410, 415])
@pytest.mark.parametrize("mode", [(True, True), (True, False), (False, True), (False, False)])
def test_the_batched_pipeline_gives_the_cpu_pipelines_batch(folder, level, mode):
    cpu, cpu_collate, encoded, plan_collate, device_stage = pipelines(folder, level, *mode)
    reads = 2 if any(mode) else 1
    for batch in range(2):
        keys = keys_of_batch(len(folder), batch, seed=level or 1, reads=reads)
        images, targets = cpu_collate([cpu[k] for k in keys])
        plan = plan_collate([encoded[k] for k in keys])
        out, out_targets = device_stage(plan, "cpu")
        assert out.dtype == torch.uint8 and out.shape == images.shape == (8, 3, SIZE, SIZE)
        assert out_targets.dtype == targets.dtype and torch.equal(out_targets, targets)
        assert torch.equal(out, images), SGEMM


def recording(seen: list, function):
    """``function`` that also appends each call's (args, kwargs, result) to ``seen``."""
    def record(*args, **kwargs):
        result = function(*args, **kwargs)
        seen.append((args, kwargs, result))
        return result

    return record


def test_the_plans_are_the_cpu_transforms_draws(folder, monkeypatch):
    """Spy on the CPU pipeline's own draws (crops, flips, mixing, RandAugment ops and Cutout
    centres) and compare them with the plans drawn under the same keys."""
    level = 415
    cpu, cpu_collate, encoded, plan_collate, _ = pipelines(folder, level)
    resizes, mixings, centres, ops = [], [], [], []
    monkeypatch.setattr("nfnet.data.transforms.resize_bicubic", recording(resizes, resize_bicubic))
    monkeypatch.setattr(mixing, "draw_mixing", recording(mixings, mixing.draw_mixing))
    monkeypatch.setattr(ra_mod, "draw_cutout_centre", recording(centres, ra_mod.draw_cutout_centre))
    for name in OP_NAMES:
        real = ra_mod._OPS[name]
        spy = lambda x, ra, s, name=name, real=real: ops.append((name, s)) or real(x, ra, s)  # noqa: E731
        monkeypatch.setitem(ra_mod._OPS, name, spy)
    keys = keys_of_batch(len(folder), 0, seed=level)
    cpu_collate([cpu[k] for k in keys])
    cpu_centres = [result for _, _, result in centres]
    plan = plan_collate([encoded[k] for k in keys])

    assert [(kwargs["box"], kwargs["flip"]) for _, kwargs, _ in resizes] == [
        (tuple(box), flip) for box, flip in zip(plan.crops.tolist(), plan.flips.tolist())
    ]
    ((_, _, draws),) = mixings
    assert torch.equal(draws.mixup_lam, plan.mixup_lam) and torch.equal(draws.boxes, plan.cutmix_boxes)
    # The CPU collate applies the ops image after image, layer after layer.
    layer_ops = plan.ra_ops.flatten().tolist()
    signs = [-1.0 if negate else 1.0 for negate in plan.ra_negate.flatten().tolist()]
    assert ops == [(OP_NAMES[op], sign) for op, sign in zip(layer_ops, signs)] and len(ops) == 32
    is_cutout = [OP_NAMES[op] == "Cutout" for op in layer_ops]
    assert any(is_cutout)
    plan_centres = plan.ra_cutout.view(-1, 2).tolist()
    assert cpu_centres == [tuple(c) for c, cut in zip(plan_centres, is_cutout) if cut]
    assert all(c == [-1, -1] for c, cut in zip(plan_centres, is_cutout) if not cut)


def test_a_batchs_plans_are_a_function_of_its_keys(folder):
    """Resuming draws a batch's plans again in fresh objects: the same tensors, bit for bit."""
    def plans(batch, seed):
        _, _, encoded, plan_collate, _ = pipelines(folder, 405)
        return plan_collate([encoded[k] for k in keys_of_batch(len(folder), batch, seed)])

    first, again, other = plans(1, seed=5), plans(1, seed=5), plans(1, seed=6)
    fields = vars(first)
    assert len(fields) == 13
    for name in fields:
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert not torch.equal(first.crops, other.crops) and not torch.equal(first.ra_ops, other.ra_ops)


def test_a_batch_crosses_loader_worker_processes_unchanged(folder):
    """What a worker returns (a dataclass of tensors: one shared-memory block each) arrives as
    it left, and a loader with workers gives the batches of one without."""
    from torch.utils.data import DataLoader

    _, _, encoded, plan_collate, _ = pipelines(folder, 405)
    batches = []
    for workers in (0, 2):
        sampler = ResumableSampler(len(folder), 4, seed=9, reads_per_example=2)
        loader = DataLoader(encoded, batch_size=8, sampler=sampler, num_workers=workers, collate_fn=plan_collate)
        batches.append(list(loader)[:2])
    for in_process, from_worker in zip(*batches):
        assert type(from_worker) is type(in_process)
        for name, value in vars(in_process).items():
            assert torch.equal(getattr(from_worker, name), value), name


def test_what_travels_encoded_and_what_is_decoded_in_the_worker(folder):
    dataset = EncodedImageDataset(folder, CLASSES, SIZE, encoded_formats=("jpeg",))
    kinds = [dataset[i][0].kind for i in range(len(folder))]
    assert kinds == [JPEG] * 20 + [PIXELS] * 3  # the PNG, the CMYK and the progressive JPEG: decoded here
    with_png = EncodedImageDataset(folder, CLASSES, SIZE, encoded_formats=("jpeg", "png"))
    assert with_png[20][0].kind == PNG
    for i in (0, 7, 20, 21, 22):
        image, label = dataset[i]
        assert label == folder[i][1] and image.index == i
        decoded = load_rgb(folder[i][0])
        assert (image.height, image.width) == tuple(decoded.shape[1:])
        if image.kind == PIXELS:
            assert torch.equal(image.data.view(decoded.shape), decoded)
        else:
            assert bytes(image.data.numpy()) == Path(folder[i][0]).read_bytes()
    with pytest.raises(ValueError, match="gif"):
        EncodedImageDataset(folder, CLASSES, SIZE, encoded_formats=("gif",))


def without_quantisation_tables(jpeg: bytes) -> bytes:
    """A JPEG whose header and end marker are whole but which no decoder reads (no DQT)."""
    out, at = bytearray(jpeg[:2]), 2
    while jpeg[at + 1] != 0xDA:
        length = (jpeg[at + 2] << 8) | jpeg[at + 3]
        if jpeg[at + 1] != 0xDB:
            out += jpeg[at : at + 2 + length]
        at += 2 + length
    return bytes(out + jpeg[at:])


def test_bad_files_are_skipped_in_the_worker_as_the_cpu_pipeline_skips_them(folder, tmp_path):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(Path(folder[3][0]).read_bytes()[:-100])
    samples = [folder[0], (str(truncated), 2), folder[1]]
    cpu = ImageFolderDataset(samples, CLASSES, InceptionCrop(SIZE), max_bad_fraction=0.5)
    encoded = EncodedImageDataset(samples, CLASSES, SIZE, max_bad_fraction=0.5)
    with pytest.warns(UserWarning, match="truncated.jpg"):
        assert cpu[1][1] == folder[1][1]  # the next file, with its label
    with pytest.warns(UserWarning, match="truncated.jpg"):
        image, label = encoded[1]
    assert (image.index, label) == (2, folder[1][1]) and encoded.num_bad == cpu.num_bad == 1


def test_decoding_on_the_host_is_the_loaders_decoder(folder, tmp_path):
    unreadable = tmp_path / "no_tables.jpg"
    unreadable.write_bytes(without_quantisation_tables(Path(folder[3][0]).read_bytes()))
    samples = folder + [(str(unreadable), 2)]
    dataset = EncodedImageDataset(samples, CLASSES, SIZE, encoded_formats=("jpeg", "png"))
    collate = PlanCollate(4, SIZE, mixup=False, cutmix=False)
    plan = collate([dataset[i] for i in (0, 7, 20, 21, 22)])
    for image, i in zip(decode_images(plan, "cpu"), (0, 7, 20, 21, 22)):
        assert torch.equal(image, load_rgb(folder[i][0]))
    plan = collate([dataset[len(samples) - 1], dataset[0]])
    assert plan.kinds[0] == JPEG  # shipped encoded: its header and end marker are whole
    with pytest.warns(UserWarning, match=f"sample {len(samples) - 1} does not decode"):
        grey, _ = decode_images(plan, "cpu")
    assert grey.shape == (3, *plan.image_sizes[0].tolist()) and (grey == 128).all()
    plan = collate([dataset[0], dataset[1]])
    plan.image_sizes[1] += 1  # a header that lies about the size is an error, not a bad crop
    with pytest.raises(ValueError, match="header says"):
        decode_images(plan, "cpu")


@pytest.mark.parametrize("flip", [False, True])
def test_crop_resize_is_resize_bicubic_of_each_box(flip):
    g = torch.Generator().manual_seed(int(flip))
    shapes = [(3, 40 + 13 * i, 70 - 5 * i) for i in range(9)]
    images = [torch.randint(0, 256, s, dtype=torch.uint8, generator=g) for s in shapes]
    # Downscales, upscales, crops of 5 pixels (taps clamped at both edges), whole images, and
    # crops of 1 to 4 pixels, which MKL's sgemm sums in another order (within float32 rounding).
    boxes = [(0, 0, h, w) for _, h, w in shapes[:3]] + [(5, 1, 5, 6), (10, 4, 17, 25), (1, 0, 60, 40),
                                                        (0, 9, 21, 13), (7, 0, 90, 30), (2, 3, 1, 4)]  # fmt: skip
    crops = torch.tensor(boxes)
    flips = torch.tensor([flip ^ (i % 3 == 0) for i in range(9)])
    out = crop_resize(images, crops, flips, BicubicTapTable(SIZE), columns=100)  # several groups
    assert out.dtype == torch.float32 and out.shape == (9, 3, SIZE, SIZE)
    for image, box, f, resized in zip(images, boxes, flips.tolist(), out):
        expect = resize_bicubic(image, (SIZE, SIZE), box=box, dtype=torch.float32, flip=f)
        if min(box[2:]) <= 4:
            torch.testing.assert_close(resized, expect, rtol=0, atol=1e-3)
        else:
            assert torch.equal(resized, expect), SGEMM


def test_tap_table_is_bicubic_taps_for_every_size():
    table = BicubicTapTable(24)
    sizes = torch.tensor([1, 2, 3, 24, 100, 512, 7])
    index, weight = table.lookup(sizes, torch.device("cpu"))
    for i, n in enumerate(sizes.tolist()):
        expect_index, expect_weight = bicubic_taps(n, 24)
        assert torch.equal(index[i], expect_index) and torch.equal(weight[i], expect_weight.double())
    index, weight = table.lookup(torch.tensor([2000, 5]), torch.device("cpu"))  # grows
    assert torch.equal(index[0], bicubic_taps(2000, 24)[0]) and torch.equal(weight[1], bicubic_taps(5, 24)[1].double())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda(folder):
    """Everything after decoding is the CPU run's (Color and Sharpness within a level, which
    later layers may spread); nvjpeg's pixels are close to libjpeg's."""
    _, _, encoded, plan_collate, device_stage = pipelines(folder, 410)
    plan = plan_collate([encoded[k] for k in keys_of_batch(len(folder), 0, seed=3)])
    on_gpu = decode_images(plan, "cuda")
    on_cpu = decode_images(plan, "cpu")
    for a, b in zip(on_gpu, on_cpu):
        assert a.is_cuda and a.shape == b.shape
        assert (a.cpu().float() - b.float()).abs().mean() < 2
    resized = crop_resize(on_cpu, plan.crops, plan.flips, BicubicTapTable(SIZE))
    resized_gpu = crop_resize([x.cuda() for x in on_cpu], plan.crops, plan.flips, BicubicTapTable(SIZE))
    assert torch.equal(resized_gpu.cpu(), resized)
    out, targets = device_stage(plan, "cuda")
    assert out.is_cuda and out.shape == (8, 3, SIZE, SIZE) and torch.equal(targets.cpu(), plan.targets)
