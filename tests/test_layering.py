"""The package's layering: models/ and data/ sit below train/ and eval/ and never import them.

A model or a dataset that reached up into training or evaluation code would tie the lower layers to
the upper ones (and make import circles); this reads every module's imports with ``ast`` (lazy imports
inside functions included) instead of importing anything.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sendvae"
UPPER = {("sendvae", "train"), ("sendvae", "eval")}


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute name) of every import in ``source``, a module of ``package``; relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def upward_imports(layer: str) -> list[str]:
    """``file:line imports name`` for each import of train/ or eval/ inside ``sendvae/<layer>``."""
    upward = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        package = ".".join(("sendvae", *path.relative_to(PACKAGE).parent.parts))
        for line, name in imported_modules(path.read_text(), package):
            if tuple(name.split(".")[:2]) in UPPER:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {name}")
    return upward


@pytest.mark.parametrize("layer", ["models", "data"])
def test_lower_layers_import_nothing_from_train_or_eval(layer):
    assert not upward_imports(layer), "\n".join(upward_imports(layer))


def test_the_guard_sees_lazy_relative_and_package_imports():
    source = ("def f():\n    from sendvae.train import loop\n"
              "from ..eval import probe\nfrom sendvae import train\nimport sendvae.eval.generation\n")
    names = [name for _, name in imported_modules(source, "sendvae.models")]
    assert names == ["sendvae.eval.probe", "sendvae.train", "sendvae.eval.generation", "sendvae.train.loop"]
    assert all(tuple(name.split(".")[:2]) in UPPER for name in names)
