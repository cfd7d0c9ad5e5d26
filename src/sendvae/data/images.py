"""Image folders: listing (ImageNet layout or flat), decoding to RGB, the ADM centre crop, bad files.

* **Layout.** A folder whose sub-folders hold images is in ImageNet layout: each sub-folder is a
  class, labels are the positions of the class names in sorted order, images are found recursively
  inside each class folder. A folder with images and no sub-folders is flat (every label 0). Hidden
  entries and files without an image extension are ignored; loose images next to class folders are
  an error (the label would be ambiguous).
* **Decoding** (:func:`load_image`): EXIF orientation is applied; L, 1, P, CMYK, YCbCr, LAB, HSV go
  through PIL's conversion to RGB; images with transparency (RGBA, LA, PA, P with a transparency
  key) are composited over white; 16-bit and 32-bit integer grey images (``I;16*``, ``I``) are
  scaled by 1/257 to 8 bits (65535 -> 255).
* **Bad files**: an empty file, a file PIL cannot identify, a truncated or corrupt file, and a
  decompression bomb (more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``; PIL's warning is treated as
  an error) raise :class:`BadImageError` (a ``UserError``) naming the file and the reason. Callers
  that skip bad files record ``(path, reason)`` in their report.
* **ADM centre crop** (:func:`center_crop_arr`, the guided-diffusion procedure used by ADM, DiT,
  SiT, REPA): while the short side is at least twice the target, halve the image with a box filter;
  then resize bicubically so that the short side equals the target; then cut the centre square.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from sendvae.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class BadImageError(UserError):
    """An image file that cannot be used; ``.path`` and ``.reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # crosses process boundaries intact
        return (type(self), (self.path, self.reason))


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha over white, 16/32-bit grey scaled by 1/257, the rest via PIL."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GREY_MODES:
        grey = np.asarray(image).astype(np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = image.convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` to an RGB PIL image with EXIF orientation applied, or raise BadImageError."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(path, "empty file")
    except OSError as exc:
        raise BadImageError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
                return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(path, f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not a decodable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        message = str(exc) or type(exc).__name__
        kind = "truncated" if "truncated" in message.lower() else "corrupt"
        raise BadImageError(path, f"{kind} image: {message}") from None


def center_crop_arr(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM centre crop: box-halve while the short side >= 2 * resolution, bicubic resize, centre crop.

    Returns uint8 ``[resolution, resolution, C]`` (C = 3 for RGB input).
    """
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - resolution) // 2
    left = (array.shape[1] - resolution) // 2
    return array[top:top + resolution, left:left + resolution].copy()  # writable, contiguous


def load_and_crop(path: str | os.PathLike, resolution: int) -> np.ndarray:
    """:func:`load_image` then :func:`center_crop_arr`: uint8 ``[resolution, resolution, 3]``."""
    return center_crop_arr(load_image(path), resolution)


@dataclass
class FolderListing:
    """The images of a folder: paths relative to ``root`` (POSIX), their labels, the class names."""

    root: Path
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)

    @property
    def layout(self) -> str:
        return "classes" if self.class_names else "flat"

    @property
    def num_classes(self) -> int:
        return max(1, len(self.class_names))


def _visible(entries: list[os.DirEntry]) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _images_below(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and is_image_file(name):
                found.append(os.path.join(dirpath, name))
    return found


def list_image_folder(root: str | os.PathLike) -> FolderListing:
    """List an image folder in ImageNet layout (class sub-folders) or flat layout (label 0)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist or is not a folder")
    with os.scandir(root) as it:
        entries = _visible(list(it))
    subdirs = [e for e in entries if e.is_dir()]
    loose = [e.name for e in entries if e.is_file() and is_image_file(e.name)]
    listing = FolderListing(root=root)
    if not subdirs:
        listing.paths = loose
        listing.labels = [0] * len(loose)
    else:
        if loose:
            raise UserError(
                f"{root} has class sub-folders and also loose images ({loose[0]}, ...); "
                "move the loose images into a class folder or point at a flat folder"
            )
        for entry in subdirs:
            files = _images_below(Path(entry.path))
            if not files:
                log.warning("class folder %s holds no images; it is not a class", entry.path)
                continue
            label = len(listing.class_names)
            listing.class_names.append(entry.name)
            listing.paths.extend(Path(f).relative_to(root).as_posix() for f in files)
            listing.labels.extend([label] * len(files))
    if not listing.paths:
        raise UserError(f"no images found in {root} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return listing


class ImageFolderDataset(Dataset):
    """Decodes and centre-crops a folder's images on every access (the slow path a store replaces).

    Items are the project's image items ``{"image": uint8 [3, H, W], "label", "index"}``; a bad file
    raises :class:`BadImageError` when it is read.
    """

    def __init__(self, root: str | os.PathLike, resolution: int) -> None:
        self.listing = list_image_folder(root)
        self.resolution = int(resolution)
        self.num_classes = self.listing.num_classes
        self.class_names = list(self.listing.class_names)

    def __len__(self) -> int:
        return len(self.listing.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.listing.root / self.listing.paths[i]
        array = load_and_crop(path, self.resolution)
        return {
            "image": torch.from_numpy(array).permute(2, 0, 1).contiguous(),
            "label": torch.tensor(self.listing.labels[i], dtype=torch.int64),
            "index": torch.tensor(int(i), dtype=torch.int64),
        }


def save_image_grid(images: np.ndarray, captions: list[list[str]], path: str | os.PathLike,
                    columns: int = 8, min_cell: int = 128) -> Path:
    """Write uint8 images ``[B, H, W, 3]`` as a PNG grid with caption lines under each image.

    Images are enlarged by an integer factor (nearest neighbour) to at least ``min_cell`` pixels.
    """
    from PIL import ImageDraw, ImageFont

    images = np.asarray(images, dtype=np.uint8)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"expected uint8 images [B, H, W, 3] with B >= 1, got {images.shape}")
    font = ImageFont.load_default(11)
    scale = max(1, -(-min_cell // images.shape[2]))
    cell_w, cell_h = images.shape[2] * scale, images.shape[1] * scale
    line_h = 14
    text_h = line_h * max((len(c) for c in captions), default=0) + 4
    width = max(cell_w, max((int(font.getlength(line)) for c in captions for line in c), default=0) + 4)
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    pad = 4
    canvas = Image.new("RGB", (columns * (width + pad) + pad, rows * (cell_h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for k, image in enumerate(images):
        x = pad + (k % columns) * (width + pad)
        y = pad + (k // columns) * (cell_h + text_h + pad)
        canvas.paste(Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST), (x, y))
        for j, line in enumerate(captions[k] if k < len(captions) else []):
            draw.text((x + 1, y + cell_h + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
