"""The typed config layer: presets, overrides, and errors that name the key and the value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from sendvae.config import ConfigError, load_config, param, parse_overrides, save_config, to_dict


@dataclass
class Optim:
    lr: float = param(3e-4, "learning rate", min=0.0)
    betas: tuple[float, float] = param((0.9, 0.999), "AdamW betas")


@dataclass
class Run:
    name: str = param("run", "a name")
    steps: int = param(10, "steps", min=1)
    precision: Literal["fp32", "bf16"] = param("fp32", "precision")
    kind: str = param("none", "alignment", choices=("none", "vf", "sendvae"))
    init: Optional[str] = param(None, "initial weights")
    flags: list[int] = param([1, 2], "a list")
    noise: bool = param(True, "noise injection")
    optim: Optim = param(default_factory=Optim)


def test_defaults_file_then_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("steps: 20\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(Run, preset, ["optim.lr=5e-5", "noise=false", "flags=[3,4,5]", "init=/x/y"])
    assert cfg.steps == 20
    assert cfg.optim.lr == pytest.approx(5e-5)
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.noise is False and cfg.flags == [3, 4, 5] and cfg.init == "/x/y"


def test_saved_config_reads_back_equal(tmp_path):
    cfg = load_config(Run, None, ["precision=bf16", "optim.betas=[0.5, 0.9]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(Run, tmp_path / "config.yaml") == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.5, 0.9]


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.lrr=1", ["optim.lrr", "known keys"]),
        ("steps=abc", ["steps", "'abc'"]),
        ("steps=1.5", ["steps", "1.5"]),
        ("steps=0", ["steps", "minimum"]),
        ("optim.lr=-1", ["optim.lr", "-1"]),
        ("precision=fp16", ["precision", "'fp16'"]),
        ("kind=linear", ["kind", "'linear'"]),
        ("noise=maybe", ["noise", "'maybe'"]),
        ("optim.betas=[0.9]", ["optim.betas", "2 values"]),
        ("steps", ["key=value"]),
    ],
)
def test_bad_values_name_the_key_and_value(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(Run, None, [override])
    for word in words:
        assert word in str(info.value)


def test_errors_in_a_preset_name_the_file(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("optim:\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.momentum"):
        load_config(Run, preset)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "missing.yaml")


def test_override_values_are_parsed_as_yaml():
    assert parse_overrides(["a.b=1e-4", "c=true", "d=[1, 2]", "e=text"]) == {
        "a": {"b": 1e-4}, "c": True, "d": [1, 2], "e": "text"}
