"""The authors' guidance for LTX-2, per stream: CFG, STG and modality isolation, with the guidance rescale.

Every pass a step needs runs in one DiT call (the authors batch their passes so too): the prompts, the negative
prompts (with CFG), the prompts perturbed for STG (the self-attentions of the STG blocks pass their values
through) and the prompts with the modalities isolated (no audio<->video attentions). Each extra pass repeats the
prompts' rows and skips attentions only in its own rows. The terms are added to the conditional prediction, on
the predicted clean latents (`x0 = x - sigma * v`) when the rescale is on, as the authors and diffusers do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffsynth.runtime.pipeline import BasePipeline

from .dit import AttentionSkip
from .velocity import LTX2Text, ltx2_velocity, repeat_conditions


def rescale_guidance(guided: torch.Tensor, positive: torch.Tensor, factor: float) -> torch.Tensor:
    """Pull the guided prediction's per-sample standard deviation back towards the conditional one's
    (`factor` 0: unchanged, 1: fully rescaled), against the over-saturation strong CFG causes."""
    dims = tuple(range(1, guided.dim()))
    ratio = positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return guided * (factor * ratio + (1 - factor))


@dataclass(frozen=True)
class LTX2Guidance:
    """The authors' guidance terms besides CFG, added to the conditional prediction per stream:
    STG `stg_scale * (cond - perturbed)`, the perturbed pass replacing the self-attention of `blocks` by
    its value projection (video self-attention if `stg_scale` is not 0, audio if `audio_stg_scale` is not),
    and modality isolation `(modality_scale - 1) * (cond - isolated)`, the isolated pass skipping both
    audio<->video attentions in every block. STG 0 and modality 1 turn a term off."""

    stg_scale: float = 0.0
    audio_stg_scale: float = 0.0
    modality_scale: float = 1.0
    audio_modality_scale: float = 1.0
    blocks: tuple[int, ...] = ()

    @property
    def stg(self) -> bool:
        return bool(self.blocks) and (self.stg_scale != 0.0 or self.audio_stg_scale != 0.0)

    @property
    def isolation(self) -> bool:
        return self.modality_scale != 1.0 or self.audio_modality_scale != 1.0

    def stg_skips(self, rows: range) -> list[AttentionSkip]:
        """What the perturbed pass (batch `rows`) skips."""
        kinds = [k for k, s in (("video_self", self.stg_scale), ("audio_self", self.audio_stg_scale)) if s != 0.0]
        return [AttentionSkip(kind, tuple(self.blocks), tuple(rows)) for kind in kinds]


NO_GUIDANCE = LTX2Guidance()


def guided_velocities(
    dit, video, audio, sigma, text, fps, use_cfg: bool, scales: tuple[float, float], rescale, guidance, conditions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided (video, audio) velocities of one step. `text` holds the prompts, then (with `use_cfg`) the negative
    prompts; `scales` are the (video, audio) CFG scales, `rescale` one factor or (video, audio) ones, `guidance` an
    `LTX2Guidance` (or None) and `conditions` the model call's other inputs (`ltx2_velocity`'s keywords)."""

    g = guidance or NO_GUIDANCE
    rescale = tuple(rescale) if isinstance(rescale, (tuple, list)) else (rescale, rescale)
    b = video.shape[0]
    positive = LTX2Text(text.video[:b], text.audio[:b], None if text.mask is None else text.mask[:b])
    batch, skips, rows = (text if use_cfg else positive), [], {}
    n = 2 if use_cfg else 1
    if g.stg:
        rows["stg"] = range(n * b, (n + 1) * b)
        skips += g.stg_skips(rows["stg"])
        batch, n = batch.cat(positive), n + 1
    if g.isolation:
        rows["isolated"] = range(n * b, (n + 1) * b)
        skips += [AttentionSkip(kind, None, tuple(rows["isolated"])) for kind in ("a2v", "v2a")]
        batch, n = batch.cat(positive), n + 1
    if n == 1:
        return ltx2_velocity(dit, video, audio, sigma, batch, fps, **conditions)
    v_video, v_audio = ltx2_velocity(
        dit,
        torch.cat([video] * n),
        torch.cat([audio] * n),
        sigma,
        batch,
        fps,
        skips=skips,
        **repeat_conditions(conditions, n),
    )

    def parts(v: torch.Tensor) -> list[torch.Tensor | None]:
        extra = (v[rows[k].start : rows[k].stop] if k in rows else None for k in ("stg", "isolated"))
        return [v[:b], v[b : 2 * b] if use_cfg else None, *extra]

    return (
        guide_terms(video, parts(v_video), sigma, (scales[0], g.stg_scale, g.modality_scale), rescale[0]),
        guide_terms(audio, parts(v_audio), sigma, (scales[1], g.audio_stg_scale, g.audio_modality_scale), rescale[1]),
    )


def guide_terms(x, preds, sigma, scales, rescale) -> torch.Tensor:
    """`preds` (cond, uncond, perturbed, isolated; None where not run) combined with `scales` (cfg, stg,
    modality); the terms are added to the conditional prediction, on x0 when rescaling."""
    if rescale != 0.0:
        sigma, x = float(sigma), x.float()
        preds = [None if p is None else x - sigma * p for p in preds]
    cond, uncond, perturbed, isolated = preds
    cfg, stg, modality = scales
    guided = cond if uncond is None else BasePipeline.guide(cond, uncond, cfg)
    if perturbed is not None:
        guided = guided + stg * (cond - perturbed)
    if isolated is not None:
        guided = guided + (modality - 1) * (cond - isolated)
    if rescale == 0.0:
        return guided
    return (x - rescale_guidance(guided, cond, rescale)) / sigma


__all__ = ["LTX2Guidance", "guide_terms", "guided_velocities", "rescale_guidance"]
