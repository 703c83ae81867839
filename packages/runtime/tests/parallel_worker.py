"""One rank of test_parallel.py (run as a script by `run_ranks`): Ulysses attention and batch division
against the single-process result, which every rank computes for itself from the same seed."""

from __future__ import annotations

import sys

import torch

from diffsynth.runtime.attention import attention
from diffsynth.runtime.parallel import batch_parallel, init_parallel, shard_sequence


def check_attention(groups, length: int, masked: bool, heads: int = 4) -> None:
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, length, heads, 8, generator=g) for _ in range(3))
    mask = None
    if masked:  # the second sample's last 3 keys are padding
        mask = torch.ones(2, length, dtype=torch.bool)
        mask[1, -3:] = False
    want = attention(q, k, v, mask)
    with torch.no_grad(), shard_sequence(groups, length) as shards:
        local = attention(
            shards.shard(q), shards.shard(k), shards.shard(v), shards.key_mask(mask, 2, "cpu"), sequence_parallel=True
        )
        got = shards.gather(local)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the same call outside a divided sequence is plain attention
    torch.testing.assert_close(attention(q, k, v, mask, sequence_parallel=True), want, atol=0, rtol=0)


def check_joint_attention(groups, length: int, prefix: int, heads: int = 4) -> None:
    """`[text, image]` attention with the text whole on every rank and the image divided."""
    g = torch.Generator().manual_seed(100 + length)
    q, k, v = (torch.randn(2, prefix + length, heads, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, prefix + length, dtype=torch.bool)
    mask[1, prefix - 2 : prefix] = False  # the second sample's text is 2 tokens shorter
    want = attention(q, k, v, mask)
    with torch.no_grad(), shard_sequence(groups, length, prefix=prefix) as shards:
        local = [torch.cat([t[:, :prefix], shards.shard(t[:, prefix:])], 1) for t in (q, k, v)]
        out = attention(*local, shards.key_mask(mask, 2, "cpu"), sequence_parallel=True)
        text, image = out[:, :prefix], shards.gather(out[:, prefix:])
    torch.testing.assert_close(torch.cat([text, image], 1), want, atol=1e-6, rtol=0)


def check_batch(groups) -> None:
    g = torch.Generator().manual_seed(0)
    x, t, w = torch.randn(4, 3, generator=g), torch.rand(4, generator=g), torch.randn(3, 3, generator=g)
    texts = [torch.randn(n, 3, generator=g) for n in (1, 2, 3, 4)]

    def forward(x, t, texts, weight, scale=1.0):
        assert x.shape[0] == len(texts) == t.shape[0]
        pooled = torch.stack([s.mean(0) for s in texts])
        return (x @ weight + pooled) * t[:, None] * scale, x.sum(-1)

    want = forward(x, t, texts, w, scale=2.0)
    got = batch_parallel(groups, 4, forward, x, t, texts, w, scale=2.0, per_sample=(2,))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def check_nested_batch(groups) -> None:
    """Per-block residual lists (here as long as the batch, to show they are not taken for samples)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, generator=g)
    residuals = [torch.randn(2, 3, generator=g) for _ in range(2)]

    def forward(x, residuals, extra):
        return x * 2 + residuals[0] - residuals[1] + extra["bias"]

    extra = {"bias": torch.randn(2, 3, generator=g)}
    want = forward(x, residuals, extra)
    torch.testing.assert_close(batch_parallel(groups, 2, forward, x, residuals, extra=extra), want, atol=0, rtol=0)


def check_undivided_batch(groups) -> None:
    """A batch of 3 over 2 ranks: computed whole on every rank, nothing gathered."""
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    seen = []

    def forward(x):
        seen.append(x.shape[0])
        return x * 3

    torch.testing.assert_close(batch_parallel(groups, 3, forward, x), x * 3, atol=0, rtol=0)
    assert seen == [3]


def main(mode: str) -> None:
    if mode == "sequence":
        groups = init_parallel()
        assert (groups.sequence_size, groups.batch_size) == (2, 1)
        assert init_parallel(sequence=2) is groups  # made once: a second call shares the communicators
        for length in (12, 13, 7):  # divisible, padded, padded with an empty-ish shard
            check_attention(groups, length, masked=False)
            check_attention(groups, length, masked=True)
            check_joint_attention(groups, length, prefix=5)
    elif mode == "batch":
        groups = init_parallel(sequence=1, batch=2)
        check_batch(groups)
        check_nested_batch(groups)
        check_undivided_batch(groups)
    elif mode == "heads":  # 3 heads over 2 ranks: keys and values gathered instead of exchanged
        groups = init_parallel(sequence=2)
        for length in (12, 13):
            check_attention(groups, length, masked=True, heads=3)
            check_joint_attention(groups, length, prefix=5, heads=3)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1])
