"""DiffSynth trainer: LoRA and full fine-tuning for every installed family (not built yet)."""
