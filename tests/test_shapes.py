"""The procedural shapes dataset: determinism, exact labels, colours, antialiased areas, the Dataset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sendvae.data import shapes
from sendvae.data.shapes import (
    BACKGROUND_RGB, FACTORS, OBJECT_RGB, PATTERN_DARKEN, SIZE_RADIUS, ShapesDataset, attribute_names,
    attribute_vector, render, render_batch, render_factors, sample_factors,
)
from sendvae.errors import UserError


def make_factors(shape=0, hue=0, bg=0, size=3, rot=0, x=3, y=4, texture=0):
    return np.array([[shape, hue, bg, size, rot, x, y, texture]], dtype=np.int64)


def coverage_from_image(image: np.ndarray, obj: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Per-pixel object coverage recovered from the colours (channel with the largest contrast)."""
    c = int(np.argmax(np.abs(obj - bg)))
    return (image[..., c].astype(np.float64) - bg[c]) / (obj[c] - bg[c])


def test_factor_table_and_attribute_names():
    assert list(FACTORS) == ["shape", "object_hue", "background", "size", "rotation", "x", "y", "texture"]
    assert [len(v) for v in FACTORS.values()] == [6, 8, 4, 4, 8, 8, 8, 3]
    names = attribute_names()
    assert len(names) == 49 and len(set(names)) == 49
    assert names[:6] == ["shape=circle", "shape=square", "shape=triangle", "shape=star", "shape=heart", "shape=ellipse"]
    assert names[-3:] == ["texture=solid", "texture=striped", "texture=dotted"]
    assert "rotation=11.25deg" in names


def test_attribute_vector_is_one_hot_per_factor():
    factors = sample_factors(np.arange(50), seed=3)
    vectors = attribute_vector(factors)
    assert vectors.shape == (50, 49) and vectors.dtype == np.float32
    names = attribute_names()
    for row, f in zip(vectors, factors):
        on = [names[j] for j in np.flatnonzero(row)]
        expected = [f"{factor}={values[i]}" for (factor, values), i in zip(FACTORS.items(), f)]
        assert on == expected
    assert attribute_vector(factors[0]).shape == (49,)
    with pytest.raises(ValueError):
        attribute_vector([6, 0, 0, 0, 0, 0, 0, 0])


def test_items_are_deterministic_whatever_the_batch():
    batch, factors = render_batch([5, 900, 17, 5], resolution=32, seed=7)
    assert np.array_equal(batch[0], batch[3])
    for k, i in enumerate([5, 900, 17]):
        image, f = render(i, resolution=32, seed=7)
        assert np.array_equal(image, batch[k]) and np.array_equal(f, factors[k])
    again, _ = render_batch(np.arange(0, 64), resolution=32, seed=7)
    assert np.array_equal(again[17], batch[2])
    other_seed = sample_factors(np.arange(200), seed=8)
    assert not np.array_equal(other_seed, sample_factors(np.arange(200), seed=7))


def test_factors_do_not_depend_on_resolution_and_cover_every_value_evenly():
    f16 = render_batch(np.arange(20), 16, seed=1)[1]
    f200 = render_batch(np.arange(20), 200, seed=1)[1]
    assert np.array_equal(f16, f200)
    factors = sample_factors(np.arange(24000), seed=0)
    for column, size in enumerate(shapes.FACTOR_SIZES):
        counts = np.bincount(factors[:, column], minlength=size)
        expected = 24000 / size
        # 5 binomial standard deviations: a hash that favoured a value would fail this
        assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected)), (column, counts)


@pytest.mark.parametrize("resolution", [16, 33, 64, 256])
def test_any_resolution_in_range(resolution):
    images, _ = render_batch(np.arange(3), resolution)
    assert images.shape == (3, resolution, resolution, 3) and images.dtype == np.uint8


@pytest.mark.parametrize("resolution", [15, 257, 64.0])
def test_resolution_out_of_range_is_refused(resolution):
    with pytest.raises(UserError, match="resolution"):
        render_batch([0], resolution)


def test_background_and_solid_object_colours_are_exact():
    f = make_factors(shape=0, hue=2, bg=3, size=2, x=3, y=3)
    image = render_factors(f, 64)[0]
    bg = np.rint(BACKGROUND_RGB[3] * 255)
    obj = np.rint(OBJECT_RGB[2] * 255)
    for corner in (image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]):
        assert np.array_equal(corner, bg)
    # x index 3 of 8 is at -0.4 + 3 * 0.8 / 7 half-widths; the pixel under the centre is inside
    cx = (-0.4 + 3 * 0.8 / 7 + 1) * 32
    cy = (0.4 - 3 * 0.8 / 7 + 1) * 32  # y index 0 is the top
    assert np.array_equal(image[int(cy), int(cx)], obj)


def test_corners_are_background_for_every_item():
    images, factors = render_batch(np.arange(300), 32, seed=2)
    bg = np.rint(BACKGROUND_RGB[factors[:, 2]] * 255)
    for corner in (images[:, 0, 0], images[:, -1, -1], images[:, 0, -1], images[:, -1, 0]):
        assert np.array_equal(corner, bg)


def _area_in_radius_units(shape: int) -> float:
    """Independent areas of the outlines (unit size radius)."""
    if shape == 0:
        return math.pi
    if shape == 1:
        return (2 * 0.82) ** 2
    if shape == 2:
        return 3 * math.sqrt(3) / 4 * 1.2 ** 2
    if shape == 3:  # 10 triangles (centre, tip, inner vertex)
        return 5 * 1.2 * (1.2 * 0.45) * math.sin(math.pi / 5)
    if shape == 4:  # a square of side a plus two half-discs of diameter a
        a = 1.15
        return a * a + math.pi * a * a / 4
    return math.pi * 1.15 * 0.6


@pytest.mark.parametrize("shape", range(6))
@pytest.mark.parametrize("rotation", [0, 3])
def test_antialiased_coverage_integrates_to_the_true_area(shape, rotation):
    resolution, size = 128, 2
    f = make_factors(shape=shape, hue=5, bg=0, size=size, rot=rotation, x=3, y=4)
    image = render_factors(f, resolution)[0]
    cov = coverage_from_image(image, OBJECT_RGB[5] * 255, BACKGROUND_RGB[0] * 255)
    edge = (cov > 0.02) & (cov < 0.98)
    assert edge.any(), "edges are antialiased: some pixels are partly covered"
    pixel_area = (2 / resolution) ** 2  # in half-width units
    area = cov.sum() * pixel_area
    expected = _area_in_radius_units(shape) * SIZE_RADIUS[size] ** 2
    assert area == pytest.approx(expected, rel=0.01)


def test_rotation_turns_asymmetric_shapes():
    for shape in (1, 2, 3, 4, 5):
        a = render_factors(make_factors(shape=shape, rot=0), 64)[0]
        b = render_factors(make_factors(shape=shape, rot=2), 64)[0]
        assert not np.array_equal(a, b), FACTORS["shape"][shape]
    plain = [render_factors(make_factors(shape=0, rot=r), 64)[0] for r in (0, 2)]
    assert np.array_equal(plain[0], plain[1])  # a solid circle carries no rotation
    textured = [render_factors(make_factors(shape=0, rot=r, texture=1), 64)[0] for r in (0, 2)]
    assert not np.array_equal(textured[0], textured[1])  # its stripes do


@pytest.mark.parametrize("texture", [1, 2])
def test_textures_darken_the_object_colour(texture):
    f = make_factors(shape=1, hue=0, bg=1, size=3, texture=texture)
    image = render_factors(f, 64)[0].astype(np.float64)
    obj = OBJECT_RGB[0] * 255
    inside = np.abs(image - obj).sum(-1) < 1.5
    dark = np.abs(image - obj * (1 - PATTERN_DARKEN)).sum(-1) < 1.5
    assert inside.sum() > 50 and dark.sum() > 20
    solid = render_factors(make_factors(shape=1, hue=0, bg=1, size=3, texture=0), 64)[0].astype(np.float64)
    assert (np.abs(solid - obj * (1 - PATTERN_DARKEN)).sum(-1) < 1.5).sum() == 0


def test_dataset_items_follow_the_project_convention():
    ds = ShapesDataset(10, resolution=32, seed=4, offset=100)
    assert len(ds) == 10 and ds.num_classes == 6 and ds.resolution == 32 and len(ds.attribute_names) == 49
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert item["index"].item() == 3
    assert item["factors"].shape == (8,) and item["factors"].dtype == torch.int64
    assert item["attributes"].shape == (49,) and item["attributes"].dtype == torch.float32
    image, factors = render(103, 32, seed=4)
    assert torch.equal(item["image"], torch.from_numpy(image).permute(2, 0, 1))
    assert item["label"].item() == factors[0] and torch.equal(item["factors"], torch.from_numpy(factors))
    assert torch.equal(ds[-1]["image"], ds[9]["image"])
    with pytest.raises(IndexError):
        ds[10]


def test_fast_batch_path_matches_single_items():
    ds = ShapesDataset(40, resolution=24, seed=1)
    batch = ds.images(5, 25)
    assert batch.shape == (20, 3, 24, 24)
    for k in (0, 7, 19):
        assert torch.equal(batch[k], ds[5 + k]["image"])
    stacked = ds.batch([2, 3])
    assert torch.equal(stacked["attributes"][1], ds[3]["attributes"])


def test_dataloader_uses_the_batched_path_and_matches_items():
    from torch.utils.data import DataLoader

    ds = ShapesDataset(12, resolution=16, seed=3)
    batches = list(DataLoader(ds, batch_size=5, shuffle=False))
    assert [len(b["index"]) for b in batches] == [5, 5, 2]
    assert torch.equal(batches[1]["image"][2], ds[7]["image"])
    assert torch.equal(batches[2]["factors"][1], ds[11]["factors"])
    items = ds.__getitems__([3, -1])
    assert torch.equal(items[1]["attributes"], ds[11]["attributes"])


def test_preview_grid_writes_a_png(tmp_path):
    from PIL import Image

    path = shapes.preview(str(tmp_path / "grid.png"), n=6, resolution=32, seed=0)
    with Image.open(path) as grid:
        assert grid.format == "PNG" and grid.width > 6 * 128 / 2 and grid.height > 128
    assert shapes.caption(sample_factors([0])[0])[0].split()[0] in FACTORS["shape"]


def test_variants_restrict_factors_and_keep_the_full_distribution_unchanged():
    full = shapes.get_variant("shapes")
    assert all(full.allowed(f) == tuple(range(len(v))) for f, v in FACTORS.items())
    factors = sample_factors(np.arange(6000), seed=3, variant="shapes-gen")
    gen = shapes.get_variant("shapes-gen")
    for column, factor in enumerate(FACTORS):
        allowed = gen.allowed(factor)
        counts = np.bincount(factors[:, column], minlength=len(FACTORS[factor]))
        assert set(np.flatnonzero(counts)) == set(allowed), factor  # every allowed value, nothing else
        expected = 6000 / len(allowed)
        assert np.all(np.abs(counts[list(allowed)] - expected) < 5 * math.sqrt(expected)), (factor, counts)
    assert gen.allowed("texture") == (0,) and gen.allowed("rotation") == (0,) and len(gen.allowed("shape")) == 6
    # the class label is the shape, and a variant's item is the full renderer's image of its factors
    data = ShapesDataset(12, resolution=16, seed=3, variant="shapes-gen")
    batch = data.batch(range(12))
    assert torch.equal(batch["label"], batch["factors"][:, 0])
    assert np.array_equal(batch["factors"].numpy(), factors[:12])
    assert np.array_equal(batch["image"].permute(0, 2, 3, 1).numpy(), render_factors(factors[:12], 16))


def test_data_specs_name_the_variant():
    assert shapes.parse_spec("shapes:1_000@4") == (1000, 4, "shapes")
    assert shapes.parse_spec("shapes-gen:30") == shapes.ShapesSpec(30, 0, "shapes-gen")
    assert shapes.parse_spec("runs/images") is None
    assert shapes.parse_spec(shapes.format_spec(7, 2, "shapes-gen")) == (7, 2, "shapes-gen")
    with pytest.raises(UserError, match="unknown shapes variant 'shapes-huge'"):
        shapes.parse_spec("shapes-huge:10")
    with pytest.raises(UserError, match="shapes:N"):
        shapes.parse_spec("shapes-gen:many")
