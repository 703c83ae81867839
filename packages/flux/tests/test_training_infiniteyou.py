"""FLUX.1 InfiniteYou training (DiffSynth-Studio's lora/ and full/FLUX.1-dev-InfiniteYou.sh): a row's face photo
`infinityou_id_image` (or its embedding `infiniteyou_id_embedding`) is cached as the embedding the pipeline's
`prepare_infiniteyou` hands its projector, with InfuseNet's guidance and control image (black by default); the task's
velocity is the pipeline's positive branch with InfuseNet reading the projected id tokens; the trainer trains a DiT
LoRA under the frozen InfuseNet + projector, or both of those together (`--trainable_models
controlnet,image_proj_model`, through `InfiniteYouInTraining`) into files the pipeline loads strictly.

The repo is conftest's tiny one at 32 T5 tokens; InfuseNet is a tiny FLUX.1 ControlNet of its widths (a diffusers
folder with config.json), the projector a tiny `Resampler` written as the authors' `image_proj_model.bin`. The face
models (insightface, facexlib) are stubs shaped like theirs. The trainer tests are `integration`.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffsynth_flux_test_helpers import (
    controlnet_config_json,
    make_controlnet,
    random_image,
    repo_controlnet_config,
    write_controlnet_folder,
)
from PIL import Image
from safetensors.torch import load_file, save_file

from diffsynth.flux.flux1.controlnet_formats import ours_to_diffusers
from diffsynth.flux.flux1.infiniteyou import FaceEncoder, InfiniteYouProjector, InfiniteYouProjectorConfig
from diffsynth.flux.pipeline import FluxImagePipeline
from diffsynth.flux.training import FluxTrainingTask, InfiniteYouInTraining, split_infiniteyou_weights
from diffsynth.runtime.controlnet import ControlNetInput
from diffsynth.runtime.errors import ConfigError
from diffsynth.runtime.hub import ModelConfig
from diffsynth.runtime.media import pil_to_tensor, tensor_to_pil
from diffsynth.runtime.pipeline import configs_from_folder
from diffsynth.runtime.testing.weights import random_weights

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a portrait of a man", "a woman on a beach at sunset"]
GUIDANCE = [1.0, 1.5]
T5_TOKENS = 32
SIZE = 64
NOISY = torch.randn(2, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
SIGMA = torch.tensor([0.8, 0.35])


# ------------------------------------------------------------------ the face models, stubbed
class StubDetector:
    """insightface's `FaceAnalysis.get(bgr)` in shape: faces with `bbox` and 5 `kps`; one face covering the image."""

    def get(self, bgr):
        h, w = bgr.shape[:2]
        return [{"bbox": np.array([0, 0, w, h], np.float32), "kps": np.full((5, 2), 8.0, np.float32)}]


def stub_align(bgr, landmark, image_size):
    """insightface's `norm_crop` in shape: a 112 x 112 crop (here the top-left corner)."""
    return bgr[:image_size, :image_size]


class StubArcFace(torch.nn.Module):
    """facexlib's ArcFace in shape: `[B, 3, 112, 112]` in [-1, 1] -> `[B, 512]` (a fixed random projection)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.randn(3 * 112 * 112, 512, generator=torch.Generator().manual_seed(6)) / 100

    def forward(self, pixels):
        return pixels.flatten(1) @ self.weight


def face_encoder() -> FaceEncoder:
    return FaceEncoder([StubDetector()], StubArcFace(), stub_align)


def photo(index: int) -> Image.Image:
    """Row `index`'s face photo, at its own size (a multiple of 16, at least the 112-pixel crop)."""
    return random_image(128, 128 + 16 * index, seed=20 + index)


# ------------------------------------------------------------------ the models
@pytest.fixture(scope="module")
def repo(tiny_repo, tiny_configs, tmp_path_factory) -> Path:
    """The tiny FLUX.1 repo at 32 T5 tokens, with InfiniteYou's two parts beside it (the hub's layout)."""
    root = shutil.copytree(tiny_repo, tmp_path_factory.mktemp("iy-train") / "repo")
    (root / "diffsynth.json").write_text(json.dumps({"defaults": {"t5_sequence_length": T5_TOKENS}}))
    dit = tiny_configs["dit"]
    cfg = repo_controlnet_config(dit, depth=1, depth_single_blocks=2)
    net = make_controlnet(cfg, seed=7)
    with torch.no_grad():  # residuals of the size of a trained net's, not swamping the DiT's states
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_blocks.", "controlnet_single_blocks.")):
                p.mul_(0.05)
    stage = root.parent / "infu_flux_v1.0" / "aes_stage2"
    write_controlnet_folder(stage / "InfuseNetModel", net, controlnet_config_json(cfg))
    sizes = dict(dim=32, depth=2, dim_head=64, heads=2, num_queries=4, embedding_dim=512, ff_mult=2)
    projector = InfiniteYouProjector(InfiniteYouProjectorConfig(**sizes, output_dim=dit["joint_attention_dim"]))
    torch.save({"image_proj": random_weights(projector, 3, scale=0.2).state_dict()}, stage / "image_proj_model.bin")
    return root


def iy_paths(repo: Path) -> list[str]:
    """The two files DiffSynth-Studio lists: the projector and InfuseNet's weights."""
    stage = repo.parent / "infu_flux_v1.0" / "aes_stage2"
    return [str(stage / "image_proj_model.bin"), str(stage / "InfuseNetModel" / "diffusion_pytorch_model.safetensors")]


def load_task(repo, files=(), **kwargs) -> FluxTrainingTask:
    configs, tokenizer = configs_from_folder(repo)
    configs = [*(ModelConfig(path=f) for f in files), *configs]
    task = FluxTrainingTask.from_pretrained(
        configs, tokenizer_config=tokenizer, torch_dtype="float32", device="cpu", **kwargs
    )
    task.pipe.infiniteyou_face_encoder = face_encoder()
    return task


def load_pipe(repo, net=None, projector=None) -> FluxImagePipeline:
    """The pipeline with InfuseNet (a folder) and the projector (default: the released pair) and the stub faces."""
    net = net if net is not None else Path(iy_paths(repo)[1]).parent
    pipe = FluxImagePipeline.from_pretrained(str(repo), torch_dtype="float32", device="cpu", controlnet=[str(net)])
    pipe.load_infiniteyou(projector if projector is not None else iy_paths(repo)[0])
    pipe.infiniteyou_face_encoder = face_encoder()
    return pipe


@pytest.fixture(scope="module")
def task(repo) -> FluxTrainingTask:
    return load_task(repo, iy_paths(repo))


@pytest.fixture(scope="module")
def pipe(repo) -> FluxImagePipeline:
    return load_pipe(repo)


def full_task(task) -> FluxTrainingTask:
    """The task training InfuseNet and the projector (what `--trainable_models controlnet,...` asks for)."""
    return FluxTrainingTask(
        task.pipe, task.controlnet_config, infiniteyou=True, trained_model="controlnet", t5_sequence_length=T5_TOKENS
    )


def rows(seed: int = 0) -> list[dict]:
    """Rows as the dataset reads them: the image and the face photo (at its own size) as [3, H, W] tensors."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "prompt": prompt,
            "image": torch.rand(3, SIZE, SIZE, generator=g) * 2 - 1,
            "infinityou_id_image": pil_to_tensor(photo(i))[0],
            "infinityou_guidance": str(GUIDANCE[i]),  # a CSV cell
        }
        for i, prompt in enumerate(PROMPTS)
    ]


def pipeline_embedding(pipe, face) -> torch.Tensor:
    """The embedding the pipeline's `prepare_infiniteyou` hands its projector for a face photo."""
    seen = []
    hook = pipe.infiniteyou_projector.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        pipe.prepare_infiniteyou(face, None, 1.0)
    finally:
        hook.remove()
    return seen[0]


def pipeline_velocity(pipe, index: int, noisy, sigma, control=None) -> torch.Tensor:
    """The pipeline's denoise step for row `index` (embedded guidance 1, no CFG): InfuseNet on the control image
    (black by default) with the projected id tokens and the row's guidance, as `__call__` prepares them."""
    text = pipe.encode_prompt(PROMPTS[index : index + 1], T5_TOKENS)
    identity = pipe.prepare_infiniteyou(photo(index), None, GUIDANCE[index])
    control = control if control is not None else Image.new("RGB", (SIZE, SIZE))
    controls = pipe.prepare_controls([ControlNetInput(image=control)], SIZE, SIZE)
    controls = [replace(c, text=identity, guidance=GUIDANCE[index]) for c in controls]
    return pipe.predict(noisy, sigma, text, None, 1.0, 1.0, None, controls)


# ------------------------------------------------------------------ encodings
def test_faces_are_cached_as_the_pipelines_embeddings(task, pipe, repo, tmp_path):
    """The cache holds the face encoder's embedding (bit for bit what the pipeline projects), the guidance and the
    black control image's tokens the pipeline makes by default; an embedding file gives what its tensor gives; the
    encoding stage (no denoiser) encodes the same."""
    assert task.infiniteyou and {"infinityou_id_image", "infiniteyou_id_image"} <= set(task.conditioning)
    assert task.denoiser_slot == "dit" and not any(
        p.requires_grad for p in task.pipe.infiniteyou_projector.parameters()
    )
    data = rows()
    samples = task.encode(data)
    black = pipe.prepare_controls([ControlNetInput(image=Image.new("RGB", (SIZE, SIZE)))], SIZE, SIZE)[0].tokens[0]
    for i, sample in enumerate(samples):
        want = pipeline_embedding(pipe, photo(i))
        assert (
            sample["infiniteyou_embedding"].shape == (1, 512) and sample["infiniteyou_embedding"].dtype == torch.float32
        )
        assert torch.equal(sample["infiniteyou_embedding"], want[0])
        assert torch.equal(sample["infiniteyou_guidance"], torch.tensor([GUIDANCE[i]]))
        assert torch.equal(sample["controlnet"], black)
    embedding = samples[0]["infiniteyou_embedding"][0]
    save_file({"embedding": embedding}, str(tmp_path / "face.safetensors"))
    np.save(tmp_path / "face.npy", embedding.numpy())
    torch.save(embedding, tmp_path / "face.pt")
    plain = {k: v for k, v in data[0].items() if k != "infinityou_id_image"}
    for given in (str(tmp_path / "face.safetensors"), tmp_path / "face.npy", str(tmp_path / "face.pt"), embedding):
        again = task.encode([{**plain, "infiniteyou_id_embedding": given}])[0]
        assert torch.equal(again["infiniteyou_embedding"], samples[0]["infiniteyou_embedding"]), given
    ours = task.encode([{**data[0], "infiniteyou_id_image": photo(0), "infinityou_id_image": None}])[0]  # our name
    assert torch.equal(ours["infiniteyou_embedding"], samples[0]["infiniteyou_embedding"])
    encoding = load_task(repo, iy_paths(repo), denoiser=False)
    assert encoding.pipe.dit is None and encoding.pipe.controlnet is None
    assert encoding.conditioning == task.conditioning
    for a, b in zip(encoding.encode(data), samples, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ the model call
def test_velocity_is_the_pipelines_positive_branch_with_infusenet(task, pipe):
    """Row by row the task's velocity equals the pipeline's `predict` with InfuseNet steered by the row's id tokens
    and guidance: bit for bit for one row, float32 batching rounding for two of equal guidance; the same through
    `InfiniteYouInTraining` (the full-training model); with a given control image too; without the face another."""
    data = rows()
    dit = task.models["dit"]
    full = full_task(task)
    assert full.denoiser_slot == "infiniteyou" and "controlnet" not in full.models
    wrapper = full.models["infiniteyou"]
    assert isinstance(wrapper, InfiniteYouInTraining) and wrapper.controlnet is task.pipe.controlnet.nets[0]
    assert wrapper.image_proj_model is task.pipe.infiniteyou_projector and full.models["infiniteyou"] is wrapper
    with torch.no_grad():
        for i in range(2):
            batch = task.collate(task.encode([data[i]]))
            ours = task.velocity(dit, batch, NOISY[i : i + 1], SIGMA[i])
            theirs = pipeline_velocity(pipe, i, NOISY[i : i + 1], SIGMA[i])
            assert torch.equal(ours, theirs)  # one row: the same call, bit for bit
            assert torch.equal(full.velocity(wrapper, batch, NOISY[i : i + 1], SIGMA[i]), theirs)
        same = [data[0], {**data[1], "infinityou_guidance": "1.0"}]
        both = task.velocity(dit, task.collate(task.encode(same)), NOISY, SIGMA)
        one = task.velocity(dit, task.collate(task.encode(same[:1])), NOISY[:1], SIGMA[:1])
        worst = (both[:1] - one).abs().max().item()
        print(f"InfiniteYou velocity, a batch of two vs. one row: max abs {worst:.2e}")
        assert worst <= 5e-6, worst
        control = random_image(SIZE, SIZE, seed=3)
        given = task.collate(task.encode([{**data[1], "controlnet_image": pil_to_tensor(control)[0]}]))
        theirs = pipeline_velocity(pipe, 1, NOISY[1:], SIGMA[1], control=control)
        assert torch.equal(task.velocity(dit, given, NOISY[1:], SIGMA[1]), theirs)
        batch = task.collate(task.encode(data[:1]))
        unguided = {**batch, "infiniteyou_guidance": torch.tensor([[3.0]])}
        assert (task.velocity(dit, unguided, NOISY[:1], SIGMA[:1]) - one).abs().max() > 1e-6  # guidance is read
        plain = {k: v for k, v in data[0].items() if not k.startswith("infinityou")}
        without = task.velocity(dit, task.collate(task.encode([plain])), NOISY[:1], SIGMA[:1])
        assert torch.equal(
            without, pipe.predict(NOISY[:1], SIGMA[:1], pipe.encode_prompt(PROMPTS[:1], T5_TOKENS), None, 1.0, 1.0)
        )
        assert (without - one).abs().max() > 1e-4


def test_full_training_gives_infusenet_and_the_projector_gradients_and_the_dit_none(task):
    full = full_task(task)
    wrapper, dit = full.models["infiniteyou"], full.pipe.dit
    assert set(wrapper.trainable_parts) == {"controlnet", "image_proj_model"}
    batch = full.collate(full.encode(rows()[1:]))
    wrapper.requires_grad_(True)
    try:
        wrapper.gradient_checkpointing = True
        full.velocity(wrapper, batch, NOISY[:1], SIGMA[:1]).square().mean().backward()
        assert dit.gradient_checkpointing and wrapper.controlnet.gradient_checkpointing  # handed on
        grads = {name: p.grad for name, p in wrapper.named_parameters()}
        assert any(n.startswith("image_proj_model.") for n in grads) and any(n.startswith("controlnet.") for n in grads)
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [
            n for n, g in grads.items() if g is None
        ]
        assert all(p.grad is None for p in dit.parameters())
    finally:
        wrapper.requires_grad_(False).zero_grad(set_to_none=True)
        wrapper.gradient_checkpointing = dit.gradient_checkpointing = wrapper.controlnet.gradient_checkpointing = False


def test_the_exported_weights_split_into_the_released_files(task, repo, tmp_path):
    """`export_state` writes InfuseNet in diffusers' names and the projector in the authors' names, each under its
    part's name; `split_infiniteyou_weights` writes them as the released pair, which load strictly as the same."""
    from diffsynth.flux.flux1.infiniteyou import load_projector

    full = full_task(task)
    state = full.models["infiniteyou"].state_dict()
    exported = full.export_state("infiniteyou", state)
    net, projector = task.pipe.controlnet.nets[0], task.pipe.infiniteyou_projector
    released = torch.load(iy_paths(repo)[0], weights_only=True)["image_proj"]
    assert set(exported) == {f"controlnet.{k}" for k in ours_to_diffusers(net.state_dict())} | {
        f"image_proj_model.{k}" for k in released
    }
    folder = tmp_path / "step" / "infiniteyou"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in exported.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    shutil.copyfile(Path(iy_paths(repo)[1]).parent / "config.json", folder / "config.json")
    net_folder, projector_file = split_infiniteyou_weights(
        folder / "diffusion_pytorch_model.safetensors", tmp_path / "out"
    )
    assert (net_folder / "config.json").is_file()
    loaded = load_projector(str(projector_file))
    assert loaded.config == projector.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in projector.state_dict().items())
    written = load_file(str(net_folder / "diffusion_pytorch_model.safetensors"))
    assert written.keys() == ours_to_diffusers(net.state_dict()).keys()
    again = load_task(repo, [str(projector_file), str(net_folder / "diffusion_pytorch_model.safetensors")])
    assert again.infiniteyou and again.controlnet_config == task.controlnet_config  # trains on from the split pair
    for ours, theirs in ((again.pipe.infiniteyou_projector, projector), (again.pipe.controlnet.nets[0], net)):
        assert all(torch.equal(ours.state_dict()[k], v) for k, v in theirs.state_dict().items())
    with pytest.raises(ConfigError, match="not InfiniteYou's trained weights"):
        split_infiniteyou_weights(net_folder / "diffusion_pytorch_model.safetensors", tmp_path / "bad")


# ------------------------------------------------------------------ errors
def test_clear_errors(task, repo, tmp_path, monkeypatch):
    row = rows()[0]
    plain = load_task(repo)
    assert not plain.infiniteyou and "infinityou_id_image" not in plain.conditioning
    with pytest.raises(ConfigError, match="has infinityou_id_image, but InfiniteYou's id projector is not among"):
        plain.encode([row])
    batch = task.collate(task.encode([row]))
    with pytest.raises(ConfigError, match="has infinityou_id_image, but InfiniteYou's id projector is not loaded"):
        plain.velocity(plain.models["dit"], batch, NOISY[:1], SIGMA[:1])
    with pytest.raises(ConfigError, match="steers InfuseNet, a FLUX.1 ControlNet, which is not among the model files"):
        load_task(repo, iy_paths(repo)[:1])
    with pytest.raises(ConfigError, match="face embeddings are 7 wide, and InfiniteYou's projector takes 512"):
        task.velocity(
            task.models["dit"], {**batch, "infiniteyou_embedding": torch.zeros(1, 1, 7)}, NOISY[:1], SIGMA[:1]
        )
    with pytest.raises(ConfigError, match="row 0 .* has infinityou_id_image and infiniteyou_id_image: the same input"):
        task.encode([{**row, "infiniteyou_id_image": photo(0)}])
    with pytest.raises(ConfigError, match="has infinityou_id_image and infiniteyou_id_embedding; give the face photo"):
        task.encode([{**row, "infiniteyou_id_embedding": torch.ones(512)}])
    no_face = {k: v for k, v in row.items() if k != "infinityou_id_image"}
    with pytest.raises(ConfigError, match="has infinityou_guidance but no face to guide"):
        task.encode([no_face])
    with pytest.raises(ConfigError, match=r"infinityou_guidance 'high' is not a number"):
        task.encode([{**row, "infinityou_guidance": "high"}])
    with pytest.raises(ConfigError, match=r"infinityou_id_image is the path 'face.png'.*--data_file_keys"):
        task.encode([{**row, "infinityou_id_image": "face.png"}])
    with pytest.raises(ConfigError, match=r"infiniteyou_id_embedding must be a \[512\] ArcFace embedding"):
        task.encode([{**no_face, "infiniteyou_id_embedding": torch.ones(256)}])
    with pytest.raises(ConfigError, match="infiniteyou_id_embedding 'missing.npy' is no file"):
        task.encode([{**no_face, "infiniteyou_id_embedding": "missing.npy"}])
    save_file({"a": torch.ones(512), "b": torch.ones(512)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ConfigError, match="holds 2 tensors"):
        task.encode([{**no_face, "infiniteyou_id_embedding": str(tmp_path / "two.safetensors")}])
    task.pipe.infiniteyou_face_encoder = FaceEncoder(
        [type("NoFace", (), {"get": lambda self, bgr: []})()], StubArcFace(), stub_align
    )
    try:
        with pytest.raises(ConfigError, match="row 0 .*: no face was found in infiniteyou_id_image"):
            task.encode([row])
    finally:
        task.pipe.infiniteyou_face_encoder = face_encoder()
    rooted = load_task(repo, iy_paths(repo), denoiser=False, infiniteyou_insightface_root=str(tmp_path))
    assert rooted.pipe.infiniteyou_insightface_root == str(tmp_path)
    rooted.pipe.infiniteyou_face_encoder = None  # built at the first photo: the install command first
    monkeypatch.setitem(sys.modules, "insightface", None)
    with pytest.raises(ConfigError, match=r'pip install "diffsynth-flux\[infiniteyou\]"'):
        rooted.encode([row])
    without = {k: v for k, v in no_face.items() if k != "infinityou_guidance"}
    full = full_task(task)
    with pytest.raises(ConfigError, match="row 0 .* has no infinityou_id_image: training InfuseNet needs every row"):
        full.encode([without])
    with pytest.raises(ConfigError, match="training InfuseNet needs batches with infinityou_id_image"):
        full.velocity(full.models["infiniteyou"], task.collate(task.encode([without])), NOISY[:1], SIGMA[:1])
    with pytest.raises(ConfigError, match=r"InfuseNet condition \(5 features\) was not encoded for this InfuseNet"):
        full.velocity(full.models["infiniteyou"], {**batch, "controlnet": torch.zeros(1, 16, 5)}, NOISY[:1], SIGMA[:1])
    with pytest.raises(ConfigError, match="mixes 1 rows with infinityou_id_image and 1 without"):
        task.collate(task.encode([row, without]))
    with pytest.raises(ConfigError, match=r"infinityou_guidance \[1.0, 1.5\].*--batch_size 1"):
        task.collate(task.encode(rows()))


def test_validation_samples_take_the_face_photo(task, pipe):
    size = {"height": 32, "width": 32, "num_inference_steps": 2}
    full = full_task(task)
    face = photo(0)
    assert full.validation_references == "required"
    assert full.reference_arguments([face]) == {"infinityou_id_image": face}
    with pytest.raises(ConfigError, match="takes the face photo, optionally followed by InfuseNet's control image"):
        full.reference_arguments([])
    with torch.no_grad():
        ours = full.sample(full.models["infiniteyou"], PROMPTS[:1], seed=3, references=[[face]], **size)[0]
        theirs = pipe(PROMPTS[0], seed=3, progress_bar=False, infinityou_id_image=face, **size)
        other = pipe(PROMPTS[0], seed=3, progress_bar=False, infinityou_id_image=photo(1), **size)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert not np.array_equal(np.asarray(ours), np.asarray(other))  # the face is read


# ------------------------------------------------------------------ the trainer
def write_dataset(folder: Path) -> Path:
    """DiffSynth-Studio's FLUX.1-dev-InfiniteYou layout: metadata.csv with image, prompt, controlnet_image,
    infinityou_id_image and infinityou_guidance."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["image,prompt,controlnet_image,infinityou_id_image,infinityou_guidance"]
    for i, prompt in enumerate(PROMPTS):
        random_image(SIZE, SIZE, seed=10 + i).save(folder / f"img{i}.png")
        Image.new("RGB", (SIZE, SIZE)).save(folder / f"control{i}.png")
        photo(i).save(folder / f"face{i}.png")
        lines.append(f"img{i}.png,{prompt},control{i}.png,face{i}.png,{GUIDANCE[i]}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


DATA_KEYS = ["image", "controlnet_image", "infinityou_id_image"]
MAX_PIXELS = 128 * 144  # the face photos at their own size (the stub crop takes 112 x 112)


@pytest.mark.integration
def test_trainable_models_controlnet_and_image_proj_model_train_both_into_files_the_pipeline_loads(repo, tmp_path):
    """DiffSynth-Studio's full recipe through the trainer: two steps change every InfuseNet and projector weight and
    nothing else; the saved file splits into the released pair, which the pipeline loads strictly and then predicts
    what the trained models predict."""
    from diffsynth.training.testing import tiny_config
    from diffsynth.training.trainer import TrainState, save, setup, train_step

    dataset = write_dataset(tmp_path / "data")
    config = tiny_config(
        repo, "flux", dataset, tmp_path / "out", model_paths=iy_paths(repo),
        trainable_models=["controlnet", "image_proj_model"], data_file_keys=DATA_KEYS, batch_size=1, max_pixels=MAX_PIXELS,
        learning_rate=1e-2, seed=0, use_gradient_checkpointing=True,
    )  # fmt: skip
    run = setup(config)
    task = run.task
    task.pipe.infiniteyou_face_encoder = face_encoder()
    wrapper, dit = task.models["infiniteyou"], task.pipe.dit
    assert task.denoiser_slot == "infiniteyou" and isinstance(wrapper, InfiniteYouInTraining)
    assert set(run.trainable) == {name for name, _ in wrapper.named_parameters()}
    items = [run.dataset[i] for i in range(len(PROMPTS))]
    assert items[1]["infinityou_id_image"].shape == (3, 144, 128) and items[1]["image"].shape == (3, SIZE, SIZE)
    before = {k: v.clone() for k, v in wrapper.state_dict().items()}
    frozen = {k: v.clone() for k, v in dit.state_dict().items()}
    state = TrainState()
    for item in items:
        state = train_step(run, state, [[item]])
    assert np.isfinite(state.loss) and state.loss > 0
    assert all(not torch.equal(v, before[k]) for k, v in wrapper.state_dict().items())
    assert all(torch.equal(v, frozen[k]) for k, v in dit.state_dict().items())
    save(run, state)
    saved = tmp_path / "out" / "step-000002" / "infiniteyou" / "diffusion_pytorch_model.safetensors"
    assert (saved.parent / "config.json").is_file()
    # the trainer writes the released pair beside the combined file too (`saved_full_weights`)
    beside = saved.parent / "InfuseNetModel" / "diffusion_pytorch_model.safetensors"
    assert beside.is_file() and (saved.parent / "image_proj_model.safetensors").is_file()
    net_folder, projector_file = split_infiniteyou_weights(saved, tmp_path / "released")
    assert load_file(str(beside)).keys() == load_file(str(net_folder / "diffusion_pytorch_model.safetensors")).keys()
    pipe = load_pipe(repo, net_folder, projector_file)
    for ours, loaded in (
        (wrapper.controlnet, pipe.controlnet.nets[0]),
        (wrapper.image_proj_model, pipe.infiniteyou_projector),
    ):
        for key, value in ours.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    batch = task.collate(task.encode([items[1]]))
    with torch.no_grad():
        trained = task.velocity(run.model, batch, NOISY[:1], SIGMA[:1])
        control = tensor_to_pil(items[1]["controlnet_image"])[0]
        face = tensor_to_pil(items[1]["infinityou_id_image"])[0]
        assert np.array_equal(np.asarray(face), np.asarray(photo(1)))
        loaded = pipeline_velocity(pipe, 1, NOISY[:1], SIGMA[:1], control=control)
        base = pipeline_velocity(load_pipe(repo), 1, NOISY[:1], SIGMA[:1], control=control)
    print(f"trained InfuseNet + projector: loaded vs trained {(loaded - trained).abs().max():.2e}, vs base "
          f"{(loaded - base).abs().max():.2e}")  # fmt: skip
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-5)
    assert (loaded - base).abs().max() > 1e-4


@pytest.mark.integration
def test_trainer_trains_a_dit_lora_under_the_frozen_infusenet_and_projector(repo, pipe, tmp_path):
    """DiffSynth-Studio's LoRA recipe through the trainer (the default DiT LoRA): two steps change only LoRA weights
    (InfuseNet and the projector stay frozen), and the pipeline with the saved LoRA predicts what the trained DiT
    predicts."""
    from diffsynth.training.testing import tiny_config
    from diffsynth.training.trainer import TrainState, save, setup, train_step

    dataset = write_dataset(tmp_path / "data")
    config = tiny_config(
        repo, "flux", dataset, tmp_path / "out", model_paths=iy_paths(repo), data_file_keys=DATA_KEYS, batch_size=1, max_pixels=MAX_PIXELS,
        seed=0,
    )  # fmt: skip
    run = setup(config)
    run.task.pipe.infiniteyou_face_encoder = face_encoder()
    dit = run.task.models["dit"]
    assert run.task.denoiser_slot == "dit" and run.trainable and all("lora_" in n for n in run.trainable)
    before = {name: p.detach().clone() for name, p in dit.named_parameters()}
    frozen_models = (run.task.pipe.controlnet.nets[0], run.task.pipe.infiniteyou_projector)
    frozen = [{k: v.clone() for k, v in m.state_dict().items()} for m in frozen_models]
    items = [run.dataset[i] for i in range(len(PROMPTS))]
    state = TrainState()
    for item in items:
        state = train_step(run, state, [[item]])
    assert np.isfinite(state.loss) and state.loss > 0
    changed = {name for name, p in dit.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    for model, was in zip(frozen_models, frozen, strict=True):
        assert all(torch.equal(v, was[k]) for k, v in model.state_dict().items())
    save(run, state)
    batch = run.task.collate(run.task.encode([items[0]]))
    control = tensor_to_pil(items[0]["controlnet_image"])[0]
    with torch.no_grad():
        trained = run.task.velocity(run.model, batch, NOISY[:1], SIGMA[:1])
        base = pipeline_velocity(pipe, 0, NOISY[:1], SIGMA[:1], control=control)
        pipe.load_lora(tmp_path / "out" / "step-000002.safetensors", fuse=False, name="iy")
        try:
            applied = pipeline_velocity(pipe, 0, NOISY[:1], SIGMA[:1], control=control)
        finally:
            pipe.clear_loras()
    print(f"DiT LoRA under InfiniteYou: applied vs trained {(applied - trained).abs().max():.2e}, vs base "
          f"{(applied - base).abs().max():.2e}")  # fmt: skip
    torch.testing.assert_close(applied, trained, rtol=0, atol=1e-5)
    assert (applied - base).abs().max() > 1e-5


@pytest.mark.integration
def test_cli_full_training_on_embedding_files_and_the_cached_two_stage_run(repo, tmp_path):
    """`diffsynth-train` as users type it, on rows giving the ArcFace embedding as a file (no face models needed):
    the cached two-stage run of `--trainable_models controlnet,image_proj_model` (embeddings and control tokens
    cached; InfuseNet, the projector and the DiT in the training stage) gives the direct run's losses and writes
    the combined file."""
    testing = pytest.importorskip("diffsynth.training.testing")
    dataset = write_dataset(tmp_path / "data")
    lines = ["image,prompt,controlnet_image,infiniteyou_id_embedding,infinityou_guidance"]
    for i, prompt in enumerate(PROMPTS):
        embedding = torch.randn(512, generator=torch.Generator().manual_seed(30 + i))
        save_file({"embedding": embedding}, str(dataset / f"face{i}.safetensors"))
        lines.append(f"img{i}.png,{prompt},control{i}.png,{dataset / f'face{i}.safetensors'},{GUIDANCE[i]}")
    (dataset / "metadata.csv").write_text("\n".join(lines) + "\n")
    flags = ["--model_paths", ",".join(iy_paths(repo)), "--data_file_keys", "image,controlnet_image"]
    flags += ["--batch_size", "1", "--trainable_models", "controlnet,image_proj_model"]
    train = testing.CliTrainer(repo, "flux", dataset, *flags)
    direct, cached = train.direct_and_cached(tmp_path / "two-stage", "--max_steps", "2")
    stored = load_file(str(tmp_path / "two-stage" / "cache" / "items" / "000000.safetensors"))
    assert stored["infiniteyou_embedding"].shape == (1, 512) and stored["infiniteyou_guidance"].shape == (1,)
    assert len(direct) == 2 and cached == pytest.approx(direct, rel=1e-6, abs=1e-7)
    saved = load_file(
        str(tmp_path / "two-stage" / "direct" / "step-000002" / "infiniteyou" / "diffusion_pytorch_model.safetensors")
    )
    assert any(k.startswith("controlnet.controlnet_blocks.") for k in saved)
    assert any(k.startswith("image_proj_model.layers.") for k in saved)
