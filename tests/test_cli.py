"""Every command explains itself: --help names inputs and outputs and shows an example."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sendvae.cli import build_parser, main


def _commands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_top_level_help_lists_the_pipeline(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "Pipeline" in out
    for command in _commands():
        assert command in out


@pytest.mark.parametrize("command", _commands())
def test_each_command_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "example" in capsys.readouterr().out.lower()


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "sendvae.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "sendvae" in result.stdout


HEAVY_LIBRARIES = ("torch", "numpy", "timm", "diffusers", "scipy", "sklearn", "matplotlib")


@pytest.mark.parametrize("argv", [["--help"], *[[command, "--help"] for command in _commands()]])
def test_help_imports_no_heavy_library(argv):
    """`sendvae [cmd] --help` must start in well under a second: it may not import torch & co (issue 12)."""
    probe = ("import sys\nfrom sendvae.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             f"print(sorted(m for m in {HEAVY_LIBRARIES!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", f"sendvae {' '.join(argv)} imported {result.stdout[-200:]}"
