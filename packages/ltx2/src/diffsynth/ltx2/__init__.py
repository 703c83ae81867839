"""DiffSynth LTX-2 audio+video family (not built yet)."""
