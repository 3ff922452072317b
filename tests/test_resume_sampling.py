"""The resumable training sampler and seeded data wrappers (nfnet.data.sampling), piece by piece."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from nfnet.data.sampling import ResumableSampler, SeededCollate, SeededDataset, derive_seed


def _keys(sampler) -> list[tuple[int, int]]:
    return list(iter(sampler))


def test_replicas_get_disjoint_equal_shards_of_one_seeded_permutation():
    n, world = 103, 4
    shards = [_keys(ResumableSampler(n, 5, seed=7, num_replicas=world, rank=r)) for r in range(world)]
    assert {len(s) for s in shards} == {n // world}
    indices = [i for shard in shards for i, _ in shard]
    assert len(set(indices)) == len(indices) == (n // world) * world  # disjoint, none repeated
    seeds = [s for shard in shards for _, s in shard]
    assert len(set(seeds)) == len(seeds)  # every sample of the epoch has its own seed
    # Interleaved, the shards are the epoch's global order, as DistributedSampler deals it.
    order = ResumableSampler(n, 5, seed=7).order(0)[: len(indices)].tolist()
    assert [shards[p % world][p // world][0] for p in range(len(indices))] == order


def test_the_order_is_a_function_of_seed_and_epoch_only():
    a, b = ResumableSampler(50, 4, seed=3), ResumableSampler(50, 4, seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    assert _keys(a) == _keys(b)
    b.set_epoch(1)
    assert sorted(i for i, _ in _keys(b)) == sorted(i for i, _ in _keys(a)) and _keys(b) != _keys(a)
    assert _keys(ResumableSampler(50, 4, seed=4)) != _keys(a)


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
    # 42 samples in batches of 4 with the last partial batch dropped: 10 batches make the epoch.
    assert ResumableSampler(42, 4, seed=1, epoch=2, start_batch=10).epoch == 3
    assert ResumableSampler(42, 4, seed=1, epoch=2, start_batch=9).epoch == 2


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
