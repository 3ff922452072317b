"""pack.py and data=streaming: shards of the original bytes, read by index with the folder
source's split, transforms and seeds (nfnet.data.packing, nfnet.data.shards).

The references are independent of the code under test: the source files' own bytes (SHA-1),
their class folders, the ground-truth file ImageNet ships, and the folder source's batches."""

from __future__ import annotations

import csv
import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streaming_helpers import make_image_folder, sha1

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def run(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(ROOT / script), *args], capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images") / "photos", classes=4, per_class=30)


@pytest.fixture(scope="module")
def packed(folder, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`python pack.py` as the README writes it, with two reading processes."""
    out = tmp_path_factory.mktemp("packs") / "shards"
    logs = tmp_path_factory.mktemp("pack-logs")
    result = run("pack.py", "source=imagefolder", f"root={folder}", f"output_dir={out}", "workers=2",
                 "max_bad_fraction=0.05", f"paths.log_dir={logs}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_pack_keeps_every_good_file_s_original_bytes_and_names_the_bad_ones(folder, packed):
    from nfnet.data.shards import ShardedImageDataset, read_pack_info

    out, result = packed
    info = read_pack_info(str(out))
    assert info.classes == ["class_0", "class_1", "class_2", "class_3"]
    assert (out / "classes.txt").read_text().split() == info.classes
    bad = {"class_0/notes.jpg", "class_1/empty.png", "class_2/truncated.jpg"}
    assert set(info.bad) == bad
    assert "zero-byte" in info.bad["class_1/empty.png"] and "undecodable" in info.bad["class_2/truncated.jpg"]
    for name in bad:
        assert name in result.stderr  # named in the log
    rows = manifest(out)
    good = {str(p.relative_to(folder)) for p in folder.rglob("*.*")} - bad
    assert {r["path"] for r in rows} == good and len(rows) == len(good) == 120
    for split in ("train", "val"):
        dataset = ShardedImageDataset(info, split)
        split_rows = [r for r in rows if r["split"] == split]
        assert len(dataset) == len(split_rows) == info.sizes[split] > 0
        for row in split_rows:
            data, label = dataset.read(int(row["index"]))
            assert sha1(data) == sha1((folder / row["path"]).read_bytes())  # never re-encoded
            assert info.classes[label] == row["path"].split("/")[0] == row["class"]


def test_the_split_is_the_folder_source_s(folder, packed):
    from nfnet.app.schema import section
    from nfnet.data import sources

    out, _ = packed
    found = sources.splits(section("data", source="imagefolder", root=str(folder), train_size=32, test_size=32,
                                   index_dir=str(out.parent / "index")))
    rows = manifest(out)
    # The folder source finds the truncated JPEG (a valid header) only when it decodes it during
    # training, and then skips it; pack.py decodes every file and leaves it out up front.
    truncated = str(folder / "class_2" / "truncated.jpg")
    for split, samples in (("train", found.train), ("val", found.val)):
        expected = [os.path.relpath(p, folder) for p, _ in samples if p not in found.bad and p != truncated]
        assert [r["path"] for r in rows if r["split"] == split] == expected  # same files, same order


def test_packing_twice_gives_the_same_shards_with_any_number_of_processes(folder, packed, tmp_path):
    from nfnet.data.packing import pack, plan_imagefolder

    out, _ = packed
    again = tmp_path / "again"
    with pytest.warns(UserWarning):
        pack(plan_imagefolder(str(folder), 0.1, 0), str(again), workers=1, max_bad_fraction=0.05, show_progress=False)
    comparison = filecmp.dircmp(out, again)
    assert sorted(os.listdir(out)) == sorted(os.listdir(again))

    def same(a: Path, b: Path) -> None:
        for name in os.listdir(a):
            if (a / name).is_dir():
                same(a / name, b / name)
            else:
                assert (a / name).read_bytes() == (b / name).read_bytes(), name

    same(out, again)
    assert not comparison.diff_files


def test_streaming_trains_on_the_very_batches_of_the_folder_source(tmp_path):
    """Same split, order, decoding, crops, mixing and RandAugment: the first batches are equal."""
    from nfnet.app.schema import section
    from nfnet.data.datamodule import ImageDataModule
    from nfnet.data.packing import pack, plan_imagefolder

    clean = make_image_folder(tmp_path / "clean", classes=3, per_class=12, bad=False)
    pack(plan_imagefolder(str(clean), 0.1, 0), str(tmp_path / "shards"), show_progress=False)
    augment = section("augment", name="official", ra_level=205)
    batches = []
    for source, root in (("imagefolder", clean), ("streaming", tmp_path / "shards")):
        torch.manual_seed(7)
        data = section("data", source=source, root=str(root), train_size=32, test_size=32, num_workers=0,
                       index_dir=str(tmp_path / "index"))
        module = ImageDataModule(data, augment, batch_size=4)
        module.prepare_data()
        module.setup("fit")
        loader = iter(module.train_dataloader())
        batches.append([next(loader) for _ in range(3)])
    for (images, targets), (s_images, s_targets) in zip(*batches):
        assert torch.equal(images, s_images) and torch.equal(targets, s_targets)


def test_an_object_store_uri_reads_through_litdata_s_download_path(packed, tmp_path):
    """`local:` is LitData's stand-in for s3:// and gs://: the same downloader and cache."""
    from nfnet.data.shards import ShardedImageDataset, read_pack_info

    out, _ = packed
    local, remote = read_pack_info(str(out)), read_pack_info(f"local:{out}")
    assert remote.classes == local.classes and remote.sizes == local.sizes
    cache = tmp_path / "cache"
    streamed = ShardedImageDataset(remote, "val", cache_dir=str(cache))
    plain = ShardedImageDataset(local, "val")
    for index in range(len(plain)):
        assert streamed.read(index) == plain.read(index)
    assert any(p.name.startswith("chunk-") for p in cache.rglob("*.bin"))  # fetched into the cache


def test_pack_imagenet_sorts_the_flat_val_folder_by_its_ground_truth(tmp_path):
    """ILSVRC-2012 as Kaggle ships it: train/<wnid>/, a flat val/, LOC_val_solution.csv."""
    from nfnet.data.packing import pack, plan_imagenet
    from nfnet.data.shards import ShardedImageDataset, read_pack_info

    root = tmp_path / "imagenet"
    wnids = ["n01440764", "n01443537", "n01484850"]
    train = make_image_folder(root / "train", classes=3, per_class=4, bad=False)
    for i, wnid in enumerate(wnids):
        (train / f"class_{i}").rename(train / wnid)
    (root / "val").mkdir()
    truth = {}
    for number in range(1, 10):
        name = f"ILSVRC2012_val_{number:08d}"
        truth[name] = wnids[(number * 2) % 3]
        source = next((train / truth[name]).glob("*.png"))
        (root / "val" / f"{name}.JPEG").write_bytes(source.read_bytes())
    lines = ["ImageId,PredictionString"] + [f"{n},{w} 1 2 30 40 {w} 5 6 7 8" for n, w in truth.items()]
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    pack(plan_imagenet(str(root)), str(tmp_path / "shards"), show_progress=False)
    info = read_pack_info(str(tmp_path / "shards"))
    assert info.classes == wnids and info.sizes == {"train": 12, "val": 9}
    rows = [r for r in manifest(tmp_path / "shards") if r["split"] == "val"]
    assert [r["class"] for r in rows] == [truth[Path(r["path"]).stem] for r in rows]
    val = ShardedImageDataset(info, "val")
    assert [wnids[val.read(int(r["index"]))[1]] for r in rows] == [truth[Path(r["path"]).stem] for r in rows]
    assert json.loads((tmp_path / "shards" / "nfnet-pack.json").read_text())["val_labels"].endswith("LOC_val_solution.csv")


def test_train_py_on_streaming_shards_then_eval_py(packed, tmp_path):
    out, _ = packed
    run_dir = tmp_path / "run"
    common = ["data.num_workers=0", "model.train_size=32", "model.test_size=32", "print_config=false", "logger=none"]
    result = run("train.py", "data=streaming", f"data.root={out}", "data.batch_size=8", "data.eval_batch_size=16",
                 "trainer.max_epochs=1", *common, f"paths.log_dir={tmp_path}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "test/acc_top1" in metrics
    # The shards are named on the command line: eval never reads a folder because a checkpoint names it.
    evaluated = run("eval.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"root={out}", "num_workers=0",
                    f"output={tmp_path / 'eval.json'}", f"paths.log_dir={tmp_path}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    from nfnet.data.shards import read_pack_info

    assert report["images"] == read_pack_info(str(out)).sizes["val"]


@pytest.mark.parametrize("args, expected", [
    (["train.py", "data=streaming"], "data.root is required for data=streaming"),
    (["train.py", "data=streaming", "data.root=ROOT"], "is not a packed dataset (it has no nfnet-pack.json)"),
    (["pack.py", "source=tar", "root=ROOT", "output_dir=OUT"], "source='tar' is not allowed"),
    (["pack.py", "source=imagenet", "root=ROOT", "output_dir=OUT"], "has no train/ folder"),
    (["pack.py", "source=imagefolder", "root=ROOT", "output_dir=OUT", "workers=0"], "workers=0 must be an integer >= 1"),
    (["pack.py", "source=imagefolder", "root=ROOT", "output_dir=s3://bucket/x"], "copy it to the object store"),
])
def test_bad_values_are_one_line(tmp_path, capsys, args, expected):
    # The entry point's own first step (nfnet.app.cli.precheck), in this process; pack.py as a
    # whole process is run by the next test.
    from nfnet.app.cli import precheck

    script, *args = [a.replace("ROOT", str(tmp_path)).replace("OUT", str(tmp_path / "out")) for a in args]
    with pytest.raises(SystemExit) as stop:
        precheck(ROOT / "conf", script.removesuffix(".py"), [*args, f"paths.log_dir={tmp_path}"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert stop.value.code == 2 and captured.out == ""
    assert len(lines) == 1 and lines[0].startswith("config error: ") and expected in lines[0], captured.err
    assert not (tmp_path / "out").exists()


def test_pack_py_itself_answers_a_bad_value_in_one_line(tmp_path):
    result = run("pack.py", "source=tar", f"root={tmp_path}", f"output_dir={tmp_path / 'out'}", f"paths.log_dir={tmp_path}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "source='tar' is not allowed" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
