"""FLUX.2 (dev, klein-4B, klein-9B, klein-base): the DiT with BFL's original key names, its formats, and the
pieces the FLUX.2 pipeline puts around it (VAE, text encoders)."""
