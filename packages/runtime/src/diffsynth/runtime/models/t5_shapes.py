"""What a T5-family encoder's weight shapes say about its config (T5-XXL for FLUX.1, umT5-XXL for Wan).

Both families read their `T5Config` / `UMT5Config` from the same shapes, so the reading lives here once.
"""

from __future__ import annotations

import re

from diffsynth.runtime.registry import StateDict

T5_LAYER = re.compile(r"encoder\.block\.(\d+)\.")


def t5_shape_facts(state: StateDict) -> dict[str, object]:
    """Config fields fixed by the shapes of an encoder-only T5 state dict in transformers' names."""
    vocab, d_model = state["shared.weight"].shape
    buckets, heads = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := T5_LAYER.match(k))}
    return dict(
        vocab_size=vocab,
        d_model=d_model,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        d_kv=state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        d_ff=state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        num_layers=max(layers) + 1,
    )
