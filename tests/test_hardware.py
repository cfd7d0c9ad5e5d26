"""Device and precision decisions (issue 12): ``precision: auto`` picks bf16 only where it is native."""

from __future__ import annotations

import logging

import pytest
import torch

from sendvae import hardware
from sendvae.errors import UserError
from sendvae.hardware import CPUSupport, resolve_device, resolve_precision

AVX2_ONLY = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse sse2 avx avx2 fma avx512f\n"
SAPPHIRE_RAPIDS = "model name\t: Intel Xeon Platinum 8480+\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


@pytest.fixture
def cpuinfo(monkeypatch):
    """Replace /proc/cpuinfo with a given text (and forget the cached answer before and after)."""
    def use(text: str) -> None:
        monkeypatch.setattr(hardware, "_cpuinfo", lambda: text)
        hardware.cpu_bf16_support.cache_clear()
    yield use
    hardware.cpu_bf16_support.cache_clear()


def test_auto_is_fp32_on_a_cpu_without_native_bf16(cpuinfo) -> None:
    cpuinfo(AVX2_ONLY)
    assert hardware.cpu_bf16_support() == CPUSupport(False, (), "AMD EPYC 7B13", "/proc/cpuinfo")
    choice = resolve_precision("auto", "cpu")
    assert choice.precision == "fp32"
    assert str(choice).startswith("precision auto -> fp32: this CPU has no native bf16")


def test_auto_is_bf16_on_a_cpu_with_avx512_bf16_or_amx(cpuinfo) -> None:
    cpuinfo(SAPPHIRE_RAPIDS)
    support = hardware.cpu_bf16_support()
    assert support.native and support.flags == ("avx512_bf16", "amx_bf16")
    choice = resolve_precision("auto", "cpu")
    assert choice.precision == "bf16" and "avx512_bf16, amx_bf16" in choice.reason


def test_arm_bf16_feature_counts_as_native(cpuinfo) -> None:
    cpuinfo("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n")
    assert resolve_precision("auto", "cpu").precision == "bf16"


def test_explicit_choices_are_kept_and_emulated_bf16_warns_once(cpuinfo, monkeypatch, caplog) -> None:
    cpuinfo(AVX2_ONLY)
    monkeypatch.setattr(hardware, "_warned", set())
    assert resolve_precision("fp32", "cpu").precision == "fp32"
    with caplog.at_level(logging.WARNING, logger="sendvae.hardware"):
        assert resolve_precision("bf16", "cpu", setting="precision").precision == "bf16"
        assert resolve_precision("bf16", "cpu", setting="precision").precision == "bf16"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "precision=bf16 on cpu" in warnings[0] and "slower than fp32" in warnings[0]


def test_unknown_precision_names_the_setting() -> None:
    with pytest.raises(UserError, match=r"^train.precision: 'fp16' is not one of \['auto', 'fp32', 'bf16'\]"):
        resolve_precision("fp16", "cpu")


def test_cuda_auto_follows_the_device_bf16_support(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda:0").precision == "fp32"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    choice = resolve_precision("auto", "cuda:0")
    assert choice.precision == "bf16" and choice.reason == "NVIDIA H100 supports bf16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_on_the_real_device() -> None:
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert resolve_precision("auto", "cuda").precision == expected


def test_this_machine_is_described_for_environment_json() -> None:
    facts = hardware.describe_cpu()
    assert set(facts) >= {"cpu_model", "cpu_native_bf16", "cpu_bf16_flags", "cpu_capability"}
    assert facts["cpu_native_bf16"] == bool(facts["cpu_bf16_flags"]) or facts["bf16_check"] != "/proc/cpuinfo"


def test_device_errors_name_the_setting_the_user_wrote() -> None:
    assert resolve_device("cpu", setting="--device") == torch.device("cpu")
    with pytest.raises(UserError, match=r"^--device: 'tpu' is not one of \['auto', 'cpu', 'cuda', 'cuda:N'\]"):
        resolve_device("tpu", setting="--device")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"^device=cuda but torch sees no CUDA device; use device=cpu or auto"):
            resolve_device("cuda", setting="device")
        with pytest.raises(UserError, match=r"^device=cuda:1 but torch sees no CUDA device"):
            resolve_device("cuda:1", setting="device")
        with pytest.raises(UserError, match=r"^train.device=cuda"):
            resolve_device("cuda")
