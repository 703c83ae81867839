"""FLUX.2 text encoders: Mistral-Small-3.1 (dev) and Qwen3 (klein) loads, hidden-state parity with transformers,
prompt-embedding parity with diffusers' FLUX.2 pipelines, and full-size key checks on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffsynth_flux2_test_repo import hub_names, tiny_mistral3_json
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from diffsynth.flux.flux2.encoder_formats import MISTRAL3_TEXT_SPEC, MISTRAL_SMALL_DEFAULTS
from diffsynth.flux.flux2.text_encoder import (
    MISTRAL_LAYERS,
    QWEN3_LAYERS,
    SYSTEM_MESSAGE,
    Mistral3TextEncoder,
    load_mistral_tokenizer,
    mistral_chat,
    mistral_prompt_embeds,
    qwen3_prompt_embeds,
)
from diffsynth.runtime.errors import CheckpointError, ConfigError
from diffsynth.runtime.loading import load_model, recognise
from diffsynth.runtime.models.qwen3 import QWEN3_SPEC, Qwen3TextEncoder
from diffsynth.runtime.registry import all_specs
from diffsynth.runtime.testing import conformance as cf
from diffsynth.runtime.testing.tokenizers import build_tiny_mistral_tokenizer, build_tiny_qwen_tokenizer
from diffsynth.runtime.testing.weights import random_weights

KEYS = Path(__file__).parent / "data" / "keys"

PROMPTS = ["a photo of a cat sitting on a red chair", "an astronaut [IMG] riding a horse on the moon, high quality"]


# ----------------------------------------------------------------------------------------- tiny configs
def tiny_qwen3_json(**overrides) -> dict:
    config = dict(
        model_type="qwen3",
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        use_sliding_window=False,
    )
    config.update(overrides)
    return config


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    return random_weights(module, seed, scale=0.2, is_norm=lambda name, p: "norm" in name)


def mistral3_reference(config_json: dict, seed: int = 0) -> Mistral3ForConditionalGeneration:
    return randomize(Mistral3ForConditionalGeneration(Mistral3Config(**config_json)), seed).eval()


def write_folder(folder: Path, state: dict[str, torch.Tensor], config_json: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    if config_json is not None:
        (folder / "config.json").write_text(json.dumps(config_json))
    return folder / "model.safetensors"


def padded_batch(vocab: int, side: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 12), generator=generator)
    mask = torch.ones(3, 12, dtype=torch.long)
    for row, real in ((1, 8), (2, 3)):
        if side == "right":
            mask[row, real:] = 0
        else:
            mask[row, : 12 - real] = 0
    return ids, mask


@pytest.fixture(scope="module")
def mistral_tokenizer(tmp_path_factory):
    return build_tiny_mistral_tokenizer(tmp_path_factory.mktemp("mistral_tok"))


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    return build_tiny_qwen_tokenizer(tmp_path_factory.mktemp("qwen_tok"))


# ----------------------------------------------------------------------------------------- Mistral3 loads
@pytest.mark.parity
@pytest.mark.parametrize("layout", ["hub", "transformers5"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_mistral_hidden_states_match_transformers(tmp_path, layout, side):
    config_json = tiny_mistral3_json()
    ref = mistral3_reference(config_json)
    if layout == "hub":
        path = write_folder(tmp_path / "text_encoder", hub_names(ref.state_dict()), config_json)
        ours = load_model(path, specs=[MISTRAL3_TEXT_SPEC])
    else:
        state = {k: v.clone() for k, v in ref.state_dict().items()}
        assert MISTRAL3_TEXT_SPEC.match(state).name == "transformers5"
        ours = load_model(state, specs=[MISTRAL3_TEXT_SPEC], config=config_json)
    assert isinstance(ours, Mistral3TextEncoder)

    ids, mask = padded_batch(300, side)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
        got = ours.hidden_states_at(ids, mask, indices=range(len(want)))
    assert len(got) == len(want) == 5
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        # padded positions included: FLUX.2's DiT reads every position
        assert (g - w).abs().max() <= 1e-6, f"hidden state {i}: {(g - w).abs().max()}"


def test_mistral_hidden_states_at_stops_early():
    config_json = tiny_mistral3_json(num_hidden_layers=3)
    ref = mistral3_reference(config_json)
    model = load_model(ref.state_dict(), specs=[MISTRAL3_TEXT_SPEC], config=config_json)
    calls, norm_calls = [], []
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    model.norm.register_forward_hook(lambda *_: norm_calls.append(1))
    ids, mask = padded_batch(300, "right")
    with torch.no_grad():
        (second,) = model.hidden_states_at(ids, mask, indices=(2,))
        assert calls == [0, 1] and not norm_calls
        (last,) = model.hidden_states_at(ids, mask, indices=(-1,))
        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert norm_calls == [1, 1]
    assert torch.equal(second, full[2])
    assert torch.equal(last, full[-1])
    with pytest.raises(IndexError, match="hidden state index 4 out of range for 3 layers"):
        model.hidden_states_at(ids, mask, indices=(4,))


def test_mistral_rotary_rebuilt_after_load_and_kept_float32(tmp_path):
    config_json = tiny_mistral3_json()
    path = write_folder(tmp_path, hub_names(mistral3_reference(config_json).state_dict()), config_json)
    model = load_model(path, specs=[MISTRAL3_TEXT_SPEC])
    eager = Mistral3TextEncoder(model.config)
    for name, buffer in eager.named_buffers():
        assert model.get_buffer(name).device.type == "cpu", name
        assert torch.equal(model.get_buffer(name), buffer), name
    model.to(torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    for name, buffer in model.rotary_emb.named_buffers():
        assert buffer.dtype == torch.float32 and torch.equal(buffer, eager.get_buffer("rotary_emb." + name)), name


def test_mistral_conformance():
    config = Mistral3Config(**tiny_mistral3_json()).text_config

    def factory():
        torch.manual_seed(0)
        return randomize(Mistral3TextEncoder(config))

    ids, mask = padded_batch(300, "right")
    cf.check_declared_units(factory)
    cf.check_meta_load(factory, (ids,), {"attention_mask": mask})


def test_mistral_config_json_contradiction_and_wrong_kind(tmp_path):
    config_json = tiny_mistral3_json()
    state = hub_names(mistral3_reference(config_json).state_dict())
    wrong = tiny_mistral3_json(intermediate_size=128)
    with pytest.raises(ConfigError, match="intermediate_size=128"):
        load_model(write_folder(tmp_path / "a", state, wrong), specs=[MISTRAL3_TEXT_SPEC])
    with pytest.raises(ConfigError, match="'qwen3' config"):
        load_model(write_folder(tmp_path / "b", state, tiny_qwen3_json()), specs=[MISTRAL3_TEXT_SPEC])
    # without a config.json, the released head_dim (128) does not divide the tiny widths: said so
    with pytest.raises(ConfigError, match="head_dim=128"):
        load_model(write_folder(tmp_path / "c", state, None), specs=[MISTRAL3_TEXT_SPEC])


def test_mistral_unknown_key_is_an_error(tmp_path):
    config_json = tiny_mistral3_json()
    state = hub_names(mistral3_reference(config_json).state_dict())
    state["language_model.model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.q_proj\.bias"):
        load_model(write_folder(tmp_path, state, config_json), specs=[MISTRAL3_TEXT_SPEC])


# ----------------------------------------------------------------------------------------- full size (meta)
def meta_state(name: str) -> dict[str, torch.Tensor]:
    shapes = json.loads((KEYS / f"{name}.json").read_text())
    return {k: torch.empty(v, dtype=torch.bfloat16, device="meta") for k, v in shapes.items()}


@pytest.mark.parametrize(
    ("name", "layout"), [("mistral3_24b_file_layout", "hub"), ("mistral3_24b_tf5_layout", "transformers5")]
)
def test_mistral_full_size_files_load_on_meta(name, layout):
    state = meta_state(name)
    assert len(state) == 585
    (rec,) = recognise(state, specs=[*all_specs(), MISTRAL3_TEXT_SPEC])
    assert rec.spec is MISTRAL3_TEXT_SPEC and rec.layout.name == layout
    model = load_model(state, specs=[MISTRAL3_TEXT_SPEC])  # no config.json: the released values
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size) == (
        5120,
        40,
        32768,
        131072,
    )
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 128)
    assert (
        config.rope_parameters["rope_theta"] == MISTRAL_SMALL_DEFAULTS["rope_theta"] and config.sliding_window is None
    )
    assert 3 * config.hidden_size == 15360  # FLUX.2-dev's txt_in width


def test_mistral_full_size_matches_transformers_reference():
    """transformers' Mistral3 at its default (= Mistral-Small-3.1) config: the key list is the file's, and our
    module is exactly its language model."""
    with torch.device("meta"):
        ref = Mistral3ForConditionalGeneration(Mistral3Config(tie_word_embeddings=False))
    want = {k: list(v.shape) for k, v in ref.state_dict().items()}
    assert want == json.loads((KEYS / "mistral3_24b_tf5_layout.json").read_text())
    model = load_model(meta_state("mistral3_24b_tf5_layout"), specs=[MISTRAL3_TEXT_SPEC])
    prefix = "model.language_model."
    lm = {k[len(prefix) :]: v for k, v in want.items() if k.startswith(prefix)}
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == lm


# ----------------------------------------------------------------------------------------- Qwen3 (klein)
def qwen3_reference(config_json: dict, seed: int = 0) -> Qwen3ForCausalLM:
    return randomize(Qwen3ForCausalLM(Qwen3Config(**config_json)), seed).eval()


@pytest.mark.parity
def test_qwen3_8b_style_file_with_lm_head_loads(tmp_path):
    """klein-9B's Qwen3-8B is untied and its file stores lm_head.weight: the spec drops it and loads the rest."""
    config_json = tiny_qwen3_json(tie_word_embeddings=False)
    ref = qwen3_reference(config_json)
    state = {k: v.clone().contiguous() for k, v in ref.state_dict().items()}
    assert "lm_head.weight" in state
    ours = load_model(write_folder(tmp_path, state, config_json), specs=[QWEN3_SPEC])
    assert isinstance(ours, Qwen3TextEncoder)
    ids, mask = padded_batch(300, "right")
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = ours.hidden_states_at(ids, mask, indices=range(len(want)))
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max() <= 1e-6


@pytest.mark.parametrize(("name", "hidden"), [("qwen3_4B_no_lmhead", 2560), ("qwen3_8B_causallm", 4096)])
def test_qwen3_full_size_files_load_on_meta(name, hidden):
    state = meta_state(name)
    model = load_model(state, specs=[QWEN3_SPEC])
    assert model.config.hidden_size == hidden and model.config.num_hidden_layers == 36
    assert max(QWEN3_LAYERS) < model.config.num_hidden_layers  # klein reads layers 9, 18, 27


# ----------------------------------------------------------------------------------------- prompt embeddings
def _diffusers_flux2():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.flux2 import pipeline_flux2, pipeline_flux2_klein, system_messages

    return diffusers, pipeline_flux2, pipeline_flux2_klein, system_messages


@pytest.mark.parity
def test_system_message_is_the_released_one():
    _, _, _, system_messages = _diffusers_flux2()
    assert SYSTEM_MESSAGE == system_messages.SYSTEM_MESSAGE


@pytest.mark.parity
@pytest.mark.parametrize("side", ["left", "right"])
def test_mistral_prompt_embeds_match_diffusers(tmp_path, mistral_tokenizer, side):
    _, pipeline_flux2, _, _ = _diffusers_flux2()
    config_json = tiny_mistral3_json(num_hidden_layers=max(MISTRAL_LAYERS) + 1)
    ref = mistral3_reference(config_json)
    path = write_folder(tmp_path, hub_names(ref.state_dict()), config_json)
    ours = load_model(path, specs=[MISTRAL3_TEXT_SPEC])
    mistral_tokenizer.padding_side = side

    # right: every default (512 tokens); left: 192 tokens, still past the longest chat (174 tiny tokens)
    length = {} if side == "right" else {"max_sequence_length": 192}
    want = pipeline_flux2.Flux2Pipeline._get_mistral_3_small_prompt_embeds(
        text_encoder=ref, tokenizer=mistral_tokenizer, prompt=PROMPTS, **length
    )
    got = mistral_prompt_embeds(ours, mistral_tokenizer, PROMPTS, **length)
    assert got.shape == want.shape == (2, length.get("max_sequence_length", 512), 3 * 32)
    assert got.dtype == want.dtype
    assert (got - want).abs().max() <= 1e-6

    # a short length truncates inside the prompt (after the 142-token system turn); other layers; a plain
    # transformers encoder
    want = pipeline_flux2.Flux2Pipeline._get_mistral_3_small_prompt_embeds(
        text_encoder=ref, tokenizer=mistral_tokenizer, prompt=PROMPTS[1], max_sequence_length=150,
        hidden_states_layers=(1, 31),
    )  # fmt: skip
    got = mistral_prompt_embeds(ref, mistral_tokenizer, PROMPTS[1], max_sequence_length=150, layers=(1, 31))
    assert got.shape == (1, 150, 2 * 32)
    assert (got - want).abs().max() <= 1e-6


@pytest.mark.parity
def test_qwen3_prompt_embeds_match_diffusers(tmp_path, qwen_tokenizer):
    _, _, pipeline_flux2_klein, _ = _diffusers_flux2()
    config_json = tiny_qwen3_json(num_hidden_layers=max(QWEN3_LAYERS) + 1)
    ref = qwen3_reference(config_json)
    state = {k: v.clone().contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    ours = load_model(write_folder(tmp_path, state, config_json), specs=[QWEN3_SPEC])

    want = pipeline_flux2_klein.Flux2KleinPipeline._get_qwen3_prompt_embeds(
        text_encoder=ref, tokenizer=qwen_tokenizer, prompt=PROMPTS
    )
    got = qwen3_prompt_embeds(ours, qwen_tokenizer, PROMPTS)
    assert got.shape == want.shape == (2, 512, 3 * 32)
    assert (got - want).abs().max() <= 1e-6

    want = pipeline_flux2_klein.Flux2KleinPipeline._get_qwen3_prompt_embeds(
        text_encoder=ref, tokenizer=qwen_tokenizer, prompt=PROMPTS[0], max_sequence_length=9, dtype=torch.bfloat16
    )
    got = qwen3_prompt_embeds(ours, qwen_tokenizer, PROMPTS[0], max_sequence_length=9, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (1, 9, 3 * 32)
    assert torch.equal(got, want)


def test_prompt_embeds_reject_bad_arguments(mistral_tokenizer):
    model = Mistral3TextEncoder(Mistral3Config(**tiny_mistral3_json()).text_config)
    with pytest.raises(ValueError, match="at least one prompt"):
        mistral_prompt_embeds(model, mistral_tokenizer, [])
    with pytest.raises(ValueError, match="max_sequence_length"):
        mistral_prompt_embeds(model, mistral_tokenizer, "a cat", max_sequence_length=0)
    with pytest.raises(ValueError, match="max_sequence_length"):
        qwen3_prompt_embeds(model, mistral_tokenizer, "a cat", max_sequence_length=True)


def test_a_length_keeping_only_the_template_is_refused(mistral_tokenizer, qwen_tokenizer):
    """A max_sequence_length ending inside the chat template (dev: its system turn, 142 tiny tokens; klein: the
    5-token user header) would drop the prompt and give the same embeddings for every prompt."""
    with pytest.raises(ConfigError, match=r"max_sequence_length=142 keeps none of prompt 1's.* > 142"):
        mistral_prompt_embeds(None, mistral_tokenizer, ["", PROMPTS[0]], max_sequence_length=142)
    with pytest.raises(ConfigError, match=r"max_sequence_length=5 keeps none of prompt 0's.* > 5"):
        qwen3_prompt_embeds(None, qwen_tokenizer, PROMPTS[0], max_sequence_length=5)


def test_a_length_keeping_part_of_the_prompt_or_an_empty_prompt_runs(mistral_tokenizer, qwen_tokenizer):
    mistral = Mistral3TextEncoder(Mistral3Config(**tiny_mistral3_json(num_hidden_layers=2)).text_config)
    assert mistral_prompt_embeds(mistral, mistral_tokenizer, PROMPTS[0], 143, layers=(1,)).shape == (1, 143, 32)
    assert mistral_prompt_embeds(mistral, mistral_tokenizer, "", 100, layers=(1,)).shape == (1, 100, 32)
    qwen = Qwen3TextEncoder(Qwen3Config(**tiny_qwen3_json(num_hidden_layers=2)))
    assert qwen3_prompt_embeds(qwen, qwen_tokenizer, [PROMPTS[0], ""], 6, layers=(1,)).shape == (2, 6, 32)


def test_load_mistral_tokenizer_takes_the_processor_chat_template(tmp_path, mistral_tokenizer):
    """A tokenizer/ folder whose template lives only in the processor's `chat_template.json` (or nowhere)."""
    folder = tmp_path / "tokenizer"
    mistral_tokenizer.save_pretrained(str(folder))
    template = mistral_tokenizer.chat_template
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="no chat template"):
        load_mistral_tokenizer(folder)

    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    loaded = load_mistral_tokenizer(folder)
    kwargs = dict(tokenize=True, return_dict=True, padding="max_length", truncation=True, max_length=200)
    chat = mistral_chat(PROMPTS)
    assert loaded.apply_chat_template(chat, **kwargs) == mistral_tokenizer.apply_chat_template(chat, **kwargs)

    bare = AutoTokenizer.from_pretrained(str(folder))  # what a plain AutoTokenizer load would give
    assert not bare.chat_template
    with pytest.raises(ConfigError, match="load_mistral_tokenizer"):
        mistral_prompt_embeds(None, bare, "a cat")
