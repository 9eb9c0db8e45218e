"""STYLE.md 4, 13 and DESIGN.md's layout: the package's folders, who imports whom, and who sees the root config."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "magi_train"
FRAMEWORK = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb")
# package -> what it must not import (DESIGN.md "Dependencies point down")
FORBIDDEN = {
    "models": (*FRAMEWORK, "magi_train.data", "magi_train.eval", "magi_train.tasks", "magi_train.training",
               "magi_train.inference"),
    "flow": (*FRAMEWORK, "magi_train.data", "magi_train.eval", "magi_train.tasks", "magi_train.training",
             "magi_train.inference"),
    "inference": ("magi_train.training", "magi_train.tasks", "magi_train.eval"),
    "eval": ("magi_train.training", "magi_train.tasks"),
    "tasks": ("magi_train.training",),
}  # fmt: skip
# Only the entry point (and the schemas) see the root config: nothing else imports Hydra / OmegaConf or the root
# schema class, so no function can take the root DictConfig or `Config` and reach into other groups.
ROOT_CONFIG_OWNERS = {"__main__.py", "config.py"}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
    return found


def test_top_level_holds_only_the_entry_point_and_the_schemas():
    loose = sorted(p.name for p in PKG.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "config.py"], loose


@pytest.mark.parametrize("sub", sorted(FORBIDDEN))
def test_dependencies_point_down(sub):
    assert (PKG / sub).is_dir()
    for path in (PKG / sub).rglob("*.py"):
        for module, _ in _imports(path):
            assert not module.startswith(FORBIDDEN[sub]), f"{path.relative_to(PKG)} imports {module}"


def test_only_the_entry_point_sees_the_root_config():
    checked = 0
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if str(rel) in ROOT_CONFIG_OWNERS:
            continue
        checked += 1
        for module, names in _imports(path):
            assert not module.startswith(("hydra", "omegaconf")), f"{rel} imports {module}"
            assert not (module == "magi_train.config" and "Config" in names), f"{rel} imports the root Config"
    assert checked > 50  # the walk saw the package


def test_the_checks_fail_on_a_violation(tmp_path):
    """Control: the import walker sees the kinds of import the checks above forbid."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import lightning as L\nfrom omegaconf import DictConfig\nfrom magi_train.config import Config\n"
    )
    found = _imports(bad)
    assert ("lightning", []) in found and ("omegaconf", ["DictConfig"]) in found
    assert ("magi_train.config", ["Config"]) in found
