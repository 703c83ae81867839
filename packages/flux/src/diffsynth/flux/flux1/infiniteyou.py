"""InfiniteYou (ByteDance; `ByteDance/InfiniteYou`): identity-preserved FLUX.1-dev images from one face photo.

The face's 512-wide ArcFace embedding goes through a perceiver resampler (`image_proj_model.bin`; 8 tokens of
4096) that stands in for the text of InfuseNet, a FLUX.1 ControlNet (`InfuseNetModel/`, diffusers layout, loaded
like any ControlNet); InfuseNet's residuals steer the DiT, whose own text stays the prompt. The authors' code:
`pipelines/pipeline_infu_flux.py` (the resampler's sizes, the face embedding, a black control image by default) and
`pipeline_flux_infusenet.py` (InfuseNet sees the id tokens at text position 0, the prompt's pooled CLIP vector and
its own guidance, 1; with true CFG only the positive branch gets its residuals).

The face embedding (`FaceEncoder`) needs the authors' face models: insightface's antelopev2 detector (onnxruntime)
for the box and 5 landmarks, insightface's `norm_crop` alignment and facexlib's ArcFace. They are the optional extra
`diffsynth-flux[infiniteyou]`, imported only when a photo is given; an embedding can be given instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffsynth.runtime.errors import CheckpointError, ConfigError

INSTALL = 'pip install "diffsynth-flux[infiniteyou]" (insightface, onnxruntime, facexlib)'
DETECTION_SIZES = (640, 320, 160)  # the authors retry smaller detector inputs when no face is found


@dataclass(frozen=True)
class InfiniteYouProjectorConfig:
    """The resampler of `image_proj_model.bin` (the authors' `Resampler` arguments)."""

    dim: int = 1280
    depth: int = 4
    dim_head: int = 64
    heads: int = 20
    num_queries: int = 8
    embedding_dim: int = 512
    output_dim: int = 4096
    ff_mult: int = 4

    def __post_init__(self):
        for name in ("dim", "depth", "dim_head", "heads", "num_queries", "embedding_dim", "output_dim", "ff_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"InfiniteYouProjectorConfig.{name}={value!r} must be a positive integer")


class PerceiverAttention(nn.Module):
    """The latents attend to the image features and themselves (keys and values from both)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


class InfiniteYouProjector(nn.Module):
    """ArcFace embeddings `[B, N, 512]` -> InfuseNet's text tokens `[B, num_queries, 4096]`. State-dict names are
    the authors' (`latents`, `proj_in`, `layers.i.0.to_q`, `layers.i.1.1`, ...), so their file loads as it is."""

    def __init__(self, config: InfiniteYouProjectorConfig | None = None):
        super().__init__()
        self.config = c = config if config is not None else InfiniteYouProjectorConfig()
        self.latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim) / c.dim**0.5)
        self.proj_in = nn.Linear(c.embedding_dim, c.dim)
        self.proj_out = nn.Linear(c.dim, c.output_dim)
        self.norm_out = nn.LayerNorm(c.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(c.dim, c.dim_head, c.heads), feed_forward(c.dim, c.ff_mult)])
            for _ in range(c.depth)
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(embeddings)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attention, ff in self.layers:
            latents = attention(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


_LAYER = re.compile(r"layers\.(\d+)\.0\.to_q\.weight")


def config_from_state(state) -> InfiniteYouProjectorConfig:
    """The sizes from the shapes (the authors' 64-wide heads)."""
    missing = [k for k in ("latents", "proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight") if k not in state]
    if missing:
        raise ConfigError(f"not an InfiniteYou image projector: keys {missing} are missing (has {sorted(state)[:5]})")
    _, queries, dim = state["latents"].shape
    inner = state["layers.0.0.to_q.weight"].shape[0]
    return InfiniteYouProjectorConfig(
        dim=dim,
        depth=1 + max(int(m.group(1)) for key in state if (m := _LAYER.fullmatch(key))),
        heads=inner // 64,
        num_queries=queries,
        embedding_dim=state["proj_in.weight"].shape[1],
        output_dim=state["proj_out.weight"].shape[0],
        ff_mult=state["layers.0.1.1.weight"].shape[0] // dim,
    )


def read_projector_state(path: str) -> dict[str, torch.Tensor]:
    """The projector's tensors: the authors' pickle `{"image_proj": {...}}`, or a flat file (safetensors)."""
    from diffsynth.runtime.checkpoint import open_checkpoint

    if str(path).endswith((".bin", ".pt", ".pth", ".ckpt")):
        try:  # the authors' file is a plain pickle of tensors: nothing else is unpickled
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise CheckpointError(f"{path}: not a readable InfiniteYou image projector ({reason})") from None
        if isinstance(obj, dict) and isinstance(obj.get("image_proj"), dict):
            obj = obj["image_proj"]
        if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        raise ConfigError(f"{path} holds no InfiniteYou image projector (expected a dict of tensors or 'image_proj')")
    state = open_checkpoint(path)
    return {k: state[k] for k in state}


def load_projector(paths: str | Sequence[str], torch_dtype=None) -> InfiniteYouProjector:
    """The projector from its file(s), loaded strictly (a missing or unexpected key is an error naming it)."""
    from diffsynth.runtime.checkpoint import weight_files

    state: dict[str, torch.Tensor] = {}
    for path in weight_files(paths):
        state.update(read_projector_state(path))
    model = InfiniteYouProjector(config_from_state(state))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"InfiniteYou image projector {paths}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    return model.to(torch_dtype) if torch_dtype is not None else model


def is_projector_file(paths: Sequence[str]) -> bool:
    """Whether `paths` (a model's files) are an InfiniteYou image projector, told from its key names."""
    from diffsynth.runtime.checkpoint import open_checkpoint

    for path in paths:
        if str(path).endswith((".bin", ".pt", ".pth", ".ckpt")):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # not a zip pickle: not one of these files
                return False
            keys = set(obj.get("image_proj", obj)) if isinstance(obj, dict) else set()
        elif str(path).endswith(".safetensors"):
            keys = set(open_checkpoint(path))
        else:
            continue
        return {"latents", "proj_in.weight", "layers.0.0.to_q.weight", "layers.0.0.to_kv.weight"} <= keys
    return False


def check_embedding(embedding, width: int) -> torch.Tensor:
    """`infiniteyou_id_embedding` as `[1, N, width]` float32 (a `[width]`, `[N, width]` or `[1, N, width]` tensor)."""
    if not isinstance(embedding, torch.Tensor) or embedding.dim() not in (1, 2, 3) or embedding.shape[-1] != width:
        shape = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
        raise ConfigError(
            f"infiniteyou_id_embedding must be a [{width}] ArcFace embedding (or [N, {width}]), got {shape}"
        )
    if embedding.dim() == 3 and embedding.shape[0] != 1:
        raise ConfigError(
            f"infiniteyou_id_embedding is one identity: [1, N, {width}] at most, got {tuple(embedding.shape)}"
        )
    embedding = embedding.float().reshape(-1, width)[None]
    if not torch.isfinite(embedding).all():
        raise ConfigError("infiniteyou_id_embedding holds NaN or infinite values")
    return embedding


def largest_face(faces: Sequence) -> object:
    """The face whose box is largest (insightface faces: `face["bbox"]` = x0, y0, x1, y1); of equal ones the last,
    as the authors' sort picks."""
    if not len(faces):
        raise ConfigError("no face was found in infiniteyou_id_image: give a photo with a clearly visible face")
    return max(reversed(list(faces)), key=lambda f: (f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]))


def face_libraries():
    """insightface's `FaceAnalysis` and `face_align`, facexlib's `init_recognition_model` (the optional extra)."""
    try:
        from facexlib.recognition import init_recognition_model
        from insightface.app import FaceAnalysis
        from insightface.utils import face_align
    except ImportError as error:
        raise ConfigError(
            f"infiniteyou_id_image needs the authors' face models ({error.name} is missing): {INSTALL}; or pass "
            "infiniteyou_id_embedding (the 512-wide ArcFace embedding) instead"
        ) from None
    return FaceAnalysis, face_align, init_recognition_model


class FaceEncoder:
    """A face photo -> its `[512]` id embedding, the authors' way: the `detectors` (antelopev2 at 640, 320, then
    160 px: the first that finds a face) give boxes and 5 landmarks; the largest face is cut out by `align` to
    112 x 112 (insightface's `norm_crop`) and its BGR pixels in [-1, 1] go through `arcface` (facexlib's).
    Built from the real libraries by `from_insightface`; any objects of the same shape do (a detector's
    `get(bgr)` returns faces with `"bbox"` and `"kps"`)."""

    def __init__(self, detectors: Sequence, arcface, align, device: str | torch.device = "cpu"):
        self.detectors, self.arcface, self.align, self.device = list(detectors), arcface, align, device

    @classmethod
    def from_insightface(cls, root, device: str | torch.device = "cpu") -> FaceEncoder:
        """`root` holds `models/antelopev2/` (`supports/insightface` of the InfiniteYou repo; a `ModelConfig` of
        that folder is fetched here). Only the detector of antelopev2 is run (its landmarks are all the authors
        use of it); facexlib fetches its ArcFace weights on first use."""
        from diffsynth.runtime.hub import ModelConfig

        face_analysis, face_align, init_recognition_model = face_libraries()
        if isinstance(root, ModelConfig):  # a folder pattern: resolves to the folder itself
            root = root.resolve()[0]
        on_gpu = torch.device(device).type == "cuda"
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if on_gpu else ["CPUExecutionProvider"]
        detectors = []
        for size in DETECTION_SIZES:
            app = face_analysis(name="antelopev2", root=str(root), providers=providers, allowed_modules=["detection"])
            app.prepare(ctx_id=0, det_size=(size, size))
            detectors.append(app)
        arcface = init_recognition_model("arcface", device=str(device)).eval()
        return cls(detectors, arcface, face_align.norm_crop, device)

    def faces(self, bgr) -> list:
        for detector in self.detectors:
            found = detector.get(bgr)
            if len(found):
                return list(found)
        return []

    def __call__(self, image) -> torch.Tensor:
        import numpy as np

        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        face = largest_face(self.faces(bgr))
        crop = np.ascontiguousarray(self.align(bgr, landmark=np.asarray(face["kps"]), image_size=112))
        pixels = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255 * 2 - 1
        with torch.no_grad():
            return self.arcface(pixels.to(self.device))[0].float().cpu()
