"""The FLUX.1 DiT layers DiffSynth-Studio's LoRA models are keyed by, and ours.

DiffSynth-Studio's LoRA Encoder and LoRA Fusion (LoRAFusion-preview) checkpoints hold one entry per DiT Linear a
LoRA may change, named after its own FLUX.1 module names with dots written `___` (`blocks___0___attn___a_to_qkv`,
`single_blocks___3___to_qkv_mlp`). Those layers are the same fused Linears as ours (BFL names; the modulation
outputs in the same order), so each maps one-to-one onto a module of `Flux1DiT`. The same table turns
DiffSynth-Studio's `--lora_target_modules` names into ours for the trainer (`studio_target_names`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# DiffSynth-Studio's layer suffix -> ours, (in, out) as multiples of (hidden, mlp_hidden): (a, b) means a * hidden +
# b * mlp_hidden features. The order is theirs (it orders the LoRA Encoder's tokens).
DOUBLE_LAYERS: dict[str, tuple[str, tuple[tuple[int, int], tuple[int, int]]]] = {
    "attn.a_to_qkv": ("img_attn.qkv", ((1, 0), (3, 0))),
    "attn.a_to_out": ("img_attn.proj", ((1, 0), (1, 0))),
    "ff_a.0": ("img_mlp.0", ((1, 0), (0, 1))),
    "ff_a.2": ("img_mlp.2", ((0, 1), (1, 0))),
    "norm1_a.linear": ("img_mod.lin", ((1, 0), (6, 0))),
    "attn.b_to_qkv": ("txt_attn.qkv", ((1, 0), (3, 0))),
    "attn.b_to_out": ("txt_attn.proj", ((1, 0), (1, 0))),
    "ff_b.0": ("txt_mlp.0", ((1, 0), (0, 1))),
    "ff_b.2": ("txt_mlp.2", ((0, 1), (1, 0))),
    "norm1_b.linear": ("txt_mod.lin", ((1, 0), (6, 0))),
}
SINGLE_LAYERS: dict[str, tuple[str, tuple[tuple[int, int], tuple[int, int]]]] = {
    "to_qkv_mlp": ("linear1", ((1, 0), (3, 1))),
    "proj_out": ("linear2", ((1, 1), (1, 0))),
    "norm.linear": ("modulation.lin", ((1, 0), (3, 0))),
}


@dataclass(frozen=True)
class StudioLayer:
    """One DiT Linear in both namings, with its sizes."""

    key: str  # DiffSynth-Studio's module name with "___" for dots (their checkpoint's ModuleDict key)
    kind: str  # their layer suffix, "___"-joined (the LoRA Encoder's projection per kind)
    ours: str  # our module name in `Flux1DiT`
    in_features: int
    out_features: int


def studio_layers(double_blocks: int, single_blocks: int, hidden: int, mlp_hidden: int) -> list[StudioLayer]:
    """Every layer, in DiffSynth-Studio's order: each double block's ten, then each single block's three."""

    def size(multiples: tuple[int, int]) -> int:
        return multiples[0] * hidden + multiples[1] * mlp_hidden

    layers = []
    for prefix, ours_prefix, count, table in (
        ("blocks", "double_blocks", double_blocks, DOUBLE_LAYERS),
        ("single_blocks", "single_blocks", single_blocks, SINGLE_LAYERS),
    ):
        for i in range(count):
            for suffix, (ours, (fan_in, fan_out)) in table.items():
                layers.append(
                    StudioLayer(
                        key=f"{prefix}.{i}.{suffix}".replace(".", "___"),
                        kind=suffix.replace(".", "___"),
                        ours=f"{ours_prefix}.{i}.{ours}",
                        in_features=size(fan_in),
                        out_features=size(fan_out),
                    )
                )
    return layers


def block_counts(keys, prefix: str) -> tuple[int, int]:
    """(double, single) block counts from checkpoint keys `<prefix>blocks___N___...` /
    `<prefix>single_blocks___N___...`."""
    double, single = set(), set()
    for key in keys:
        if not key.startswith(prefix):
            continue
        head = key[len(prefix) :].split("___")
        if head[0] == "blocks":
            double.add(int(head[1]))
        elif head[0] == "single_blocks":
            single.add(int(head[1]))
    return len(double), len(single)


def studio_target_names(names: Sequence[str], linears: Iterable[str]) -> list[str]:
    """LoRA target names (`--lora_target_modules`, each the end of a module path) with DiffSynth-Studio's FLUX.1
    layer names, or their endings, replaced by ours: its default list `a_to_qkv,b_to_qkv,ff_a.0,...,
    norm.linear,to_qkv_mlp` selects the same Linears as in DiffSynth-Studio (`a_to_qkv` -> `img_attn.qkv`,
    `norm.linear` -> `modulation.lin`, `to_qkv_mlp` -> `linear1`). A name that ends one of `linears` (our
    module names) stays ours."""

    def ends(path: str, name: str) -> bool:
        return path == name or path.endswith("." + name)

    linears = list(linears)
    table = {**DOUBLE_LAYERS, **SINGLE_LAYERS}
    result: list[str] = []
    for name in names:
        theirs = (
            [] if any(ends(path, name) for path in linears) else [o for s, (o, _) in table.items() if ends(s, name)]
        )
        result.extend(n for n in theirs or [name] if n not in result)
    return result
