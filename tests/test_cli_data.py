"""``sendvae data``: preview, prepare (report, --strict), info, and the help texts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sendvae.cli import main
from sendvae.data.store import ImageStore


def test_help_texts_explain_inputs_outputs_and_examples(capsys):
    for argv in (["data", "--help"], ["data", "preview", "--help"], ["data", "prepare", "--help"],
                 ["data", "info", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        text = capsys.readouterr().out
        assert "sendvae data" in text
        if len(argv) > 2:
            assert "input:" in text and "output:" in text and "example" in text


def test_data_without_an_action_prints_usage(capsys):
    assert main(["data"]) == 2
    assert "preview" in capsys.readouterr().out


def test_preview_shapes_writes_a_labelled_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["data", "preview", "shapes", "--out", str(out), "--n", "4", "--resolution", "32", "--seed", "1"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as grid:
        grid = np.asarray(grid.convert("RGB"))
    assert grid.shape[1] >= 4 * 128
    assert (grid.sum(-1) < 60).any()  # dark caption text under the images


def test_prepare_reports_skipped_files_and_info_reads_the_store(tmp_path, capsys):
    src = tmp_path / "flat"
    src.mkdir()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(src / "good.png")
    (src / "broken.jpg").write_bytes(b"")
    out = tmp_path / "store"
    argv = ["data", "prepare", str(src), str(out), "--resolution", "16", "--workers", "0", "--no-progress"]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert "1 images at 16x16" in report and "skipped files: 1" in report and "broken.jpg: empty file" in report
    assert len(ImageStore(out)) == 1
    assert main(["data", "info", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 1 and summary["skipped"] == [{"path": "broken.jpg", "reason": "empty file"}]

    assert main(argv[:4] + ["--resolution", "16", "--strict", "--workers", "0", "--no-progress"]) == 2
    assert "broken.jpg" in capsys.readouterr().err


def test_prepare_strict_names_the_bad_file(tmp_path, capsys):
    src = tmp_path / "flat"
    src.mkdir()
    (src / "a.png").write_bytes(b"garbage" * 30)
    code = main(["data", "prepare", str(src), str(tmp_path / "o"), "--resolution", "16", "--strict", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "a.png" in err and "not a decodable image" in err


def test_prepare_shapes_and_preview_the_store(tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["data", "prepare", "shapes:9@2", str(out), "--resolution", "16", "--workers", "2", "--no-progress"]
    assert main(argv) == 0
    assert "9 images at 16x16 from shapes:9@2" in capsys.readouterr().out
    assert main(["data", "preview", str(out), "--out", str(tmp_path / "p.png"), "--n", "3"]) == 0
    assert (tmp_path / "p.png").is_file()


def test_info_on_attribute_dataset_and_errors(tmp_path, capsys):
    assert main(["data", "info", "shapes:50"]) == 0
    assert json.loads(capsys.readouterr().out)["sizes"] == {"train": 35, "val": 5, "test": 10}
    assert main(["data", "info", str(tmp_path)]) == 2
    assert "not a sendvae store" in capsys.readouterr().err
