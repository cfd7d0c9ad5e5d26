"""``sendvae demo --smoke`` end to end: the report exists, every metric is finite, steps resume and are deterministic.

The smoke scale runs every step of the real demo (data, base VAE, three fine-tunes, probes,
classifier, reconstruction metrics, the generation classifier, latent caches with the reconstruction
ceiling, two SiTs and the LightningDiT-style recipe row, each sampled at two checkpoints) with a few
dozen steps each. Nothing here asserts which variant wins.
"""

import json
import math
import re
import shutil

import pytest

from sendvae.cli import main
from sendvae.config import ConfigError
from sendvae.demo.config import DemoConfig, demo_config
from sendvae.demo.plan import pace, read_done
from sendvae.demo.report import finite_metrics, summary_table
from sendvae.demo.study import run_demo
from sendvae.errors import UserError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    summary = run_demo(out, smoke=True, progress=False)
    return out, summary


def test_smoke_demo_writes_report_with_finite_metrics(smoke):
    out, summary = smoke
    md = (out / "report" / "report.md").read_text()
    page = (out / "report" / "index.html").read_text()
    assert "SMOKE" in md and "<table>" in page
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):  # every image the report links exists
        assert (out / "report" / image).is_file(), image
    assert finite_metrics(summary) == []
    on_disk = json.loads((out / "report" / "summary.json").read_text())
    assert on_disk["table"] == summary["table"]
    names = [row["vae"] for row in summary["rows"]]
    assert names == ["base", "none", "vf", "sendvae"]
    for row in summary["rows"]:
        for key in ("macro_f1", "mean_factor_accuracy", "psnr", "ssim", "fd_recon"):
            assert math.isfinite(row[key]), (row["vae"], key)
        assert 0.0 <= row["macro_f1"] <= 1.0 and 0.0 <= row["ssim"] <= 1.0
    generated = {row["vae"]: row for row in summary["rows"] if "class_consistency" in row}
    assert sorted(generated) == ["none", "sendvae"]
    for row in generated.values():
        for key in ("class_consistency", "class_consistency_cfg", "ceiling_class_accuracy"):
            assert 0.0 <= row[key] <= 1.0, key
        assert row["fd_gen"] >= 0 and row["ceiling_fd"] >= 0
    generation = summary["generation"]
    assert sorted(generation["curves"]) == ["none", "none-lightning", "sendvae"]
    for curve in generation["curves"].values():
        assert len(curve["images_seen"]) == 2 and curve["images_seen"][0] < curve["images_seen"][1]
    assert [r["generator"] for r in generation["budget"]] == ["none", "sendvae", "none-lightning"]
    recipe = json.loads((out / "sit-none-lightning" / "sit" / "sit" / "config.json").read_text())  # RUN/sit
    assert recipe["preset"].startswith("LightningDiT-")
    references = {r["name"]: r for r in summary["probe"]["rows"] if r["kind"] == "reference"}
    assert set(references) == {"pixels", "random-init VAE"}
    assert references["pixels"]["probe_dim"] == 256 and references["pixels"]["feature_dim"] == 3 * 32 * 32


def test_rerun_skips_complete_steps_and_gives_the_same_summary(smoke):
    out, summary = smoke
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/done.json")}
    again = run_demo(out, smoke=True, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/done.json")} == stamps
    assert again["rows"] == summary["rows"] and again["table"] == summary["table"]
    assert again["timing"]["steps"] == {}  # nothing ran again


def test_a_deleted_step_reruns_deterministically(smoke):
    """Delete the 'none' fine-tune and the classifier: a rerun rebuilds them bit for bit."""
    from sendvae.models.vae import vae_fingerprint
    from sendvae.models.vae_formats import load_vae

    out, _ = smoke
    before_vae = vae_fingerprint(load_vae(out / "vae-none" / "vae"))
    before_clf = (out / "classifier" / "classifier.safetensors").read_bytes()
    before_acc = read_done(out / "classifier")["accuracy"]
    shutil.rmtree(out / "vae-none")
    (out / "classifier" / "done.json").unlink()
    again = run_demo(out, smoke=True, progress=False)
    assert set(again["timing"]["steps"]) == {"vae-none", "classifier"}
    assert vae_fingerprint(load_vae(out / "vae-none" / "vae")) == before_vae
    assert (out / "classifier" / "classifier.safetensors").read_bytes() == before_clf
    assert read_done(out / "classifier")["accuracy"] == before_acc


def test_other_settings_in_the_same_folder_are_refused(smoke):
    out, _ = smoke
    with pytest.raises(UserError, match=r"seed: 0 -> 1.*another --out"):
        run_demo(out, smoke=True, seed=1, progress=False)


def test_scales_and_overrides():
    default, full, small = demo_config(), demo_config("full"), demo_config("smoke")
    assert (default.n_train, default.n_test, default.base_steps, default.finetune_steps) == (12_000, 3_000, 350, 200)
    assert default.variants == ["none", "vf", "sendvae"] and not default.generation_smoke and small.generation_smoke
    assert default.gen_data == "shapes-gen" and default.sit_variants == ["sendvae"]
    assert full.variants[-1] == "sendvae-nonoise" and full.finetune_seeds == 1 and not full.generation_smoke
    assert full.base_steps > default.base_steps and full.sit_variants == ["none", "vf", "sendvae"]
    assert full.sit_seeds == 2 and full.sit_points >= 5 and full.recipe_variants
    assert "teacher" in full.probe_references and full.n_train == 20_000
    assert small.n_train < default.n_train and small.base_steps < default.base_steps
    tuned = demo_config("default", seed=3, overrides=["finetune_steps=600", "sit_variants=[none,vf]"])
    assert tuned.seed == 3 and tuned.finetune_steps == 600 and tuned.sit_variants == ["none", "vf"]
    with pytest.raises(UserError, match="sit_variants"):
        demo_config(overrides=["variants=[none]"])
    with pytest.raises(ConfigError, match="unknown key stepz"):
        demo_config(overrides=["stepz=3"])
    with pytest.raises(UserError, match="scale"):
        demo_config("huge")
    with pytest.raises(UserError, match="--smoke and --full"):
        run_demo("unused", smoke=True, full=True)


def test_finite_metrics_names_what_is_not_finite():
    summary = {"rows": [{"vae": "none", "psnr": float("nan")}], "probe": {"rows": [{"macro_f1": 0.5}]},
               "classifier": {"fd_real_halves": float("inf")}, "generation": {}}
    assert finite_metrics(summary) == ["rows[0].psnr", "classifier.fd_real_halves"]


def test_summary_table_leaves_out_columns_no_row_fills():
    table = summary_table([{"vae": "none", "macro_f1": 0.5, "psnr": 27.03}, {"vae": "vf", "macro_f1": 0.7, "psnr": None}])
    assert table.splitlines()[0] == "| VAE | probe macro-F1 | PSNR dB |"
    assert table.splitlines()[3] == "| vf | 0.7 | – |"


def test_cli_help_explains_the_demo(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "Examples:" in text and "--smoke" in text and "finetune_steps" in text
    assert DemoConfig().resolution == 32


def test_eta_pace_trusts_the_estimates_until_the_work_done_is_long():
    assert pace(0.0, 0.0) == 1.0
    assert pace(5.0, 2.5) == pytest.approx(1.02, abs=0.01)  # the 5-second data step, done in 2.5 s: ETA barely moves
    assert pace(900.0, 1800.0) == pytest.approx(0.53, abs=0.01)  # a long step twice as slow as estimated: ETA ~2x
