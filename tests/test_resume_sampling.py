"""The resumable training sampler and seeded data wrappers (nfnet.data.sampling), piece by piece."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from nfnet.data.sampling import ResumableSampler, SeededCollate, SeededDataset, derive_seed, epoch_steps
from nfnet.optim.schedule import schedule_lengths


def _keys(sampler) -> list[tuple[int, int]]:
    return list(iter(sampler))


def test_replicas_get_disjoint_equal_shards_of_one_seeded_permutation():
    n, world, batch = 103, 4, 5
    shards = [_keys(ResumableSampler(n, batch, seed=7, num_replicas=world, rank=r)) for r in range(world)]
    steps = n // (batch * world)  # epoch 0: the steps that end within its 103 examples
    assert {len(s) for s in shards} == {steps * batch}
    indices = [i for shard in shards for i, _ in shard]
    assert len(set(indices)) == len(indices) == steps * batch * world  # disjoint, none repeated
    seeds = [s for shard in shards for _, s in shard]
    assert len(set(seeds)) == len(seeds)  # every sample has its own seed
    # Interleaved, the shards are the stream's order, as DistributedSampler deals an epoch.
    order = ResumableSampler(n, batch, seed=7).order(0)[: len(indices)]
    assert [shards[p % world][p // world][0] for p in range(len(indices))] == order


def test_the_order_is_a_function_of_seed_and_epoch_only():
    a, b = ResumableSampler(50, 4, seed=3), ResumableSampler(50, 4, seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    assert _keys(a) == _keys(b)
    b.set_epoch(1)
    assert _keys(b) != _keys(a)
    assert _keys(ResumableSampler(50, 4, seed=4)) != _keys(a)


def test_epochs_are_n_examples_of_one_stream_so_no_example_is_dropped_at_an_epoch_end():
    n, batch = 42, 4  # 10.5 batches per epoch
    sampler = ResumableSampler(n, batch, seed=1)
    counts = [sampler.batches_in_epoch(e) for e in range(4)]
    assert counts == [10, 11, 10, 11] and len(sampler) == 11 * batch  # Lightning's bound: the longest epoch
    stream = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        stream += [i for i, _ in _keys(sampler)]
    # Epochs 0-3 read the stream of permutations 0, 1, 2, ... without a gap, 4 x 42 examples.
    assert stream == sampler.order(0) + sampler.order(1) + sampler.order(2) + sampler.order(3)
    assert sorted(sampler.order(1)) == list(range(n)) and sampler.order(1) != sampler.order(0)
    assert epoch_steps(3, n, batch) == (31, 42)  # 4 epochs: 4 * 42 // 4 steps


def test_mixing_reads_two_raw_images_per_example_and_keeps_the_step_count():
    n, batch = 40, 4
    plain = ResumableSampler(n, batch, seed=1)
    mixing = ResumableSampler(n, batch, seed=1, reads_per_example=2)
    assert mixing.raw_batch == 2 * batch
    assert [mixing.batches_in_epoch(e) for e in range(3)] == [plain.batches_in_epoch(e) for e in range(3)] == [10] * 3
    raw = [i for i, _ in _keys(mixing)]
    # One epoch of 40 examples reads 80 raw images: two independent permutations of the data.
    assert len(raw) == 2 * n and raw == mixing.order(0) + mixing.order(1)


def test_an_epoch_is_whole_optimizer_steps_under_gradient_accumulation():
    sampler = ResumableSampler(50, 2, seed=0, num_replicas=2, accumulate=3)  # 12 examples a step
    assert [sampler.batches_in_epoch(e) for e in range(3)] == [3 * 4, 3 * 4, 3 * 4]
    assert [epoch_steps(e, 50, 12) for e in range(3)] == [(0, 4), (4, 8), (8, 12)]
    assert epoch_steps(5, 50, 12) == (20, 25)  # the 6th epoch takes the accumulated remainders


def test_the_imagenet_recipe_runs_the_official_number_of_steps():
    # NFNET_SPEC §4: 1281167 * 360 // 4096 = 112,602 steps with a 5 * 1281167 / 4096 = 1563.9 warmup,
    # computed by what the sampler (steps per epoch) and the module (schedule) use.
    n, batch, epochs = 1_281_167, 4096, 360
    assert epoch_steps(epochs - 1, n, batch)[1] == 112_602
    assert sum(b - a for a, b in (epoch_steps(e, n, batch) for e in range(epochs))) == 112_602
    warmup, total = schedule_lengths(n, batch, epochs, 5)
    assert total == 112_602 and warmup == pytest.approx(1563.92, abs=0.01)
    # The same on 32 devices of 128, or 16 of 128 accumulating 2, with the official mixing.
    sampler = ResumableSampler(n, 128, seed=0, num_replicas=32, rank=5, reads_per_example=2)
    assert sum(sampler.batches_in_epoch(e) for e in range(epochs)) == 112_602
    accumulating = ResumableSampler(n, 128, seed=0, num_replicas=16, reads_per_example=2, accumulate=2)
    assert sum(accumulating.batches_in_epoch(e) for e in range(epochs)) == 2 * 112_602


def test_a_resumed_epoch_continues_at_the_next_batch_and_only_that_epoch():
    full = _keys(ResumableSampler(40, 4, seed=1, epoch=2))
    resumed = ResumableSampler(40, 4, seed=1, epoch=2, start_batch=3)
    assert len(resumed) == len(full)  # Lightning counts the resumed epoch's batches from where it was
    assert _keys(resumed) == full[12:]
    resumed.set_epoch(2)  # Lightning sets the resumed epoch again: still resumed
    assert _keys(resumed) == full[12:]
    resumed.set_epoch(3)
    assert _keys(resumed) == _keys(ResumableSampler(40, 4, seed=1, epoch=3))


def test_a_position_at_the_end_of_an_epoch_is_the_start_of_the_next():
    # A checkpoint written at the end of epoch 2 records all 10 of its batches as trained.
    finished = ResumableSampler(40, 4, seed=1, epoch=2, start_batch=10)
    assert finished.epoch == 3 and _keys(finished) == _keys(ResumableSampler(40, 4, seed=1, epoch=3))
    finished.set_epoch(3)  # what Lightning then asks for
    assert _keys(finished) == _keys(ResumableSampler(40, 4, seed=1, epoch=3))
    # 42 samples in batches of 4: epoch 2 is the 10 steps that end within examples 84-125.
    assert ResumableSampler(42, 4, seed=1, epoch=2, start_batch=10).epoch == 3
    assert ResumableSampler(42, 4, seed=1, epoch=2, start_batch=9).epoch == 2
    assert ResumableSampler(42, 4, seed=1, epoch=1, start_batch=10).epoch == 1  # epoch 1 has 11


def test_a_split_smaller_than_one_step_is_refused_in_words():
    with pytest.raises(ValueError, match="fewer than one optimizer step takes"):
        ResumableSampler(7, 4, seed=0, num_replicas=2)


class _RandomCrops(Dataset):
    """Draws from torch's global RNG, as the real transforms do."""

    def __len__(self):
        return 32

    def __getitem__(self, index):
        return torch.rand(3) + index, index


def _noisy_collate(items):
    images = torch.stack([image for image, _ in items])
    return images + torch.rand(images.shape), torch.tensor([label for _, label in items])


def test_draws_depend_on_the_sample_not_on_the_process_or_the_worker():
    dataset = SeededDataset(_RandomCrops())
    key = (5, derive_seed("x", 5))
    state = torch.get_rng_state()
    first = dataset[key]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was
    torch.manual_seed(999)
    assert torch.equal(dataset[key][0], first[0]) and first[1:] == (5, key[1])

    def batches(workers: int):
        sampler = ResumableSampler(len(dataset), 4, seed=11)
        loader = DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=SeededCollate(_noisy_collate),
                            num_workers=workers, drop_last=True)
        return list(loader)

    torch.manual_seed(0)
    inline = batches(0)
    torch.manual_seed(1)
    in_workers = batches(2)
    assert len(inline) == 8
    for (x, y), (x2, y2) in zip(inline, in_workers):
        assert torch.equal(x, x2) and torch.equal(y, y2)
