"""sendvae: Send-VAE (arXiv 2601.05823) as a complete PyTorch toolkit.

Stage 1 fine-tunes a VAE while a non-linear mapper aligns its noised latent with a frozen vision
foundation model; stage 2 trains SiT + REPA on the frozen latents; probes measure attribute
disentanglement; the ADM evaluation suite measures generation. See README.md.
"""

__version__ = "0.1.0"
