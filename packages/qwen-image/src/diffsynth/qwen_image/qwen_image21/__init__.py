"""Qwen-Image 2.1: a single-stream block-causal DiT over one interleaved text/image sequence, a Qwen3-VL text
encoder that reads the prompt and the condition images together, and a 64-channel, 16x image VAE (RGBA)."""
