"""Training data whose order and randomness do not depend on where a run was (re)started.

A run killed mid-epoch and resumed must see exactly the batches, crops, flips, MixUp/CutMix
draws and RandAugment ops an uninterrupted run sees. With `shuffle=True` and augmentations that
draw from each worker's global RNG that is impossible: the order comes from the main process's
RNG at each `iter()`, and a worker's draws depend on every sample that worker loaded before.
Here instead every random draw is a pure function of `(seed, epoch, position)`:

* `ResumableSampler` reads an endless stream of seeded permutations of the dataset, cut into
  epochs of N training examples (2N raw reads when MixUp/CutMix pairs images), shards it across
  replicas as `DistributedSampler` does (it *is* one, so Lightning does not wrap it again under
  DDP/XLA), can start `start_batch` batches into an epoch, and yields `(index, sample_seed)`
  keys, the seed derived from `(seed, position in the stream)`.
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


def epoch_steps(epoch: int, num_examples: int, step_examples: int) -> tuple[int, int]:
    """The optimizer steps ``[first, end)`` of ``epoch`` when an epoch is ``num_examples``
    training examples and a step takes ``step_examples`` of them.

    Training reads one endless stream of examples (as the official input pipeline does), and
    epoch ``e`` is the steps that end within its ``num_examples``: ``floor(e * N / G)`` up to
    ``floor((e + 1) * N / G)``. A step that straddles two epochs belongs to the later one, so
    no example is dropped at an epoch's end and ``E`` epochs are ``floor(E * N / G)`` steps,
    the official count (``1281167 * 360 // 4096 = 112,602``; nfnet.optim.schedule_lengths).
    """
    return epoch * num_examples // step_examples, (epoch + 1) * num_examples // step_examples


class ResumableSampler(DistributedSampler):
    """An endless seeded stream of the dataset cut into epochs of N examples, sharded over
    replicas, resumable mid-epoch.

    The raw-image stream is one permutation of the dataset after another (permutation ``k``
    seeded by ``(seed, k)``). With MixUp/CutMix each training example reads
    ``reads_per_example`` = 2 raw images, so an epoch of N examples reads 2N raw images: two
    independent permutations, and the same number of steps as without mixing.

    num_samples: dataset length N. batch_size: examples per replica per loader batch (the
    loader's batch is ``reads_per_example * batch_size`` raw images). accumulate: loader batches
    per optimizer step (trainer.accumulate_grad_batches); an epoch is whole optimizer steps
    (:func:`epoch_steps`). epoch, start_batch: where to start (loader batches of ``epoch``
    already trained; a position at the end of an epoch is the start of the next one, since a
    checkpoint written at the end of an epoch records the whole epoch as trained).

    Epochs differ in length by at most one step (N is rarely a multiple of the step's
    examples): ``len()`` is the longest epoch's, which is what Lightning sizes its loop by,
    and :meth:`batches_in_epoch` gives each epoch's own (nfnet.training.callbacks.EpochLength).
    Each yielded key is ``(index, sample_seed)``, the seed derived from the raw image's
    position in the stream.
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
        reads_per_example: int = 1,
        accumulate: int = 1,
    ) -> None:
        # DistributedSampler.__init__ would ask torch.distributed for the world; XLA never
        # initialises it, so the replicas are given explicitly and the parent is not called.
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        step_examples = int(batch_size) * int(num_replicas) * int(accumulate)
        if num_samples < step_examples:
            raise ValueError(
                f"{num_samples} training examples are fewer than one optimizer step takes ({batch_size} per "
                f"device x {num_replicas} device(s) x {accumulate} accumulated batch(es) = {step_examples}): "
                "lower the batch size or add data"
            )
        self.dataset = None
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.batch_size = int(batch_size)
        self.reads_per_example = int(reads_per_example)
        self.accumulate = int(accumulate)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.drop_last = True  # every loader batch is whole, on every replica
        self._dataset_len = int(num_samples)
        self._step_examples = step_examples
        self._permutations: dict[int, list[int]] = {}
        self.raw_batch = self.reads_per_example * self.batch_size  # the loader's batch size
        # DistributedSampler's attributes, for code that reads them: per-replica raw reads of the
        # longest epoch, and over all replicas.
        self.num_samples = self.accumulate * -(-self._dataset_len // step_examples) * self.raw_batch
        self.total_size = self.num_samples * self.num_replicas
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)
        # Lightning resumes such a checkpoint in the next epoch, but builds the loader and, with
        # persistent workers, starts its iterator before it calls set_epoch: an iterator of the
        # finished epoch would be empty, and the next epoch would silently train on nothing.
        if self.start_batch >= self.batches_in_epoch(self.epoch):
            self.epoch, self.start_batch = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        # Lightning calls this before every epoch, also with the resumed epoch itself: only a
        # new epoch forgets the resume position.
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.start_batch = 0

    def _batch_range(self, epoch: int) -> tuple[int, int]:
        first, end = epoch_steps(epoch, self._dataset_len, self._step_examples)
        return first * self.accumulate, end * self.accumulate

    def batches_in_epoch(self, epoch: int) -> int:
        """Loader batches (per replica) of ``epoch``: the same on every replica."""
        first, end = self._batch_range(epoch)
        return end - first

    def order(self, permutation: int) -> list[int]:
        """The dataset order of the stream's ``permutation``-th pass over the data."""
        if permutation not in self._permutations:
            if self.shuffle:
                generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", permutation))
                order = torch.randperm(self._dataset_len, generator=generator).tolist()
            else:
                order = list(range(self._dataset_len))
            # A batch spans at most two passes (it is smaller than the dataset): keep the last two.
            self._permutations = {k: v for k, v in self._permutations.items() if k >= permutation - 1}
            self._permutations[permutation] = order
        return self._permutations[permutation]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        first, end = self._batch_range(self.epoch)
        replicas, per_batch = self.num_replicas, self.raw_batch * self.num_replicas
        for batch in range(first + self.start_batch, end):
            for i in range(self.raw_batch):
                # Replicas take turns along the stream, as DistributedSampler deals an epoch.
                position = batch * per_batch + i * replicas + self.rank
                permutation, offset = divmod(position, self._dataset_len)
                yield self.order(permutation)[offset], derive_seed(self.seed, "sample", position)

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
