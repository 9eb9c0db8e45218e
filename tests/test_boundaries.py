"""STYLE.md 13: models/ and flow/ import nothing from Lightning, Hydra, data or eval."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "magi_train"
FORBIDDEN = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "magi_train.data", "magi_train.eval",
             "magi_train.tasks", "wandb")


@pytest.mark.parametrize("sub", ["models", "flow"])
def test_pure_packages_import_no_framework(sub):
    for path in (PKG / sub).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(FORBIDDEN), f"{path.relative_to(PKG)} imports {name}"
