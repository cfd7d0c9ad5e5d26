"""Crafted inputs for the fault tests: image folders with broken files, and pickle payloads.

The pickle payload is an object whose unpickling calls ``open(marker, "w")``: harmless, but it
creates the marker file, so a test sees at once whether any loader ran code from a checkpoint.
:func:`payload_is_live` checks that the crafted file really does so when unpickled unsafely.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class MarkerPayload:
    """Unpickling this object creates the file ``marker`` (``open(marker, "w")``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def pickled_checkpoint(path: Path, marker: Path, tensors: dict[str, torch.Tensor] | None = None,
                       wrap: str | None = "state_dict") -> Path:
    """A torch file holding real tensors (under ``wrap``) next to the payload, as legacy checkpoints do."""
    tensors = tensors if tensors is not None else {"weight": torch.zeros(2, 2)}
    body = {wrap: tensors, "extra": MarkerPayload(marker)} if wrap else {**tensors, "extra": MarkerPayload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(body, path)
    return path


def pickled_npy(path: Path, marker: Path) -> Path:
    """An ``.npy`` object array whose element is the payload."""
    array = np.empty(1, dtype=object)
    array[0] = MarkerPayload(marker)
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=True)
    return path


def payload_is_live(path: Path, marker: Path) -> bool:
    """Unpickle ``path`` unsafely (``weights_only=False``) once: does it create ``marker``? Removes it again."""
    assert not marker.exists()
    torch.load(path, map_location="cpu", weights_only=False)
    live = marker.exists()
    marker.unlink(missing_ok=True)
    return live


# ----------------------------------------------------------------------------------------------
# Images


def noise_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def png_bytes_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def broken_files() -> dict[str, bytes]:
    """Files the data layer must skip, by name -> bytes (the name says what is wrong)."""
    jpeg = encoded(noise_image(64, 48, 90), "JPEG", quality=90)
    png = encoded(noise_image(64, 48, 91), "PNG")
    return {
        "zero_bytes.png": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "text_named_as.png": b"this is a text file, not an image\n" * 20,
        "bomb.png": png_bytes_claiming_size(30_000, 30_000),  # 9e8 pixels > 2x PIL's limit
    }


def unusual_good_files() -> dict[str, Image.Image | bytes]:
    """Files that are odd but decodable (the data layer must convert, not skip, them)."""
    grey16 = Image.fromarray((257 * np.arange(64, dtype=np.uint16)).reshape(8, 8))  # mode I;16, values k * 257
    return {
        "one_pixel.png": Image.new("RGB", (1, 1), (200, 30, 60)),
        "cmyk.jpg": noise_image(40, 30, 92, "CMYK"),
        "grey16.png": grey16,
        "jpeg_named_as.png": encoded(noise_image(30, 40, 93), "JPEG", quality=95),  # wrong extension
        "UPPER.JPG": noise_image(33, 33, 94),
        "rgba.png": noise_image(20, 20, 95, "RGBA"),
        "palette.gif": noise_image(24, 24, 96).convert("P"),
    }


def write_image_folder(root: Path, classes: int = 3, per_class: int = 30, broken: bool = True,
                       unusual: bool = True) -> Path:
    """An ImageNet-layout folder of noise images (PNG and JPEG), plus broken / unusual files spread over classes."""
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = noise_image(24 + (i % 5) * 7, 20 + (i % 3) * 9, 1000 * c + i)
            if i % 2:
                image.save(folder / f"img{i:03d}.jpg", quality=90)
            else:
                image.save(folder / f"img{i:03d}.png")
    extra: dict[str, Image.Image | bytes] = {}
    if broken:
        extra.update(broken_files())
    if unusual:
        extra.update(unusual_good_files())
    for k, (name, content) in enumerate(sorted(extra.items())):
        path = root / f"class{k % classes}" / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            fmt = {".jpg": "JPEG", ".gif": "GIF"}.get(path.suffix.lower(), "PNG")
            content.save(path, format=fmt)
    return root
