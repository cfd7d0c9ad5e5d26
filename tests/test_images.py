"""Image folders: ADM centre crop, conversion of every mode to RGB, EXIF orientation, bad files."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sendvae.data.images import (
    BadImageError, ImageFolderDataset, center_crop_arr, list_image_folder, load_and_crop, load_image,
    save_image_grid,
)
from sendvae.errors import UserError


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# ADM centre crop


def test_center_crop_follows_the_adm_steps():
    image = noise_image(300, 200)
    # the documented steps: 200 >= 2 * 64 -> box-halve to 150 x 100; 100 < 128 stop;
    # bicubic to round(150 * 0.64) x 64 = 96 x 64; centre crop columns 16 .. 79
    halved = image.resize((150, 100), resample=Image.BOX)
    resized = np.asarray(halved.resize((96, 64), resample=Image.BICUBIC))
    expected = resized[:, 16:80]
    out = center_crop_arr(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out, expected)


def test_center_crop_box_halving_is_a_block_mean():
    image = noise_image(128, 128, seed=1)
    out = center_crop_arr(image, 64).astype(np.float64)
    block_mean = np.asarray(image, dtype=np.float64).reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    # one box halving (PIL rounds in each separable pass) then an identity resize
    assert np.abs(out - block_mean).max() <= 1.0
    # a plain bicubic downscale (no box halving) would not be a block mean
    bicubic = np.asarray(image.resize((64, 64), resample=Image.BICUBIC), dtype=np.float64)
    assert np.abs(bicubic - block_mean).max() > 10


def test_center_crop_keeps_the_centre_of_a_wide_image():
    array = np.zeros((50, 200, 3), dtype=np.uint8)
    array[:, 88:112] = 255  # a white band in the middle eighth of the width
    out = center_crop_arr(Image.fromarray(array), 32)  # bicubic to 128 x 32, keep columns 48 .. 79
    assert out.shape == (32, 32, 3)
    assert out[:, 11:21].min() > 240  # the crop is centred on the white band
    assert out[:, :5].max() < 15 and out[:, -5:].max() < 15


def test_center_crop_upsamples_small_images():
    out = center_crop_arr(Image.new("RGB", (20, 30), (10, 200, 30)), 64)
    assert out.shape == (64, 64, 3) and np.all(out == [10, 200, 30])


# ---------------------------------------------------------------------------------------------
# Modes and EXIF


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_grey_palette_and_cmyk_become_rgb(tmp_path):
    grey = _save(Image.new("L", (8, 8), 77), tmp_path / "l.png")
    assert np.all(np.asarray(load_image(grey)) == 77)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    assert np.all(np.asarray(load_image(_save(palette, tmp_path / "p.png"))) == [12, 34, 56])
    cmyk = _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=95)
    rgb = np.asarray(load_image(cmyk)).astype(int)
    assert load_image(cmyk).mode == "RGB" and rgb[..., 0].min() > 230 and rgb[..., 1:].max() < 30
    bilevel = _save(Image.new("1", (8, 8), 1), tmp_path / "b.png")
    assert np.all(np.asarray(load_image(bilevel)) == 255)


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    rgba[2:, :, 3] = 0
    out = np.asarray(load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")))
    assert np.all(out[:2] == [200, 0, 0]) and np.all(out[2:] == 255)
    la = Image.fromarray(np.stack([np.full((4, 4), 40, np.uint8), np.full((4, 4), 0, np.uint8)], -1), "LA")
    assert np.all(np.asarray(load_image(_save(la, tmp_path / "la.png"))) == 255)
    keyed = Image.new("P", (4, 4), 0)
    keyed.putpalette([9, 9, 9, 50, 60, 70] + [0] * 762)
    keyed.putpixel((0, 0), 1)
    out = np.asarray(load_image(_save(keyed, tmp_path / "key.png", transparency=0)))
    assert np.array_equal(out[0, 0], [50, 60, 70]) and np.all(out[1:] == 255)


def test_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path):
    values = np.array([[0, 257 * 100], [65535, 257 * 3]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # PIL reads it as a 16/32-bit integer mode
    out = np.asarray(load_image(path))
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], [[0, 100], [255, 3]])


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = [255, 0, 0]  # left half red, right half black
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = _save(Image.fromarray(array), tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    out = np.asarray(load_image(path)).astype(int)
    assert out.shape == (40, 20, 3)  # portrait after the rotation
    assert out[:18, :, 0].min() > 200 and out[22:, :, 0].max() < 60  # the left half is now on top


# ---------------------------------------------------------------------------------------------
# Bad files


def _png_claiming_size(path, width: int, height: int):
    """A valid tiny PNG whose header (IHDR) claims ``width x height`` pixels."""
    buffer = io.BytesIO()
    Image.new("L", (4, 4)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def test_empty_file_is_bad(tmp_path):
    (tmp_path / "e.jpg").write_bytes(b"")
    with pytest.raises(BadImageError, match="empty file") as info:
        load_image(tmp_path / "e.jpg")
    assert info.value.path.endswith("e.jpg") and isinstance(info.value, UserError)


def test_undecodable_file_is_bad(tmp_path):
    (tmp_path / "x.png").write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(BadImageError, match="not a decodable image"):
        load_image(tmp_path / "x.png")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_bad(tmp_path, fmt):
    buffer = io.BytesIO()
    noise_image(64, 64).save(buffer, format=fmt)
    path = tmp_path / f"t.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(BadImageError, match="truncated|corrupt") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_decompression_bomb_header_is_bad(tmp_path):
    path = _png_claiming_size(tmp_path / "bomb.png", 30000, 30000)  # 900M pixels, > 2x the PIL limit
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(path)


def test_decompression_bomb_warning_is_an_error(tmp_path, monkeypatch):
    path = _save(noise_image(100, 100), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10,000 pixels: PIL only warns (< 2x)
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(path)


def test_bad_image_error_survives_pickling():
    error = pickle.loads(pickle.dumps(BadImageError("/a/b.jpg", "empty file")))
    assert error.path == "/a/b.jpg" and error.reason == "empty file" and "b.jpg" in str(error)


# ---------------------------------------------------------------------------------------------
# Folder layouts


def test_imagenet_layout_labels_follow_sorted_class_names(tmp_path):
    for cls, names in {"n02": ["b.png", "a.JPEG"], "n01": ["z.png"], "n03": ["deep/c.png"]}.items():
        for name in names:
            (tmp_path / cls / name).parent.mkdir(parents=True, exist_ok=True)
            _save(noise_image(10, 12), tmp_path / cls / name, format="PNG")
    (tmp_path / "n01" / "notes.txt").write_text("not an image")
    (tmp_path / "n01" / ".hidden.png").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    listing = list_image_folder(tmp_path)
    assert listing.layout == "classes" and listing.class_names == ["n01", "n02", "n03"]
    assert listing.paths == ["n01/z.png", "n02/a.JPEG", "n02/b.png", "n03/deep/c.png"]
    assert listing.labels == [0, 1, 1, 2]
    ds = ImageFolderDataset(tmp_path, 8)
    item = ds[3]
    assert item["image"].shape == (3, 8, 8) and item["label"].item() == 2 and ds.num_classes == 3
    assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), load_and_crop(tmp_path / "n03/deep/c.png", 8))


def test_flat_layout_has_label_zero(tmp_path):
    for name in ("2.png", "1.jpg"):
        _save(noise_image(9, 9), tmp_path / name)
    listing = list_image_folder(tmp_path)
    assert listing.layout == "flat" and listing.paths == ["1.jpg", "2.png"] and listing.labels == [0, 0]
    assert listing.num_classes == 1


def test_mixed_missing_and_empty_folders_are_user_errors(tmp_path):
    (tmp_path / "cls").mkdir()
    _save(noise_image(5, 5), tmp_path / "cls" / "a.png")
    _save(noise_image(5, 5), tmp_path / "loose.png")
    with pytest.raises(UserError, match="loose images"):
        list_image_folder(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        list_image_folder(tmp_path / "nope")
    (tmp_path / "void").mkdir()
    with pytest.raises(UserError, match="no images"):
        list_image_folder(tmp_path / "void")


def test_image_grid_size(tmp_path):
    images = np.zeros((5, 16, 16, 3), dtype=np.uint8)
    path = save_image_grid(images, [["a", "b"]] * 5, tmp_path / "g.png", columns=3, min_cell=64)
    with Image.open(path) as grid:
        assert grid.size[0] >= 3 * 64 and grid.size[1] >= 2 * (64 + 2 * 14)
