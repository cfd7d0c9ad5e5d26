"""Benchmark: reading a prepared uint8 store against decoding the source JPEG folder, in one run.

Writes N synthetic JPEGs of ImageNet-like size (500 x 375, shapes content plus sensor-like noise),
prepares a store at the target resolution, then reads every image once both ways through the
same item interface: ``ImageStore[i]`` (memory-mapped uint8) and ``ImageFolderDataset[i]``
(decode + ADM centre crop, what training without a store does). Prints both rates and their ratio
(target >= 10x). Run: ``.venv/bin/python bench/bench_store.py [--n 256] [--resolution 256]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sendvae.data.images import ImageFolderDataset
from sendvae.data.shapes import render_batch
from sendvae.data.store import ImageStore, prepare_store

TARGET = 10.0


def write_jpegs(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for start in range(0, n, 64):
        images, _ = render_batch(np.arange(start, min(n, start + 64)), 256, seed=0)
        for k, image in enumerate(images):
            big = np.asarray(Image.fromarray(image).resize((500, 375), Image.BICUBIC), dtype=np.int16)
            big = np.clip(big + rng.integers(-12, 13, big.shape), 0, 255).astype(np.uint8)
            Image.fromarray(big).save(folder / f"img_{start + k:06d}.JPEG", quality=90)


def read_all(dataset, order: np.ndarray) -> tuple[float, torch.Tensor]:
    checksum = torch.zeros((), dtype=torch.int64)
    start = time.perf_counter()
    for i in order:
        checksum += dataset[int(i)]["image"][0, 0, 0]
    return time.perf_counter() - start, checksum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="number of images")
    parser.add_argument("--resolution", type=int, default=256, help="store resolution")
    parser.add_argument("--workers", type=int, default=2, help="prepare workers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "jpegs", Path(tmp) / "store"
        src.mkdir()
        write_jpegs(src, args.n)
        t0 = time.perf_counter()
        prepare_store(src, out, args.resolution, workers=args.workers, shard_size=64, progress=False)
        prepare_s = time.perf_counter() - t0
        store, folder = ImageStore(out), ImageFolderDataset(src, args.resolution)
        order = np.random.default_rng(1).permutation(args.n)  # random access, as a shuffled sampler reads
        read_all(store, order[:8])  # open the memory maps
        store_s, a = read_all(store, order)
        folder_s, b = read_all(folder, order)
        assert int(a) == int(b), "store and folder must yield the same pixels"
        for i in order[:8]:
            assert torch.equal(store[int(i)]["image"], folder[int(i)]["image"]), f"image {i} differs"
    store_rate, folder_rate = args.n / store_s, args.n / folder_s
    print(f"{args.n} JPEGs 500x375 -> {args.resolution}px; prepare took {prepare_s:.1f} s with {args.workers} workers")
    print(f"store read      {store_rate:9.0f} img/s")
    print(f"folder decode   {folder_rate:9.0f} img/s (PIL decode + ADM centre crop)")
    print(f"ratio {store_rate / folder_rate:.1f}x (target >= {TARGET:.0f}x)")


if __name__ == "__main__":
    main()
