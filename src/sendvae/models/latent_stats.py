"""Latent statistics of a dataset: the per-channel mean and std that normalise a VAE's latents.

:func:`compute_latent_stats` measures them on a random subset of a dataset (DESIGN.md section 2,
"Latents"; docs/architecture.md, "latent statistics"); :meth:`sendvae.models.vae.VAE.set_latent_stats`
attaches them and :func:`sendvae.models.vae_formats.save_vae` writes them to ``latent_stats.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from sendvae.errors import UserError
from sendvae.models.vae import VAE
from sendvae.pixels import to_model
from sendvae.progress import bars_enabled

logger = logging.getLogger(__name__)


def _images_of(batch: Any) -> torch.Tensor:
    images = batch["image"] if isinstance(batch, Mapping) else batch
    if not isinstance(images, torch.Tensor):
        raise UserError(f"expected image batches as tensors or dicts with 'image', got {type(images).__name__}")
    if images.dtype == torch.uint8:
        return to_model(images)
    return images.float()


@torch.no_grad()
def compute_latent_stats(
    vae: VAE,
    data: Any,
    num_images: int,
    batch_size: int = 64,
    latent: str = "posterior",
    generator: torch.Generator | None = None,
    autocast_bf16: bool = False,
    num_workers: int = 0,
    subset_seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the raw latent over ``num_images`` images drawn from the whole dataset.

    ``data`` is a Dataset of items ``{"image": uint8 [3, H, W], ...}`` (or a DataLoader of such
    batches, read in its own order). From a Dataset the images are a random subset without
    replacement drawn by a generator seeded with ``subset_seed`` (read in index order), never its
    first ``num_images``: stores are sorted by class folder, so a prefix of 10,000 ImageNet images
    would hold about 8 classes (LightningDiT measures random latents, REPA-E's BatchNorm running
    statistics see shuffled batches). ``latent`` says which latent the statistics describe:

    - ``posterior`` (default): the posterior samples ``z = mean + std * eps`` that stage 2 trains on
      (the latent cache keeps the moments and draws z each step, as REPA does), computed exactly from the
      moments: E[z] = E[mean], E[z^2] = E[mean^2 + std^2]. A channel whose posterior noise exceeds the
      spread of its means would otherwise reach the diffusion model with a variance far above 1.
    - ``mean``: the posterior means only;
    - ``sample``: one posterior sample per image drawn with ``generator``.

    Statistics are taken over all images and positions (float64 sums); std is the population std.
    """
    if latent not in ("posterior", "mean", "sample"):
        raise UserError(f"latent statistics of {latent!r}: use posterior, mean or sample")
    from torch.utils.data import DataLoader, Dataset, Subset
    from tqdm import tqdm

    if num_images < 1:
        raise UserError(f"num_images must be positive, got {num_images}")
    if isinstance(data, Dataset):
        available = len(data)  # type: ignore[arg-type]
        if num_images > available:
            logger.warning("the dataset has %d images, fewer than the %d asked for; using all", available, num_images)
            num_images = available
        chosen = torch.randperm(available, generator=torch.Generator().manual_seed(subset_seed))[:num_images]
        loader: Iterable[Any] = DataLoader(Subset(data, chosen.sort().values.tolist()), batch_size=batch_size,
                                           shuffle=False, num_workers=num_workers)
    else:
        loader = data
    device = vae.latent_mean.device
    channels = vae.latent_channels
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    seen = 0
    was_training = vae.training
    vae.eval()
    with tqdm(total=num_images, desc="latent stats", unit="img", disable=not bars_enabled()) as bar:
        for batch in loader:
            x = _images_of(batch)[: num_images - seen].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                posterior = vae.encode(x)
            z = posterior.sample(generator) if latent == "sample" else posterior.mean
            z = z.double().transpose(0, 1).reshape(channels, -1).cpu()
            total += z.sum(dim=1)
            total_sq += z.pow(2).sum(dim=1)
            if latent == "posterior":
                total_sq += posterior.std.double().transpose(0, 1).reshape(channels, -1).cpu().pow(2).sum(dim=1)
            count += z.shape[1]
            seen += x.shape[0]
            bar.update(x.shape[0])
            if seen >= num_images:
                break
    vae.train(was_training)
    if seen == 0:
        raise UserError("no images to compute latent statistics on")
    mean = total / count
    var = (total_sq / count - mean.pow(2)).clamp_min(0.0)
    return mean.float(), var.sqrt().float()
