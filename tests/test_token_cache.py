"""The stage-1 teacher-token cache (sendvae.data.token_cache): filled lazily, read back exactly, keyed
by what the tokens depend on, and a fine-tune that reads it equals the one that filled it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sendvae.config import load_config
from sendvae.data.token_cache import TokenCache
from sendvae.errors import UserError
from sendvae.train.vae import TrainVAEConfig, train_vae


def test_rows_are_computed_once_and_returned_float16_rounded(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path, {"teacher": "t"}, size=10, tokens=3, dim=2)
    table = torch.randn(10, 3, 2)
    calls: list[list[int]] = []

    def compute_for(index: torch.Tensor):
        def compute(rows: torch.Tensor) -> torch.Tensor:
            calls.append(index[rows].tolist())
            return table[index[rows]]
        return compute

    first = torch.tensor([4, 1, 7])
    got = cache.fetch(first, compute_for(first))
    assert calls == [[4, 1, 7]]
    assert torch.equal(got, table[first].half().float())  # rounded even when just computed
    mixed = torch.tensor([7, 2, 4, 9])
    got = cache.fetch(mixed, compute_for(mixed))
    assert calls[-1] == [2, 9]  # only the rows not cached yet
    assert torch.equal(got, table[mixed].half().float())
    assert cache.filled_count() == 5
    again = TokenCache(tmp_path, {"teacher": "t"}, size=10, tokens=3, dim=2)  # another run, same key
    assert again.path == cache.path and again.filled_count() == 5
    other = TokenCache(tmp_path, {"teacher": "u"}, size=10, tokens=3, dim=2)
    assert other.path != cache.path and other.filled_count() == 0
    with pytest.raises(UserError, match="index 10 outside the 10 cached images"):
        cache.fetch(torch.tensor([10]), compute_for(torch.tensor([10])))


def test_a_fine_tune_reading_the_cache_equals_the_one_that_filled_it(tmp_path: Path) -> None:
    overrides = ["data.source=shapes:64", "data.resolution=16", "teacher.grid=4", "alignment.kind=vf",
                 "alignment.vf_adaptive=false", "model.stats_images=16", "model.export_stats=false",
                 "train.batch_size=16", "train.total_images=96", "train.checkpoint_every=96", "train.num_workers=0",
                 "train.device=cpu", "train.precision=fp32", f"teacher.cache={tmp_path / 'tokens'}"]
    cfg = load_config(TrainVAEConfig, None, overrides)
    train_vae(cfg, tmp_path / "fill")
    folders = list((tmp_path / "tokens").iterdir())
    assert len(folders) == 1
    filled = np.load(folders[0] / "filled.npy")
    assert filled.sum() == 64  # 96 images drawn over 1.5 epochs of 64: every image once
    train_vae(load_config(TrainVAEConfig, None, overrides), tmp_path / "read")
    first, second = load_file(tmp_path / "fill/vae/model.safetensors"), load_file(tmp_path / "read/vae/model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    tokens = np.load(folders[0] / "tokens.npy", mmap_mode="r+")  # the second run read them: change them
    tokens[:] = 0
    tokens.flush()
    train_vae(load_config(TrainVAEConfig, None, overrides), tmp_path / "zeros")
    third = load_file(tmp_path / "zeros/vae/model.safetensors")
    assert not all(torch.equal(first[k], third[k]) for k in first)
