"""Architectures shared by several families (AutoencoderKL, causal 3D VAE, text encoders)."""
