"""The stage-1 losses: L = lambda_align * L_align + L_VAE (SPEC section 2, step 7; section 9.1 of REFERENCES).

Each term is a function or a small module; the training step multiplies it by its weight. The
reductions (DESIGN.md section 2, "Loss reductions"), written next to the REPA-E default weights:

| term | function | reduction | default weight |
|---|---|---|---|
| reconstruction | :func:`reconstruction_loss` | L1 or MSE, **mean** over batch, channels, pixels | 1.0 |
| perceptual | :class:`PerceptualLoss` | LPIPS-VGG, spatial mean per image, **mean** over batch | 1.0 |
| KL | :func:`kl_loss` | **sum** over C, H, W of the latent, **mean** over batch | 1e-6 |
| GAN (generator) | :func:`generator_loss` | ``-mean`` of the patch logits | 0.1 fixed (REPA-E) or :func:`adaptive_weight` x 0.5 (LDM) |
| GAN (discriminator) | :func:`hinge_discriminator_loss` | hinge, mean over patches and batch | 1.0 (own optimiser) |
| alignment | :class:`SendAlignment` (Eq. 2) | ``1 - cos``, mean over tokens and batch | lambda_align = 1.0 |
| alignment (VA-VAE) | :class:`VFAlignment` | margins, mean over tokens (pairs) and batch | adaptive weight (clamp 1e8) x 0.1 |

LDM / VA-VAE instead *sum* the pixel loss over pixels (divide by B only); with the same nominal
KL weight their KL is ~2e5 times weaker relative to reconstruction (3 x 256 x 256 pixels). All
losses are computed in float32 whatever the autocast dtype.

Alignment modules share one interface: ``forward(z, teacher_tokens, generator=None) -> (loss,
logs)`` with ``z`` the latent [B, C, h, w] (normalised for Send-VAE, raw for VA-VAE's VF loss),
``teacher_tokens`` [B, N, D] from a frozen :class:`~sendvae.models.teachers.Teacher`, ``loss`` a
float32 scalar and ``logs`` a dict of detached scalars for logging.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sendvae.config import ConfigError
from sendvae.errors import UserError
from sendvae.models.mapper import Mapper, noise_injection
from sendvae.models.teachers import RANDOM_WEIGHTS, read_state_dict

logger = logging.getLogger(__name__)

ReconstructionKind = Literal["l1", "mse"]
AlignmentKind = Literal["none", "vf", "sendvae"]


# ----------------------------------------------------------------------------------------------
# Reconstruction, KL, GAN
# ----------------------------------------------------------------------------------------------


def _float32(device: torch.device) -> contextlib.AbstractContextManager:
    """A region that runs in float32 inside an autocast region: autocast would otherwise compute its
    matmuls and convolutions in bf16 even on float32 inputs (the inputs must be cast with ``.float()``)."""
    return torch.autocast(device_type=device.type, enabled=False)


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, kind: ReconstructionKind = "l1") -> torch.Tensor:
    """Pixel loss, **mean** over batch, channels and pixels (REPA-E; weight 1.0). ``kind``: l1 | mse."""
    diff = recon.float() - x.float()
    if kind == "l1":
        return diff.abs().mean()
    if kind == "mse":
        return diff.square().mean()
    raise ConfigError(f"reconstruction loss kind {kind!r} is not one of ['l1', 'mse']")


class DiagonalGaussianLike(Protocol):
    def kl(self) -> torch.Tensor: ...


def kl_loss(posterior: DiagonalGaussianLike) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) **summed** over the latent (C, H, W), **mean** over the batch (weight 1e-6).

    ``posterior.kl()`` returns one summed value per sample (``sendvae.models.vae.DiagonalGaussian``).
    """
    return posterior.kl().float().mean()


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: ``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))``."""
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The VAE's adversarial term: ``-mean D(x_hat)`` over patches and batch (weight 0.1 in REPA-E)."""
    return -fake_logits.float().mean()


def adaptive_weight(
    loss_a: torch.Tensor, loss_b: torch.Tensor, last_layer: torch.Tensor, clamp: float = 1e4
) -> torch.Tensor:
    """``||d loss_a / d W|| / (||d loss_b / d W|| + 1e-4)`` at ``last_layer`` W, clamped to [0, clamp], detached.

    LDM's GAN weight: ``adaptive_weight(nll, generator_loss, decoder_last_layer)`` x disc_weight.
    VA-VAE's VF weight: ``adaptive_weight(nll, vf_loss, encoder_last_layer, clamp=1e8)`` x 0.1.
    Both graphs are kept (``retain_graph``) for the backward pass that follows.
    """
    grad_a = torch.autograd.grad(loss_a, last_layer, retain_graph=True)[0]
    grad_b = torch.autograd.grad(loss_b, last_layer, retain_graph=True)[0]
    weight = grad_a.float().norm() / (grad_b.float().norm() + 1e-4)
    return weight.clamp(0.0, clamp).detach()


# ----------------------------------------------------------------------------------------------
# LPIPS (the lpips package, VGG trunk, weights from local files only)
# ----------------------------------------------------------------------------------------------

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
# torchvision vgg16 ``features`` index ranges that lpips' VGG keeps as slice1..slice5.
_LPIPS_VGG_SLICES = ((1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30)))


def lpips_linear_weights_path() -> Path:
    """The calibrated linear layers of LPIPS-VGG v0.1, shipped inside the lpips wheel."""
    import lpips

    return Path(lpips.__file__).resolve().parent / "weights" / "v0.1" / "vgg.pth"


def default_vgg16_path() -> Path:
    """Where torchvision keeps its ImageNet VGG16 file (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def torchvision_vgg16_to_lpips(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ``features.{i}.*`` -> lpips ``net.slice{s}.{i}.*`` (the classifier is dropped)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "features":
            continue
        index = int(parts[1])
        for number, indices in _LPIPS_VGG_SLICES:
            if index in indices:
                out[f"net.slice{number}.{index}.{parts[2]}"] = value
    return out


def build_lpips_vgg(weights_path: str | os.PathLike[str] | None = None) -> nn.Module:
    """``lpips.LPIPS(net="vgg")`` built without any download, frozen, in eval mode.

    The linear layers come from the lpips wheel. The VGG16 trunk comes from ``weights_path``:
    a full LPIPS state dict (``net.slice*`` and ``lin*`` keys; its linear layers then replace the
    wheel's), a torchvision ImageNet ``vgg16`` state dict (``features.*``), or ``"random"`` (tests
    and benchmarks only: not a perceptual metric). None looks for torchvision's cached
    ``vgg16-397923af.pth`` and raises a :class:`UserError` naming it when absent.
    """
    import lpips

    random_trunk = weights_path is not None and str(weights_path) == RANDOM_WEIGHTS
    path = default_vgg16_path() if weights_path is None else Path(weights_path).expanduser()
    if not random_trunk and not path.exists():
        raise UserError(
            f"LPIPS needs the ImageNet VGG16 weights and does not download them: {path} does not exist. "
            f"Download {VGG16_URL} (528 MB) to {default_vgg16_path()} or pass its path as the LPIPS "
            "weights (a full LPIPS state dict also works)"
        )
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    linear = torch.load(lpips_linear_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(linear, strict=False)
    if random_trunk:
        logger.warning("LPIPS: random VGG16 trunk (weights_path='random'); distances are not perceptual")
    else:
        _load_lpips_trunk(model, read_state_dict(path, "LPIPS weights"), path)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _load_lpips_trunk(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    if not any(k.startswith("net.slice") for k in state):
        state = torchvision_vgg16_to_lpips(state)
    own = model.state_dict()
    needed = [k for k in own if k.startswith("net.")]
    missing = [k for k in needed if k not in state]
    if missing:
        raise UserError(
            f"LPIPS weights {path}: neither a torchvision vgg16 nor an LPIPS state dict; missing {missing[:6]}"
        )
    loadable = {k: v for k, v in state.items() if k in own and (k.startswith("net.") or k.startswith("lin"))}
    model.load_state_dict(loadable, strict=False)
    logger.info("LPIPS: VGG16 trunk loaded from %s", path)


def check_model_range(x: torch.Tensor, name: str = "LPIPS input", tolerance: float = 1e-3) -> None:
    """Guard for the pixel convention [-1, 1] (the LPIPS input-range bug of REPA-E and RAE).

    Raises ``ValueError`` when values leave [-1, 1] (e.g. [0, 1] images mapped again with
    ``2x - 1`` give [-3, 1]); warns (``RuntimeWarning``) when no value is negative, the signature of
    [0, 1] images passed as if they were [-1, 1].
    """
    lo, hi = (v.item() for v in torch.aminmax(x.detach().float()))
    if lo < -1.0 - tolerance or hi > 1.0 + tolerance:
        raise ValueError(
            f"{name} must be in [-1, 1] (sendvae.pixels.to_model); got values in [{lo:.3f}, {hi:.3f}]"
        )
    if lo >= 0.0:
        warnings.warn(
            f"{name} has no negative value (range [{lo:.3f}, {hi:.3f}]): are these [0, 1] images? "
            "LPIPS expects [-1, 1] (sendvae.pixels.to_model)",
            RuntimeWarning,
            stacklevel=3,
        )


class PerceptualLoss(nn.Module):
    """LPIPS-VGG v0.1 (lpips package) between images in [-1, 1]; spatial mean, then **mean** over batch.

    ``forward(x, recon)``: ``x`` is the real image batch and must be in [-1, 1]
    (:func:`check_model_range`: raise outside, warn when it looks like [0, 1]); ``recon`` is the
    decoder output and is not checked (it may overshoot slightly). Frozen; gradients flow to
    ``recon`` only.
    """

    def __init__(self, weights_path: str | os.PathLike[str] | None = None, check_range: bool = True) -> None:
        super().__init__()
        self.lpips = build_lpips_vgg(weights_path)
        self.check_range = check_range

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Always eval (LPIPS' dropout layers stay off)."""
        return super().train(False)

    def forward(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        if self.check_range:
            check_model_range(x)
        with _float32(x.device):
            distance = self.lpips(x.float(), recon.float())
        return distance.mean()


# ----------------------------------------------------------------------------------------------
# Alignment: none, VA-VAE's VF loss, Send-VAE (SPEC Eq. 2)
# ----------------------------------------------------------------------------------------------


def alignment_loss(predicted: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """SPEC Eq. 2: ``1 - (1/N) sum_n cos(h(z_t)[n], y[n])``, averaged over tokens and batch (float32)."""
    with _float32(predicted.device):
        return 1.0 - F.cosine_similarity(predicted.float(), teacher_tokens.float(), dim=-1).mean()


def vf_loss(
    z_tokens: torch.Tensor, teacher_tokens: torch.Tensor, margin_cos: float = 0.5, margin_dist: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor]:
    """VA-VAE's vision-foundation loss on projected latent tokens z [B, N, D] and teacher tokens f.

    - marginal cosine: ``mean_{b,i} relu(1 - m_cos - cos(z_i, f_i))``;
    - marginal distance matrix: ``mean_{b,i,j} relu(|cos(z_i, z_j) - cos(f_i, f_j)| - m_dist)`` over
      the N tokens of each image.
    Returns ``(cosine term, distance-matrix term)`` in float32 (the N x N cosine matrices too);
    VA-VAE adds them with weight 1 each.
    """
    with _float32(z_tokens.device):
        z = F.normalize(z_tokens.float(), dim=-1)
        f = F.normalize(teacher_tokens.float(), dim=-1)
        cos_term = F.relu(1.0 - margin_cos - (z * f).sum(-1)).mean()
        distance = (z @ z.transpose(1, 2) - f @ f.transpose(1, 2)).abs()
        dist_term = F.relu(distance - margin_dist).mean()
    return cos_term, dist_term


def _token_grid(teacher_tokens: torch.Tensor) -> int:
    grid = math.isqrt(teacher_tokens.shape[1])
    if grid * grid != teacher_tokens.shape[1]:
        raise ValueError(f"teacher tokens must form a square grid, got N = {teacher_tokens.shape[1]}")
    return grid


class Alignment(nn.Module):
    """Base of the alignment terms: ``forward(z, teacher_tokens, generator=None) -> (loss, logs)``."""

    kind: str = ""
    needs_teacher: bool = True


class NoAlignment(Alignment):
    """The plain fine-tuning baseline: loss 0, no teacher needed (``teacher_tokens`` may be None)."""

    kind = "none"
    needs_teacher = False

    def forward(
        self, z: torch.Tensor, teacher_tokens: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return torch.zeros((), device=z.device, dtype=torch.float32), {}


class VFAlignment(Alignment):
    """VA-VAE's VF loss on a linear 1x1 projection (no bias) of z to the teacher width.

    VA-VAE projects the raw posterior sample; the training step passes it unnormalised when
    ``alignment.normalize_latent=false`` (the vf presets).
    The latent grid must equal the teacher grid, or be a multiple of it (the projection is then
    average-pooled to the teacher grid, e.g. an f8 latent 32x32 against 16x16 DINOv2 tokens).
    VA-VAE weights the sum by ``adaptive_weight(nll, vf, encoder_last_layer, clamp=1e8) * 0.1``:
    that is the training step's business.
    """

    kind = "vf"

    def __init__(
        self, latent_channels: int, teacher_dim: int, margin_cos: float = 0.5, margin_dist: float = 0.25
    ) -> None:
        super().__init__()
        self.projection = nn.Conv2d(latent_channels, teacher_dim, kernel_size=1, bias=False)
        self.margin_cos = margin_cos
        self.margin_dist = margin_dist

    def project(self, z: torch.Tensor, grid: int) -> torch.Tensor:
        """z [B, C, h, w] -> projected tokens [B, grid * grid, D] (row-major)."""
        projected = self.projection(z)
        size = projected.shape[-1]
        if size != grid:
            if size % grid or projected.shape[-2] != size:
                raise ValueError(
                    f"VF loss: latent grid {tuple(projected.shape[-2:])} does not match the teacher grid {grid} "
                    "(it must be equal or a multiple)"
                )
            projected = F.avg_pool2d(projected, size // grid)
        return projected.flatten(2).transpose(1, 2)

    def forward(
        self, z: torch.Tensor, teacher_tokens: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens = self.project(z, _token_grid(teacher_tokens))
        cos_term, dist_term = vf_loss(tokens, teacher_tokens, self.margin_cos, self.margin_dist)
        loss = cos_term + dist_term
        logs = {"align_loss": loss.detach(), "vf_cos": cos_term.detach(), "vf_distmat": dist_term.detach()}
        return loss, logs


class SendAlignment(Alignment):
    """Send-VAE: noise injection (Eq. 1) -> mapper h_phi -> ``1 - mean cos`` to the teacher tokens (Eq. 2).

    ``z`` must already be normalised with the latent statistics (the caller's job, SPEC step 2).
    ``noise=False`` is the "without noise" ablation (t = 0).
    """

    kind = "sendvae"

    def __init__(self, mapper: Mapper, noise: bool = True) -> None:
        super().__init__()
        self.mapper = mapper
        self.noise = noise

    def forward(
        self, z: torch.Tensor, teacher_tokens: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z_t, t = noise_injection(z, generator=generator, enabled=self.noise)
        loss = alignment_loss(self.mapper(z_t), teacher_tokens)
        return loss, {"align_loss": loss.detach(), "align_t_mean": t.float().mean().detach()}


def build_alignment(
    kind: AlignmentKind,
    latent_channels: int,
    latent_grid: int,
    teacher_dim: int,
    teacher_grid: int,
    noise: bool = True,  # sendvae: noise injection (Eq. 1) on/off
    mapper_depth: int = 1,  # sendvae: ViT blocks in the mapper (paper: 1)
    mapper_width: int | None = None,  # sendvae: None = teacher_dim
    mapper_heads: int | None = None,  # sendvae: None = width // 64
    mlp_hidden: int = 2048,  # sendvae: projector hidden width
    margin_cos: float = 0.5,  # vf: marginal cosine margin
    margin_dist: float = 0.25,  # vf: marginal distance-matrix margin
) -> Alignment:
    """The alignment term ``kind``: ``none`` | ``vf`` (VA-VAE) | ``sendvae`` (mapper, SPEC Eq. 1-2)."""
    if kind == "none":
        return NoAlignment()
    if kind == "vf":
        if latent_grid % teacher_grid:
            raise ConfigError(
                f"alignment vf: latent grid {latent_grid} is not a multiple of the teacher grid {teacher_grid}"
            )
        return VFAlignment(latent_channels, teacher_dim, margin_cos, margin_dist)
    if kind == "sendvae":
        try:
            mapper = Mapper(
                latent_channels, latent_grid, teacher_dim, teacher_grid,
                depth=mapper_depth, width=mapper_width, heads=mapper_heads, mlp_hidden=mlp_hidden,
            )
        except ValueError as exc:
            raise ConfigError(f"alignment sendvae: {exc}") from exc
        return SendAlignment(mapper, noise=noise)
    raise ConfigError(f"alignment kind {kind!r} is not one of ['none', 'vf', 'sendvae']")
