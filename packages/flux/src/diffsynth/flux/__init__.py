"""DiffSynth FLUX family: FLUX.1 and FLUX.2 (not built yet)."""
