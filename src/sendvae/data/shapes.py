"""The procedural attribute dataset ``shapes``: the embedded default for the demo, tests and probes.

Every image is a function of ``(seed, index)`` alone: eight factors are drawn from a counter-based
hash (splitmix64 of seed, index and factor number), so item ``i`` is the same whatever the batch,
the number of workers or the resolution it is rendered at. Factors (all discrete, exact labels):

=============  ======================================================================
shape          circle, square, triangle, star (5 points), heart, ellipse (class label)
object_hue     8 hues, HSV saturation 0.85, value 0.95
background     4 hues, HSV saturation 0.45, value 0.42
size           4 radii: 0.28, 0.36, 0.44, 0.52 of the half-width
rotation       8 steps of 11.25 degrees over [0, 90), counter-clockwise
x, y           8 centre positions each over [-0.4, 0.4] of the half-width (y index 0 = top)
texture        solid, striped, dotted (a darker pattern with a period of 1/8 of the image
               width, in the object's rotated frame)
=============  ======================================================================

6 * 8 * 4 * 4 * 8 * 8 * 8 * 3 = 589,824 combinations; the binary attribute vector has one column
per factor value (49). Rotation is only partly identifiable: a solid circle carries none, the
square repeats every 90 degrees, the star every 72 (so its 78.75-degree step looks like 6.75),
textures reveal it on every shape.

**Variants** (:data:`VARIANTS`) restrict some factors to a subset of their values and leave the
rest uniform; the factor indices, attribute columns and renderer stay those of the full dataset, so
any model or classifier of the full dataset reads a variant's images. A variant is named in a data
spec as ``<variant>:N[@SEED]`` (:func:`parse_spec`):

- ``shapes``: the full distribution above (the probe study's data);
- ``shapes-gen``: the generation study's data (``sendvae demo``): the largest size, no rotation,
  solid texture and the 4 x 4 central positions, so the shape (the class) is drawn large and
  sharp enough for a tiny SiT to learn in CPU minutes; hues and backgrounds stay free
  (6 * 8 * 4 * 4 * 4 = 3,072 combinations). docs/demo_full.md gives the measurements behind it.

Rendering is antialiased by analytic coverage: each shape has a signed distance function (negative
inside) evaluated at pixel centres, and a pixel's coverage is ``clip(0.5 - d / pixel, 0, 1)`` (a
one-pixel linear ramp across the edge); the stripes and dots are antialiased the same way.
:func:`render_batch` vectorises across a batch with numpy (items grouped by shape and texture);
:func:`render` renders one item through the same code.
"""

from __future__ import annotations

import colorsys
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from sendvae.errors import UserError

#: factor -> value names, in the order of the factor vector and of the attribute columns.
FACTORS: "OrderedDict[str, tuple[str, ...]]" = OrderedDict(
    shape=("circle", "square", "triangle", "star", "heart", "ellipse"),
    object_hue=("red", "orange", "lime", "green", "cyan", "azure", "violet", "pink"),
    background=("brown", "green", "slate", "plum"),
    size=("xs", "s", "m", "l"),
    rotation=tuple(f"{step * 11.25:g}deg" for step in range(8)),
    x=tuple(str(i) for i in range(8)),
    y=tuple(str(i) for i in range(8)),
    texture=("solid", "striped", "dotted"),
)
FACTOR_SIZES = tuple(len(values) for values in FACTORS.values())
NUM_FACTORS = len(FACTORS)
NUM_CLASSES = FACTOR_SIZES[0]
MIN_RESOLUTION, MAX_RESOLUTION = 16, 256

OBJECT_RGB = np.array([colorsys.hsv_to_rgb(k / 8, 0.85, 0.95) for k in range(8)], dtype=np.float32)
BACKGROUND_RGB = np.array([colorsys.hsv_to_rgb(k / 4 + 1 / 16, 0.45, 0.42) for k in range(4)], dtype=np.float32)
SIZE_RADIUS = np.array([0.28, 0.36, 0.44, 0.52], dtype=np.float32)
ROTATION_RAD = np.deg2rad(np.arange(8) * 11.25).astype(np.float32)
POSITIONS = np.linspace(-0.4, 0.4, 8).astype(np.float32)
PATTERN_PERIOD = 0.25  # in half-widths: 1/8 of the image width (4 px at 32 px)
PATTERN_DARKEN = 0.5  # pattern pixels are the object colour times (1 - 0.5)

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class ShapesVariant:
    """A named distribution over the factors: ``values[factor]`` lists the allowed value indices
    (a factor not listed takes all its values); each factor stays uniform over its allowed values."""

    name: str
    description: str
    values: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def allowed(self, factor: str) -> tuple[int, ...]:
        """The value indices ``factor`` can take in this variant."""
        return self.values.get(factor, tuple(range(len(FACTORS[factor]))))


#: variant name -> variant; the name is also the prefix of its data spec (``shapes-gen:4000@0``).
VARIANTS: dict[str, ShapesVariant] = {
    "shapes": ShapesVariant("shapes", "the full distribution: every factor uniform over all its values"),
    "shapes-gen": ShapesVariant(
        "shapes-gen", "generation study: size l, rotation 0, solid, x and y in the 4 central positions",
        {"size": (3,), "rotation": (0,), "x": (2, 3, 4, 5), "y": (2, 3, 4, 5), "texture": (0,)},
    ),
}


def get_variant(name: str) -> ShapesVariant:
    """The variant called ``name`` (a UserError naming the known ones otherwise)."""
    if name not in VARIANTS:
        raise UserError(f"unknown shapes variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


class ShapesSpec(NamedTuple):
    """A parsed data spec ``<variant>:N[@SEED]``."""

    n: int
    seed: int
    variant: str


_SPEC = re.compile(r"^(shapes(?:-[a-z]+)?):([0-9_]+)(?:@([0-9]+))?$")


def parse_spec(spec: str) -> ShapesSpec | None:
    """``"shapes:N"``, ``"shapes-gen:N@SEED"``, ... -> :class:`ShapesSpec`; ``None`` for anything that is not
    a shapes spec (a folder path); a UserError for a malformed one or an unknown variant."""
    text = str(spec).strip()
    match = _SPEC.match(text)
    if not match:
        if re.match(r"^shapes(-[a-z]+)?:", text):
            raise UserError(f"bad shapes spec {spec!r}: expected shapes:N or shapes:N@SEED (e.g. shapes:20000@1), or a "
                            f"variant's VARIANT:N@SEED (variants: {', '.join(VARIANTS)})")
        return None
    return ShapesSpec(int(match.group(2).replace("_", "")), int(match.group(3) or 0), get_variant(match.group(1)).name)


def format_spec(n: int, seed: int, variant: str = "shapes") -> str:
    """The data spec of ``n`` items of ``variant`` drawn with ``seed`` (inverse of :func:`parse_spec`)."""
    return f"{get_variant(variant).name}:{int(n)}@{int(seed)}"


def attribute_names() -> list[str]:
    """One binary column per factor value: ``["shape=circle", ..., "texture=dotted"]`` (49 names)."""
    return [f"{factor}={value}" for factor, values in FACTORS.items() for value in values]


def attribute_vector(factors: Any) -> np.ndarray:
    """Factor indices ``[8]`` or ``[B, 8]`` -> one-hot attribute vector(s) float32 ``[49]`` / ``[B, 49]``."""
    f = np.asarray(factors, dtype=np.int64)
    if f.shape[-1] != NUM_FACTORS:
        raise ValueError(f"expected {NUM_FACTORS} factor indices, got shape {f.shape}")
    sizes = np.array(FACTOR_SIZES)
    if (f < 0).any() or (f >= sizes).any():
        raise ValueError(f"factor indices {f.tolist()} out of range {FACTOR_SIZES}")
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = f.reshape(-1, NUM_FACTORS)
    out = np.zeros((flat.shape[0], int(sizes.sum())), dtype=np.float32)
    out[np.arange(flat.shape[0])[:, None], flat + offsets] = 1.0
    return out.reshape(*f.shape[:-1], -1)


# ---------------------------------------------------------------------------------------------
# Factors from (seed, index): a counter-based hash, identical on every platform and batch size.


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_factors(indices: Any, seed: int = 0, variant: str = "shapes") -> np.ndarray:
    """Factor indices int64 ``[B, 8]`` of items ``indices`` for ``seed``, each uniform over the values that
    ``variant`` allows (the full variant: over all values)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if (idx < 0).any():
        raise ValueError("shapes indices must be >= 0")
    chosen = get_variant(variant)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([int(seed) & _MASK64], dtype=np.uint64))
        base = _splitmix64(idx.astype(np.uint64) ^ key)
        columns = []
        for f, factor in enumerate(FACTORS):
            allowed = np.asarray(chosen.allowed(factor), dtype=np.int64)
            h = _splitmix64(base + np.uint64(f + 1) * np.uint64(0xD1B54A32D192ED03))
            columns.append(allowed[(h % np.uint64(len(allowed))).astype(np.int64)])
    return np.stack(columns, axis=1)


# ---------------------------------------------------------------------------------------------
# Signed distance functions in the object's frame (units of the size radius; negative inside).


def _sdf_circle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.sqrt(x * x + y * y) - 1.0


def _sdf_box(x: np.ndarray, y: np.ndarray, half: float) -> np.ndarray:
    dx = np.abs(x) - half
    dy = np.abs(y) - half
    outside = np.sqrt(np.maximum(dx, 0.0) ** 2 + np.maximum(dy, 0.0) ** 2)
    return outside + np.minimum(np.maximum(dx, dy), 0.0)


def _sdf_square(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _sdf_box(x, y, 0.82)


def _sdf_folded_segment(x: np.ndarray, y: np.ndarray, n: int, tip: float, inner: tuple[float, float]) -> np.ndarray:
    """Exact distance for an n-fold mirror-symmetric star-shaped outline with a vertex at the top.

    The plane is folded into the half-sector between the tip direction (+y) and the next mirror line
    (angle pi/n); there the outline is the segment tip -> ``inner`` and the shape is the triangle
    (origin, tip, inner), so the distance to that one segment is the distance to the outline.
    """
    sector = 2.0 * math.pi / n
    phi = np.arctan2(x, y)
    phi = np.abs(np.mod(phi + sector / 2, sector) - sector / 2)
    rho = np.sqrt(x * x + y * y)
    px, py = rho * np.sin(phi), rho * np.cos(phi) - tip
    ex, ey = inner[0], inner[1] - tip
    h = np.clip((px * ex + py * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    dist = np.sqrt((px - h * ex) ** 2 + (py - h * ey) ** 2)
    return np.where(ex * py - ey * px < 0.0, -dist, dist)


def _polygon_inner(n: int, radius: float) -> tuple[float, float]:
    """Midpoint of the edge next to the top vertex of a regular n-gon of circumradius ``radius``."""
    half = math.pi / n
    return (radius * math.cos(half) * math.sin(half), radius * math.cos(half) * math.cos(half))


def _star_inner(n: int, radius: float) -> tuple[float, float]:
    half = math.pi / n
    return (radius * math.sin(half), radius * math.cos(half))


_TRIANGLE_INNER = _polygon_inner(3, 1.2)
_STAR_INNER = _star_inner(5, 1.2 * 0.45)


def _sdf_triangle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _sdf_folded_segment(x, y, 3, 1.2, _TRIANGLE_INNER)


def _sdf_star(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _sdf_folded_segment(x, y, 5, 1.2, _STAR_INNER)


_HEART_SIDE = 1.15
_HEART_Y0 = -0.0732 * _HEART_SIDE  # centres the heart's bounding box on the origin
_HEART_LOBE = (_HEART_SIDE / (2 * math.sqrt(2)), _HEART_Y0 + _HEART_SIDE / (2 * math.sqrt(2)))


def _sdf_heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A square standing on a corner plus a disc (diameter = side) centred on each upper side (union = min)."""
    ax = np.abs(x)
    yy = y - _HEART_Y0
    s = np.float32(1 / math.sqrt(2))
    diamond = _sdf_box((ax + yy) * s, (yy - ax) * s, _HEART_SIDE / 2)
    lobe = np.sqrt((ax - _HEART_LOBE[0]) ** 2 + (y - _HEART_LOBE[1]) ** 2) - _HEART_SIDE / 2
    return np.minimum(diamond, lobe)


_ELLIPSE_AXES = (1.15, 0.6)


def _sdf_ellipse(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """First-order distance ``(|w| - 1) / |grad |w||`` with ``w = (x / a, y / b)``: exact on the outline."""
    a, b = _ELLIPSE_AXES
    wx, wy = x * (1 / a), y * (1 / b)
    norm = np.sqrt(wx * wx + wy * wy)
    grad = np.sqrt((wx * (1 / a)) ** 2 + (wy * (1 / b)) ** 2)
    return (norm - 1.0) * norm / np.maximum(grad, 1e-6)


_SDF = (_sdf_circle, _sdf_square, _sdf_triangle, _sdf_star, _sdf_heart, _sdf_ellipse)


def _pattern_sdf(texture: int, xo: np.ndarray, yo: np.ndarray) -> np.ndarray:
    """Signed distance (half-width units) to the texture's dark pattern in the object frame."""
    if texture == 1:  # stripes: bands of half the period centred on multiples of the period
        t = yo * (1 / PATTERN_PERIOD)
        g = np.abs(t - np.floor(t) - 0.5)
        return (0.25 - g) * PATTERN_PERIOD
    fx = xo * (1 / PATTERN_PERIOD)  # dots of radius 0.3 periods at the cell centres
    fy = yo * (1 / PATTERN_PERIOD)
    fx = fx - np.floor(fx) - 0.5
    fy = fy - np.floor(fy) - 0.5
    return (np.sqrt(fx * fx + fy * fy) - 0.3) * PATTERN_PERIOD


def _coverage(sd: np.ndarray, half_res: float) -> np.ndarray:
    """Pixel coverage from a signed distance in half-width units (one pixel = 1 / half_res)."""
    cov = sd * np.float32(-half_res)
    cov += 0.5
    return np.clip(cov, 0.0, 1.0, out=cov)


def _pixel_centres(resolution: int) -> np.ndarray:
    return ((2.0 * np.arange(resolution) + 1.0) / resolution - 1.0).astype(np.float32)


def _render_group(factors: np.ndarray, resolution: int, out: np.ndarray) -> None:
    """Render items that share one shape and one texture into ``out`` (uint8 [b, H, W, 3])."""
    shape, texture = int(factors[0, 0]), int(factors[0, 7])
    half_res = resolution / 2.0
    centres = _pixel_centres(resolution)
    cx = POSITIONS[factors[:, 5]][:, None, None]
    cy = -POSITIONS[factors[:, 6]][:, None, None]  # y index 0 is the top of the image
    theta = ROTATION_RAD[factors[:, 4]]
    cos_t, sin_t = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    dx = centres[None, None, :] - cx  # [b, 1, W]
    dy = -centres[None, :, None] - cy  # [b, H, 1]; image rows go down, y goes up
    xo = cos_t * dx + sin_t * dy  # object frame: rotate by -theta
    yo = cos_t * dy - sin_t * dx
    radius = SIZE_RADIUS[factors[:, 3]][:, None, None]
    inv_r = 1.0 / radius
    sd = _SDF[shape](xo * inv_r, yo * inv_r)
    sd *= radius
    cov = _coverage(sd, half_res)
    if texture:
        amount = cov * (1.0 - PATTERN_DARKEN * _coverage(_pattern_sdf(texture, xo, yo), half_res))
    else:
        amount = cov
    obj = (OBJECT_RGB[factors[:, 1]] * 255.0)[:, None, None, :]
    bg = (BACKGROUND_RGB[factors[:, 2]] * 255.0)[:, None, None, :]
    img = amount[..., None] * obj
    img -= cov[..., None] * bg
    img += bg + 0.5  # convex mix of background and (darkened) object colour; +0.5 then floor = round
    np.clip(img, 0.0, 255.0, out=img)
    out[...] = img.astype(np.uint8)


def _check_resolution(resolution: int) -> int:
    if not isinstance(resolution, (int, np.integer)) or not MIN_RESOLUTION <= int(resolution) <= MAX_RESOLUTION:
        raise UserError(
            f"shapes resolution {resolution!r} is not an integer in [{MIN_RESOLUTION}, {MAX_RESOLUTION}]"
        )
    return int(resolution)


def render_factors(factors: Any, resolution: int = 64) -> np.ndarray:
    """Images uint8 ``[B, H, W, 3]`` for explicit factor indices ``[B, 8]`` (any combination).

    Items are grouped by (shape, texture) and each group is rendered in chunks of about 128k
    pixels, so the intermediate numpy arrays stay in cache.
    """
    resolution = _check_resolution(resolution)
    factors = np.asarray(factors, dtype=np.int64).reshape(-1, NUM_FACTORS)
    if (factors < 0).any() or (factors >= np.array(FACTOR_SIZES)).any():
        raise ValueError(f"factor indices out of range {FACTOR_SIZES}")
    images = np.empty((len(factors), resolution, resolution, 3), dtype=np.uint8)
    chunk = max(1, (1 << 17) // (resolution * resolution))
    group = factors[:, 0] * 3 + factors[:, 7]
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    for members in np.split(order, bounds):
        for start in range(0, len(members), chunk):
            rows = members[start:start + chunk]
            block = np.empty((len(rows), resolution, resolution, 3), dtype=np.uint8)
            _render_group(factors[rows], resolution, block)
            images[rows] = block
    return images


def render_batch(indices: Any, resolution: int = 64, seed: int = 0,
                 variant: str = "shapes") -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``[B, H, W, 3]`` and factor indices int64 ``[B, 8]`` of items ``indices`` (the fast path)."""
    resolution = _check_resolution(resolution)
    factors = sample_factors(indices, seed, variant)
    return render_factors(factors, resolution), factors


def render(index: int, resolution: int = 64, seed: int = 0, variant: str = "shapes") -> tuple[np.ndarray, np.ndarray]:
    """One item: image uint8 ``[H, W, 3]`` and its factor indices int64 ``[8]``."""
    images, factors = render_batch([index], resolution, seed, variant)
    return images[0], factors[0]


def describe_factors(factors: Sequence[int]) -> dict[str, str]:
    """Factor indices -> ``{"shape": "star", ...}`` (value names)."""
    return {name: values[int(i)] for (name, values), i in zip(FACTORS.items(), factors)}


class ShapesDataset(Dataset):
    """Items ``offset .. offset + n - 1`` of the shapes dataset (or one of its :data:`VARIANTS`) at
    ``resolution`` for ``seed``.

    Each item is the project's image item plus the exact factors and the attribute vector:
    ``{"image": uint8 [3, H, W], "label": int64 (shape index), "index": int64 (dataset index i,
    0-based, not counting the offset), "factors": int64 [8], "attributes": float32 [49]}``.
    :meth:`images` and :meth:`batch` render many items at once (the fast path).
    """

    def __init__(self, n: int, resolution: int = 64, seed: int = 0, offset: int = 0, variant: str = "shapes") -> None:
        if int(n) < 0 or int(offset) < 0:
            raise UserError(f"shapes dataset size {n} and offset {offset} must be >= 0")
        self.n, self.seed, self.offset = int(n), int(seed), int(offset)
        self.variant = get_variant(variant).name
        self.resolution = _check_resolution(resolution)
        self.num_classes = NUM_CLASSES
        self.attribute_names = attribute_names()
        self.class_names = list(FACTORS["shape"])

    def __len__(self) -> int:
        return self.n

    def _positions(self, indices: Any) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if ((idx < 0) | (idx >= self.n)).any():
            raise IndexError(f"index out of range for a shapes dataset of {self.n} items")
        return idx

    def batch(self, indices: Any) -> dict[str, torch.Tensor]:
        """Stacked items for ``indices`` (same keys as an item, with a leading batch dimension)."""
        idx = self._positions(indices)
        images, factors = render_batch(idx + self.offset, self.resolution, self.seed, self.variant)
        return {
            "image": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            "label": torch.from_numpy(factors[:, 0].copy()),
            "index": torch.from_numpy(idx.copy()),
            "factors": torch.from_numpy(factors),
            "attributes": torch.from_numpy(attribute_vector(factors)),
        }

    def images(self, start: int, stop: int) -> torch.Tensor:
        """uint8 ``[stop - start, 3, H, W]`` for items ``start .. stop - 1``."""
        return self.batch(np.arange(start, stop))["image"]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """Many items rendered in one batch (``torch.utils.data.DataLoader`` calls this per batch)."""
        batch = self.batch([int(i) + self.n if i < 0 else int(i) for i in indices])
        return [{key: value[j] for key, value in batch.items()} for j in range(len(indices))]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"ShapesDataset indices must be integers, got {type(i).__name__}")
        i = int(i) + self.n if i < 0 else int(i)
        item = self.batch([i])
        return {key: value[0] for key, value in item.items()}


def caption(factors: Sequence[int]) -> list[str]:
    """Two short caption lines naming every factor of an item (used by the preview grid)."""
    v = describe_factors(factors)
    return [
        f"{v['shape']} {v['object_hue']} on {v['background']}",
        f"{v['size']} {v['rotation']} x{v['x']} y{v['y']} {v['texture']}",
    ]


def preview(out: str, n: int = 16, resolution: int = 64, seed: int = 0, start: int = 0, variant: str = "shapes") -> str:
    """Write a PNG grid of items ``start .. start + n - 1`` with their factor labels; returns the path."""
    from sendvae.data.images import save_image_grid

    if not 1 <= int(n) <= 1024:
        raise UserError(f"preview size n={n} must be in [1, 1024]")
    images, factors = render_batch(np.arange(start, start + int(n)), resolution, seed, variant)
    return str(save_image_grid(images, [caption(f) for f in factors], out))
