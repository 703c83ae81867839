"""FLUX.1 Fill and Canny / Depth training: the condition concatenated to the noisy tokens is encoded as the
pipeline encodes it, the task's velocity is the pipeline's per-step call, and the trainer trains a LoRA on them
(also over FLUX.1-dev with a control LoRA fused by `--preset_lora_path`).

The Fill (384 inputs) and Canny/Depth (128) repos are conftest's tiny FLUX.1 repo with a wider DiT
(`flux1_tools_repo.py`) and a `diffsynth.json` setting 32 T5 tokens, which the pipeline and the task both read.
diffusers is not imported here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffsynth_flux_test_helpers import random_image
from PIL import Image
from safetensors.torch import load_file, save_file

from diffsynth.flux.flux1.channels import CONTROL, FILL
from diffsynth.flux.flux1.text_encoder import FluxPromptEmbeds
from diffsynth.flux.pipeline import FluxImagePipeline
from diffsynth.flux.training import FluxTrainingTask
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.media import pil_to_tensor, tensor_to_pil
from diffsynth.runtime.pipeline import configs_from_folder
from diffsynth.runtime.testing.modules import load_beside

tools = load_beside(__file__, "flux1_tools_repo.py", "diffsynth_flux1_tools_repo")
pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle on a blue background", "a small green square in the top left corner"]
T5_TOKENS = 32
SIZE = 64


def with_short_prompts(repo: Path) -> Path:
    (repo / "diffsynth.json").write_text(json.dumps({"defaults": {"t5_sequence_length": T5_TOKENS}}))
    return repo


@pytest.fixture(scope="module")
def fill_repo(tiny_repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("fill-train") / "repo"
    return with_short_prompts(tools.tools_repo(tiny_repo, root, tools.FILL_CHANNELS, seed=5))


@pytest.fixture(scope="module")
def control_repo(tiny_repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("canny-train") / "repo"
    return with_short_prompts(tools.tools_repo(tiny_repo, root, tools.CONTROL_CHANNELS, seed=6))


@pytest.fixture(scope="module")
def dev_repo(tiny_repo, tmp_path_factory):
    """The plain tiny FLUX.1 repo at 32 T5 tokens (the base a control LoRA widens)."""
    return with_short_prompts(shutil.copytree(tiny_repo, tmp_path_factory.mktemp("dev-train") / "repo"))


def load_task(repo, **kwargs) -> FluxTrainingTask:
    configs, tokenizer = configs_from_folder(repo)
    return FluxTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", **kwargs
    )


def load_pipe(repo) -> FluxImagePipeline:
    return FluxImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def fill_task(fill_repo):
    return load_task(fill_repo)


@pytest.fixture(scope="module")
def fill_pipe(fill_repo):
    return load_pipe(fill_repo)


@pytest.fixture(scope="module")
def control_task(control_repo):
    return load_task(control_repo)


@pytest.fixture(scope="module")
def control_pipe(control_repo):
    return load_pipe(control_repo)


def mask_picture(width: int, height: int, seed: int) -> Image.Image:
    """A blocky mask (white = repaint) with soft values too, so the 0.5 binarisation matters."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 8, width // 8), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((8, 8), dtype=np.uint8)), mode="L")


def tensor(picture: Image.Image) -> torch.Tensor:
    """A picture as the dataset reads it: RGB [3, H, W] in [-1, 1]."""
    return pil_to_tensor(picture.convert("RGB"))[0]


def fill_rows(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "prompt": prompt,
            "image": torch.rand(3, SIZE, SIZE, generator=g) * 2 - 1,
            "flux_fill_image": tensor(random_image(SIZE, SIZE, seed=seed + 10 + i)),
            "flux_fill_mask": tensor(mask_picture(SIZE, SIZE, seed=seed + 20 + i)),
        }
        for i, prompt in enumerate(PROMPTS)
    ]


def control_rows(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "prompt": prompt,
            "image": torch.rand(3, SIZE, SIZE, generator=g) * 2 - 1,
            "control_image": tensor(random_image(SIZE, SIZE, seed=seed + 30 + i)),
        }
        for i, prompt in enumerate(PROMPTS)
    ]


def pipeline_condition(pipe, row, height=SIZE, width=SIZE) -> torch.Tensor:
    """What the pipeline concatenates for one prompt given the row's pictures as PIL (its own argument checks)."""
    columns = ("flux_fill_image", "flux_fill_mask", "control_image")
    as_pil = {k: tensor_to_pil(v)[0] for k, v in row.items() if k in columns}
    if "flux_fill_mask" in as_pil:
        as_pil["flux_fill_mask"] = as_pil["flux_fill_mask"].convert("L")
    inputs = pipe.check_channel_inputs(
        as_pil.get("flux_fill_image"), as_pil.get("flux_fill_mask"), as_pil.get("control_image"), None
    )
    return pipe.encode_channel_condition(inputs, 1, height, width)


# ------------------------------------------------------------------ which model
def test_the_task_knows_which_condition_its_dit_takes(fill_task, control_task, fill_repo, tiny_repo):
    assert fill_task.channel_kind == FILL and fill_task.validation_references == "required"
    assert control_task.channel_kind == CONTROL and control_task.validation_references == "required"
    # the encoding stage of a cached run loads no DiT: its files' header says the same
    encoder_side = load_task(fill_repo, denoiser=False)
    assert encoder_side.pipe.dit is None and encoder_side.channel_kind == FILL
    plain = load_task(tiny_repo, encoders=False)
    assert plain.channel_kind is None and plain.validation_references == "optional"


# ------------------------------------------------------------------ encodings and the model call
def test_fill_rows_are_encoded_as_the_pipeline_encodes_them(fill_task, fill_pipe):
    rows = fill_rows()
    samples = fill_task.encode(rows)
    for row, sample in zip(rows, samples, strict=True):
        assert sample["condition"].shape == ((SIZE // 16) ** 2, 320) and sample["condition"].dtype == torch.float32
        assert torch.equal(sample["condition"], pipeline_condition(fill_pipe, row)[0])
    # PIL pictures work too, at another size (resized to the target's, as the pipeline resizes them)
    picture, mask = random_image(48, 80, seed=3), mask_picture(48, 80, seed=4)
    row = {"prompt": PROMPTS[0], "image": rows[0]["image"], "flux_fill_image": picture, "flux_fill_mask": mask}
    expected = fill_pipe.encode_channel_condition(fill_pipe.check_channel_inputs(picture, mask, None, None), 1, 64, 64)
    assert torch.equal(fill_task.encode([row])[0]["condition"], expected[0])


def test_control_rows_are_encoded_as_the_pipeline_encodes_them(control_task, control_pipe):
    rows = control_rows()
    samples = control_task.encode(rows)
    for row, sample in zip(rows, samples, strict=True):
        assert sample["condition"].shape == ((SIZE // 16) ** 2, 64)
        assert torch.equal(sample["condition"], pipeline_condition(control_pipe, row)[0])
    assert set(samples[0]) == {"latents", "t5", "pooled", "condition"}


@pytest.mark.parametrize("kind", [FILL, CONTROL])
def test_velocity_is_the_pipeline_per_step_call_with_the_condition(kind, request):
    """Each row with its own condition: bit-equal to the pipeline's `predict` (its denoise loop's call) at embedded
    guidance 1 on the same noisy latents; another condition gives another prediction."""
    task = request.getfixturevalue(f"{kind}_task")
    pipe = request.getfixturevalue(f"{kind}_pipe")
    make_rows = fill_rows if kind == FILL else control_rows
    rows = make_rows()
    batch = task.collate(task.encode(rows))
    noisy = torch.randn(2, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.75, 0.3])
    text = pipe.encode_prompt(PROMPTS, T5_TOKENS)
    condition = torch.cat([pipeline_condition(pipe, row) for row in rows])
    with torch.no_grad():
        ours = task.velocity(task.models["dit"], batch, noisy, sigma)
        assert torch.equal(ours, pipe.predict(noisy, sigma, text, None, 1.0, 1.0, condition=condition))
        for i in range(2):  # and one prompt at a time, as a one-prompt call's loop
            prompt = FluxPromptEmbeds(text.t5[i : i + 1], text.pooled[i : i + 1])
            theirs = pipe.predict(noisy[i : i + 1], sigma[i], prompt, None, 1.0, 1.0, condition=condition[i : i + 1])
            torch.testing.assert_close(ours[i : i + 1], theirs, rtol=0, atol=1e-5)
        other = task.collate(task.encode(make_rows(seed=7)))
        other["latents"], other["t5"], other["pooled"] = batch["latents"], batch["t5"], batch["pooled"]
        assert not torch.allclose(task.velocity(task.models["dit"], other, noisy, sigma), ours, atol=1e-4)
    assert ours.shape == (2, 16, SIZE // 8, SIZE // 8) and ours.dtype == torch.float32


def test_clear_errors(fill_task, control_task, tiny_repo, fill_repo, tmp_path):
    rows = fill_rows()
    del rows[1]["flux_fill_mask"]
    with pytest.raises(ConfigError, match=r"row 1 of the batch .* has no flux_fill_mask: a FLUX.1 Fill model"):
        fill_task.encode(rows)
    with pytest.raises(ConfigError, match="has no control_image.*--data_file_keys image,control_image"):
        control_task.encode([{k: v for k, v in control_rows()[0].items() if k != "control_image"}])
    with pytest.raises(ConfigError, match="has no flux_fill_image and no flux_fill_mask"):
        fill_task.encode(control_rows())
    unread = {**fill_rows()[0], "flux_fill_image": "fill/0.png"}  # a column the dataset did not read as a file
    with pytest.raises(ConfigError, match="flux_fill_image is the path 'fill/0.png'.*add flux_fill_image to "):
        fill_task.encode([unread])
    both = {**fill_rows()[0], "control_image": control_rows()[0]["control_image"]}
    with pytest.raises(ConfigError, match="both flux_fill_image / flux_fill_mask and control_image"):
        fill_task.encode([both])
    # a plain FLUX.1 DiT: Fill rows are refused; control rows are encoded (a control LoRA may widen it when the
    # trainer fuses --preset_lora_path) and the model call refuses them while the DiT takes none
    plain = load_task(tiny_repo)
    with pytest.raises(ConfigError, match="need a FLUX.1 Fill DiT .*plain FLUX.1 DiT \\(in_channels 64"):
        plain.encode(fill_rows())
    batch = plain.collate(plain.encode(control_rows()))
    noisy, sigma = torch.zeros(2, 16, 8, 8), torch.tensor([0.5, 0.5])
    with pytest.raises(ConfigError, match="has control_image, which a plain FLUX.1 DiT .*--preset_lora_path"):
        plain.velocity(plain.models["dit"], batch, noisy, sigma)
    with pytest.raises(ConfigError, match="Fill DiT \\(in_channels 384.*need flux_fill_image \\+ flux_fill_mask"):
        fill_task.velocity(fill_task.models["dit"], plain.collate(plain.encode(plain_rows())), noisy, sigma)
    # with no DiT to ask, the rows decide, and a batch must agree
    encoders = [c for c in configs_from_folder(fill_repo)[0] if "transformer" not in str(c.path)]
    blind = FluxTrainingTask.from_pretrained(encoders, torch_dtype="float32", device="cpu", denoiser=False)
    assert blind.channel_kind is None and blind.dit_config is None
    samples = blind.encode(fill_rows()[:1]) + blind.encode(plain_rows()[:1])
    with pytest.raises(ConfigError, match="mixes 1 rows with a Fill / Canny / Depth condition and 1 without"):
        blind.collate(samples)
    # validation references: the counts each model takes
    with pytest.raises(ConfigError, match="two images, the image to fill and its mask"):
        fill_task.reference_arguments([random_image(32, 32)])
    with pytest.raises(ConfigError, match="one image, the control map"):
        control_task.reference_arguments([])
    # a DiT of another input width
    odd = tools.tools_repo(tiny_repo, tmp_path / "odd", 100, seed=1)
    with pytest.raises(ConfigError, match="in_channels 100.*neither FLUX.1's"):
        load_task(odd, encoders=False)


def plain_rows() -> list[dict]:
    return [{k: v for k, v in row.items() if k != "control_image"} for row in control_rows()]


# ------------------------------------------------------------------ validation samples
@pytest.mark.parametrize("kind", [FILL, CONTROL])
def test_validation_samples_are_the_pipeline_with_the_same_condition(kind, request):
    """`sample` (the trainer's --validation_images) passes the Fill image and mask, or the control map, to the
    pipeline, which draws what it draws from the same inputs, seed and size (the pipeline's own defaults)."""
    task = request.getfixturevalue(f"{kind}_task")
    pipe = request.getfixturevalue(f"{kind}_pipe")
    size = {"height": 32, "width": 32, "num_inference_steps": 2}
    if kind == FILL:
        references = [[random_image(32, 32, seed=1), mask_picture(32, 32, seed=2).convert("RGB")]]
        arguments = {"flux_fill_image": references[0][0], "flux_fill_mask": references[0][1]}
    else:
        references = [[random_image(32, 32, seed=3)]]
        arguments = {"control_image": references[0][0]}
    with torch.no_grad():
        ours = task.sample(task.models["dit"], PROMPTS[:1], seed=3, references=references, **size)[0]
        theirs = pipe(PROMPTS[0], seed=3, progress_bar=False, **arguments, **size)
    assert ours.size == (32, 32)
    assert np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int)).max() <= 1


# ------------------------------------------------------------------ the trainer
def write_dataset(folder: Path, kind: str) -> Path:
    """Two 64x64 noise pictures with their Fill image + mask, or control map, as files beside them."""
    testing = pytest.importorskip("diffsynth.training.testing")
    folder.mkdir(parents=True, exist_ok=True)
    extra = []
    for i in range(len(PROMPTS)):
        if kind == FILL:
            random_image(SIZE, SIZE, seed=40 + i).save(folder / f"fill{i}.png")
            mask_picture(SIZE, SIZE, seed=50 + i).save(folder / f"mask{i}.png")
            extra.append({"flux_fill_image": f"fill{i}.png", "flux_fill_mask": f"mask{i}.png"})
        else:
            random_image(SIZE, SIZE, seed=60 + i).save(folder / f"edges{i}.png")
            extra.append({"control_image": f"edges{i}.png"})
    return testing.write_caption_dataset(folder, PROMPTS, extra=extra)


FILE_KEYS = {FILL: "image,flux_fill_image,flux_fill_mask", CONTROL: "image,control_image"}


def lora_targets():
    from diffsynth.flux.flux1.dit import Flux1DiT

    return ",".join([*Flux1DiT.lora_target_modules, "img_in"])  # img_in: the condition's columns learn too


@pytest.mark.integration
@pytest.mark.parametrize("kind", [FILL, CONTROL])
def test_lora_training_changes_only_the_lora_and_writes_a_file_the_pipeline_loads(kind, request, tmp_path):
    """Through the trainer's API: two steps on dataset rows read with --data_file_keys change the LoRA weights and
    nothing else of the DiT; the saved file loads into the pipeline and changes what it draws from the condition."""
    from diffsynth.training.testing import outputs_before_and_after_lora, tiny_config
    from diffsynth.training.trainer import TrainState, save, setup, train_step

    repo = request.getfixturevalue(f"{kind}_repo")
    dataset = write_dataset(tmp_path / "data", kind)
    options = dict(data_file_keys=FILE_KEYS[kind].split(","), lora_target_modules=lora_targets().split(","), seed=0)
    config = tiny_config(repo, "flux", dataset, tmp_path / "out", **options)
    run = setup(config)
    dit = run.task.models["dit"]
    assert run.trainable and all("lora_" in name for name in run.trainable)
    before = {name: p.detach().clone() for name, p in dit.named_parameters()}
    items = [run.dataset[i] for i in range(len(PROMPTS))]
    assert items[0]["image"].shape == (3, SIZE, SIZE)
    state = TrainState()
    for _ in range(2):
        state = train_step(run, state, [items])
    assert np.isfinite(state.loss) and state.loss > 0
    changed = {name for name, p in dit.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed), sorted(changed)[:5]
    assert any(name.startswith("img_in.") for name in changed)
    save(run, state)
    lora = tmp_path / "out" / "step-000002.safetensors"
    assert lora.is_file() and all("lora" in key for key in load_file(str(lora)))
    pipe = load_pipe(repo)
    condition = (
        {"flux_fill_image": Image.open(dataset / "fill0.png"), "flux_fill_mask": Image.open(dataset / "mask0.png")}
        if kind == FILL
        else {"control_image": Image.open(dataset / "edges0.png")}
    )
    call = dict(seed=0, num_inference_steps=2, output_type="pt", progress_bar=False, **condition)
    base, after = outputs_before_and_after_lora(pipe, lora, PROMPTS[0], **call)
    assert after.shape == base.shape == (1, 3, SIZE, SIZE)
    assert (after - base).abs().max() > 1e-4


@pytest.mark.integration
def test_cli_trains_canny_with_validation_samples_and_the_cache_gives_the_same_loss(control_repo, tmp_path):
    """`diffsynth-train` as users type it: --data_file_keys image,control_image, validation samples drawn from the
    --validation_images control map; the cached two-stage run (encoded without the DiT) gives the same loss."""
    testing = pytest.importorskip("diffsynth.training.testing")
    dataset = write_dataset(tmp_path / "data", CONTROL)
    flags = ["--data_file_keys", FILE_KEYS[CONTROL], "--dataset_repeat", "2"]
    train = testing.CliTrainer(control_repo, "flux", dataset, *flags)
    validation = ["--validation_prompts", PROMPTS[0], "--validation_images", "edges1.png"]
    size = ["--validation_height", "32", "--validation_width", "32", "--validation_num_inference_steps", "2"]
    losses = train(tmp_path / "out", *validation, *size)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (tmp_path / "out" / "validation" / "step-000002-0.png").is_file()
    direct, cached = train.direct_and_cached(tmp_path / "two-stage", "--max_steps", "1")
    stored = load_file(str(next((tmp_path / "two-stage" / "cache").rglob("*.safetensors"))))
    assert stored["condition"].shape == ((SIZE // 16) ** 2, 64)
    assert cached[0] == pytest.approx(direct[0], rel=1e-6, abs=1e-7)


@pytest.mark.integration
def test_a_lora_trains_over_flux_dev_with_a_control_lora(dev_repo, tmp_path):
    """FLUX.1-dev + a Canny/Depth control LoRA given as --preset_lora_path: the task widens img_in (frozen) before the
    trainer fuses the control LoRA, trains a new LoRA on control_image rows, and the pipeline with both LoRAs
    loaded draws something else than with the control LoRA alone."""
    testing = pytest.importorskip("diffsynth.training.testing")
    from diffsynth.training.trainer import setup

    dit = load_pipe(dev_repo).dit
    control = tmp_path / "canny-lora.safetensors"
    save_file({k: v.contiguous() for k, v in tools.control_lora(dit).items()}, str(control))
    dataset = write_dataset(tmp_path / "data", CONTROL)
    flags = ["--data_file_keys", FILE_KEYS[CONTROL], "--preset_lora_path", str(control), "--dataset_repeat", "2"]
    options = dict(data_file_keys=FILE_KEYS[CONTROL].split(","), preset_lora_path=str(control))
    config = testing.tiny_config(dev_repo, "flux", dataset, tmp_path / "setup", **options)
    run = setup(config)
    assert run.task.models["dit"].config.in_channels == 128 and run.task.channel_kind == CONTROL
    assert all("lora_" in name for name in run.trainable)
    flags += ["--lora_target_modules", lora_targets()]
    losses = testing.train_with_cli(dev_repo, "flux", dataset, tmp_path / "out", *flags)
    assert len(losses) == 2 and all(np.isfinite(losses))
    pipe = load_pipe(dev_repo)
    pipe.load_lora(str(control))
    call = dict(seed=0, num_inference_steps=2, output_type="pt", progress_bar=False)
    call["control_image"] = Image.open(dataset / "edges0.png")
    lora = tmp_path / "out" / "step-000002.safetensors"
    base, after = testing.outputs_before_and_after_lora(pipe, lora, PROMPTS[0], **call)
    assert (after - base).abs().max() > 1e-4


@pytest.mark.integration
def test_full_fill_training_writes_a_dit_the_pipeline_loads(fill_repo, fill_pipe, tmp_path):
    """--trainable_models dit on a Fill model: the saved DiT keeps its 384 inputs and draws another inpainting."""
    testing = pytest.importorskip("diffsynth.training.testing")
    from diffsynth.runtime.hub import ModelConfig

    dataset = write_dataset(tmp_path / "data", FILL)
    flags = ["--data_file_keys", FILE_KEYS[FILL], "--trainable_models", "dit", "--max_steps", "1"]
    losses = testing.train_with_cli(fill_repo, "flux", dataset, tmp_path / "out", *flags)
    assert len(losses) == 1 and np.isfinite(losses[0])
    tuned = FluxImagePipeline.from_pretrained(
        testing.configs_with_trained_weights(fill_repo, tmp_path / "out" / "step-000001" / "dit"),
        tokenizer_1_config=ModelConfig(path=str(fill_repo / "tokenizer")),
        tokenizer_2_config=ModelConfig(path=str(fill_repo / "tokenizer_2")),
        torch_dtype="float32",
        device="cpu",
    )
    assert tuned.dit.config.in_channels == tools.FILL_CHANNELS
    inputs = {"flux_fill_image": Image.open(dataset / "fill0.png"), "flux_fill_mask": Image.open(dataset / "mask0.png")}
    call = dict(seed=0, num_inference_steps=2, t5_sequence_length=T5_TOKENS, output_type="pt", progress_bar=False)
    image, reference = (p(PROMPTS[0], **inputs, **call) for p in (tuned, fill_pipe))
    assert (image - reference).abs().max() > 1e-5
