"""Recognise -> config -> meta build -> strict assign load, on toy specs defined here."""

import json
import logging
import re
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffsynth.runtime.checkpoint import describe_checkpoint
from diffsynth.runtime.errors import CheckpointError, ConfigError, DiffSynthError, UnknownModelError
from diffsynth.runtime.loading import LoadedModel, load_model, load_models, recognise
from diffsynth.runtime.registry import KeyLayout, ModelSpec


# ----------------------------------------------------------------------------------- toy specs
@dataclass
class ToyConfig:
    width: int = 4
    depth: int = 2
    scale: float = 1.0  # only config.json can tell


class Toy(nn.Module):
    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.proj_in = nn.Linear(3, config.width)
        self.blocks = nn.ModuleList(nn.Linear(config.width, config.width) for _ in range(config.depth))
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:  # plain arange: scalar arithmetic on meta would import torch._dynamo
        return torch.arange(1, self.config.width + 1, dtype=torch.float32)

    def materialize_buffers(self) -> None:
        self.inv_freq = self._inv_freq().to(self.proj_in.weight.device)


class ToyWithoutMaterialize(Toy):
    materialize_buffers = None


def toy_config(state, config_json):
    depth = 0
    while f"blocks.{depth}.weight" in state:
        depth += 1
    return ToyConfig(width=state["proj_in.weight"].shape[0], depth=depth, **(config_json or {}))


def original_to_ours(state):
    out = {}
    for key, value in state.items():
        if key.startswith("input."):
            out["proj_in." + key[len("input.") :]] = value
        elif re.match(r"layers\.\d+\.", key):
            out["blocks." + key[len("layers.") :]] = value
        else:
            raise KeyError(key)
    return out


TOY = ModelSpec(
    name="toy",
    role="dit",
    layouts=(
        KeyLayout("ours", ("proj_in.weight", "blocks.0.weight")),
        KeyLayout("original", ("input.weight", "layers.0.weight"), convert=original_to_ours),
        KeyLayout(
            "comfy", ("input.weight", "layers.0.weight"), prefix="model.diffusion_model.", convert=original_to_ours
        ),
    ),
    config_from_state=toy_config,
    build=Toy,
)


@dataclass
class ToyVAEConfig:
    channels: int = 2


class ToyVAE(nn.Module):
    def __init__(self, config: ToyVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = nn.Conv2d(3, config.channels, 1)
        self.decoder = nn.Conv2d(config.channels, 3, 1)


TOY_VAE = ModelSpec(
    name="toy_vae",
    role="vae",
    layouts=(KeyLayout("bundled", ("encoder.weight", "decoder.weight"), prefix="vae."),),
    config_from_state=lambda state, cfg: ToyVAEConfig(channels=state["encoder.weight"].shape[0]),
    build=ToyVAE,
)
SPECS = [TOY, TOY_VAE]


def toy_state(width=4, depth=2, seed=0, layout="ours") -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = Toy(ToyConfig(width=width, depth=depth))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if layout == "ours":
        return state
    renamed = {k.replace("proj_in.", "input.").replace("blocks.", "layers."): v for k, v in state.items()}
    return {("model.diffusion_model." if layout == "comfy" else "") + k: v for k, v in renamed.items()}


def vae_state(seed=1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {"vae." + k: v.clone() for k, v in ToyVAE(ToyVAEConfig()).state_dict().items()}


# ----------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("layout", ["ours", "original", "comfy"])
def test_loads_each_layout_with_exact_weights(tmp_path, layout):
    state = toy_state(width=6, depth=3, layout=layout)
    path = tmp_path / "toy.safetensors"
    save_file(state, str(path))
    model = load_model(path, specs=SPECS)
    assert isinstance(model, Toy) and not model.training
    assert model.config == ToyConfig(width=6, depth=3)
    expected = toy_state(width=6, depth=3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert torch.equal(model.inv_freq, model._inv_freq())  # non-persistent buffer rebuilt


def test_cast_to_dtype_and_loaded_model_fields(tmp_path):
    path = tmp_path / "toy.safetensors"
    save_file(toy_state(), str(path))
    (loaded,) = load_models(path, torch_dtype="bf16", device="cpu", specs=SPECS)
    assert isinstance(loaded, LoadedModel)
    assert (loaded.spec, loaded.role, loaded.layout, loaded.files) == ("toy", "dit", "ours", [str(path)])
    assert loaded.config == ToyConfig()
    assert all(p.dtype == torch.bfloat16 for p in loaded.module.parameters())
    assert loaded.module.inv_freq.dtype == torch.float32  # the model's own buffers keep its choice
    out = loaded.module.proj_in(torch.ones(1, 3, dtype=torch.bfloat16))
    assert out.shape == (1, 4)


def test_loaded_weights_stay_file_backed_and_the_file_untouched(tmp_path):
    path = tmp_path / "toy.safetensors"
    save_file(toy_state(), str(path))
    model = load_model(path, specs=SPECS)
    with torch.no_grad():
        model.proj_in.weight.zero_()  # copy-on-write: the checkpoint keeps its values
    reloaded = load_model(path, specs=SPECS)
    assert torch.equal(reloaded.proj_in.weight, toy_state()["proj_in.weight"])


def test_sharded_folder_with_index(tmp_path):
    state = toy_state(depth=3)
    keys = sorted(state)
    shards = {"m-00001-of-00002.safetensors": keys[:3], "m-00002-of-00002.safetensors": keys[3:]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(tmp_path / name))
    weight_map = {k: name for name, part in shards.items() for k in part}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (loaded,) = load_models(tmp_path, specs=SPECS)
    assert loaded.config.depth == 3 and len(loaded.files) == 2
    assert torch.equal(loaded.module.blocks[2].weight, state["blocks.2.weight"])


def test_pth_with_nested_state_dict(tmp_path):
    path = tmp_path / "toy.pth"
    torch.save({"state_dict": toy_state(layout="original"), "epoch": 7}, path)
    model = load_model(path, specs=SPECS)
    assert torch.equal(model.blocks[1].bias, toy_state()["blocks.1.bias"])


def test_config_json_beside_the_file_is_used(tmp_path):
    save_file(toy_state(), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"scale": 2.5}))
    model = load_model(tmp_path / "diffusion_pytorch_model.safetensors", specs=SPECS)
    assert model.config == ToyConfig(width=4, depth=2, scale=2.5)


def test_explicit_config_wins_over_config_json(tmp_path):
    save_file(toy_state(), str(tmp_path / "toy.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"scale": 2.5}))
    assert load_model(tmp_path / "toy.safetensors", specs=SPECS, config={"scale": 0.5}).config.scale == 0.5
    given = ToyConfig(width=4, depth=2, scale=9.0)
    assert load_model(tmp_path / "toy.safetensors", specs=SPECS, config=given).config is given


def test_broken_config_json_is_named(tmp_path):
    save_file(toy_state(), str(tmp_path / "toy.safetensors"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(tmp_path / "toy.safetensors", specs=SPECS)


def test_meta_state_dict_source_gives_a_meta_module():
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in toy_state(depth=4).items()}
    model = load_model(meta, torch_dtype=torch.float16, specs=SPECS)
    assert model.config.depth == 4
    assert all(p.is_meta and p.dtype == torch.float16 for p in model.parameters())


def test_in_memory_state_dict_source():
    model = load_model(toy_state(seed=3), specs=SPECS)
    assert torch.equal(model.proj_in.bias, toy_state(seed=3)["proj_in.bias"])


def test_mixed_meta_and_real_tensors_are_refused():
    state = toy_state()
    state["proj_in.bias"] = state["proj_in.bias"].to("meta")
    with pytest.raises(ConfigError, match="mixes meta and real tensors.*proj_in.bias"):
        load_model(state, specs=SPECS)


def test_unknown_checkpoint_names_the_closest_spec_and_missing_keys(tmp_path):
    path = tmp_path / "mystery.safetensors"
    save_file({"input.weight": torch.zeros(4, 3), "head.weight": torch.zeros(2, 4)}, str(path))
    with pytest.raises(UnknownModelError) as info:
        load_model(path, specs=SPECS)
    message = str(info.value)
    assert "mystery.safetensors" in message
    assert "'toy'" in message and "'original'" in message and "'layers.0.weight'" in message
    assert message.index("'toy'") < message.index("'toy_vae'")  # closest first


def test_a_lora_file_given_as_a_model_says_to_load_it_as_a_lora(tmp_path):
    """A LoRA is not a model with 0% of some spec's signature: the message says what it is and how to load it."""
    torch.manual_seed(0)
    path = tmp_path / "style_lora.safetensors"
    lora = {}
    for name in ("proj_in", "blocks.0", "blocks.1"):
        lora[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(2, 4)
        lora[f"diffusion_model.{name}.lora_B.weight"] = torch.zeros(4, 2)
    lora["diffusion_model.proj_in.alpha"] = torch.tensor(2.0)
    save_file(lora, str(path))
    with pytest.raises(UnknownModelError, match=r"style_lora\.safetensors is a LoRA file.*pipe\.load_lora\(path\)"):
        load_model(path, specs=SPECS)


def test_no_specs_installed():
    with pytest.raises(UnknownModelError, match="no model specs are installed"):
        load_model(toy_state(), specs=[])


def test_shape_mismatch_names_the_parameter_and_both_shapes(tmp_path):
    path = tmp_path / "toy.safetensors"
    save_file(toy_state(width=4), str(path))
    with pytest.raises(CheckpointError) as info:
        load_model(path, specs=SPECS, config=ToyConfig(width=8, depth=2))
    message = str(info.value)
    assert "toy.safetensors" in message and "'toy'" in message
    assert "'proj_in.weight': checkpoint (4, 3) vs model (8, 3)" in message


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    path = tmp_path / "toy.safetensors"
    save_file(toy_state(depth=2), str(path))
    with pytest.raises(CheckpointError) as info:
        load_model(path, specs=SPECS, config=ToyConfig(width=4, depth=3))
    message = str(info.value)
    assert "missing keys 'blocks.2.weight', 'blocks.2.bias'" in message and "layout 'ours'" in message


def test_unmappable_key_is_named(tmp_path):
    state = toy_state(layout="original")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="layout 'original' cannot map key 'extra.weight'"):
        load_model(state, specs=SPECS)


def test_multi_model_file_gives_a_dict_by_role(tmp_path):
    path = tmp_path / "bundle.safetensors"
    save_file({**toy_state(layout="comfy"), **vae_state()}, str(path))
    models = load_model(path, specs=SPECS)
    assert set(models) == {"dit", "vae"}
    assert isinstance(models["dit"], Toy) and isinstance(models["vae"], ToyVAE)
    assert torch.equal(models["vae"].decoder.weight, vae_state()["vae.decoder.weight"])
    loaded = load_models(path, specs=SPECS, config={"vae": ToyVAEConfig(channels=2)})
    assert [item.role for item in loaded] == ["dit", "vae"]


def test_roles_load_one_model_of_a_multi_model_file_without_reading_the_others(tmp_path, monkeypatch):
    """A training stage that wants only the VAE of a file that also holds the DiT reads the VAE's tensors alone."""
    from diffsynth.runtime.checkpoint import LazyStateDict

    path = tmp_path / "bundle.safetensors"
    save_file({**toy_state(layout="comfy"), **vae_state()}, str(path))
    read, real = [], LazyStateDict.__getitem__

    def recording(self, key):
        read.append(key)
        return real(self, key)

    monkeypatch.setattr(LazyStateDict, "__getitem__", recording)
    loaded = load_models(path, specs=SPECS, roles={"vae"})
    assert [item.role for item in loaded] == ["vae"]
    assert read and all(key.startswith("vae.") for key in read)
    assert torch.equal(loaded[0].module.decoder.weight, vae_state()["vae.decoder.weight"])
    assert load_models(path, specs=SPECS, roles=set()) == []


def test_multi_model_file_refuses_a_single_config(tmp_path):
    with pytest.raises(ConfigError, match="several models.*dict role -> config"):
        load_model({**toy_state(layout="comfy"), **vae_state()}, specs=SPECS, config=ToyConfig())


def test_keys_no_model_claims_are_an_error():
    state = {**toy_state(layout="comfy"), "cond_stage_model.weight": torch.zeros(2)}
    with pytest.raises(UnknownModelError, match="belong to no known model: 'cond_stage_model.weight'"):
        load_model(state, specs=SPECS)


def test_recognise_prefers_the_spec_owning_everything():
    found = recognise(toy_state().keys(), specs=[TOY_VAE, TOY])
    assert [(r.spec.name, r.layout.name) for r in found] == [("toy", "ours")]


def test_meta_buffer_without_materialize_is_named():
    spec = ModelSpec("toy_plain", "dit", TOY.layouts, toy_config, ToyWithoutMaterialize)
    with pytest.raises(DiffSynthError, match="left buffers on the meta device.*'inv_freq'.*materialize_buffers"):
        load_model(toy_state(), specs=[spec])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"torch_dtype": "bfloat"}, "unknown dtype"),
        ({"device": "gpu"}, "unknown device"),
        ({"specs": ["toy"]}, "ModelSpec"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        load_model(toy_state(), **{"specs": SPECS, **kwargs})


@pytest.mark.parametrize("source", [42, None, {"w": 1}])
def test_bad_source(source):
    with pytest.raises(ConfigError, match="source|state dict"):
        load_model(source, specs=SPECS)


def test_describe_checkpoint(tmp_path, caplog):
    path = tmp_path / "bundle.safetensors"
    save_file({**toy_state(layout="comfy"), **vae_state()}, str(path))
    info = describe_checkpoint(path, specs=SPECS)
    assert info["files"] == [str(path)] and info["tensors"] == 10
    assert info["parameters"] == sum(t.numel() for t in {**toy_state(), **vae_state()}.values())
    assert info["dtypes"] == {"float32": {"tensors": 10, "parameters": info["parameters"]}}
    models = {m["spec"]: m for m in info["models"]}
    assert models["toy"]["layout"] == "comfy" and models["toy"]["config"] == {"width": 4, "depth": 2, "scale": 1.0}
    assert models["toy_vae"]["role"] == "vae" and models["toy_vae"]["config"] == {"channels": 2}


def test_describe_unknown_checkpoint(tmp_path):
    path = tmp_path / "mystery.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2)}, str(path))
    info = describe_checkpoint(path, specs=SPECS)
    assert info["models"] == [] and "Closest specs" in info["unrecognised"]


def test_load_logs_what_it_loaded(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="diffsynth.runtime.loading")
    load_model(toy_state(), specs=SPECS)
    assert "loaded toy (dit, layout ours)" in caplog.text


def test_an_entry_point_may_register_several_families(monkeypatch, caplog):
    """A package with two generations (FLUX.1 and FLUX.2) registers both through its one entry point."""
    import importlib.metadata

    from diffsynth.runtime import registry

    first, second = registry.Family(name="gen1"), registry.Family(name="gen2")

    class EntryPoint:
        def __init__(self, name, value):
            self.name, self.value = name, value

        def load(self):
            return self.value

    points = [
        EntryPoint("pair", (first, second)),
        EntryPoint("single", registry.Family(name="solo")),
        EntryPoint("odd", 3),
    ]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: points)
    registry.installed_families.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            families = registry.installed_families()
    finally:
        registry.installed_families.cache_clear()
    assert list(families) == ["gen1", "gen2", "solo"]
    assert families["gen1"] is first and families["gen2"] is second
    assert "'odd'" in caplog.text and "not a Family" in caplog.text
