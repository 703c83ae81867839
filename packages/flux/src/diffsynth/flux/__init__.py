"""DiffSynth FLUX family: the FLUX.1 DiT (dev, Krea, Kontext; BFL, diffusers and ComfyUI layouts).

The pipeline, text encoders and FLUX.2 are still to come; `diffsynth.flux.flux1` holds the DiT.
"""
