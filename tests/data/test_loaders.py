"""Samplers: a step's global batch is the same for any number of ranks; resume skips."""

import torch

from xception.data.loaders import Batch, EvalBatchSampler, TrainBatchSampler, collate


def test_global_batch_is_rank_independent():
    single = list(TrainBatchSampler(50, 8, seed=3))
    ranks = [list(TrainBatchSampler(50, 8, seed=3, rank=r, world=2)) for r in range(2)]
    assert len(single) == 6  # full batches only
    for step, batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == batch


def test_epochs_reshuffle_and_resume_skips_done_batches():
    sampler = TrainBatchSampler(40, 8, seed=0)
    sampler.set_position(epoch=1)
    epoch1 = list(sampler)
    sampler.set_position(epoch=2)
    assert list(sampler) != epoch1
    sampler.set_position(epoch=1, start_batch=3)
    assert list(sampler) == epoch1[3:] and len(sampler) == 2
    assert all(e == 1 for batch in epoch1 for e, _ in batch)


def test_eval_sampler_covers_every_sample_once_without_padding():
    covered = [i for r in range(3) for batch in EvalBatchSampler(10, 4, r, 3) for _, i in batch]
    assert sorted(covered) == list(range(10))


def test_collate_drops_unreadable_files_and_reports_them():
    good = (torch.zeros(3, 4, 4, dtype=torch.uint8), torch.tensor(1))
    batch = collate([good, "x.png: OSError: truncated", good])
    assert isinstance(batch, Batch) and batch.images.shape[0] == 2
    assert batch.skipped == ["x.png: OSError: truncated"]
    assert collate(["a: bad"]).images.shape[0] == 0
