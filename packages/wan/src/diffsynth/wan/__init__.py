"""DiffSynth Wan video family: Wan 2.1 and 2.2 (not built yet)."""
