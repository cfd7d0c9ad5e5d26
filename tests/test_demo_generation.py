"""The demo's generation study: which SiTs it trains, the convergence curves over seeds, the fixed-budget
table and the verdicts of its findings (pure functions on small hand-made results)."""

from __future__ import annotations

import pytest

from sendvae.demo.config import demo_config
from sendvae.demo.findings import compare, generation_findings
from sendvae.demo.generation import budget_rows, convergence, sit_runs


def _result(vae: str, seed: int, recipe: str = "sit", cc=(0.2, 0.5), fd=(90.0, 30.0), cfg_bonus: float = 0.2):
    curve = [{"images_seen": 256 * (i + 1), "plain": {"class_consistency": c, "fd": f},
              "cfg": {"class_consistency": c + cfg_bonus, "fd": f + 5}} for i, (c, f) in enumerate(zip(cc, fd))]
    return {"vae": vae, "recipe": recipe, "seed": seed, "curve": curve}


def test_sit_runs_cover_every_vae_seed_and_the_recipe_rows():
    cfg = demo_config(overrides=["sit_variants=[none,sendvae]", "sit_seeds=2", "recipe_variants=[none]"])
    names = [r.name for r in sit_runs(cfg)]
    assert names == ["sit-none", "sit-sendvae", "sit-none-s1", "sit-sendvae-s1", "sit-none-lightning"]
    assert {r.recipe for r in sit_runs(cfg) if r.name.endswith("lightning")} == {"lightning"}


def test_convergence_averages_seeds_and_keeps_their_range():
    curves = convergence([_result("none", 0, cc=(0.2, 0.6)), _result("none", 1, cc=(0.3, 0.4)),
                          _result("none", 0, recipe="lightning", cc=(0.1, 0.9))])
    assert set(curves) == {"none", "none-lightning"}
    none = curves["none"]
    assert none["seeds"] == 2 and none["images_seen"] == [256, 512]
    assert none["class_consistency_plain"]["mean"] == pytest.approx([0.25, 0.5])
    assert none["class_consistency_plain"]["low"] == pytest.approx([0.2, 0.4])
    assert none["class_consistency_plain"]["high"] == pytest.approx([0.3, 0.6])
    assert none["class_consistency_cfg"]["mean"] == pytest.approx([0.45, 0.7])
    one = curves["none-lightning"]
    assert one["seeds"] == 1 and one["fd_plain"]["low"] == one["fd_plain"]["mean"] == one["fd_plain"]["high"]


def test_convergence_refuses_seeds_checkpointed_at_different_points():
    late = _result("none", 1)
    late["curve"][0]["images_seen"] = 300
    with pytest.raises(ValueError, match="different points"):
        convergence([_result("none", 0), late])


def test_budget_rows_take_the_last_point_with_half_the_seed_range_and_the_ceiling():
    curves = convergence([_result("none", 0, cc=(0.2, 0.6)), _result("none", 1, cc=(0.3, 0.4))])
    (row,) = budget_rows(curves, {"none": {"class_consistency": 0.9, "fd": 12.0}})
    assert row["generator"] == "none" and row["images_seen"] == 512
    assert row["class_consistency_plain"] == pytest.approx(0.5)
    assert row["class_consistency_plain_spread"] == pytest.approx(0.1)
    assert row["ceiling_class_accuracy"] == 0.9 and row["ceiling_fd"] == 12.0


def _row(cc: float, fd: float, seeds: int = 2, spread: float = 0.02):
    return {"seeds": seeds, "class_consistency_cfg": cc, "class_consistency_cfg_spread": spread, "fd_plain": fd,
            "fd_plain_spread": 10 * spread}


def test_compare_states_a_verdict_only_beyond_the_seed_noise():
    diff, noise, verdict = compare(_row(0.70, 20.0), _row(0.60, 25.0), "class_consistency_cfg", 300)
    assert diff == pytest.approx(0.10) and noise == pytest.approx(0.04) and verdict == "better"
    assert compare(_row(0.61, 20.0), _row(0.60, 25.0), "class_consistency_cfg", 300)[2] == "within noise"
    assert compare(_row(0.7, 40.0), _row(0.6, 20.0), "fd_plain", 300)[2] == "worse"  # higher FD is worse
    # one seed: the binomial standard error of each class consistency stands in for the seed range
    _, noise, _ = compare(_row(0.5, 20.0, seeds=1), _row(0.5, 20.0, seeds=1), "class_consistency_cfg", 100)
    assert noise == pytest.approx(2 * 0.05)
    assert compare(_row(0.5, 40.0, seeds=1), _row(0.5, 20.0, seeds=1), "fd_plain", 100)[2].startswith("noise not measured")


def test_findings_say_plainly_when_no_sample_reaches_the_target():
    cfg = demo_config()
    curves = convergence([_result("none", 0, cc=(0.1, 0.15), cfg_bonus=0.05),
                          _result("sendvae", 0, cc=(0.1, 0.2), fd=(80.0, 85.0), cfg_bonus=0.05)])
    ceilings = {"none": {"class_consistency": 0.3, "fd": 50.0}, "sendvae": {"class_consistency": 0.35, "fd": 40.0}}
    text = " ".join(generation_findings(cfg, {"curves": curves, "budget": budget_rows(curves, ceilings)}))
    assert "No VAE's samples reach class consistency 0.4" in text and "best: sendvae 0.250" in text
    assert "the VAEs are the limit" in text  # their ceilings (0.30, 0.35) are below the target
    assert "none falls from 90.0 to 30.0" in text and "sendvae does not fall from 80.0 to 85.0" in text
    assert "sendvae vs the unaligned VAE" in text
