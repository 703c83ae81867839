"""TrainConfig from flags and YAML: types, overrides, and messages that name the flag to change."""

import re

import pytest

from diffsynth.runtime.errors import ConfigError
from diffsynth.training.cli import main
from diffsynth.training.config import TrainConfig, from_dict, parse_args

BASE = ["--model", "some/folder", "--dataset_base_path", "data"]


def test_flags_become_typed_fields():
    config, _ = parse_args(
        [
            *BASE,
            "--lora_rank",
            "8",
            "--learning_rate",
            "5e-5",
            "--lora_target_modules",
            "to_q, to_k",
            "--use_gradient_checkpointing",
            "--height",
            "512",
            "--width",
            "768",
            "--lr_scheduler",
            "cosine",
        ]
    )
    assert config.lora_rank == 8 and config.learning_rate == 5e-5
    assert config.lora_target_modules == ["to_q", "to_k"]
    assert config.use_gradient_checkpointing is True
    assert (config.height, config.width, config.lr_scheduler) == (512, 768, "cosine")
    assert config.batch_size == TrainConfig.batch_size  # untouched fields keep their defaults


def test_yaml_file_with_flags_overriding_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: Tongyi-MAI/Z-Image-Turbo\ndataset_base_path: data\nlora_rank: 16\nlearning_rate: 1e-4\n"
        "lora_formats: [diffsynth, kohya]\nuse_gradient_checkpointing: true\n"
    )
    config, _ = parse_args(["--config", str(path), "--lora_rank", "4"])
    assert config.lora_rank == 4  # the flag wins
    assert config.learning_rate == 1e-4  # YAML's 1e-4 is a string to PyYAML; we read it as a float
    assert config.lora_formats == ["diffsynth", "kohya"] and config.use_gradient_checkpointing is True


def test_whole_number_lists_from_flags_and_yaml(tmp_path):
    config, _ = parse_args([*BASE, "--resolutions", "512, 768"])
    assert config.resolutions == [512, 768]
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndataset_base_path: data\nresolutions: [512, 1024]\n")
    assert parse_args(["--config", str(path)])[0].resolutions == [512, 1024]
    with pytest.raises(ConfigError, match="--resolutions 512,big: give whole numbers"):
        parse_args([*BASE, "--resolutions", "512,big"])


def test_unknown_yaml_key_lists_the_accepted_ones(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: x\nlora_rnak: 4\n")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) lora_rnak; accepted: .*lora_rank"):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lora_rank": 0}, "--lora_rank 0 must be >= 1"),
        ({"lora_rank": "four"}, "--lora_rank must be an integer"),
        ({"height": 512}, "--height and --width go together"),
        ({"lora_formats": "diffsynth,safetensors"}, "--lora_formats .* choose from diffsynth, peft, kohya"),
        ({"trainable_models": "dit", "lora_rank": 4, "lora_target_modules": "to_q"}, "--trainable_models dit"),
        ({"stage": "encode"}, "--stage encode .* give --cache_dir"),
        ({"stage": "cache"}, "--stage 'cache': choose from train, encode"),
        ({"dtype": "bf17"}, "--dtype 'bf17' is not a dtype"),
        ({"min_timestep_boundary": 0.8, "max_timestep_boundary": 0.2}, "--min_timestep_boundary 0.8"),
        ({"seed": -1}, r"--seed -1 must be between 0 and 2\*\*32 - 1"),
        ({"seed": 2**32}, r"--seed 4294967296 must be between"),
        ({"learning_rate": "inf"}, "--learning_rate inf: give a finite number"),
        ({"learning_rate": "nan"}, "--learning_rate nan: give a finite number"),
        ({"weight_decay": "nan"}, "--weight_decay nan: give a finite number"),
        ({"max_grad_norm": "inf"}, "--max_grad_norm inf: give a finite number"),
    ],
)
def test_bad_values_name_the_flag(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"model": "m", "dataset_base_path": "d", **values}).check()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"logit_mean": 0.5}, r"--logit_mean 0.5 shapes --timestep_sampling logit_normal; .*would do nothing"),
        ({"logit_std": 2.0}, r"--logit_std 2.0 shapes --timestep_sampling logit_normal"),
        ({"lokr_factor": 4}, r"--lokr_factor 4 sizes the Kronecker factors of --lora_type lokr; --lora_type lora has"),
        ({"lokr_factor": 4, "lora_type": "loha"}, r"--lokr_factor 4 .*; --lora_type loha has none"),
        ({"lora_alpha": 8, "trainable_models": "dit"}, r"--lora_alpha 8.0 scales a LoRA; --trainable_models trains"),
        ({"validation_height": 64, "validation_width": 64}, r"--validation_height 64 shapes the validation samples; "
         "give --validation_prompts or --validation_prompts_file too"),
        ({"validation_num_inference_steps": 4}, r"--validation_num_inference_steps 4 shapes the validation samples"),
        ({"validation_seed": 3}, r"--validation_seed 3 shapes the validation samples"),
        ({"validation_steps": 100}, r"--validation_steps 100 times the validation samples; give --validation_prompts"),
        ({"validation_steps": 100, "validation_dataset_base_path": "v", "validation_loss_steps": 50},
         r"--validation_steps 100 times the validation samples \(--validation_loss_steps times the validation loss\)"),
    ],
)  # fmt: skip
def test_settings_that_would_do_nothing_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"model": "m", "dataset_base_path": "d", **values}).check()


@pytest.mark.parametrize(
    "values",
    [
        {"timestep_sampling": "logit_normal", "logit_mean": 0.5, "logit_std": 2.0},
        {"lora_type": "lokr", "lokr_factor": 4},
        {"lora_alpha": 8},
        {"validation_prompts": "a cat", "validation_steps": 100, "validation_height": 64, "validation_width": 64},
        {"validation_prompts_file": "prompts.txt", "validation_seed": 3, "validation_num_inference_steps": 4},
        {"validation_dataset_base_path": "v", "validation_steps": 100},  # the validation loss's default interval
    ],
)
def test_the_same_settings_where_they_act_are_accepted(values):
    from_dict({"model": "m", "dataset_base_path": "d", **values}).check()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"preset_lora_scale": 0.5}, r"--preset_lora_scale 0.5 scales --preset_lora_path; this run has none"),
        ({"dmd2_student_update_freq": 3}, r"--dmd2_student_update_freq 3 shapes --task dmd2; --task sft"),
        ({"dmd2_teacher_cfg_scale": 4.0, "task": "trajectory_imitation"}, r"--dmd2_teacher_cfg_scale 4.0 shapes"),
        ({"dmd2_student_t_list": "0.9,0"}, r"--dmd2_student_t_list 0.9,0 shapes --task dmd2"),
        ({"trajectory_teacher_cfg_scale": 5.0}, r"--trajectory_teacher_cfg_scale 5.0 shapes --task trajectory_imi"),
        ({"trajectory_student_steps": 4, "task": "dmd2"}, r"--trajectory_student_steps 4 shapes"),
        ({"distill_num_inference_steps": 8}, r"--distill_num_inference_steps 8 shapes --task direct_distill"),
        ({"distill_num_inference_steps": 8, "task": "dmd2"}, r"--distill_num_inference_steps 8 .*--task dmd2 does"),
        ({"task": "direct_distill", "timestep_sampling": "logit_normal"}, r"--timestep_sampling logit_normal .*"
         "--task direct_distill samples each row from its seed"),
        ({"task": "direct_distill", "min_timestep_boundary": 0.5}, r"--min_timestep_boundary 0.5 shapes --task sft"),
        ({"task": "direct_distill", "max_timestep_boundary": 0.5}, r"--max_timestep_boundary 0.5 shapes"),
        ({"task": "direct_distill", "loss_weighting": "none"}, r"--loss_weighting none shapes --task sft / dmd2 /"),
        ({"task": "trajectory_imitation", "timestep_sampling": "logit_normal"}, r"--timestep_sampling logit_normal "
         "shapes --task sft / dmd2; --task trajectory_imitation trains at the student's sigmas"),
        ({"task": "trajectory_imitation", "min_timestep_boundary": 0.2}, r"--min_timestep_boundary 0.2 shapes"),
    ],
)  # fmt: skip
def test_settings_of_another_task_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"model": "m", "dataset_base_path": "d", **values}).check()


@pytest.mark.parametrize(
    "values",
    [
        {"preset_lora_path": "p.safetensors", "preset_lora_scale": 0.5},
        {"task": "dmd2", "dmd2_student_update_freq": 3, "timestep_sampling": "logit_normal", "logit_mean": 0.5,
         "min_timestep_boundary": 0.2, "loss_weighting": "none"},  # the fake score's flow-matching loss reads them
        {"task": "trajectory_imitation", "trajectory_teacher_cfg_scale": 5.0, "loss_weighting": "none"},
        {"task": "direct_distill", "distill_num_inference_steps": 8},
        {"timestep_sampling": "logit_normal", "max_timestep_boundary": 0.5, "loss_weighting": "none"},
        {"task": "direct_distill", "dmd2_student_update_freq": 5},  # a default value is not a setting given
    ],
)  # fmt: skip
def test_settings_of_the_task_itself_are_accepted(values):
    from_dict({"model": "m", "dataset_base_path": "d", **values}).check()


def test_a_config_file_with_a_byte_order_mark_reads_and_a_broken_one_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\xef\xbb\xbfmodel: x\ndataset_base_path: d\nlora_rank: 4\n")
    config, _ = parse_args(["--config", str(path)])
    assert (config.model, config.lora_rank) == ("x", 4)
    path.write_text("model: [x\n")
    with pytest.raises(ConfigError, match=rf"--config {re.escape(str(path))} is not YAML"):
        parse_args(["--config", str(path)])


def test_a_dataset_and_a_model_are_required():
    with pytest.raises(ConfigError, match="--dataset_base_path is required"):
        TrainConfig(model="m").check()
    with pytest.raises(ConfigError, match="no model given: pass --model"):
        TrainConfig(dataset_base_path="d").check()
    TrainConfig(model="m", cache_dir="c").check()  # training from a cache needs no dataset folder


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--lora_rank", "--trainable_models", "--cache_dir", "--resume", "--max_pixels"):
        assert flag in out


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert main(["--dataset_base_path", "d", "--model", "m", "--lora_rank", "0"]) == 2
    assert "--lora_rank 0 must be >= 1" in capsys.readouterr().err


def test_validation_prompts_split_on_bars_so_prompts_keep_their_commas():
    from diffsynth.training.config import parse_args

    argv = ["--family", "m:T", "--model", "m", "--dataset_base_path", "d", "--lora_target_modules", "a,b"]
    config, _ = parse_args([*argv, "--validation_prompts", "a red fox, in the snow|a cat"])
    assert config.validation_prompts == ["a red fox, in the snow", "a cat"]
    assert config.lora_target_modules == ["a", "b"]


def test_task_options_from_flags_and_yaml(tmp_path):
    config, _ = parse_args([*BASE, "--task_options", "sigma_shift=3, kontext_auto_resize=true,note=a b"])
    assert config.task_options == {"sigma_shift": 3, "kontext_auto_resize": True, "note": "a b"}
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndataset_base_path: d\ntask_options:\n  embedded_guidance: 1.0\n")
    config, _ = parse_args(["--config", str(path)])
    assert config.task_options == {"embedded_guidance": 1.0}
    assert parse_args(BASE)[0].task_options == {}
    with pytest.raises(ConfigError, match="--task_options 'sigma_shift': write name=value pairs"):
        parse_args([*BASE, "--task_options", "sigma_shift"])
    with pytest.raises(ConfigError, match="--task_options must be a mapping or name=value pairs, got 3"):
        from_dict({"model": "m", "dataset_base_path": "d", "task_options": 3})


def test_trainable_models_naming_a_trainable_slot_sets_the_trained_model_option():
    """A task's `trainable_slots` (models it trains in the denoiser's place) are chosen by --trainable_models or
    --lora_base_model; they become its `trained_model` option, which must agree with an explicit one."""
    from diffsynth.training.trainer import trained_model_option

    class Task:
        trainable_slots = ("controller", "adapter")

    def option(*flags):
        return trained_model_option(Task, parse_args([*BASE, *flags])[0])

    assert option() == {} and option("--trainable_models", "dit") == {}
    assert option("--trainable_models", "controller") == {"trained_model": "controller"}
    assert option("--lora_base_model", "adapter") == {"trained_model": "adapter"}
    assert option("--trainable_models", "controller", "--task_options", "trained_model=controller") == {
        "trained_model": "controller"
    }
    with pytest.raises(ConfigError, match="contradicts --trainable_models / --lora_base_model controller"):
        option("--trainable_models", "controller", "--task_options", "trained_model=adapter")
    with pytest.raises(ConfigError, match="name controller, adapter: train one at a time"):
        option("--trainable_models", "controller,adapter")
    assert trained_model_option(object, parse_args([*BASE, "--trainable_models", "controller"])[0]) == {}


def test_a_lora_preset_is_refused_as_a_training_model(monkeypatch):
    """A LoRA preset (a base model with a LoRA applied on load) would train without its LoRA: refused, naming it."""
    from diffsynth.runtime import registry
    from diffsynth.runtime.registry import Family, Preset, PresetFile, PresetLoRA
    from diffsynth.training.task import model_sources

    fast = Preset(
        name="Org/Fast",
        files=(PresetFile("Org/Base", "model.safetensors"),),
        loras=(PresetLoRA("Org/Fast", "fast.safetensors"),),
    )
    base = Preset(name="Org/Base", files=(PresetFile("Org/Base", "model.safetensors"),))
    family = Family(name="toy", presets={"Org/Fast": fast, "Org/Base": base})
    monkeypatch.setattr(registry, "installed_families", lambda: {"toy": family})
    with pytest.raises(ConfigError, match="--model Org/Fast is a LoRA preset .*Org/Fast's fast.safetensors"):
        model_sources(TrainConfig(model="Org/Fast", dataset_base_path="d"))
    assert [c.model_id for c in model_sources(TrainConfig(model="Org/Base", dataset_base_path="d"))[0]] == ["Org/Base"]


@pytest.mark.parametrize(
    ("values", "message"),
    [({"num_frames": 17}, "--num_frames 17"), ({"video_fps": 16.0}, "--video_fps 16.0"),
     ({"video_frame_extraction": "chunk"}, "--video_frame_extraction chunk")],
)  # fmt: skip
def test_clip_settings_for_a_family_of_pictures_are_refused_before_it_loads(tmp_path, dataset, values, message):
    from diffsynth_training_toy import VIDEO_TASK, ToyTask, toy_config

    from diffsynth.training.trainer import run_stage, setup

    ToyTask.builds.clear()
    for stage in ({}, {"stage": "encode", "cache_dir": str(tmp_path / "cache")}):
        with pytest.raises(ConfigError, match=rf"{message}: the toy training task trains on pictures; video clip"):
            run_stage(toy_config(tmp_path, dataset, **values, **stage))
    assert ToyTask.builds == []  # before any model loads
    setup(toy_config(tmp_path, dataset, family=VIDEO_TASK, **values))  # a video family reads them


def test_a_missing_dataset_is_named_before_any_model_loads(tmp_path, monkeypatch):
    from diffsynth.training import trainer

    monkeypatch.setattr(trainer, "task_class", lambda cfg: pytest.fail("the task was looked up"))
    for stage in ("train", "encode"):
        cfg = TrainConfig(model="some/folder", dataset_base_path=str(tmp_path / "nodata"), stage=stage)
        cfg.cache_dir = str(tmp_path / "cache") if stage == "encode" else None
        with pytest.raises(ConfigError, match=r"--dataset_base_path .*nodata: no such folder"):
            trainer.run_stage(cfg)
    (tmp_path / "data").mkdir()
    cfg = TrainConfig(model="x", dataset_base_path=str(tmp_path / "data"), dataset_metadata_path="gone.csv")
    with pytest.raises(ConfigError, match="--dataset_metadata_path gone.csv: no such file"):
        trainer.run_stage(cfg)


def test_diffsynth_studio_commands_parse_and_fold_into_our_settings():
    """A DiffSynth-Studio training command's flags (its examples pass --remove_prefix_in_ckpt and --extra_inputs
    nearly always) parse, and its names become ours."""
    config, _ = parse_args(
        [*BASE, "--remove_prefix_in_ckpt", "pipe.dit.", "--extra_inputs", "edit_image", "--lora_base_model", "dit",
         "--enable_tensorboard_log", "--enable_swanlab_log", "--swanlab_project", "cats",
         "--resume_from_checkpoint", "old.safetensors", "--preset_lora_model", "dit",
         "--audio_processor_path", "Wan-AI/Wan2.2-S2V-14B:wav2vec2-large-xlsr-53-english/"]
    )  # fmt: skip
    assert config.report_to == ["tensorboard", "swanlab"] and config.tracker_project_name == "cats"
    assert config.lora_checkpoint == "old.safetensors" and config.extra_inputs == ["edit_image"]
    config.check()  # folding twice changes nothing
    assert config.report_to == ["tensorboard", "swanlab"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--remove_prefix_in_ckpt", "model."], "DiffSynth-Studio's form is pipe.<model>."),
        (["--preset_lora_model", "text_encoder"], "fuses into the trained model"),
        (["--framewise_decoding"], "Wan-Dancer's global model recipe .* is not trained here"),
        (["--wandb_project", "a", "--swanlab_project", "b"], "one run has one project name"),
        (["--resume_from_checkpoint", "w.safetensors", "--trainable_models", "dit"], "pass the file as the model's"),
        (["--resume_from_checkpoint", "a.safetensors", "--lora_checkpoint", "b.safetensors"], "name two files"),
    ],
)
def test_diffsynth_studio_names_that_cannot_fold_are_named(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_args([*BASE, *extra])


def test_extra_inputs_no_row_has_are_reported(tmp_path, dataset, caplog):
    from diffsynth_training_toy import TASK

    from diffsynth.training.trainer import setup

    cfg = TrainConfig(
        family=TASK, dataset_base_path=str(dataset), output_path=str(tmp_path / "out"), max_pixels=64 * 128,
        bucket_step=16, mixed_precision="no", dtype="float32", lora_rank=4, extra_inputs=["prompt", "edit_image"],
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="diffsynth.training.trainer"):
        setup(cfg)
    warned = [r.getMessage() for r in caplog.records if "--extra_inputs" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("--extra_inputs edit_image: no row")


def test_diffsynth_studio_family_flags_fold_too(tmp_path):
    from diffsynth.runtime.hub import ModelConfig
    from diffsynth.training.task import model_sources

    config, _ = parse_args(
        [*BASE, "--align_to_opensource_format", "--zero_cond_t", "--initialize_model_on_cpu",
         "--tokenizer_path", "black-forest-labs/FLUX.2-klein-4B:tokenizer/"]
    )  # fmt: skip
    assert config.lora_formats == ["diffsynth", "kohya"] and config.task_options == {"zero_cond_t": True}
    config.model = None  # the tokenizer's source alone
    tokenizer = model_sources(config)[1]
    assert tokenizer == ModelConfig(model_id="black-forest-labs/FLUX.2-klein-4B", origin_file_pattern="tokenizer/")
    config.tokenizer_path = str(tmp_path)
    assert model_sources(config)[1] == ModelConfig(path=str(tmp_path))
    config.tokenizer_path = "no/such/folder"
    with pytest.raises(ConfigError, match="--tokenizer_path no/such/folder: no such folder"):
        model_sources(config)
    config.tokenizer_path = None
    config.model_id_with_origin_paths = ["Tongyi-MAI/Z-Image-Turbo:transformer/*.safetensors"]
    assert model_sources(config)[0] == [
        ModelConfig(model_id="Tongyi-MAI/Z-Image-Turbo", origin_file_pattern="transformer/*.safetensors")
    ]
    for bad in ("Z-Image-Turbo:transformer/", "Tongyi-MAI/Z-Image-Turbo", "/Z-Image:vae/", "Org/Model:"):
        config.model_id_with_origin_paths = [bad]
        with pytest.raises(ConfigError, match="must look like Org/Model:path/pattern"):
            model_sources(config)
