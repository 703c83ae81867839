"""The `diffsynth` command: generate, list-models, inspect, score, lora.

Families are discovered through entry points and imported only when a command needs them, so
`diffsynth --help` stays fast and knows exactly the families that are installed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import sys
from pathlib import Path

from .errors import ConfigError, DiffSynthError
from .prompt_lines import OPTIONS, SAMPLERS, SamplePrompt, read_prompts_file

logger = logging.getLogger("diffsynth")

DEFAULT_MODEL = "demo"  # shipped with diffsynth-z-image, runs anywhere without downloads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffsynth", description="Run diffusion models: images and videos.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = commands.add_parser("generate", help="generate an image or video from a prompt")
    gen.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a preset (see `diffsynth list-models`) or a local model folder (default: the bundled demo model, "
        "a tiny Z-Image that draws shapes, from diffsynth-z-image)",
    )
    gen.add_argument(
        "--prompt", default=None, help="what to make, e.g. 'a red circle on a blue background' (all but HDR need one)"
    )
    gen.add_argument("--negative-prompt", default=None, help="what to avoid, used when --cfg > 1 (preset default)")
    gen.add_argument(
        "--output",
        "-o",
        default=None,
        help="file to write (.png/.jpg/.webp for images, .mp4 for video; default output.png/.mp4)",
    )
    gen.add_argument("--height", type=int, default=None, help="image height in pixels (preset default)")
    gen.add_argument("--width", type=int, default=None, help="image width in pixels (preset default)")
    gen.add_argument(
        "--num-frames", type=int, default=None, help="video length in frames (video models; preset default)"
    )
    gen.add_argument(
        "--fps", type=int, default=None, help="frames per second of a written video (video models; preset default)"
    )
    gen.add_argument("--steps", type=int, default=None, help="number of denoising steps (preset default)")
    gen.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale; 1 = off (preset default)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument(
        "--prompts-file",
        default=None,
        metavar="FILE",
        help="many generations with the model loaded once: a .txt of prompts (one a line; # comments; kohya's "
        "sample-prompt options after the prompt: --w W --h H --s STEPS --d SEED --l CFG --n NEGATIVE --f FRAMES "
        "--g GUIDANCE --ss SAMPLER --i IMAGE) or a .jsonl of rows {prompt, seed?, negative_prompt?, height?, width?, "
        "steps?, cfg?}; outputs OUTPUT_0000.png, ... and OUTPUT.jsonl listing them",
    )
    gen.add_argument(
        "--no-metadata",
        action="store_true",
        help="leave out the model, prompt, seed and settings that PNG outputs otherwise carry (text chunk 'parameters')",
    )
    gen.add_argument(
        "--num-images",
        type=int,
        default=1,
        metavar="N",
        help="outputs per prompt, seeds --seed, --seed+1, ... (a row's own seed starts its run); with N > 1 the "
        "outputs are numbered as with --prompts-file",
    )
    gen.add_argument("--input-image", default=None, help="image-to-image: the starting image")
    gen.add_argument(
        "--denoising-strength",
        type=float,
        default=None,
        help="image-to-image strength in (0, 1] with --input-image (or --input-video); default 1",
    )
    gen.add_argument(
        "--inpaint-mask",
        default=None,
        metavar="MASK",
        help="inpainting: white in the mask is repainted in --input-image (Qwen-Image, FLUX.2; FLUX.1 Fill)",
    )
    gen.add_argument(
        "--edit-image",
        action="append",
        default=None,
        metavar="IMAGE",
        help="editing: an image to edit or draw from (repeatable, in order; Qwen-Image Edit and 2.1, FLUX.2)",
    )
    gen.add_argument(
        "--input-audio", default=None, help="audio-to-video: the sound the video is made to (LTX-2, Wan2.2-S2V)"
    )
    gen.add_argument(
        "--input-video",
        default=None,
        help="video-to-video with --denoising-strength (Wan); video-to-audio, the video kept (LTX-2's retake_video)",
    )
    gen.add_argument(
        "--vace-video", default=None, help="VACE (Wan): the control video (a pose, depth or edge video, or one to edit)"
    )
    gen.add_argument(
        "--vace-mask",
        default=None,
        help="VACE (Wan): a mask video, or one image for every frame; white = generate, black = keep --vace-video",
    )
    gen.add_argument(
        "--vace-reference-image",
        action="append",
        default=None,
        metavar="IMAGE",
        help="VACE (Wan): an image of a subject or background to put in the video (repeatable)",
    )
    gen.add_argument("--vace-scale", type=float, default=None, help="VACE (Wan): weight of the control (default 1)")
    gen.add_argument(
        "--control-video",
        default=None,
        help="Wan Fun Control, LTX-2 IC-LoRAs: the video to follow (a pose, depth or edge video)",
    )
    gen.add_argument("--reference-image", default=None, help="Wan Fun Control (V1.1, Wan 2.2): an image of the subject")
    gen.add_argument(
        "--camera-direction",
        default=None,
        metavar="DIR",
        help="Wan Fun Control-Camera: the camera move (Left, Right, Up, Down, In, Out or e.g. LeftUp; --input-image)",
    )
    gen.add_argument("--camera-speed", type=float, default=None, help="Wan Fun Control-Camera: move per frame")
    gen.add_argument(
        "--dfr", action="store_true", help="LTX-2.5: the authors' DFR pipeline (keyframe slots, detailing pass)"
    )
    gen.add_argument(
        "--hq", action="store_true", help="LTX-2: the authors' HQ two-stage pipeline (res_2s sampler, distilled LoRA)"
    )
    gen.add_argument(
        "--audio-only",
        action="store_true",
        help="LTX-2: text-to-audio, sound alone (--num-frames / --fps give its length); writes a .wav",
    )
    gen.add_argument(
        "--dub-video",
        default=None,
        metavar="FILE",
        help="LTX-2.3 Dub-It: re-voice this clip (with sound) to say --prompt, lips in sync (load the Dub-It IC-LoRA)",
    )
    gen.add_argument(
        "--temporal-rounds",
        type=int,
        default=None,
        metavar="N",
        help="LTX-2.5 DFR: double the frame rate N times (1 or 2; needs the temporal upsampler); --fps is the base rate",
    )
    gen.add_argument(
        "--s2v-pose-video", default=None, help="Wan2.2-S2V: a pose video the person follows (with --input-audio)"
    )
    gen.add_argument(
        "--sliding-window",
        default=None,
        metavar="SIZE:STRIDE",
        help="Wan: denoise in overlapping windows of SIZE latent frames every STRIDE (long videos), e.g. 21:16",
    )
    gen.add_argument(
        "--motion-bucket-id",
        type=float,
        default=None,
        metavar="ID",
        help="Wan speed control (DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1): 0 slow ... 100 fast",
    )
    gen.add_argument("--animate2-reference-image", default=None, help="Wan2.2-Animate-2: the character to animate")
    gen.add_argument(
        "--animate2-reference-video", default=None, help="Wan2.2-Animate-2: the driving video (its person's motion)"
    )
    gen.add_argument("--animate2-prompt-ref", default=None, help="Wan2.2-Animate-2: a description of the driving video")
    gen.add_argument(
        "--vap-video", default=None, help="Wan Video-As-Prompt: the reference video whose semantics --input-image takes"
    )
    gen.add_argument("--vap-prompt", default=None, help="Wan Video-As-Prompt: a description of the reference video")
    gen.add_argument(
        "--animate-pose-video",
        default=None,
        help="Wan2.2-Animate: the driving pose video (--input-image: the character)",
    )
    gen.add_argument("--animate-face-video", default=None, help="Wan2.2-Animate: the driving face crops (a video)")
    gen.add_argument(
        "--animate-inpaint-video", default=None, help="Wan2.2-Animate replacement: the background video to put it in"
    )
    gen.add_argument(
        "--animate-mask-video", default=None, help="Wan2.2-Animate replacement: where the person is (white), per frame"
    )
    gen.add_argument(
        "--layer-input-image", default=None, help="Qwen-Image-Layered: the image to split into RGBA layers"
    )
    gen.add_argument(
        "--lora-image",
        action="append",
        default=[],
        metavar="IMAGE",
        help="image-to-LoRA presets (Qwen-Image-i2L, Z-Image-i2L): an image the LoRA is made from (repeatable); "
        "--output names the .safetensors file",
    )
    gen.add_argument(
        "--infiniteyou-id-image",
        "--infinityou-id-image",
        dest="infiniteyou_id_image",
        default=None,
        metavar="IMAGE",
        help="InfiniteYou (FLUX.1): a photo of the person whose identity to keep (pip install "
        "'diffsynth-flux[infiniteyou]')",
    )
    gen.add_argument(
        "--value-controller-inputs",
        type=float,
        nargs="+",
        default=None,
        metavar="VALUE",
        help="AttriCtrl (FLUX.1, DiffSynth-Studio/AttriCtrl-FLUX.1-Dev): one value in [0, 1] per attribute encoder",
    )
    gen.add_argument(
        "--lora-encoder-inputs",
        nargs="+",
        default=None,
        metavar="LORA",
        help="LoRA Encoder (FLUX.1, DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev): LoRAs (files or Org/Name) turned into "
        "prompt tokens; usually also given to --lora",
    )
    for flag, what in (
        ("source-image", "the image to insert into"),
        ("source-mask", "where the object goes in --insert-source-image (white)"),
        ("ref-image", "the image holding the object"),
        ("ref-mask", "the object in --insert-ref-image (white)"),
    ):  # FLUX.1 Insert Anything (preset HuanJue/Insert-Anything); no --prompt
        gen.add_argument(
            f"--insert-{flag}", dest=f"insert_anything_{flag.replace('-', '_')}", default=None, metavar="IMAGE",
            help=f"Insert Anything (FLUX.1, HuanJue/Insert-Anything): {what}",
        )  # fmt: skip
    gen.add_argument(
        "--size-level",
        type=int,
        default=None,
        metavar="N",
        help="Step1X-Edit: generate at about N x N pixels at the input image's aspect ratio (512 or 1024)",
    )
    gen.add_argument(
        "--sampler",
        default=None,
        choices=SAMPLERS,
        help="Wan, Z-Image, Qwen-Image, FLUX.1: the sampler (default Euler, as DiffSynth-Studio; unipc: the multistep "
        "UniPC solver the Wan authors use, accurate in fewer steps)",
    )
    gen.add_argument(
        "--positive-only-lora",
        default=None,
        metavar="PATH",
        help="Z-Image: a LoRA for the conditional branch of guidance only (how the Z-Image-i2L authors apply theirs)",
    )
    gen.add_argument("--layer-num", type=int, default=None, help="Qwen-Image-Layered: how many layers (preset default)")
    gen.add_argument(
        "--context-image",
        default=None,
        help="Qwen-Image with an In-Context Control LoRA (DiffSynth-Studio's): the control map to follow",
    )
    gen.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="SOURCE",
        help="load a ControlNet (repeatable): a file or folder, or a hub repo id (FLUX.1, Z-Image, Qwen-Image)",
    )
    gen.add_argument(
        "--control-image",
        action="append",
        default=[],
        metavar="IMAGE[:SCALE]",
        help="a control image for the ControlNets (repeatable: the k-th goes to the k-th --controlnet, or all to "
        "the only one), e.g. depth.png:0.7",
    )
    gen.add_argument(
        "--control-mode",
        default=None,
        metavar="MODE",
        help="the control mode of a union ControlNet that takes one (FLUX.1 Union: canny, depth, pose, ...)",
    )
    gen.add_argument(
        "--prompt-enhancer",
        default=None,
        metavar="SOURCE",
        help="LTX-2: rewrite the prompt with this chat model first (a folder or hub id, e.g. google/gemma-4-E2B-it)",
    )
    gen.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="apply a LoRA (repeatable): a file, or a hub repo Org/Name (its one .safetensors) or Org/Name/file, "
        "e.g. a.safetensors:0.8",
    )
    gen.add_argument(
        "--first-block-cache",
        type=float,
        default=None,
        metavar="THRESHOLD",
        help="skip the DiT's later blocks on steps that change little (0.05 to 0.2; higher is faster, looser)",
    )
    gen.add_argument(
        "--tea-cache",
        type=float,
        default=None,
        metavar="THRESHOLD",
        help="TeaCache (FLUX.1, Wan): skip whole DiT calls while the input changes little (e.g. 0.4 FLUX.1, 0.2 Wan)",
    )
    gen.add_argument(
        "--tea-cache-model-id",
        default=None,
        metavar="ID",
        help="which TeaCache polynomial (Wan: Wan2.1-T2V-1.3B, Wan2.1-T2V-14B, Wan2.1-I2V-14B-480P or -720P)",
    )
    gen.add_argument(
        "--sequence-parallel",
        type=int,
        default=None,
        metavar="N",
        help="under torchrun: divide the DiT's tokens over N ranks (Ulysses; default: the ranks --cfg-parallel leaves)",
    )
    gen.add_argument(
        "--cfg-parallel",
        type=int,
        default=None,
        metavar="N",
        help="under torchrun: divide each DiT call's batch (CFG's positive and negative halves) over N ranks",
    )
    gen.add_argument("--vram-limit", type=float, default=None, help="GiB of VRAM the models may use")
    gen.add_argument(
        "--quantize",
        action="append",
        default=[],
        metavar="[SLOT=]METHOD",
        help="store a model's Linears quantized: bitsandbytes_nf4 or bitsandbytes_fp4 (4-bit), torchao_int8_w8a16 "
        "or torchao_fp8_w8a16 (8-bit), for the DiT (slot 'dit') or the slot named (repeatable; needs the 'quant' "
        "extra: bitsandbytes, torchao)",
    )
    gen.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    gen.add_argument(
        "--dtype", default=None, help="bfloat16, float16 or float32 (default: bfloat16 on a GPU, float32 on the CPU)"
    )

    commands.add_parser("list-models", help="list the installed model families and their presets")

    ins = commands.add_parser("inspect", help="say what a checkpoint file is: model, config, dtype, parameters")
    ins.add_argument("file", nargs="+", help="a checkpoint file, several shards, or a folder")
    ins.add_argument("--json", action="store_true", help="print JSON")

    from .lora_cli import add_lora_parser
    from .metrics.cli import add_score_parser

    add_score_parser(commands)
    add_lora_parser(commands)
    return parser


def quantize_options(specs: list[str], pipeline_class: type | None = None) -> dict[str, str]:
    """`--quantize [SLOT=]METHOD` values as `from_pretrained(quantize=...)` takes them (no slot: the DiT), each
    method checked, and each slot against `pipeline_class`'s model slots when given, before any model loads."""
    from .errors import ConfigError
    from .quant import QuantizeConfig

    slots = list(getattr(pipeline_class, "model_slots", None) or ())
    chosen: dict[str, str] = {}
    for spec in specs:
        slot, _, method = spec.rpartition("=")
        slot = slot.strip() or "dit"
        if slot in chosen:
            raise ConfigError(f"--quantize names the {slot} model twice ({chosen[slot]}, {method})")
        if slots and slot not in slots:
            raise ConfigError(
                f"--quantize {spec}: {pipeline_class.__name__} has no model slot {slot!r}; slots: {slots}"
            )
        try:
            QuantizeConfig.parse(method.strip())
        except ConfigError as exc:
            raise ConfigError(f"--quantize {spec}: {exc}") from None
        chosen[slot] = method.strip()
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "list-models":
            return _list_models()
        if args.command == "score":
            from .metrics.cli import run_score

            return run_score(args)
        if args.command == "lora":
            from .lora_cli import run_lora

            return run_lora(args)
        return _inspect(args)
    except DiffSynthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def path_and_scale(spec: str, default: float = 1.0, flag: str | None = None) -> tuple[str, float]:
    """`PATH[:SCALE]` (a LoRA, a control image) as (path, scale), `default` without one; a path that exists is
    taken whole. A scale that is not finite (nan, inf) is a `ConfigError` naming `flag` and `spec`."""
    from .errors import ConfigError

    path, sep, scale = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            value = float(scale)
        except ValueError:
            return spec, default
        if not math.isfinite(value):
            raise ConfigError(f"{flag + ' ' if flag else ''}{spec}: the scale {scale} must be a finite number")
        return path, value
    return spec, default


def _control_options(pipe, controlnets: list[str], images: list[str], mode: str | None = None, mask=None) -> dict:
    """`--control-image`s as the pipeline's ControlNet inputs: the k-th image for the k-th `--controlnet` (all for
    the only one), to `blockwise_controlnet_inputs` when the nets went to that slot (Qwen-Image's Blockwise). An
    inpainting net (`takes_mask`) gets `--inpaint-mask` in its input (`mask_taken` then says so)."""
    from .controlnet import ControlNetInput

    if not images:
        if mode is not None:
            raise ConfigError("--control-mode applies to --control-image inputs: give one")
        return {}
    if not controlnets and "control_image" in inspect.signature(type(pipe).__call__).parameters:
        if len(images) != 1 or mode is not None:  # FLUX.1 Canny / Depth: one map, concatenated to the latents
            raise ConfigError(f"{type(pipe).__name__} takes one --control-image (a map) without --control-mode")
        return {"control_image": images[0]}
    if not controlnets:
        raise ConfigError("--control-image needs a ControlNet: give --controlnet SOURCE")
    if len(controlnets) > 1 and len(images) != len(controlnets):
        raise ConfigError(
            f"{len(images)} --control-image for {len(controlnets)} --controlnet: give one image per net (in order)"
        )
    blockwise = "blockwise_controlnet" in pipe.model_slots and pipe.controlnets("blockwise_controlnet")
    if blockwise and pipe.controlnets("controlnet"):
        raise ConfigError("--controlnet: give either Blockwise ControlNets or others in one run, not both")
    nets = pipe.controlnets("blockwise_controlnet" if blockwise else "controlnet")
    inputs, taken = [], False
    for k, spec in enumerate(images):
        path, scale = path_and_scale(spec, flag="--control-image")
        cid = k if len(controlnets) > 1 else 0
        inpainting = cid < len(nets) and getattr(nets[cid], "takes_mask", False) is True
        if inpainting and mask is None:
            raise ConfigError(
                f"--controlnet {controlnets[cid]} is an inpainting ControlNet: give --inpaint-mask MASK (white = "
                "repaint) for the picture in its --control-image"
            )
        item = ControlNetInput(image=path, scale=scale, controlnet_id=cid, processor_id=mode)
        if inpainting:
            item.inpaint_mask, taken = mask, True
        inputs.append(item)
    return {"blockwise_controlnet_inputs" if blockwise else "controlnet_inputs": inputs, "mask_taken": taken}


def _generate_audio(pipe, args, writes: bool = True) -> int:
    """`--audio-only`: the pipeline's text-to-audio, written as a .wav (by rank 0 alone under torchrun: `writes`)."""
    from .media import save_audio

    output = output_file(pipe, args)  # a .wav
    options = {"negative_prompt": args.negative_prompt, "num_frames": args.num_frames, "frame_rate": args.fps}
    options.update(num_inference_steps=args.steps, audio_cfg_scale=args.cfg)
    sound = pipe.generate_audio(args.prompt, seed=args.seed, **{k: v for k, v in options.items() if v is not None})
    if not writes:
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    save_audio(sound.waveform, output, sound.sample_rate)
    logger.info("wrote %s", output)
    return 0


def _dub_video(pipe, args, writes: bool = True) -> int:
    """`--dub-video FILE`: LTX-2.3 Dub-It, the re-voiced clip with its new sound in one mp4 at the source's rate
    (written by rank 0 alone under torchrun: `writes`)."""
    from .media import mux_video_audio, video_frame_rate

    output = output_file(pipe, args)  # an .mp4
    size = {name: value for name, value in (("height", args.height), ("width", args.width)) if value is not None}
    frames, sound = pipe.dub_video(args.prompt, args.dub_video, seed=args.seed, **size)
    if not writes:
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    mux_video_audio(frames, sound.waveform, sound.sample_rate, str(output), fps=video_frame_rate(args.dub_video))
    logger.info("wrote %s", output)
    return 0


def _sliding_window(value: str | None) -> dict:
    """`--sliding-window SIZE:STRIDE` as the pipeline's `sliding_window_size` / `sliding_window_stride`."""
    from .errors import ConfigError

    if value is None:
        return {}
    size, _, stride = value.partition(":")
    if not (size.isdigit() and stride.isdigit()):
        raise ConfigError(f"--sliding-window {value!r}: give SIZE:STRIDE in latent frames, e.g. 21:16")
    return {"sliding_window_size": int(size), "sliding_window_stride": int(stride)}


def _pipeline_class(model: str):
    from .errors import ConfigError, preview
    from .registry import find_preset, installed_families

    if Path(model).is_dir():
        return _family_for_folder(Path(model)).pipeline_class()
    if Path(model).exists():
        raise ConfigError(f"--model {model!r} is a file; pass a preset name or a folder with the model's subfolders")
    try:
        family, preset = find_preset(model)
    except ConfigError:
        if model == DEFAULT_MODEL:
            raise ConfigError(
                f"the default model {DEFAULT_MODEL!r} ships with diffsynth-z-image, which is not installed: "
                "pip install diffsynth-z-image, or name a model with --model"
            ) from None
        if "/" not in model and not installed_families():
            raise ConfigError(
                "no model families are installed; install one, e.g. pip install diffsynth-z-image"
            ) from None
        raise
    if preset.pipeline is not None:  # e.g. LTX-2.3's HDR IC-LoRA preset, which has no text encoder
        return preset.pipeline_class()
    if family.pipeline is None:
        raise ConfigError(
            f"family {family.name!r} has no pipeline; families with pipelines: "
            f"{preview(n for n, f in installed_families().items() if f.pipeline)}"
        )
    return family.pipeline_class()


def _family_for_folder(folder: Path):
    from .registry import family_for_folder

    return family_for_folder(folder, kind="pipeline")


def _generate(args) -> int:
    import inspect

    import torch

    from .dtypes import check_device, parse_device, parse_dtype
    from .errors import ConfigError
    from .hub import ModelConfig
    from .media import load_image, load_video
    from .parallel import saves_outputs

    if args.first_block_cache is not None and args.tea_cache is not None:
        raise ConfigError("--first-block-cache and --tea-cache are two ways to skip blocks: choose one")
    if args.tea_cache_model_id is not None and args.tea_cache is None:
        raise ConfigError("--tea-cache-model-id picks TeaCache's polynomial: give --tea-cache THRESHOLD with it")
    device = parse_device(args.device)  # None: cuda when available
    if not isinstance(device, torch.device):
        raise ConfigError(
            f"--device {args.device} is where weights may be offloaded, not where models run; use cuda or cpu"
        )
    device = torch.device(device)
    check_device(device, "--device", args.device)
    check_generation_numbers(args)
    parallel = args.sequence_parallel is not None or args.cfg_parallel is not None
    if parallel and device.type == "cuda" and device.index is None:  # torchrun: one GPU per rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    cls = _pipeline_class(args.model)
    if hasattr(cls, "run_cli"):  # its own inputs and outputs: a flag it does not read is refused before loading
        check_run_cli_flags(cls, args)
    inserting = args.insert_anything_source_image is not None  # Insert Anything reads no prompt
    places: list[str] = []  # where each job's row is, for messages
    jobs = generation_jobs(args, cls, places)  # a prompts file is read (and checked) before any model loads
    single = [f for f, on in (("--audio-only", args.audio_only), ("--dub-video", args.dub_video)) if on]
    if single and (len(jobs) > 1 or args.prompts_file is not None):
        raise ConfigError(f"{single[0]} makes one output: leave out --prompts-file / --num-images")
    pictures = (("--height", args.height), ("--width", args.width), ("--input-image", args.input_image),
                ("--input-video", args.input_video), ("--inpaint-mask", args.inpaint_mask))  # fmt: skip
    unused = [flag for flag, value in pictures if value is not None]
    if args.audio_only and unused:
        raise ConfigError(
            f"{unused[0]} is not used with --audio-only, which makes sound alone (from --prompt, --negative-prompt, "
            "--num-frames, --fps, --steps, --cfg and --seed)"
        )
    if args.prompt is None and not hasattr(cls, "run_cli") and not inserting and args.prompts_file is None:
        raise ConfigError(f"--prompt is required: what {cls.__name__} should make")
    output = output_file(cls, args)  # an --output (or --fps) the pipeline cannot write is refused before it loads
    if args.lora_image and not hasattr(cls, "run_cli"):
        raise ConfigError(f"--lora-image is for image-to-LoRA presets (e.g. Qwen-Image-i2L), not {cls.__name__}")
    starts = args.input_image, args.input_video, *(job.get("input_image") for job in jobs)
    if args.denoising_strength is not None and all(start is None for start in starts):
        raise ConfigError(
            "--denoising-strength is how far image-to-image moves from --input-image (or --input-video): give one, "
            "or leave it out"
        )
    many = len(jobs) > 1 or args.prompts_file is not None
    if many and output is not None:
        check_listing(output, args.prompts_file)
    flags = flag_options(args)
    if not (args.audio_only or args.dub_video is not None or hasattr(cls, "run_cli")):
        check_flags_taken(cls, args, flags)
    if args.prompt_enhancer is not None and not hasattr(cls, "load_prompt_enhancer"):
        raise ConfigError(f"--prompt-enhancer is not used by {cls.__name__} (model {args.model!r})")
    options = {"quantize": quantize_options(args.quantize, cls)} if args.quantize else {}
    pipe = cls.from_pretrained(
        args.model, torch_dtype=parse_dtype(dtype), device=device, vram_limit=args.vram_limit, **options
    )
    if parallel:
        batch = 1 if args.cfg_parallel is None else args.cfg_parallel
        pipe.enable_parallel(sequence=args.sequence_parallel, batch=batch)
    for spec in args.lora:
        path, scale = path_and_scale(spec, flag="--lora")
        pipe.load_lora(path, scale=scale)
    if args.controlnet:
        pipe.load_controlnet(args.controlnet)
    if args.prompt_enhancer is not None:
        source = args.prompt_enhancer
        pipe.load_prompt_enhancer(source if Path(source).exists() else ModelConfig(model_id=source))
    if args.first_block_cache is not None:
        pipe.enable_first_block_cache(args.first_block_cache)
    if args.tea_cache is not None:
        _enable_tea_cache(pipe, args)
    writes = saves_outputs()  # every rank holds the same result: under torchrun rank 0 alone writes it
    if args.audio_only:
        return _generate_audio(pipe, args, writes)
    if hasattr(pipe, "run_cli"):  # a pipeline whose inputs and outputs are its own (LTX-2.3 HDR: EXR frames)
        return pipe.run_cli(args)  # which writes on rank 0 alone too (`parallel.saves_outputs`)
    if args.dub_video is not None:
        return _dub_video(pipe, args, writes)
    if args.inpaint_mask is not None:
        flags["inpaint_mask"] = load_image(args.inpaint_mask).convert("L")
    control = _control_options(pipe, args.controlnet, args.control_image, args.control_mode, flags.get("inpaint_mask"))
    if control.pop("mask_taken", False):  # an inpainting ControlNet repaints with the mask, not the pipeline
        flags.pop("inpaint_mask")
    flags.update(control)
    video = None if args.input_video is None else load_video(args.input_video)
    options = call_options(pipe, args, flags, video)
    accepted = inspect.signature(type(pipe).__call__).parameters
    given = "input_image" in options or "input_video" in options  # a start for every generation
    lines = any("input_image" in job for job in jobs)  # a start for a prompts file's lines with --i
    if args.denoising_strength is not None and not (given or lines):
        raise ConfigError(
            f"--denoising-strength is not used by {type(pipe).__name__} (model {args.model!r}) with these inputs: "
            "none of them is an image-to-image start"
        )  # e.g. FLUX.1 Fill's --input-image, which is the picture to inpaint
    if args.denoising_strength is not None:  # refused below where the call takes none (image-to-video models)
        options["denoising_strength"] = args.denoising_strength
    refuse_unused(options, accepted, type(pipe), args.model)
    makes_video = "num_frames" in accepted
    if not many:
        result = pipe(prompt=args.prompt, seed=args.seed, **options)
        if writes:
            _write_result(pipe, args, result, output, makes_video)
        return 0
    calls = [
        job_arguments(pipe, args, (flags, video, options), job, where) for job, where in zip(jobs, places, strict=True)
    ]
    manifest: list[dict] = []
    listing = output.with_suffix(".jsonl")
    for i, (job, arguments) in enumerate(zip(jobs, calls, strict=True)):
        path = output.with_name(f"{output.stem}_{i:04d}{output.suffix}")
        result = pipe(**arguments)
        if writes:  # the listing is rewritten after each output, so a failure later keeps those made listed
            record = _write_result(pipe, args, result, path, makes_video, job)
            manifest.append({"file": path.name, **record})
            write_listing(listing, manifest)
    if writes:
        logger.info("wrote %d outputs and %s", len(manifest), listing)
    return 0


def flag_options(args) -> dict:
    """The pipeline arguments the flags give (only those given, so the preset's defaults are left alone), under
    the generic names a family's `cli_options` may rename; `--inpaint-mask` is still its path."""
    options = {
        "negative_prompt": args.negative_prompt,
        "cfg_scale": args.cfg,
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
        "num_inference_steps": args.steps,
        "input_image": args.input_image,
        "edit_image": args.edit_image,
        "inpaint_mask": args.inpaint_mask,
        "animate_pose_video": args.animate_pose_video,
        "animate_face_video": args.animate_face_video,
        "animate_inpaint_video": args.animate_inpaint_video,
        "animate_mask_video": args.animate_mask_video,
        "layer_input_image": args.layer_input_image,
        "context_image": args.context_image,
        "layer_num": args.layer_num,
        "retake_audio": args.input_audio,
        "vace_video": args.vace_video,
        "vace_video_mask": args.vace_mask,
        "vace_reference_image": args.vace_reference_image,
        "vace_scale": args.vace_scale,
        "control_video": args.control_video,
        "reference_image": args.reference_image,
        "camera_control_direction": args.camera_direction,
        "camera_control_speed": args.camera_speed,
        "use_dfr_pipeline": True if args.dfr else None,
        "use_hq_pipeline": True if args.hq else None,
        "temporal_upsample_rounds": args.temporal_rounds,
        "enhance_prompt": True if args.prompt_enhancer is not None else None,
        "s2v_pose_video": args.s2v_pose_video,
        "motion_bucket_id": args.motion_bucket_id,
        "animate2_reference_image": args.animate2_reference_image,
        "animate2_reference_video": args.animate2_reference_video,
        "animate2_prompt_ref": args.animate2_prompt_ref,
        "vap_video": args.vap_video,
        "vap_prompt": args.vap_prompt,
        "positive_only_lora": args.positive_only_lora,
        "sampler": args.sampler,
        "infiniteyou_id_image": args.infiniteyou_id_image,
        "value_controller_inputs": args.value_controller_inputs,
        "lora_encoder_inputs": args.lora_encoder_inputs,
        "insert_anything_source_image": args.insert_anything_source_image,
        "insert_anything_source_mask": args.insert_anything_source_mask,
        "insert_anything_ref_image": args.insert_anything_ref_image,
        "insert_anything_ref_mask": args.insert_anything_ref_mask,
        "size_level": args.size_level,
        **_sliding_window(args.sliding_window),
    }
    return {name: value for name, value in options.items() if value is not None}


def call_options(pipe, args, flags: dict, video=None) -> dict:
    """`flags` (generic names) as the loaded pipeline's keywords: its `cli_options` renames (FLUX.1 Kontext, Fill,
    Flex.2, Step1X, Wan-Dancer), `--input-audio` / `--input-video` under the name its call takes, `--fps` where it
    places frames in time (LTX-2; without it a retake sets it to the --input-video file's rate)."""
    options = pipe.cli_options(flags) if hasattr(pipe, "cli_options") else dict(flags)
    accepted = inspect.signature(type(pipe).__call__).parameters
    if "retake_audio" in options and "retake_audio" not in accepted and "input_audio" in accepted:  # Wan2.2-S2V
        options["input_audio"] = options.pop("retake_audio")
    if video is not None:  # Wan's video-to-video, else LTX-2's retake
        options["retake_video" if "retake_video" in accepted else "input_video"] = video
    if args.fps is None and video is not None and {"retake_video", "frame_rate"} <= accepted.keys():
        from .media import video_frame_rate  # a retake keeps the given video's timing (the authors' RetakePipeline)

        args.fps = video_frame_rate(args.input_video)  # as --fps: the mp4 is written at that rate too
    if args.fps is not None and "frame_rate" in accepted:  # models that place frames in time (LTX-2)
        options["frame_rate"] = args.fps
    return options


def job_arguments(pipe, args, made: tuple, job: dict, where: str) -> dict:
    """One prompts-file generation's call: its row's settings over the flags', mapped as the flags are (a line's
    `--i` is Step1X's reference_image as `--input-image` is); a setting the call does not take names the row.
    `made`: the flags' options, the loaded --input-video and the flags' call options."""
    flags, video, options = made
    own = {key: value for key, value in job.items() if key not in ("prompt", "seed")}
    if own:
        arguments = call_options(pipe, args, {**flags, **pipeline_arguments(own)}, video)
        if "denoising_strength" in options:
            arguments["denoising_strength"] = options["denoising_strength"]
    else:
        arguments = dict(options)
    started = "input_image" in job or "input_image" in options or "input_video" in options
    if not started:  # --denoising-strength is for the lines with --i only
        arguments.pop("denoising_strength", None)
    accepted = inspect.signature(type(pipe).__call__).parameters
    for name in arguments:
        if name not in accepted:
            raise ConfigError(f"{where}: {flag_of(name)} is not used by {type(pipe).__name__} (model {args.model!r})")
    return {**arguments, "prompt": job["prompt"], "seed": job["seed"]}


def check_listing(output: Path, prompts_file: str | None) -> None:
    """The listing OUTPUT.jsonl of a run of many outputs must not be the prompts file it reads (it would be lost)."""
    if prompts_file is None:
        return
    listing = output.with_suffix(".jsonl")
    if listing.resolve() == Path(prompts_file).resolve():
        raise ConfigError(
            f"--output {output} lists its outputs in {listing}, which is --prompts-file {prompts_file}: it would be "
            "written over; name the output otherwise (e.g. --output out/img.png)"
        )


def write_listing(listing: Path, manifest: list[dict]) -> None:
    """`manifest` as OUTPUT.jsonl, replaced whole (a partial file never stands in for it)."""
    partial = listing.with_name(listing.name + ".partial")
    partial.write_text("".join(json.dumps(row) + "\n" for row in manifest))
    os.replace(partial, listing)


def _enable_tea_cache(pipe, args) -> None:
    """TeaCache from `--tea-cache`, its messages in the flags' names (`--tea-cache-model-id`)."""
    try:
        pipe.enable_tea_cache(args.tea_cache, model_id=args.tea_cache_model_id)
    except ConfigError as exc:
        text = str(exc).replace("tea_cache_model_id", "--tea-cache-model-id")
        raise ConfigError(f"--tea-cache {args.tea_cache}: {text}") from None


# flags every pipeline's load reads (`run_cli` pipelines' too), by dest
LOAD_FLAGS = {"command", "verbose", "model", "output", "device", "dtype", "vram_limit", "quantize"}


def check_run_cli_flags(cls: type, args) -> None:
    """A pipeline with its own `run_cli` reads the flags its `cli_flags` names (dests) and the load's: any other
    flag set away from its default is refused before loading, naming it; --prompts-file and --num-images > 1 too,
    as it makes one output. A class that declares no `cli_flags` is not checked flag by flag."""
    if args.prompts_file is not None or args.num_images != 1:
        flag = "--prompts-file" if args.prompts_file is not None else f"--num-images {args.num_images}"
        raise ConfigError(f"{flag}: {cls.__name__} (model {args.model!r}) makes one output; leave it out")
    declared = getattr(cls, "cli_flags", None)
    if declared is None:
        return
    defaults = vars(build_parser().parse_args(["generate"]))
    own = ", ".join("--" + name.replace("_", "-") for name in sorted(declared))
    for name, value in vars(args).items():
        if name not in LOAD_FLAGS and name not in declared and value != defaults.get(name):
            flag = "--" + name.replace("insert_anything_", "insert_").replace("_", "-")
            raise ConfigError(f"{flag} is not used by {cls.__name__} (model {args.model!r}), which reads {own}")


# the pipeline arguments that a flag of another name gives, by that flag's dest (others: the flag's own name)
CALL_FLAGS = {"num_inference_steps": "steps", "cfg_scale": "cfg", "retake_audio": "input_audio"}
CALL_FLAGS.update(vace_video_mask="vace_mask", controlnet_inputs="control_image")
CALL_FLAGS.update(blockwise_controlnet_inputs="control_image", in_context_videos="control_video")
CALL_FLAGS.update(flux_fill_mask="inpaint_mask", flux_fill_image="input_image")
CALL_FLAGS.update(flex_inpaint_mask="inpaint_mask", flex_inpaint_image="input_image")
CALL_FLAGS.update(flex_control_image="control_image", flex_control_strength="control_image")
CALL_FLAGS["retake_video"] = "input_video"
CALL_FLAGS.update({f"insert_anything_{p}": f"insert_{p}" for p in ("source_image", "source_mask")})
CALL_FLAGS.update({f"insert_anything_{p}": f"insert_{p}" for p in ("ref_image", "ref_mask")})
CALL_FLAGS.update(camera_control_direction="camera_direction", camera_control_speed="camera_speed")
CALL_FLAGS.update(use_dfr_pipeline="dfr", temporal_upsample_rounds="temporal_rounds", use_hq_pipeline="hq")
CALL_FLAGS.update(sliding_window_size="sliding_window", sliding_window_stride="sliding_window")
# the generic options a family's `cli_options` may give under its own names (Step1X's reference_image, FLUX.1
# Fill's flux_fill_*, Wan-Dancer's wantodance_*, LTX-2's in_context_videos): known only once the model loaded
CLI_RENAMED = {"input_image", "edit_image", "inpaint_mask", "control_image", "control_video", "retake_audio"}


def flag_of(name: str) -> str:
    """The `diffsynth generate` flag that gives the pipeline argument `name` (`cfg_scale`: `--cfg`)."""
    return "--" + CALL_FLAGS.get(name, name).replace("_", "-")


def refuse_unused(options: dict, accepted, cls: type, model: str) -> None:
    """An option the pipeline's call has no keyword for is refused, named by its flag."""
    for name in options:
        if name not in accepted:
            raise ConfigError(f"{flag_of(name)} is not used by {cls.__name__} (model {model!r})")


def check_flags_taken(cls: type, args, options: dict) -> None:
    """The flags the pipeline class's call takes no keyword for, refused before any model loads; those a family's
    `cli_options` may rename (`CLI_RENAMED`) and the ControlNet inputs wait for the loaded pipeline."""
    from .pipeline import call_keywords

    accepted = call_keywords(cls)
    if accepted is None:
        return
    waits = CLI_RENAMED if hasattr(cls, "cli_options") else set()
    known = {name: value for name, value in options.items() if name not in waits}
    if "retake_audio" in known and "input_audio" in accepted:  # Wan2.2-S2V's name for --input-audio
        known.pop("retake_audio")
    if args.input_video is not None and not {"retake_video", "input_video"} & accepted:
        known["input_video"] = args.input_video
    if args.denoising_strength is not None:
        known["denoising_strength"] = args.denoising_strength
    refuse_unused(known, accepted, cls, args.model)


OTHER_OUTPUT_SUFFIXES = (".mp4", ".wav", ".safetensors")  # videos; --audio-only's sound; image-to-LoRA's LoRA
RUN_DTYPES = ("bfloat16", "float16", "float32")  # what --dtype may name: the dtypes the models compute in


def check_generation_numbers(args) -> None:
    """The sizes, steps, numbers, dtype and output file type of `diffsynth generate`, checked before any model
    loads: every number a flag gives (--cfg, --vram-limit, a LoRA's scale, ...) must be finite."""
    from .dtypes import dtype_name, parse_dtype
    from .errors import ConfigError
    from .media import IMAGE_SUFFIXES

    for flag, value in (
        ("--steps", args.steps),
        ("--height", args.height),
        ("--width", args.width),
        ("--num-frames", args.num_frames),
        ("--fps", args.fps),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1")
    check_parallel_layout(args.sequence_parallel, args.cfg_parallel)
    for flag, value, usual in (("--first-block-cache", args.first_block_cache, "0.05 to 0.2"),
                               ("--tea-cache", args.tea_cache, "0.05 to 0.8")):  # fmt: skip
        if value is not None and value < 0:
            raise ConfigError(f"{flag} {value}: the threshold must be >= 0 ({usual} are usual)")
    for name, value in vars(args).items():  # the float flags, by their dest: --cfg, --first-block-cache, ...
        for number in value if isinstance(value, list) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                raise ConfigError(f"--{name.replace('_', '-')} {number} must be a finite number")
    for flag, specs in (("--lora", args.lora), ("--control-image", args.control_image)):
        for spec in specs:
            path_and_scale(spec, flag=flag)  # a SCALE that is nan or inf is refused
    if args.dtype is not None:
        try:
            name = dtype_name(parse_dtype(args.dtype))
        except ConfigError:
            name = None
        if name not in RUN_DTYPES:
            raise ConfigError(
                f"--dtype {args.dtype}: the models run in {', '.join(RUN_DTYPES)} (to store weights in 8 or 4 bits, "
                "see --quantize)"
            )
    if args.output is not None:
        suffix = Path(args.output).suffix.lower()
        if suffix not in IMAGE_SUFFIXES + OTHER_OUTPUT_SUFFIXES:
            raise ConfigError(
                f"--output {args.output}: {suffix or 'no file extension'} is not a type diffsynth writes; use "
                f"{', '.join(IMAGE_SUFFIXES)} for pictures, .mp4 for videos, .wav for sound, .safetensors for an "
                "image-to-LoRA preset's LoRA"
            )


def check_parallel_layout(sequence: int | None, batch: int | None) -> None:
    """`--sequence-parallel` / `--cfg-parallel`, checked before any model loads: each >= 1, run under torchrun, and
    their product (a missing one: what the other leaves of the ranks) equal to torchrun's WORLD_SIZE."""
    from .errors import ConfigError

    if sequence is None and batch is None:
        return
    for flag, value in (("--sequence-parallel", sequence), ("--cfg-parallel", batch)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1 (ranks)")
    given = [f"{f} {v}" for f, v in (("--sequence-parallel", sequence), ("--cfg-parallel", batch)) if v is not None]
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        raise ConfigError(
            f"{' '.join(given)} divides each DiT call over torchrun's ranks: launch one process per GPU, e.g. "
            "`torchrun --nproc_per_node 2 -m diffsynth.runtime.cli generate ...` (WORLD_SIZE is not set)"
        )
    world, batch = int(world), 1 if batch is None else batch
    if sequence is None:  # the sequence takes the ranks the batch leaves
        if world % batch:
            raise ConfigError(f"--cfg-parallel {batch} does not divide the {world} ranks torchrun started (WORLD_SIZE)")
        return
    if sequence * batch != world:
        raise ConfigError(
            f"--sequence-parallel {sequence} x --cfg-parallel {batch} = {sequence * batch} ranks, but torchrun "
            f"started WORLD_SIZE={world}: the product must equal the number of ranks (--nproc_per_node x nodes)"
        )


def output_file(pipeline, args) -> Path | None:
    """The file `diffsynth generate` writes with `pipeline` (its class, before the model loads, or the pipeline):
    `--output`, else output.wav / output.mp4 / output.png by what it makes. An `--output` of another type, and the
    `--fps` / `--num-frames` a picture has no use for, are refused, saying what the pipeline writes. None for a pipeline
    that writes its own outputs (`run_cli`: an image-to-LoRA preset's .safetensors, LTX-2.3 HDR's EXR frames)."""
    import inspect

    from .errors import ConfigError
    from .media import IMAGE_SUFFIXES

    cls = pipeline if isinstance(pipeline, type) else type(pipeline)
    if args.audio_only:
        if not hasattr(cls, "generate_audio"):
            raise ConfigError(f"--audio-only is not used by {cls.__name__} (model {args.model!r}): it needs LTX-2")
        output = Path(args.output or "output.wav")
        if output.suffix.lower() != ".wav":
            raise ConfigError(f"--audio-only writes sound: --output must name a .wav file, not {output}")
        return output
    if hasattr(cls, "run_cli"):
        return None
    if args.dub_video is not None:
        if not hasattr(cls, "dub_video"):
            raise ConfigError(f"--dub-video is not used by {cls.__name__} (model {args.model!r}): it needs LTX-2.3")
        output = Path(args.output or "output.mp4")
        if output.suffix.lower() != ".mp4":
            raise ConfigError(f"--dub-video makes a video with sound: --output must name an .mp4 file, not {output}")
        if args.fps is not None:
            raise ConfigError("--fps is not used with --dub-video: the dubbed clip keeps its source's frame rate")
        return output
    if "num_frames" in inspect.signature(cls.__call__).parameters:
        output = Path(args.output or "output.mp4")
        if output.suffix.lower() != ".mp4":
            raise ConfigError(f"{cls.__name__} makes videos: --output must name an .mp4 file, not {output}")
        return output
    output = Path(args.output or "output.png")
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(
            f"--output {output}: {cls.__name__} (model {args.model!r}) writes images: use {', '.join(IMAGE_SUFFIXES)}"
        )
    for flag, value in (("--fps", args.fps), ("--num-frames", args.num_frames)):
        if value is not None:
            raise ConfigError(f"{flag} is not used by {cls.__name__} (model {args.model!r}): it writes images")
    return output


def generation_jobs(args, pipeline=None, places: list[str] | None = None) -> list[dict]:
    """The prompt, seed and settings (`JOB_KEYS`) of each generation `--prompts-file` / `--num-images` ask for, in
    order; a bad file or row, or a row's setting the `pipeline` class does not take, is an error naming it.
    `places` (when given) gets where each generation's row is, for later messages."""
    from .errors import ConfigError
    from .pipeline import check_seed

    if args.num_images < 1:
        raise ConfigError(f"--num-images {args.num_images} must be >= 1")
    check_seed(args.seed, "--seed")
    if args.prompts_file is None:
        check_seed(
            args.seed + args.num_images - 1, f"--seed {args.seed} with --num-images {args.num_images} reaches seed"
        )
        if places is not None:
            places += ["--prompt"] * args.num_images
        return [{"prompt": args.prompt, "seed": args.seed + n} for n in range(args.num_images)]
    if args.prompt is not None:
        raise ConfigError("--prompt and --prompts-file both give the prompt: use one")
    path = Path(args.prompts_file)
    if not path.is_file():
        raise ConfigError(f"--prompts-file {path} does not exist")
    kohya = path.suffix.lower() != ".jsonl"  # a prompt a line, with kohya's sample-prompt options after it
    if kohya:
        lines = read_prompts_file(path, flag="--prompts-file", at="{file}, line {number}")
        # each row with where it is, for messages
        rows = [(_checked_row(_line_row(line), line.where, kohya=True), line.where) for line in lines]
    else:
        rows = _jsonl_rows(path)
    if pipeline is not None and not hasattr(pipeline, "run_cli"):
        for row, where in rows:
            _check_row_settings(pipeline, row, where, args.model, kohya)
    jobs = []
    for row, where in rows:
        first = int(args.seed if row.get("seed") is None else row["seed"])  # null: no seed of its own
        if args.num_images > 1:  # the run's last seed, counted on from the row's (or --seed)
            check_seed(
                first + args.num_images - 1, f"{where}: with --num-images {args.num_images}, seed {first} reaches"
            )
        extra = {k: v for k, v in row.items() if k not in ("prompt", "seed")}
        jobs += [{"prompt": row["prompt"], "seed": first + n, **extra} for n in range(args.num_images)]
        if places is not None:
            places += [where] * args.num_images
    return jobs


def _jsonl_rows(path: Path) -> list[tuple[dict, str]]:
    """The checked rows of a .jsonl prompts file, each with where it is (`--prompts-file FILE, line N`)."""
    from .errors import ConfigError

    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        where = f"--prompts-file {path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not JSON ({exc})") from None
        unknown = sorted(set(row) - set(ROW_KEYS)) if isinstance(row, dict) else None
        if unknown is None or "prompt" not in row or unknown:
            what = f"unknown keys {unknown}" if unknown else "no prompt"
            raise ConfigError(
                f"{where}: {what}; a row is {{prompt, seed?, negative_prompt?, height?, width?, steps?, cfg?}}"
            )
        rows.append((_checked_row(row, where), where))
    if not rows:
        raise ConfigError(f"--prompts-file {path} holds no prompts")
    return rows


# a prompts file row's keys (the flags' names), and the pipeline arguments they stand for
ROW_KEYS = {"prompt": "prompt", "seed": "seed", "negative_prompt": "negative_prompt", "height": "height"}
ROW_KEYS.update(width="width", steps="num_inference_steps", cfg="cfg_scale")
# a generation's keys: a row's, and the settings a .txt line's kohya options add (--f, --g, --ss, --i)
JOB_KEYS = {**ROW_KEYS, "num_frames": "num_frames", "embedded_guidance": "embedded_guidance", "sampler": "sampler"}
JOB_KEYS["input_image"] = "input_image"


def _line_row(line: SamplePrompt) -> dict:
    """A kohya sample-prompt line as a row under `JOB_KEYS`' names: `--d` its seed (so `--num-images` counts on
    from it, as from a .jsonl row's), `--ss` one of `SAMPLERS`, one `--i` its input image (as `--input-image`)."""
    from .errors import ConfigError

    keys = {name: key for key, name in JOB_KEYS.items()}
    row: dict = {"prompt": line.prompt} | ({} if line.seed is None else {"seed": line.seed})
    row.update({keys[name]: value for name, value in line.options.items()})
    if len(line.images) > 1:
        raise ConfigError(
            f"{line.where}: --i is given {len(line.images)} times; a generation starts from one input image"
        )
    if line.images:
        check_picture(line.images[0], f"{line.where}: --i {line.images[0]}")
        row["input_image"] = str(line.images[0])
    return row


def check_picture(path, what: str) -> None:
    """A picture file checked readable before any model loads (a bad one would fail a batch half done)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise ConfigError(f"{what}: not a picture that can be read ({exc})") from None


def _check_row_settings(pipeline, row: dict, where: str, model: str, kohya: bool) -> None:
    """A row's setting the pipeline class's call has no keyword for is refused before any model loads, named as
    the row spells it (a .txt line's `--f`, a .jsonl row's `width`); a call taking `**kwargs` takes any."""
    from .errors import ConfigError
    from .pipeline import call_keywords

    accepted = call_keywords(pipeline)
    if accepted is None:
        return
    waits = CLI_RENAMED if hasattr(pipeline, "cli_options") else set()  # checked once loaded, as renamed
    options = {name: f"--{key}" for key, (name, _, _) in OPTIONS.items()} | {"input_image": "--i"}
    for key in row:
        name = JOB_KEYS[key]
        if key not in ("prompt", "seed") and name not in accepted and name not in waits:
            said = f"{options[name]} ({name})" if kohya else key if key == name else f"{key} ({name})"
            raise ConfigError(f"{where}: {said} is not used by {pipeline.__name__} (model {model!r})")


def _checked_row(row: dict, where: str, kohya: bool = False) -> dict:
    """A prompts-file row with its values checked: text for the prompts, whole sizes, steps and seed, finite
    numbers for cfg and guidance; a .txt line's value is named by its kohya option (`--l`)."""
    from .errors import ConfigError

    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise ConfigError(f"{where}: prompt {row.get('prompt')!r} must be a string that is not empty")
    value = row.get("negative_prompt")
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}: negative_prompt {value!r} must be a string")
    for key in ("seed", "height", "width", "steps"):
        value = row.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or (key != "seed" and value < 1)
        ):
            raise ConfigError(f"{where}: {key} {value!r} must be a whole number{'' if key == 'seed' else ' >= 1'}")
    if row.get("seed") is not None:
        from .pipeline import check_seed

        check_seed(row["seed"], f"{where}: {'--d' if kohya else 'seed'}")
    cfg = row.get("cfg")
    if cfg is not None and (isinstance(cfg, bool) or not isinstance(cfg, (int, float))):
        raise ConfigError(f"{where}: cfg {cfg!r} must be a number")
    for key, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            if kohya:  # named as the line gives it: `--l nan: cfg_scale must be ...`
                option = next(k for k, (name, _, _) in OPTIONS.items() if name == JOB_KEYS[key])
                raise ConfigError(f"{where}: --{option} {value}: {JOB_KEYS[key]} must be a finite number")
            raise ConfigError(f"{where}: {key} {value} must be a finite number")
    return row


def pipeline_arguments(job: dict) -> dict:
    """A generation's keys (the flags' names: steps, cfg) as the pipeline's arguments."""
    return {JOB_KEYS[key]: value for key, value in job.items()}


# `diffsynth generate`'s settings that leave the picture as it is, kept out of `generation_record`
NOT_RECORDED = {"command", "verbose", "output", "prompts_file", "no_metadata", "num_images", "device", "vram_limit"}
NOT_RECORDED |= {"sequence_parallel", "cfg_parallel"}


def generation_record(args, job: dict | None = None, size: tuple[int, int] | None = None) -> dict:
    """What made a picture, written into its PNG (`parameters` text chunk) and listed in a prompts file's
    OUTPUT.jsonl: model, prompt, seed, the row's own settings, then every other setting given on the command line
    that changes the picture (sampler, dtype, LoRAs, caches, input images, ...), and the `size` (width, height) it
    came out at (a pipeline rounds a size to its multiple), so the picture can be made again."""
    job = job or {"prompt": args.prompt, "seed": args.seed}
    record = {"model": args.model, **job}
    started = "input_image" in job or args.input_image is not None or args.input_video is not None
    for name, value in vars(args).items():
        if name in NOT_RECORDED or name in record or value is None or value is False or value == []:
            continue
        if name == "denoising_strength" and not started:  # a prompts file's line without --i
            continue
        record[name] = list(value) if isinstance(value, list) else value
    if size is not None:
        record["width"], record["height"] = size
    return record


def _write_result(pipe, args, result, output: Path, makes_video: bool, job: dict | None = None) -> dict:
    """Write one generation's result (a picture, pictures, frames, or frames with sound) to `output`; pictures
    saved as PNG carry its `generation_record` (`--no-metadata` leaves it out), which is returned."""
    picture = result[0] if isinstance(result, list) and result and not makes_video else result
    size = picture.size if hasattr(picture, "getpixel") else None  # a PIL image: the size it came out at
    record = generation_record(args, job, size)
    carried = None if args.no_metadata else record
    for slot, cache in pipe.step_caches().items():
        kind = "TeaCache" if type(cache).__name__ == "TeaCache" else "first-block cache"
        logger.info("%s (%s): %d of %d model calls reused", kind, slot, cache.skipped, cache.calls)
    output.parent.mkdir(parents=True, exist_ok=True)
    fps = args.fps or pipe.defaults.get("fps") or pipe.defaults.get("frame_rate") or 16
    fps *= 2 ** (args.temporal_rounds or 0)  # each DFR temporal round doubles the frame rate
    if isinstance(result, tuple) and len(result) == 2:  # video frames with their sound
        from .media import mux_video_audio

        frames, (waveform, sample_rate) = result
        mux_video_audio(frames, waveform, sample_rate, str(output), fps=fps)
    elif isinstance(result, list) and not makes_video:  # several pictures (Qwen-Image-Layered's layers)
        for i, image in enumerate(result):
            _save_picture(image, output.with_name(f"{output.stem}_{i}{output.suffix}"), carried)
        logger.info("wrote %d images %s_*%s", len(result), output.with_name(output.stem), output.suffix)
        return record
    elif isinstance(result, list):  # video frames
        from .media import save_video

        save_video(result, str(output), fps=fps)
    else:
        _save_picture(result, output, carried)
    logger.info("wrote %s", output)
    return record


def _save_picture(image, output: Path, record: dict | None = None) -> None:
    if image.mode == "RGBA" and output.suffix.lower() in (".jpg", ".jpeg"):  # JPEG has no alpha channel
        logger.warning("%s cannot hold the image's transparency; write a .png to keep it", output)
        image = image.convert("RGB")
    if record is not None and output.suffix.lower() == ".png":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", json.dumps(record, ensure_ascii=False))
        image.save(output, pnginfo=info)
        return
    image.save(output)


def _list_models() -> int:
    from .registry import installed_families

    families = installed_families()
    if not families:
        print("no model families installed (pip install diffsynth-z-image, diffsynth-wan, ...)")
    for name, family in sorted(families.items()):
        print(f"{name}: {family.description}")
        for spec in family.specs:
            print(f"  model   {spec.name} ({spec.role})")
        for preset_name, preset in sorted(family.presets.items()):
            print(f"  preset  {preset_name}  {preset.description}")
    return 0


def _inspect(args) -> int:
    from .checkpoint import describe_checkpoint

    paths = args.file[0] if len(args.file) == 1 else args.file
    info = describe_checkpoint(paths)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for key, value in info.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{key}:")
            for item in value:
                print("  - " + json.dumps(item, default=str))
        else:
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
