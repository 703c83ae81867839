"""Step1X-Edit (`flux1/step1x_connector.py`, `step1x.py`).

- the connector and the whole model (connector -> FLUX.1 DiT without guidance) against the authors'
  `Qwen2Connector` / `Step1XEdit`, compiled from their git mirror (skipped where it is absent), on tiny sizes;
- the full-size connector keys and shapes on meta against the authors' module on meta;
- a tiny single file in the released layout (DiT keys + `connector.*`) recognised as two models, strictly loaded;
- the authors' resolution rule, quote-aware split, the preset, and the errors naming the argument.
"""

from __future__ import annotations

import math
import subprocess
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from diffsynth_step1x_test_repo import TINY_DIT
from PIL import Image

from diffsynth.flux.flux1.dit import Flux1DiT, Flux1DiTConfig
from diffsynth.flux.flux1.step1x_connector import (
    STEP1X_CONNECTOR_SPEC,
    Step1XConnector,
    Step1XConnectorConfig,
    config_from_state,
)
from diffsynth.flux.step1x import Step1XEditPipeline, quote_pieces, reference_size, step1x_velocity
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.testing.weights import random_weights

MIRROR = Path("/work/.mirror/stepfun-ai+Step1X-Edit/repo")
TINY = dict(in_channels=24, hidden_size=128, num_heads=2, depth=2, pooled_dim=16)


def _rms(x, weight, eps, *_):  # the fp32 RMSNorm Liger's kernel computes ("gemma" casting, offset 0)
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def _sdpa_bshd(q, k, v, dropout_p=0.0, causal=False, softmax_scale=None):
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def authors_modules():
    """The authors' `modules` package (attention, layers, connector_edit, model_edit) from their mirror, with stubs for the
    Liger RMSNorm kernel and the block-swapping helper their imports need."""
    if not (MIRROR / "HEAD").exists() and not (MIRROR / ".git").exists():
        pytest.skip("the Step1X-Edit git mirror is not on this machine")
    name = "step1x_authors_modules"
    if name in sys.modules:
        return sys.modules[name]
    liger = types.ModuleType("liger_kernel.ops.rms_norm")
    liger.LigerRMSNormFunction = types.SimpleNamespace(apply=_rms)
    sys.modules.setdefault("liger_kernel", types.ModuleType("liger_kernel"))
    sys.modules.setdefault("liger_kernel.ops", types.ModuleType("liger_kernel.ops"))
    sys.modules["liger_kernel.ops.rms_norm"] = liger
    library = types.ModuleType("library")
    library.custom_offloading_utils = types.ModuleType("library.custom_offloading_utils")
    sys.modules.setdefault("library", library)
    package = types.ModuleType(name)
    package.__path__ = []
    sys.modules[name] = package
    for part in ("attention", "layers", "connector_edit", "model_edit"):
        source = subprocess.run(
            ["git", "-C", str(MIRROR), "show", f"HEAD:modules/{part}.py"], capture_output=True, text=True
        )
        if source.returncode:
            pytest.skip(f"modules/{part}.py is not in the Step1X-Edit mirror")
        module = types.ModuleType(f"{name}.{part}")
        module.__package__ = name
        sys.modules[module.__name__] = module
        exec(compile(source.stdout, f"step1x:modules/{part}.py", "exec"), module.__dict__)
        if part == "attention":  # their DiT asks for flash-attn: the same attention through SDPA, [B, S, H, D]
            module.flash_attn_func = _sdpa_bshd
        if part == "layers":  # run their RoPE eagerly (it is wrapped in torch.compile)
            module.apply_rope = getattr(module.apply_rope, "_torchdynamo_orig_callable", module.apply_rope)
        setattr(package, part, module)
    return package


def _inputs(seed=0, batch=2, length=7, width=24):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, width, generator=g)
    mask = torch.zeros(batch, length, dtype=torch.long)
    mask[0, :5] = 1
    mask[1, :3] = 1
    states = states * mask[..., None]  # zero past each prompt's end, as the text encoder path pads them
    return states, mask


def test_connector_matches_the_authors():
    ref_mod = authors_modules().connector_edit
    torch.manual_seed(0)
    ref = ref_mod.Qwen2Connector(in_channels=24, hidden_size=128, heads_num=2, depth=2, dtype=torch.float32)
    ref.global_proj_out = torch.nn.Linear(24, 16)  # the authors fix 768; tiny here
    random_weights(ref, 3)
    ours = Step1XConnector(Step1XConnectorConfig(**TINY))
    ours.load_state_dict(ref.state_dict(), strict=True)
    states, mask = _inputs()
    t = torch.tensor([0.7, 0.7])
    txt_ref, y_ref = ref(states, t, mask)
    txt, y = ours(states, t, mask)
    print(f"Step1X connector vs the authors': txt {(txt - txt_ref).abs().max():.1e}, y {(y - y_ref).abs().max():.1e}")
    assert (txt - txt_ref).abs().max().item() < 1e-5
    assert (y - y_ref).abs().max().item() < 1e-5
    # padded tokens take part in the DiT's attention: they must match too, and differ from the real ones' path
    assert txt[1, 3:].abs().sum() > 0


def test_full_size_connector_keys_and_shapes_match_the_authors():
    ref_mod = authors_modules().connector_edit
    with torch.device("meta"):
        ref = ref_mod.Qwen2Connector()
        ours = Step1XConnector()
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs
    assert config_from_state({k: v for k, v in ours.state_dict().items()}) == Step1XConnectorConfig()


def test_full_size_layout_without_mirror():
    with torch.device("meta"):
        ours = Step1XConnector()
    state = ours.state_dict()
    assert tuple(state["S.input_embedder.weight"].shape) == (4096, 3584)
    assert tuple(state["S.individual_token_refiner.blocks.1.self_attn_qkv.weight"].shape) == (12288, 4096)
    assert tuple(state["S.individual_token_refiner.blocks.1.mlp.fc1.weight"].shape) == (16384, 4096)
    assert tuple(state["global_proj_out.weight"].shape) == (768, 3584)
    assert tuple(state["scale_factor"].shape) == (1,)
    assert len(state) == 10 + 2 * 14 + 3  # S: 5 embedding layers; 2 blocks of 7 layers (weight + bias); proj, scale


def _tiny_models(seed=1):
    dit = random_weights(Flux1DiT(Flux1DiTConfig(**TINY_DIT)), seed).eval()
    connector = random_weights(Step1XConnector(Step1XConnectorConfig(**TINY)), seed + 1).eval()
    return dit, connector


def test_model_call_matches_the_authors_step1x_edit():
    mods = authors_modules()
    dit, connector = _tiny_models()
    params = mods.model_edit.Step1XParams(
        in_channels=64, out_channels=64, vec_in_dim=16, context_in_dim=128, hidden_size=256, mlp_ratio=4.0,
        num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[16, 56, 56], theta=10_000, qkv_bias=True,
    )  # fmt: skip
    original = mods.model_edit.Qwen2Connector
    mods.model_edit.Qwen2Connector = partial(
        original, in_channels=24, hidden_size=128, heads_num=2, depth=2, dtype=torch.float32
    )
    try:
        ref = mods.model_edit.Step1XEdit(params).float()
    finally:
        mods.model_edit.Qwen2Connector = original
    ref.connector.global_proj_out = torch.nn.Linear(24, 16)
    state = {**dit.state_dict(), **{f"connector.{k}": v for k, v in connector.state_dict().items()}}
    ref.load_state_dict(state, strict=True)
    g = torch.Generator().manual_seed(5)
    h, w = 4, 6  # latent size / 2 (packed grid)
    x = torch.randn(2, h * w, 64, generator=g)
    reference = torch.randn(1, h * w, 64, generator=g)
    states, mask = _inputs(seed=6)
    from diffsynth.flux.pipeline import latent_ids

    ids = latent_ids(2 * h, 2 * w)
    sigma = 0.8
    ours = step1x_velocity(dit, connector, x, reference, ids, states, mask, sigma)
    t = torch.full((2,), sigma)
    img = torch.cat([x, reference.expand(2, -1, -1)], dim=1)
    theirs = ref(
        img=img, img_ids=torch.cat([ids, ids])[None].expand(2, -1, -1), txt_ids=torch.zeros(2, 7, 3),
        timesteps=t, llm_embedding=states, t_vec=t, mask=mask,
    )[:, : h * w]  # fmt: skip
    assert ours.shape == (2, h * w, 64)
    print(f"Step1X model call vs the authors' Step1XEdit: {(ours - theirs).abs().max():.1e}")
    assert (ours - theirs).abs().max().item() < 1e-4


def test_single_file_loads_strictly_into_dit_and_connector(tmp_path):
    from safetensors.torch import save_file

    from diffsynth.flux.formats import FAMILY
    from diffsynth.runtime.loading import load_models

    dit, connector = _tiny_models()
    state = {**dit.state_dict(), **{f"connector.{k}": v for k, v in connector.state_dict().items()}}
    path = tmp_path / "step1x-edit-i1258.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = {m.role: m for m in load_models([str(path)], torch_dtype=torch.float32, specs=FAMILY.specs)}
    assert set(loaded) == {"dit", "step1x_connector"}
    assert loaded["dit"].config.guidance_embed is False
    assert loaded["step1x_connector"].config == Step1XConnectorConfig(**{**TINY, "num_heads": 1})  # 128-wide heads
    for role, model in (("dit", dit), ("step1x_connector", connector)):
        got = loaded[role].module.state_dict()
        assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    # a connector key missing: the file is not silently half-loaded
    del state["connector.S.individual_token_refiner.blocks.1.mlp.fc2.bias"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(Exception, match="fc2.bias"):
        load_models([str(path)], torch_dtype=torch.float32, specs=FAMILY.specs)
    assert STEP1X_CONNECTOR_SPEC.role == "step1x_connector"


def test_reference_size_follows_the_authors_rule():
    assert reference_size(1024, 1024) == (512, 512)
    assert reference_size(832, 1248) == (416, 624)  # ceil(sqrt(512^2 / 1.5)) = 419 -> 416; 419 * 2/3 -> 624
    w, h = reference_size(1920, 1080)
    assert (w % 16, h % 16) == (0, 0) and w > h and abs(w * h - 512 * 512) < 0.1 * 512 * 512


def test_quotes_are_split_per_character_past_the_template_head():
    head = "x" * 200
    assert quote_pieces(head + 'write "ab" now') == [head + 'write "', "\u201ca\u201d", "\u201cb\u201d", '" now']
    early = 'say "hi" ' + "y" * 200
    assert quote_pieces(early) == [early]  # quotes before character 155 are left as they are
    assert quote_pieces(head + "don't") == [head + 'don"', "\u201ct\u201d"]  # apostrophes count as quotes


def test_preset_and_errors():
    from diffsynth.flux.presets import PRESETS

    preset = PRESETS["stepfun-ai/Step1X-Edit"]
    assert preset.pipeline_class() is Step1XEditPipeline
    assert preset.defaults["cfg_scale"] == 6.0 and preset.defaults["num_inference_steps"] == 28
    assert {f.origin_file_pattern for f in preset.files} >= {"step1x-edit-i1258.safetensors", "vae.safetensors"}
    pipe = Step1XEditPipeline(device="cpu", torch_dtype=torch.float32)
    with pytest.raises(ConfigError, match="reference_image"):
        pipe("make it red")
    assert pipe.cli_options({"input_image": "a.png"}) == {"reference_image": "a.png"}
    with pytest.raises(ValueError, match="mask"):
        Step1XConnector(Step1XConnectorConfig(**TINY))(torch.zeros(1, 3, 24), 0.5, torch.zeros(1, 3))
    with pytest.raises(ConfigError, match="num_heads"):
        Step1XConnectorConfig(hidden_size=30, num_heads=4)


# ------------------------------------------------------------------ the text encoder path and the pipeline
@pytest.fixture(scope="module")
def step1x_pipe(step1x_base):
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(step1x_base))
    mp.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    try:
        yield Step1XEditPipeline.from_pretrained("stepfun-ai/Step1X-Edit", torch_dtype="float32", device="cpu")
    finally:
        mp.undo()


def _photo(width=80, height=48, seed=0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_the_v1p1_preset_loads_its_file_like_v1p0(step1x_base, tmp_path, monkeypatch):
    """`stepfun-ai/Step1X-Edit:v1.1` takes the repo's `step1x-edit-v1p1-official.safetensors` (the same architecture
    and code as v1.0, the authors' `--version v1.1`) with the same VAE, encoder and settings."""
    import shutil

    from diffsynth.flux.presets import PRESETS

    base = tmp_path / "models"
    shutil.copytree(step1x_base, base)
    repo = base / "stepfun-ai" / "Step1X-Edit"
    (repo / "step1x-edit-i1258.safetensors").rename(repo / "step1x-edit-v1p1-official.safetensors")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    pipe = Step1XEditPipeline.from_pretrained("stepfun-ai/Step1X-Edit:v1.1", torch_dtype="float32", device="cpu")
    assert pipe.step1x_connector is not None and pipe.dit.config.guidance_embed is False
    v10, v11 = PRESETS["stepfun-ai/Step1X-Edit"], PRESETS["stepfun-ai/Step1X-Edit:v1.1"]
    assert v11.defaults == v10.defaults and v11.training == v10.training and v11.files[1:] == v10.files[1:]


def test_vision_size_is_qwens_resize_rule():
    """`vision_size` equals transformers' Qwen2-VL `smart_resize` over many sizes and limits; the authors' two
    resizes (qwen_vl_utils' wide limits, then the processor's) can end elsewhere than one resize."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from diffsynth.flux.step1x import FETCH_MAX_PIXELS, FETCH_MIN_PIXELS, MAX_PIXELS, MIN_PIXELS, vision_size

    for width in (33, 64, 300, 416, 512, 777, 1920):
        for height in (40, 97, 512, 624, 1080):
            for lo, hi in ((MIN_PIXELS, MAX_PIXELS), (FETCH_MIN_PIXELS, FETCH_MAX_PIXELS)):
                h, w = smart_resize(height, width, factor=28, min_pixels=lo, max_pixels=hi)
                assert vision_size(width, height, lo, hi) == (w, h), (width, height, lo, hi)
    once = vision_size(416, 624, MIN_PIXELS, MAX_PIXELS)
    twice = vision_size(*vision_size(416, 624, FETCH_MIN_PIXELS, FETCH_MAX_PIXELS), MIN_PIXELS, MAX_PIXELS)
    assert once == (392, 616) and twice == (392, 588)


def test_chat_text_is_the_qwen25vl_template(step1x_base):
    """Our chat text equals the Instruct repo's template rendered by transformers for the authors' message (the
    prefix, one image with `add_vision_id`, the instruction; the generation prompt)."""
    from transformers import AutoTokenizer

    from diffsynth.flux.step1x import PREFIX, chat_text

    tokenizer = AutoTokenizer.from_pretrained(str(step1x_base / "Qwen" / "Qwen2.5-VL-7B-Instruct"))
    message = [
        {
            "role": "user",
            "content": [{"type": "text", "text": PREFIX}, {"type": "image"}, {"type": "text", "text": "make it red"}],
        }
    ]
    rendered = tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    assert chat_text("make it red") == rendered


def _schedule(steps: int, seq_len: int) -> list[float]:
    """The authors' `sampling.get_schedule` (shifted): linspace(1, 0) moved by mu, linear in the token count."""
    slope = (1.15 - 0.5) / (4096 - 256)
    mu = slope * seq_len + 0.5 - slope * 256
    t = torch.linspace(1, 0, steps + 1).tolist()
    return [1.0] + [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in t[1:-1]] + [0.0]


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_pipeline_is_the_authors_loop(step1x_pipe, cfg_scale):
    """The preset's pipeline on a tiny hub layout, against the authors' `generate_image` written out from our
    proven parts: the reference at `size_level`^2 pixels (multiples of 16), its VAE latent beside the noisy
    tokens at the same positions, the instruction (and the negative prompt) through Qwen2.5-VL (217 tokens
    dropped, 640 kept), Euler steps on their shifted schedule, `uncond + cfg * (cond - uncond)`; the result is
    returned at the reference's own size."""
    from diffsynth.flux.pipeline import latent_ids, pack_latents, unpack_latents
    from diffsynth.flux.step1x import encode_instructions
    from diffsynth.runtime.media import pil_to_tensor, tensor_to_output

    pipe, photo, steps = step1x_pipe, _photo(), 2
    width, height = reference_size(*photo.size, 64)
    assert (width, height) == (80, 48)  # 64^2 pixels at 5:3, multiples of 16
    noise = torch.randn(1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(3))
    run = dict(size_level=64, num_inference_steps=steps, cfg_scale=cfg_scale, latents=noise, progress_bar=False)
    got = pipe("make the sky red", reference_image=photo, negative_prompt="blurry", output_type="pt", **run)

    with torch.no_grad():
        image = photo.resize((width, height), Image.BICUBIC)
        prompts = ["make the sky red", "blurry"] if cfg_scale != 1 else ["make the sky red"]
        states, mask = encode_instructions(pipe.text_encoder, pipe.processor, prompts, image)
        assert mask.shape == (len(prompts), 640) and 0 < int(mask[0].sum()) < 640
        reference = pack_latents(pipe.vae.encode(pil_to_tensor([image], dtype=torch.float32)))
        ids = latent_ids(height // 8, width // 8)
        x = pack_latents(noise)
        schedule = _schedule(steps, x.shape[1])
        for t_curr, t_prev in zip(schedule[:-1], schedule[1:], strict=True):
            pred = step1x_velocity(
                pipe.dit, pipe.step1x_connector, x.expand(len(prompts), -1, -1), reference, ids, states, mask, t_curr
            )
            if cfg_scale != 1:
                pred = pred[1:] + cfg_scale * (pred[:1] - pred[1:])
            x = x + (t_prev - t_curr) * pred
        want = tensor_to_output(pipe.vae.decode(unpack_latents(x, height // 8, width // 8)), "pt")
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5
    out = pipe("make the sky red", reference_image=photo, **{**run, "latents": noise})
    assert out.size == photo.size


def test_every_output_type_is_at_the_reference_size(step1x_pipe):
    """A reference of another size than the generated one (100x60 -> 80x48 at size 64) comes back at its own size
    as pil, np and pt alike, with the same pixels."""
    import numpy as np

    photo = _photo(100, 60)
    run = dict(seed=1, size_level=64, num_inference_steps=1, cfg_scale=1.0, progress_bar=False)
    image = step1x_pipe("make it red", reference_image=photo, **run)
    array = step1x_pipe("make it red", reference_image=photo, output_type="np", **run)
    tensor = step1x_pipe("make it red", reference_image=photo, output_type="pt", **run)
    assert image.size == photo.size
    assert array.shape == (1, 60, 100, 3) and tuple(tensor.shape) == (1, 3, 60, 100)
    want = np.asarray(image, dtype=np.float32) / 255.0
    assert np.array_equal(array[0], want) and np.array_equal(tensor[0].permute(1, 2, 0).numpy(), want)


def test_quoted_text_is_tokenised_per_character(step1x_pipe):
    """Past the template's head, a quoted word's characters are tokenised one by one, without the curly quotes
    the authors wrap them in (their rule for text rendering): the text stays the same, its ids do not."""
    processor, photo = step1x_pipe.processor, _photo()
    assert processor.quote_ids == tuple(processor.token_ids(q)[0] for q in ("\u201c", "\u201d"))
    ids = processor('write "OK" on the sign', photo)["input_ids"][0].tolist()
    start = ids.index(processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")) + 1
    assert processor.tokenizer.decode(ids[start:]) == 'write "OK" on the sign<|im_end|>\n<|im_start|>assistant\n'
    assert processor.token_ids("OK") != processor.token_ids("O") + processor.token_ids("K")  # "OK" is one token
    quoted = processor.token_ids('write "')
    assert ids[start + len(quoted) : start + len(quoted) + 2] == processor.token_ids("O") + processor.token_ids("K")
    plain = processor("write OK on the sign", photo)["input_ids"][0].tolist()
    assert ids[:start] == plain[:start]  # the template head and the image's tokens are the plain ones


def test_cli_edits_the_input_image(step1x_base, step1x_pipe, tmp_path, monkeypatch):
    """`diffsynth generate --model stepfun-ai/Step1X-Edit --input-image --size-level` gives the pipeline's image."""
    from diffsynth.runtime.cli import main

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(step1x_base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    _photo(seed=4).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    args = ["generate", "--model", "stepfun-ai/Step1X-Edit", "--prompt", "make it red", "--seed", "2"]
    args += ["--input-image", str(tmp_path / "in.png"), "--output", str(out), "--steps", "1", "--size-level", "48"]
    assert main([*args, "--cfg", "1", "--device", "cpu", "--dtype", "float32"]) == 0
    want = step1x_pipe(
        "make it red", reference_image=str(tmp_path / "in.png"), seed=2, num_inference_steps=1, cfg_scale=1.0,
        size_level=48, progress_bar=False,
    )  # fmt: skip
    with Image.open(out) as written:
        assert written.size == want.size
        assert np.array_equal(np.asarray(written), np.asarray(want))


class _AuthorsProcessor:
    """What the authors' embedder asks of transformers' Qwen2.5-VL processor: the chat template, and
    `(text, images)` -> ids with each `<|image_pad|>` repeated once per merged patch group, plus the pixels.
    (transformers' own processor wants torchvision for its video half.)"""

    def __init__(self, image_processor, tokenizer):
        self.image_processor, self.tokenizer = image_processor, tokenizer

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def __call__(self, text, images=None, videos=None, padding=True, return_tensors="pt"):
        from transformers import BatchFeature

        text = text[0] if isinstance(text, list) else text
        out = {}
        if images:
            out = dict(self.image_processor(images=images, return_tensors="pt"))
            count = int(out["image_grid_thw"][0].prod()) // self.image_processor.merge_size**2
            text = text.replace("<|image_pad|>", "<|image_pad|>" * count)
        out["input_ids"] = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        return BatchFeature(out)


@pytest.mark.parity
def test_instruction_states_match_the_authors_embedder(step1x_pipe):
    """`encode_instructions` against the authors' `Qwen25VL_7b_Embedder.forward` (from their mirror, on CPU and
    float32, with qwen_vl_utils for the image; both absent in CI, where this skips): the same ids (chat template,
    image tokens after their two resizes, per-character quoted text), states after 217 dropped tokens and the
    mask, on a square and a tall reference."""
    if not (MIRROR / "HEAD").exists() and not (MIRROR / ".git").exists():
        pytest.skip("the Step1X-Edit git mirror is not on this machine")
    stubs = {name: types.ModuleType(name) for name in ("torchvision", "torchvision.io", "torchvision.transforms")}
    stubs["torchvision.transforms"].InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    stubs["torchvision.transforms"].ToPILImage = lambda: _to_pil
    stubs["torchvision"].io, stubs["torchvision"].transforms = stubs["torchvision.io"], stubs["torchvision.transforms"]
    stubs["torchvision"].__version__ = "0.0"
    with pytest.MonkeyPatch.context() as mp:
        for name, module in stubs.items():
            mp.setitem(sys.modules, name, module)
        pytest.importorskip("qwen_vl_utils")
        source = subprocess.run(
            ["git", "-C", str(MIRROR), "show", "HEAD:modules/conditioner.py"], capture_output=True, text=True
        ).stdout
        source = source.replace("torch.cuda.current_device()", '"cpu"').replace('"cuda"', '"cpu"')
        # Qwen2.5's ids of `<|vision_end|>` and the curly quotes, in their code: the tiny vocabulary's here
        for qwen_id, name in (("151653", "VISION_END_ID"), ("== 2073", "== QUOTE_OPEN"), ("== 854", "== QUOTE_CLOSE")):
            assert qwen_id in source
            source = source.replace(qwen_id, name)
        processor = step1x_pipe.processor
        vision_end = processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
        namespace = {"__name__": "step1x_authors_conditioner", "VISION_END_ID": vision_end}
        namespace["QUOTE_OPEN"], namespace["QUOTE_CLOSE"] = processor.quote_ids
        exec(compile(source.replace("torch.bfloat16", "torch.float32"), "step1x:conditioner.py", "exec"), namespace)
    from diffsynth.flux.step1x import MAX_PIXELS, MIN_PIXELS, encode_instructions

    pipe = step1x_pipe
    embedder = namespace["Qwen25VL_7b_Embedder"].__new__(namespace["Qwen25VL_7b_Embedder"])
    torch.nn.Module.__init__(embedder)
    embedder.max_length, embedder.prefix = 640, namespace["Qwen25VL_7b_PREFIX"]
    image_processor = type(pipe.processor.image_processor)(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    embedder.processor = _AuthorsProcessor(image_processor, pipe.processor.tokenizer)

    class Model:  # the causal LM's call as they make it; our encoder's states are transformers' (Qwen-Image tests)
        config = pipe.text_encoder.config.text_config

        def __call__(self, input_ids, attention_mask, pixel_values, image_grid_thw, output_hidden_states):
            assert output_hidden_states
            seen.append(input_ids)
            last = pipe.text_encoder.last_hidden_state(
                input_ids, attention_mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw
            )
            return {"hidden_states": [None, last]}

    embedder.model = Model()
    prompts = ['write "OK" on the sign', "make the sky red"]
    for size in ((64, 64), (416, 624)):
        seen = []
        image = _photo(*size, seed=7)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
        with torch.no_grad():
            theirs, their_mask = embedder(prompts, [pixels, pixels])
            ours, mask = encode_instructions(pipe.text_encoder, pipe.processor, prompts, image)
        for prompt, their_ids in zip(prompts, seen, strict=True):
            assert pipe.processor(prompt, image)["input_ids"].tolist() == their_ids.tolist(), (size, prompt)
        assert torch.equal(mask, their_mask)
        difference = (ours - theirs).abs().max().item()
        print(f"Step1X instruction states {size}: {int(mask[0].sum())} tokens, max abs {difference:.1e}")
        assert difference < 1e-5


def _to_pil(tensor):
    from PIL import Image

    return Image.fromarray(tensor.mul(255).byte().permute(1, 2, 0).numpy())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 64}, "give both height and width"),
        ({"size_level": 8}, "size_level=8 is not accepted"),
        ({"negative_prompt": 3}, "negative_prompt must be a string"),
        ({"output_type": "latent"}, "output_type='latent'"),
        ({"prompt": "  "}, "prompt must be a non-empty string"),
        ({"cfg_scale": float("nan")}, "cfg_scale=nan must be a finite number"),  # else an all-NaN image
        ({"cfg_scale": float("inf")}, "cfg_scale=inf must be a finite number"),
        ({"cfg_scale": "6"}, "cfg_scale='6' must be a finite number"),
    ],
)
def test_bad_calls_name_the_argument(step1x_pipe, kwargs, message):
    call = {"prompt": "make it red", "reference_image": _photo(), "num_inference_steps": 1, **kwargs}
    with pytest.raises(ConfigError, match=message):
        step1x_pipe(**call)
