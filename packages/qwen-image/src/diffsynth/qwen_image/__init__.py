"""DiffSynth Qwen-Image family (not built yet)."""
