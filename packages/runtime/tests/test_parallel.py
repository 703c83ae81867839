"""Sequence (Ulysses) and batch parallelism over two CPU ranks (gloo) equal one process; setup errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.parallel import ParallelGroups, SequenceShards, init_parallel, shard_sequence
from diffsynth.runtime.testing.distributed import run_ranks

WORKER = Path(__file__).with_name("parallel_worker.py")


@pytest.mark.parametrize("mode", ["sequence", "batch", "heads"])
def test_two_ranks_equal_one_process(mode):
    run_ranks(WORKER, 2, mode)


def test_shards_cover_the_sequence_once_with_padding_masked():
    x = torch.arange(2 * 7).reshape(2, 7, 1).float()
    parts, masks = [], []
    for rank in range(3):
        shards = SequenceShards(ParallelGroups(sequence_size=3, sequence_rank=rank), 7)
        parts.append(shards.shard(x))
        masks.append(shards.key_mask(None, 2, "cpu"))
        assert shards.valid_tokens == [3, 3, 1][rank]
    assert torch.equal(torch.cat(parts, 1)[:, :7], x) and torch.cat(parts, 1).shape[1] == 9
    assert masks[0].shape == (2, 9) and masks[0][:, :7].all() and not masks[0][:, 7:].any()


def test_without_torchrun_the_error_says_how_to_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        init_parallel()


def test_training_is_refused():
    groups = ParallelGroups(sequence_size=2)
    with pytest.raises(ConfigError, match="no_grad"), torch.enable_grad(), shard_sequence(groups, 8):
        pass
    with torch.no_grad(), shard_sequence(None, 8) as shards:
        assert shards is None
