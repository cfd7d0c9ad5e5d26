"""Data: the procedural shapes dataset, image folders, the uint8 store, attribute datasets, latents."""
