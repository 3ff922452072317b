"""Two real ranks (`trainer=ddp_cpu`) on a packed folder and on the folder itself, each run
`python train.py` in its own process group:

* the ranks read disjoint examples that together cover the training split (each pass of the
  stream), with 2 raw images per example (the official mixing);
* a job SIGKILLed mid-epoch and resumed with `resume=true` ends bit-identical to the
  uninterrupted run, every batch of both ranks included;
* the image folder's index (its header checks) is built once for both ranks, and a later run
  checks no header at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streaming_helpers import make_image_folder, sha1
from test_resume import COMPARED, differences

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
RANKS, BATCH = 2, 4

pytestmark = pytest.mark.slow

RUN = [
    "trainer=ddp_cpu", "augment=official", "logger=none", "print_config=false", "test=false",
    "model.train_size=32", "model.test_size=32", f"data.batch_size={BATCH}", "data.eval_batch_size=16",
    "data.num_workers=0", "model.stochdepth_rate=0.1", "model.drop_rate=0.2", "trainer.max_epochs=1",
    "trainer.deterministic=true", "callbacks.step_checkpoint.every_n_train_steps=2",
    "~callbacks.augmented_images", "~callbacks.rich_progress_bar",
]


def train_py(run_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # Its own session, so that a kill of the job's process group reaches no test process.
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *RUN, f"paths.log_dir={run_dir.parents[2]}",
         f"hydra.run.dir={run_dir}", *overrides],
        capture_output=True, text=True, timeout=900, start_new_session=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **(env or {})},
    )


def logs(tmp: Path) -> list[str]:
    return ["+callbacks.reads._target_=streaming_helpers.ReadLog", f"+callbacks.reads.path={tmp / 'reads'}",
            "+callbacks.batches._target_=streaming_helpers.RankBatchLog", f"+callbacks.batches.path={tmp / 'batches'}"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from nfnet.data.packing import pack, plan_imagefolder

    folder = make_image_folder(tmp_path_factory.mktemp("images") / "photos", classes=4, per_class=40)
    out = tmp_path_factory.mktemp("packs") / "shards"
    with pytest.warns(UserWarning):
        pack(plan_imagefolder(str(folder), 0.1, 0), str(out), workers=2, max_bad_fraction=0.05, show_progress=False)
    return out


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    base = tmp_path_factory.mktemp("reference")
    run_dir = base / "logs" / "train" / "runs" / "full"
    result = train_py(run_dir, "data=streaming", f"data.root={shards}", *logs(base))
    assert result.returncode == 0, result.stderr[-3000:]
    return base, run_dir / "checkpoints" / "last.ckpt"


def test_the_two_ranks_read_disjoint_examples_that_cover_the_split(shards, reference):
    from nfnet.data.shards import ShardedImageDataset, read_pack_info

    base, _ = reference
    train = ShardedImageDataset(read_pack_info(str(shards)), "train")
    split = {sha1(train.read(i)[0]) for i in range(len(train))}
    n = len(split)
    assert n == len(train)  # the generated images are distinct
    reads = [[line.split()[0] for line in (base / f"reads.rank{r}").read_text().splitlines()] for r in range(RANKS)]
    # An epoch is N examples, each mixed from 2 raw images: floor(N / step) steps of 2 x 4 reads per rank.
    steps = n // (BATCH * RANKS)
    assert [len(r) for r in reads] == [2 * BATCH * steps] * RANKS
    # Ranks take turns along one stream of seeded permutations: rank r reads positions r, r + 2, ...
    # Within the first pass (positions < N) they read disjoint images that together are the split.
    first = [r[: len(range(rank, n, RANKS))] for rank, r in enumerate(reads)]
    assert not set(first[0]) & set(first[1])
    assert set(first[0]) | set(first[1]) == split and sum(map(len, first)) == n
    # What the epoch reads of the second pass is disjoint between the ranks too, and new within it.
    second = [r[len(f):] for r, f in zip(reads, first)]
    assert not set(second[0]) & set(second[1]) and all(len(set(s)) == len(s) for s in second)
    assert set(second[0]) | set(second[1]) <= split


def test_a_job_killed_mid_epoch_resumes_bit_exactly(shards, reference, tmp_path):
    base, reference_ckpt = reference
    killed_dir = tmp_path / "logs" / "train" / "runs" / "killed"
    killed = train_py(killed_dir, "data=streaming", f"data.root={shards}", *logs(tmp_path),
                      "+callbacks.kill._target_=streaming_helpers.KillJobAtStep", "+callbacks.kill.step=5")
    assert killed.returncode == -9, killed.stderr[-3000:]  # the whole job, as a preemption
    assert (killed_dir / "checkpoints" / "last-step.ckpt").exists()
    resumed_dir = tmp_path / "logs" / "train" / "runs" / "resumed"
    resumed = train_py(resumed_dir, "data=streaming", f"data.root={shards}", *logs(tmp_path), "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume=true: resuming from" in resumed.stderr and "killed" in resumed.stderr
    got = torch.load(resumed_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    want = torch.load(reference_ckpt, map_location="cpu", weights_only=True)
    assert got["ImageDataModule"]["batches"] > 5  # the checkpoint compared is past the kill
    diffs = [d for key in COMPARED for d in differences(want[key], got[key], key)]
    assert not diffs, diffs[:10]
    for rank in range(RANKS):
        full = {line.split()[2]: line for line in (base / f"batches.rank{rank}").read_text().splitlines()}
        for line in (tmp_path / f"batches.rank{rank}").read_text().splitlines():
            assert full[line.split()[2]] == line  # every batch trained before and after the kill


def test_the_folder_index_is_built_once_for_two_ranks(tmp_path):
    folder = make_image_folder(tmp_path / "photos", classes=3, per_class=20)
    files = sum(1 for p in folder.rglob("*.*"))
    scans = tmp_path / "scans.log"
    common = ["data=imagefolder", f"data.root={folder}", "+trainer.max_steps=2",
              "datamodule._target_=streaming_helpers.ScanCountingDataModule", "data.max_bad_fraction=0.1"]
    env = {"NFNET_TEST_SCAN_LOG": str(scans)}
    first = train_py(tmp_path / "logs" / "train" / "runs" / "first", *common, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    checks = scans.read_text().splitlines()
    # One header check per image file, all in one process, for both ranks.
    assert len(checks) == files and len({line.split()[0] for line in checks}) == 1
    assert len({line.split(maxsplit=1)[1] for line in checks}) == files
    second = train_py(tmp_path / "logs" / "train" / "runs" / "second", *common, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert scans.read_text().splitlines() == checks  # a later run reads the index: no file opened
