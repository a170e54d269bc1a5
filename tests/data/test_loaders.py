"""Samplers: a step's global batch is the same for any number of ranks; resume skips."""

import numpy as np
import pytest
import torch

from xception.data.loaders import (
    Batch,
    EvalBatchSampler,
    StreamBatchSampler,
    TrainBatchSampler,
    collate,
)
from xception.data.shards import ShardInfo, ShardSplit


def shard_split(counts):
    shards = tuple(ShardInfo(f"train-{i:06d}.tar", n, 0, "") for i, n in enumerate(counts))
    return ShardSplit("/nowhere", shards, ("a",), False, (sum(counts),))


COUNTS = [10, 10, 10, 10, 9, 3]  # 52 samples: 6 batches of 8 and a tail of 4


def shard_of(split, index):
    starts = np.cumsum([0] + [s.samples for s in split.shards])
    return int(np.searchsorted(starts, index, side="right")) - 1


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


def stream(world=1, rank=0, lanes=2, buffer=6, seed=5):
    return StreamBatchSampler(shard_split(COUNTS), 8, seed, rank, world, lanes, buffer)


def test_a_shard_epoch_uses_every_sample_once_less_a_tail_under_one_batch():
    sampler = stream()
    for epoch in range(4):
        sampler.set_position(epoch)
        batches = list(sampler)
        used = [i for batch in batches for e, i in batch if e == epoch]
        assert len(batches) == 6 and len(used) == len(set(used)) == 48
        assert set(range(52)) - set(used)  # the 4 left out come from the epoch's last shard
    sampler.set_position(0)
    first = list(sampler)
    sampler.set_position(1)
    assert list(sampler) != first  # shards and buffers reshuffle each epoch


def test_ranks_serving_lanes_give_the_global_batches_of_one_process():
    single = list(stream(lanes=2))
    ranks = [list(stream(world=2, rank=r, lanes=2)) for r in range(2)]
    for step, batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == batch
    with pytest.raises(ValueError, match="lanes must be a multiple of the process count"):
        stream(world=2, lanes=3)
    with pytest.raises(ValueError, match="not divisible by 3 lanes"):
        stream(lanes=3)


def test_a_lane_reads_its_shards_in_stream_order_a_buffer_at_a_time():
    """Locality: each lane's batch comes from the one or two shards its block spans, and
    rank 1 (lane 1) never reads the shards that lane 0 reads early in the epoch."""
    split = shard_split(COUNTS)
    ranks = [list(stream(world=2, rank=r, lanes=2)) for r in range(2)]
    for batches in ranks:
        for batch in batches:
            assert len({shard_of(split, i) for _, i in batch}) <= 2
    lane_shards = [{shard_of(split, i) for batch in r[:2] for _, i in batch} for r in ranks]
    assert not lane_shards[0] & lane_shards[1]


def test_a_shard_stream_resumes_mid_epoch_and_records_where_each_lane_reads():
    sampler = stream(lanes=2, buffer=6)
    sampler.set_position(3)
    epoch = list(sampler)
    sampler.set_position(3, start_batch=4)
    assert list(sampler) == epoch[4:] and len(sampler) == 2
    cursor = sampler.cursor(3, 4)
    assert cursor["epoch"] == 3 and cursor["batch"] == 4 and cursor["buffer"] == 6
    # Lane 0 is at its 16th sample, in the block of its samples 12-17 (buffer 6), which
    # batches 3 and 4 draw from (4 a batch): the cursor's sample is among theirs.
    lane = cursor["lanes"][0]
    number = int(lane["shard"][6:12])
    start = sum(COUNTS[:number])
    block = {i for batch in epoch[3:5] for _, i in batch[:4]}
    assert start + lane["offset"] in block
    assert sampler.cursor(3, 0)["lanes"][0]["offset"] == 0  # an epoch starts at a shard's start
    assert sampler.cursor(3, 4) != sampler.cursor(4, 4)
