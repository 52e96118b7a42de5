"""Dependencies flow one way: engine_adapter -> kvstore, tools -> kvstore; only the disk tier
imports lmdb; the store never imports an engine or a tool."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def files(package: str):
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package, forbidden", [
    ("kvstore", {"engine_adapter", "tools", "transformers", "vllm", "prometheus_client"}),
    ("engine_adapter", {"tools"}),
])
def test_dependencies_flow_one_way(package, forbidden):
    for f in files(package):
        bad = imports_of(f) & forbidden
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_only_the_disk_tier_imports_lmdb():
    users = [f.relative_to(ROOT).as_posix() for f in files("kvstore") if "lmdb" in imports_of(f)]
    assert users == ["kvstore/tiers/disk/env.py"]


def test_no_utils_modules():
    for package in ("kvstore", "engine_adapter", "tools"):
        assert not [f for f in files(package) if f.stem in ("utils", "helpers", "misc")]
