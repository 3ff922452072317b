"""Training data whose order and randomness do not depend on where a run was (re)started.

A run killed mid-epoch and resumed must see exactly the batches, crops, flips, MixUp/CutMix
draws and RandAugment ops an uninterrupted run sees. With `shuffle=True` and augmentations that
draw from each worker's global RNG that is impossible: the order comes from the main process's
RNG at each `iter()`, and a worker's draws depend on every sample that worker loaded before.
Here instead every random draw is a pure function of `(seed, epoch, position)`:

* `ResumableSampler` permutes the dataset with a generator seeded by `(seed, epoch)`, shards the
  permutation across replicas as `DistributedSampler` does (it *is* one, so Lightning does not
  wrap it again under DDP/XLA), can start `start_batch` batches into the epoch, and yields
  `(index, sample_seed)` keys, the seed derived from `(seed, epoch, position in the epoch)`.
* `SeededDataset` loads and transforms sample `index` with torch's CPU RNG seeded by its key's
  seed (the caller's RNG state is restored afterwards, so a `num_workers=0` loader leaves the
  training process's RNG alone).
* `SeededCollate` runs the batch-level augmentation (MixUp/CutMix + RandAugment) with the RNG
  seeded from the batch's first key, i.e. from `(seed, epoch, batch position)`.

Which worker loads a sample, how many workers there are and where the run resumed change
nothing. Plain PyTorch; the LightningDataModule saves and restores `(seed, epoch, batches)`.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import Dataset, default_collate
from torch.utils.data.distributed import DistributedSampler

_SEED_MASK = (1 << 63) - 1


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings; unrelated tuples give unrelated seeds."""
    text = "|".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & _SEED_MASK


@contextlib.contextmanager
def seeded_cpu_rng(seed: int):
    """Run a block with torch's CPU RNG seeded to `seed`; the previous state comes back after.

    Only the CPU generator is touched (`torch.manual_seed` would also reseed every GPU).
    """
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch permutation, sharded over replicas, resumable mid-epoch.

    num_samples: dataset length. batch_size: the loader's batch (raw images per step and replica).
    start_batch: batches of `epoch` already trained on; they are skipped in that epoch only.
    A position at the end of an epoch is the start of the next one (a checkpoint written at
    the end of an epoch records the whole epoch as trained).
    `len()` stays the full per-replica epoch length, as Lightning counts a resumed epoch's
    batches from where it stopped.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        epoch: int = 0,
        start_batch: int = 0,
    ) -> None:
        # DistributedSampler.__init__ would ask torch.distributed for the world; XLA never
        # initialises it, so the replicas are given explicitly and the parent is not called.
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if num_samples < num_replicas:
            raise ValueError(f"{num_samples} samples cannot be shared by {num_replicas} replicas")
        self.dataset = None
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.batch_size = int(batch_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.drop_last = True  # every replica gets the same number of samples, none repeated
        self.num_samples = int(num_samples) // self.num_replicas  # per replica
        self.total_size = self.num_samples * self.num_replicas
        self._dataset_len = int(num_samples)
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)
        # Lightning resumes such a checkpoint in the next epoch, but builds the loader and, with
        # persistent workers, starts its iterator before it calls set_epoch: an iterator of the
        # finished epoch would be empty, and the next epoch would silently train on nothing.
        if self.start_batch >= self.num_samples // self.batch_size:  # the loader drops the last partial batch
            self.epoch, self.start_batch = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        # Lightning calls this before every epoch, also with the resumed epoch itself: only a
        # new epoch forgets the resume position.
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.start_batch = 0

    def order(self, epoch: int) -> torch.Tensor:
        """The whole epoch's dataset order (before sharding)."""
        if not self.shuffle:
            return torch.arange(self._dataset_len)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
        return torch.randperm(self._dataset_len, generator=generator)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.order(self.epoch)[: self.total_size].tolist()
        first = self.start_batch * self.batch_size
        for i in range(first, self.num_samples):
            position = i * self.num_replicas + self.rank  # in the epoch's global order
            yield order[position], derive_seed(self.seed, "sample", self.epoch, position)

    def __len__(self) -> int:
        return self.num_samples


def _split_key(key: Any) -> tuple[int, int]:
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    # A plain index (Lightning swapped in a sequential sampler, e.g. for overfit_batches).
    return int(key), derive_seed("index", int(key))


class SeededDataset(Dataset):
    """`dataset[index]` computed under the key's seed; items come back as `(*item, seed)`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> tuple:
        index, seed = _split_key(key)
        with seeded_cpu_rng(seed):
            item = self.dataset[index]
        return (*item, seed) if isinstance(item, tuple) else (item, seed)

    def __getattr__(self, name: str) -> Any:
        # `classes`, `samples`, `bad_files` ... of the wrapped dataset stay reachable.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SeededCollate:
    """Strips the seeds `SeededDataset` appended and runs `collate` seeded by the batch's first one."""

    def __init__(self, collate: Optional[Callable[[Sequence], Any]] = None) -> None:
        self.collate = collate

    def __call__(self, batch: Sequence[tuple]) -> Any:
        items = [item[:-1] if len(item) > 2 else item[0] for item in batch]
        collate = self.collate or default_collate
        with seeded_cpu_rng(derive_seed(batch[0][-1], "batch")):
            return collate(items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.collate!r})"
