"""Models: the VAE, teachers (frozen VFMs), the Send-VAE mapper, the discriminator, SiT."""
