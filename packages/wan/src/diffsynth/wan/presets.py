"""Known Wan hub repos: their files and the authors' default generation settings.

Files are named as in DiffSynth-Studio's Wan examples (`ModelConfig(model_id, origin_file_pattern)`);
the umT5 tokenizer is the `google/umt5-xxl/` folder of Wan2.1-T2V-1.3B for every model, as there.
Defaults follow the authors' `generate.py` and `wan/configs/` (Wan-Video/Wan2.1 and Wan2.2):

- Wan 2.1: 50 steps (40 for I2V), guide scale 5, shift 5 (3 for 480p I2V, 16 for FLF2V and VACE), 81 frames,
  16 fps, the configs' negative prompt (I2V prefixes "镜头晃动，", FLF2V also "镜头切换，").
- Wan 2.2 A14B: two experts; the high-noise one runs while t >= boundary * 1000 (0.875 T2V, 0.9 I2V),
  guide scales (high, low) = (4, 3) for T2V and (3.5, 3.5) for I2V, shift 12 / 5, 40 steps.
- Wan2.2-TI2V-5B: 1280x704, 121 frames at 24 fps, 50 steps, guide 5, shift 5.
- PAI/Wan2.2-VACE-Fun-A14B (Alibaba PAI's VACE experts on Wan2.2-T2V-A14B, each laid out like
  Wan2.1-VACE-14B): the settings of the Wan2.2-T2V-A14B it extends.
- Wan2.2-Animate-14B (the authors' `wan/animate.py` and `generate.py --task animate-14B`): 20 steps, guide
  scale 1 (no negative branch), shift 5, segments of 77 frames (`num_frames=81`: the character frame + 77),
  1280x720; the output is as long as the pose video, at its frame rate (30 fps from the authors' preprocessing).
- Wan2.2-S2V-14B (`wan/configs/wan_s2v_14B.py`): 40 steps, guide scale 4.5, shift 3, clips of 80 frames
  (`num_frames=81`: the reference frame + 80) at 16 fps, its own negative prompt; 448x832 as DiffSynth-Studio's
  example (the authors fit the reference image's size into 720*1280 pixels).
- Wan2.2-Animate-2-14B (DiffSynth-Studio's examples; diffusers 0.42 also implements it, as
  `WanAnimate2Transformer3DModel` and modular pipelines, default height 800 x width 640): 40 steps, guidance 3,
  shift 5, 81 frames, height 1280 x width 720, 24 fps, the driving video's keys / values kept on the CPU
  (`animate2_offload_kv`, as the examples); the distilled DiT (`...:distilled`) 10 steps without guidance and
  `animate2_log_scale=-1.3`.
- krea/krea-realtime-video (Krea's few-step Wan2.1-T2V-14B): DiffSynth-Studio's example, which samples the whole
  clip at once (not frame block by block, as Krea's own streaming code does): 6 steps, no guidance, shift 20,
  81 frames at 15 fps, 832x480.
- Wan-AI/Wan-Dancer-14B (DiffSynth-Studio's examples; no other implementation is public): `:global` makes the
  dance's keyframes (one per latent frame, decoded frame by frame) at 7.5 fps in 48 steps, untiled; `:local` the
  30 fps video between keyframes in 24 steps; both 149 frames, height 1280 x width 720, guidance 5, shift 5.
- ByteDance/Video-As-Prompt-Wan2.1-14B (the authors' `infer/wan_vap.py`): 832x480, 49 frames, 50 steps, guide 5,
  shift 3 (the 480p I2V base it was trained on), their English negative prompt; the encoders of Wan2.1-I2V-14B-720P.
- PAI's Wan Fun Control and InP models: DiffSynth-Studio's defaults, which its example scripts use
  (832x480, 81 frames, 50 steps, guidance 5, shift 5; the A14B experts hand over at 0.875).

Sizes are the authors' default `--size` (1280*720 = width*height; 832*480 for the 480p-only models).
The authors sample with UniPC; we take Euler steps on the same shifted schedule (as DiffSynth-Studio).
The guide scale is the usual `uncond + g * (cond - uncond)`, so `cfg_scale = g`; `cfg_scale_2` is the
low-noise expert's.
"""

from __future__ import annotations

from diffsynth.runtime.registry import Preset, PresetFile, PresetLoRA

NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)
I2V_NEGATIVE_PROMPT = "镜头晃动，" + NEGATIVE_PROMPT
FLF2V_NEGATIVE_PROMPT = "镜头切换，" + I2V_NEGATIVE_PROMPT
S2V_NEGATIVE_PROMPT = (  # wan/configs/wan_s2v_14B.py
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，多余的手指，画得不好的手部，"
    "画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

TOKENIZER = PresetFile("Wan-AI/Wan2.1-T2V-1.3B", "google/umt5-xxl/")
DIT = "diffusion_pytorch_model*.safetensors"
T5 = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE21 = "Wan2.1_VAE.pth"
VAE22 = "Wan2.2_VAE.pth"

_COMMON = {"num_frames": 81, "fps": 16, "cfg_scale": 5.0, "sigma_shift": 5.0, "negative_prompt": NEGATIVE_PROMPT}
_480P = {"height": 480, "width": 832}
_720P = {"height": 720, "width": 1280}
_T2V_A14B = dict(
    num_inference_steps=40, sigma_shift=12.0, cfg_scale=4.0, cfg_scale_2=3.0, switch_DiT_boundary=0.875, **_720P
)


def _preset(repo: str, patterns: tuple[str, ...], description: str, **defaults) -> Preset:
    return Preset(
        name=repo,
        files=tuple(PresetFile(repo, p) for p in patterns),
        tokenizer=TOKENIZER,
        defaults={**_COMMON, **defaults},
        description=description,
    )


_PRESETS = (
    _preset(
        "Wan-AI/Wan2.1-T2V-1.3B",
        (DIT, T5, VAE21),
        "Wan 2.1 text-to-video 1.3B, 480p.",
        num_inference_steps=50,
        **_480P,
    ),
    _preset(
        "Wan-AI/Wan2.1-T2V-14B",
        (DIT, T5, VAE21),
        "Wan 2.1 text-to-video 14B, 720p (480p works too).",
        num_inference_steps=50,
        **_720P,
    ),
    _preset(
        "Wan-AI/Wan2.1-I2V-14B-480P",
        (DIT, T5, VAE21, CLIP),
        "Wan 2.1 image-to-video 14B, 480p: pass input_image.",
        num_inference_steps=40,
        sigma_shift=3.0,
        negative_prompt=I2V_NEGATIVE_PROMPT,
        **_480P,
    ),
    _preset(
        "Wan-AI/Wan2.1-I2V-14B-720P",
        (DIT, T5, VAE21, CLIP),
        "Wan 2.1 image-to-video 14B, 720p: pass input_image.",
        num_inference_steps=40,
        negative_prompt=I2V_NEGATIVE_PROMPT,
        **_720P,
    ),
    _preset(
        "Wan-AI/Wan2.1-FLF2V-14B-720P",
        (DIT, T5, VAE21, CLIP),
        "Wan 2.1 first-last-frame-to-video 14B, 720p: pass input_image and end_image.",
        num_inference_steps=50,
        sigma_shift=16.0,
        negative_prompt=FLF2V_NEGATIVE_PROMPT,
        **_720P,
    ),
    _preset(
        "Wan-AI/Wan2.1-VACE-1.3B",
        (DIT, T5, VAE21),
        "Wan 2.1 VACE 1.3B, 480p: text-to-video controlled by vace_video / vace_video_mask / vace_reference_image.",
        num_inference_steps=50,
        sigma_shift=16.0,
        **_480P,
    ),
    _preset(
        "iic/VACE-Wan2.1-1.3B-Preview",
        (DIT, T5, VAE21),
        "VACE 1.3B preview (Alibaba Tongyi Lab, before Wan2.1-VACE-1.3B), 480p: vace_* arguments as VACE 1.3B.",
        num_inference_steps=50,
        sigma_shift=16.0,
        **_480P,
    ),
    _preset(
        "Wan-AI/Wan2.1-VACE-14B",
        (DIT, T5, VAE21),
        "Wan 2.1 VACE 14B, 720p (480p works too): video editing and control with vace_* arguments.",
        num_inference_steps=50,
        sigma_shift=16.0,
        **_720P,
    ),
    _preset(
        "Wan-AI/Wan2.2-TI2V-5B",
        (DIT, T5, VAE22),
        "Wan 2.2 text/image-to-video 5B (16x VAE), 1280x704, 121 frames at 24 fps; input_image optional.",
        num_inference_steps=50,
        num_frames=121,
        fps=24,
        height=704,
        width=1280,
    ),
    _preset(
        "Wan-AI/Wan2.2-T2V-A14B",
        (f"high_noise_model/{DIT}", f"low_noise_model/{DIT}", T5, VAE21),
        "Wan 2.2 text-to-video, two 14B experts (high noise, then low noise), 720p.",
        **_T2V_A14B,
    ),
    _preset(
        "Wan-AI/Wan2.2-I2V-A14B",
        (f"high_noise_model/{DIT}", f"low_noise_model/{DIT}", T5, VAE21),
        "Wan 2.2 image-to-video, two 14B experts, 720p: pass input_image.",
        num_inference_steps=40,
        cfg_scale=3.5,
        cfg_scale_2=3.5,
        switch_DiT_boundary=0.9,
        **_720P,
    ),
    _preset(
        "Wan-AI/Wan2.2-Animate-14B",
        (DIT, T5, VAE21, CLIP),
        "Wan 2.2 Animate 14B: animate input_image (a character) with animate_pose_video + animate_face_video, or "
        "replace a person with animate_inpaint_video + animate_mask_video too.",
        num_inference_steps=20,
        cfg_scale=1.0,
        fps=30,
        **_720P,
    ),
    _preset(
        "Wan-AI/Wan2.2-S2V-14B",
        (DIT, "wav2vec2-large-xlsr-53-english/model.safetensors", T5, VAE21),
        "Wan 2.2 S2V 14B: a talking / singing person from input_image + input_audio (optionally s2v_pose_video), "
        "448x832 clips of 80 frames at 16 fps; continue with motion_video.",
        num_inference_steps=40,
        cfg_scale=4.5,
        sigma_shift=3.0,
        height=448,
        width=832,
        negative_prompt=S2V_NEGATIVE_PROMPT,
    ),
    _preset(
        "PAI/Wan2.2-VACE-Fun-A14B",
        (f"high_noise_model/{DIT}", f"low_noise_model/{DIT}", T5, VAE21),
        "Wan 2.2 VACE Fun (Alibaba PAI), two 14B experts with VACE control branches, 720p: vace_* arguments.",
        **_T2V_A14B,
    ),
)

_FUN = {"num_inference_steps": 50, **_480P}
_FUN_A14B = {**_FUN, "switch_DiT_boundary": 0.875}
_PRESETS += tuple(
    _preset(f"PAI/Wan2.1-Fun-{name}", (DIT, T5, VAE21, CLIP), description, **_FUN)
    for name, description in (
        (
            "1.3B-Control",
            "Wan 2.1 Fun 1.3B Control (PAI): follow a control_video (pose, depth, edges); input_image optional.",
        ),
        ("14B-Control", "Wan 2.1 Fun 14B Control (PAI): follow a control_video; input_image optional."),
        (
            "V1.1-1.3B-Control",
            "Wan 2.1 Fun V1.1 1.3B Control (PAI): control_video, and a reference_image of the subject.",
        ),
        (
            "V1.1-14B-Control",
            "Wan 2.1 Fun V1.1 14B Control (PAI): control_video, and a reference_image of the subject.",
        ),
        ("1.3B-InP", "Wan 2.1 Fun 1.3B InP (PAI): image-to-video from input_image (and end_image)."),
        ("14B-InP", "Wan 2.1 Fun 14B InP (PAI): image-to-video from input_image (and end_image)."),
        ("V1.1-1.3B-InP", "Wan 2.1 Fun V1.1 1.3B InP (PAI): image-to-video from input_image (and end_image)."),
        ("V1.1-14B-InP", "Wan 2.1 Fun V1.1 14B InP (PAI): image-to-video from input_image (and end_image)."),
        (
            "V1.1-1.3B-Control-Camera",
            "Wan 2.1 Fun V1.1 1.3B Control-Camera (PAI): animate input_image along camera_control_direction.",
        ),
        (
            "V1.1-14B-Control-Camera",
            "Wan 2.1 Fun V1.1 14B Control-Camera (PAI): animate input_image along camera_control_direction.",
        ),
    )
) + tuple(
    _preset(
        f"PAI/Wan2.2-Fun-A14B-{name}",
        (f"high_noise_model/{DIT}", f"low_noise_model/{DIT}", T5, VAE21),
        description,
        **_FUN_A14B,
    )
    for name, description in (
        (
            "Control",
            "Wan 2.2 Fun A14B Control (PAI), two experts: control_video, reference_image, input_image optional.",
        ),
        ("InP", "Wan 2.2 Fun A14B InP (PAI), two experts: image-to-video from input_image (and end_image)."),
        (
            "Control-Camera",
            "Wan 2.2 Fun A14B Control-Camera (PAI), two experts: animate input_image along camera_control_direction.",
        ),
    )
)

# DiffSynth-Studio's speed control: Wan2.1-T2V-1.3B with the motion controller beside it (`motion_bucket_id`).
SPEED_CONTROL = Preset(
    name="DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1",
    files=(
        *(PresetFile("Wan-AI/Wan2.1-T2V-1.3B", p) for p in (DIT, T5, VAE21)),
        PresetFile("DiffSynth-Studio/Wan2.1-1.3b-speedcontrol-v1", "model.safetensors"),
    ),
    tokenizer=TOKENIZER,
    defaults={**_COMMON, "num_inference_steps": 50, **_480P},
    description="Wan 2.1 text-to-video 1.3B with DiffSynth-Studio's speed control: motion_bucket_id 0 (slow) to 100.",
)
_PRESETS += (SPEED_CONTROL,)

# Wan2.2-Animate-2-14B: the DiT and encoders in the repo's `wan_animate_2/` and `videomodel/Wan-AI/` folders, the
# VAE from Wan2.1-T2V-14B (DiffSynth-Studio's examples). The distilled DiT is a second file of the same repo.
ANIMATE2 = "Wan-AI/Wan2.2-Animate-2-14B"
_ANIMATE2_FILES = (
    PresetFile(ANIMATE2, f"videomodel/Wan-AI/{T5}"),
    PresetFile(ANIMATE2, f"videomodel/Wan-AI/{CLIP}"),
    PresetFile("Wan-AI/Wan2.1-T2V-14B", VAE21),
)
# the driving video's cached keys / values take ~62 GB in bf16 at this size: kept on the CPU, as the examples do
_ANIMATE2 = {**_COMMON, "num_frames": 81, "height": 1280, "width": 720, "fps": 24, "animate2_offload_kv": True}
_PRESETS += (
    Preset(
        name=ANIMATE2,
        files=(PresetFile(ANIMATE2, "wan_animate_2/wan_animate_2_bf16.safetensors"), *_ANIMATE2_FILES),
        tokenizer=PresetFile(ANIMATE2, "videomodel/Wan-AI/umt5-xxl/"),
        defaults={**_ANIMATE2, "num_inference_steps": 40, "cfg_scale": 3.0, "animate2_log_scale": 0.0},
        description="Wan 2.2 Animate-2 14B: animate animate2_reference_image (a character) with the motion of "
        "animate2_reference_video; 40 steps, guidance 3, 720x1280 (portrait), 81 frames; continue long videos with "
        "animate2_refert_images (animate2.animate2_long_video).",
    ),
    Preset(
        name=f"{ANIMATE2}:distilled",
        files=(PresetFile(ANIMATE2, "wan_animate_2/wan_animate_2_bf16_distillation.safetensors"), *_ANIMATE2_FILES),
        tokenizer=PresetFile(ANIMATE2, "videomodel/Wan-AI/umt5-xxl/"),
        defaults={**_ANIMATE2, "num_inference_steps": 10, "cfg_scale": 1.0, "animate2_log_scale": -1.3},
        description="Wan 2.2 Animate-2 14B distilled (same repo): 10 steps without guidance, animate2_log_scale -1.3.",
    ),
)

# krea-realtime-video: Wan2.1-T2V-14B distilled by Krea for few-step sampling, sampled as a whole clip as
# DiffSynth-Studio's example does (6 steps, no guidance, shift 20, 15 fps), with Wan2.1-T2V-14B's encoders and VAE.
_PRESETS += (
    Preset(
        name="krea/krea-realtime-video",
        files=(
            PresetFile("krea/krea-realtime-video", "krea-realtime-video-14b.safetensors"),
            *(PresetFile("Wan-AI/Wan2.1-T2V-14B", p) for p in (T5, VAE21)),
        ),
        tokenizer=TOKENIZER,
        defaults={**_COMMON, **_480P, "num_inference_steps": 6, "cfg_scale": 1.0, "sigma_shift": 20.0, "fps": 15},
        description="Krea's few-step Wan2.1-T2V-14B (krea-realtime-video): 6 steps without guidance, shift 20, 832x480.",
    ),
)

# Wan-Dancer-14B: two DiTs of one layout in one repo, with the Wan 2.1 encoders and VAE beside them; the umT5
# tokenizer of Wan2.1-T2V-1.3B, as DiffSynth-Studio's examples.
DANCER = "Wan-AI/Wan-Dancer-14B"
_DANCER_FILES = tuple(PresetFile(DANCER, p) for p in (T5, VAE21, CLIP))
_DANCER = {**_COMMON, "num_frames": 149, "height": 1280, "width": 720}
_GLOBAL_DECODE = {"framewise_decoding": True, "tiled": False}  # keyframes: each latent frame decoded alone
_LOCAL_DECODE = {"framewise_decoding": False, "tiled": True}
_PRESETS += (
    Preset(
        name=f"{DANCER}:global",
        files=(PresetFile(DANCER, "global_model.safetensors"), *_DANCER_FILES),
        tokenizer=TOKENIZER,
        defaults={**_DANCER, "num_inference_steps": 48, "fps": 7.5, "wantodance_fps": 7.5, **_GLOBAL_DECODE},
        description="Wan-Dancer 14B global model: the keyframes of a dance to wantodance_music_path from "
        "wantodance_reference_image (one image per latent frame, 7.5 fps); 48 steps, 720x1280 (portrait), 149 frames.",
    ),
    Preset(
        name=f"{DANCER}:local",
        files=(PresetFile(DANCER, "local_model.safetensors"), *_DANCER_FILES),
        tokenizer=TOKENIZER,
        defaults={**_DANCER, "num_inference_steps": 24, "fps": 30, "wantodance_fps": 30.0, **_LOCAL_DECODE},
        description="Wan-Dancer 14B local model: the 30 fps dance video between wantodance_keyframes (marked by "
        "wantodance_keyframes_mask) to wantodance_music_path; 24 steps, 720x1280 (portrait), 149 frames.",
    ),
)

# LongCat-Video: the authors' DiT shards with Wan 2.1's umT5 and VAE (DiffSynth-Studio's file choices); the authors'
# run_demo_* settings: 50 steps, guidance 4 (CFG-Zero*), 832x480, 93 frames at 15 fps, their English negative prompt.
# Their scheduler's shift lives in the hub's scheduler_config.json (not readable here): 1, as DiffSynth-Studio's example.
LONGCAT = "meituan-longcat/LongCat-Video"
LONGCAT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, overall "
    "gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, three "
    "legs, many people in the background, walking backwards"
)
_LONGCAT = {"num_inference_steps": 50, "cfg_scale": 4.0, "sigma_shift": 1.0, "fps": 15, "num_frames": 93, **_480P}
_PRESETS += (
    Preset(
        name=LONGCAT,
        files=(
            PresetFile(LONGCAT, "dit/" + DIT),
            PresetFile("Wan-AI/Wan2.1-T2V-14B", T5),
            PresetFile("Wan-AI/Wan2.1-T2V-14B", VAE21),
        ),
        tokenizer=TOKENIZER,
        defaults={**_LONGCAT, "negative_prompt": LONGCAT_NEGATIVE_PROMPT},
        description="LongCat-Video 13.6B (Meituan): text-to-video, image-to-video (input_image) and continuation "
        "(longcat_video, 4n + 1 frames); 50 steps, CFG-Zero* guidance 4, 832x480, 93 frames at 15 fps.",
    ),
    # the authors' distilled sampling (run_demo_text_to_video.py): the cfg_step LoRA, 16 steps on its grid, no CFG
    Preset(
        name=LONGCAT + ":distill",
        files=(
            PresetFile(LONGCAT, "dit/" + DIT),
            PresetFile("Wan-AI/Wan2.1-T2V-14B", T5),
            PresetFile("Wan-AI/Wan2.1-T2V-14B", VAE21),
        ),
        tokenizer=TOKENIZER,
        loras=(PresetLoRA(LONGCAT, "lora/cfg_step_lora.safetensors"),),
        defaults={**_LONGCAT, "num_inference_steps": 16, "cfg_scale": 1.0, "longcat_distill": True},
        description="LongCat-Video with the authors' cfg_step LoRA (fused): 16 steps on the distilled grid, no "
        "CFG; text-to-video, image-to-video and continuation as the base preset.",
    ),
)

# Video-As-Prompt: the repo's `transformer/` files hold the Wan2.1-I2V-14B DiT and the MoT expert; the umT5, VAE and
# CLIP of Wan2.1-I2V-14B-720P (DiffSynth-Studio's file choices). The authors' `infer/wan_vap.py` settings: 832x480,
# 49 frames, 50 steps, guidance 5, their English negative prompt (also the reference caption's negative), 16 fps.
# Their scheduler config is not readable here: shift 3, the 480p I2V value (the expert was trained on
# Wan2.1-I2V-14B-480P-Diffusers).
VAP = "ByteDance/Video-As-Prompt-Wan2.1-14B"
_PRESETS += (
    Preset(
        name=VAP,
        files=(
            PresetFile(VAP, "transformer/" + DIT),
            *(PresetFile("Wan-AI/Wan2.1-I2V-14B-720P", p) for p in (T5, VAE21, CLIP)),
        ),
        tokenizer=TOKENIZER,
        defaults={
            **_COMMON,
            **_480P,
            "num_frames": 49,
            "num_inference_steps": 50,
            "cfg_scale": 5.0,
            "sigma_shift": 3.0,
            "negative_prompt": LONGCAT_NEGATIVE_PROMPT,
        },
        description="Video-As-Prompt (ByteDance) on Wan2.1-I2V-14B: input_image takes on the semantics (effect, "
        "motion, style, camera) of the reference vap_video, described by vap_prompt; 832x480, 49 frames, 50 steps.",
    ),
)

# lightx2v's Wan2.2-Lightning (4 steps, no CFG): a LoRA per A14B expert, in the folders their README names (the
# files are not checked against the hub here); their sampler: Euler on Wan's grid shifted by 5, the experts' usual
# boundary (wan/configs of their repo: sample_steps 4, guide scale 1, sample_shift 5, boundary 0.875)
LIGHTNING = "lightx2v/Wan2.2-Lightning"
_LIGHTNING = {"num_inference_steps": 4, "cfg_scale": 1.0, "cfg_scale_2": 1.0, "sigma_shift": 5.0}
_PRESETS += tuple(
    Preset(
        name=LIGHTNING + suffix,
        files=base.files,
        tokenizer=TOKENIZER,
        defaults={**base.defaults, **_LIGHTNING},
        description=f"{base.name.split('/')[1]} with lightx2v's Lightning LoRAs ({folder}, one per expert, fused): "
        "4 steps without CFG, shift 5.",
        loras=(
            PresetLoRA(LIGHTNING, f"{folder}/high_noise_model.safetensors", slot="dit"),
            PresetLoRA(LIGHTNING, f"{folder}/low_noise_model.safetensors", slot="dit2"),
        ),
    )
    for suffix, base, folder in (
        (
            "",
            next(p for p in _PRESETS if p.name == "Wan-AI/Wan2.2-T2V-A14B"),
            "Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1",
        ),
        (
            ":i2v",
            next(p for p in _PRESETS if p.name == "Wan-AI/Wan2.2-I2V-A14B"),
            "Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1",
        ),
    )
)

PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}

__all__ = ["FLF2V_NEGATIVE_PROMPT", "I2V_NEGATIVE_PROMPT", "NEGATIVE_PROMPT", "PRESETS"]
