"""Imports point down: surfaces → the prompt lifecycle → services and repositories → db.
A module may import only from its own rank or below (ARCHITECTURE.md, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import broker

RANKS = {  # the longest matching prefix decides
    "broker.db": 0, "broker.errors": 0, "broker.error_handlers": 0, "broker.settings": 0,
    "broker.logs": 0, "broker.ops.metrics": 0, "broker.responses": 0,
    "broker.comfy": 1, "broker.keys": 1, "broker.tenants": 1, "broker.audit": 1,
    "broker.usage": 1, "broker.files": 1,
    "broker.prompts": 2,
    "broker.proxy": 3, "broker.admin": 3, "broker.cli": 3, "broker.ops": 3,
    "broker.body_limit": 3, "broker.v2": 3, "broker.egress": 3,
    "broker.state": 3, "broker.dependencies": 3,  # they hold and read the surfaces' objects
    "broker.app": 4, "broker.__main__": 4, "broker": 0,
}  # fmt: skip


def rank(module: str) -> int:
    prefixes = [p for p in RANKS if module == p or module.startswith(p + ".")]
    return RANKS[max(prefixes, key=len)]


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "broker" or name.startswith("broker.")}


def test_imports_point_down() -> None:
    root = Path(broker.__file__).parent
    upward = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        upward += [
            f"{module} → {target}" for target in imports_of(path) if rank(target) > rank(module)
        ]
    assert upward == []
