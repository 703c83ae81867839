"""DiffSynth Qwen-Image family: the Qwen-Image MMDiT (Qwen-Image, 2512, Edit, Edit-2509/2511 with zero_cond_t).

The pipeline and the Qwen2.5-VL text encoder are still to come; `diffsynth.qwen_image.dit` holds the DiT.
"""
