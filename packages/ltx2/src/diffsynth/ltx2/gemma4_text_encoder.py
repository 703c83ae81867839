"""LTX-2.5's text encoder: the language model of Gemma 4, read at every layer as Gemma 3 is (`text_encoder.py`).

`Gemma4TextEncoder` is transformers' `Gemma4UnifiedTextModel`, built from the `text_config` of the
`Gemma4UnifiedForConditionalGeneration` in LTX-2.5's diffusers folder (its vision and audio embedders are dropped
by `text_encoder_formats.py`). What changes for a hand-run forward: global layers may have their own head width
and key/value heads (and reuse keys as values), late layers may reuse the keys and values of earlier ones, each
layer's output is multiplied by a stored `layer_scalar`, and the masks are built as the multimodal model builds
them for text-only input. A module of its own, imported only when a Gemma 4 is loaded; with a transformers older
than 5.23 it still imports, and building the encoder raises a ConfigError naming the release needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.masking_utils import create_masks_for_generate

from diffsynth.runtime.errors import ConfigError

from .text_encoder import GemmaTextEncoder, resolve_hidden_state_index

GEMMA4_TRANSFORMERS = "5.23"  # Gemma4UnifiedTextModel came in 5.10, the KVSharingDict its forward needs in 5.23


def require_gemma4_transformers() -> None:
    """The packages allow transformers>=5.0, older than Gemma 4: say which release is needed instead of letting an
    ImportError surface from inside the build."""
    try:
        from transformers import Gemma4UnifiedTextConfig, Gemma4UnifiedTextModel  # noqa: F401
        from transformers.cache_utils import KVSharingDict  # noqa: F401
    except ImportError as error:
        import transformers

        raise ConfigError(
            f"LTX-2.5's Gemma 4 text encoder needs transformers>={GEMMA4_TRANSFORMERS} "
            f"(installed {transformers.__version__}): pip install -U transformers"
        ) from error


try:
    from transformers import Gemma4UnifiedTextModel as _Gemma4Base
    from transformers.cache_utils import KVSharingDict
except ImportError:  # transformers < 5.23

    class _Gemma4Base(torch.nn.Module):
        """Stands in for `Gemma4UnifiedTextModel` so that this module still imports; building the encoder says
        which transformers it needs."""

        def __init__(self, *args, **kwargs):
            require_gemma4_transformers()


class Gemma4TextEncoder(GemmaTextEncoder, _Gemma4Base):
    """Gemma 4's language model (transformers' `Gemma4UnifiedTextModel`, the text part of LTX-2.5's
    `Gemma4UnifiedForConditionalGeneration`) with runtime capabilities and a forward that returns the
    hidden states LTX reads, as the whole multimodal model computes them for a text-only prompt (`layer_scalar`
    is a persistent buffer: it comes from the checkpoint)."""

    def _masks(self, x: torch.Tensor, attention_mask, position_ids) -> dict:
        """One mask per layer kind, as `Gemma4UnifiedModel` builds them: with bidirectional attention over
        vision tokens configured, a text-only prompt is one with no vision blocks (ids -1)."""
        config = self.config
        kwargs = dict(
            config=config, inputs_embeds=x, attention_mask=attention_mask, cache=None, position_ids=position_ids
        )
        if config.use_bidirectional_attention == "vision":
            kwargs["block_sequence_ids"] = torch.full(x.shape[:2], -1, device=x.device)
        return create_masks_for_generate(**kwargs)  # keyed by layer kind (Gemma 4 configs always have them)

    def hidden_states_at(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        indices: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """Entries `indices` (default: all) of transformers' `output_hidden_states` tuple, running no more
        layers than needed. 0 is the scaled embeddings, i the output of layer i-1, the last one (`-1`) the
        final-normed output."""
        n = len(self.layers)
        wanted = list(range(n + 1)) if indices is None else [resolve_hidden_state_index(i, n) for i in indices]
        stop = max(wanted)
        kinds = self.config.layer_types
        x = self.embed_tokens(input_ids)
        position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        masks = self._masks(x, attention_mask, position_ids) if stop else {}
        ropes = {kind: self.rotary_emb(x, position_ids, kind) for kind in set(kinds[:stop])}
        shared_kv = KVSharingDict()  # keys/values the last producing layer of each kind leaves for the reusing ones
        states = {0: x}
        for i, layer in enumerate(self.layers[: min(stop, n)]):
            x = layer(
                x,
                shared_kv_states=shared_kv,
                position_embeddings=ropes[kinds[i]],
                attention_mask=masks[kinds[i]],
                position_ids=position_ids,
            )
            states[i + 1] = x
        if stop == n:
            states[n] = self.norm(x)
        return [states[i] for i in wanted]
