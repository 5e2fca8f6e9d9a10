"""The application's state is read through `broker.state.state_of` (typed), never through
`app.state`'s untyped attributes: `request.app.state.x`, `app.state.x`, `scope["app"].state`."""

from __future__ import annotations

import ast
from pathlib import Path

import broker

TYPED_STATE = "broker/state.py"


def is_app(node: ast.expr) -> bool:
    if isinstance(node, ast.Subscript):  # scope["app"]
        return isinstance(node.slice, ast.Constant) and node.slice.value == "app"
    return (isinstance(node, ast.Name) and node.id == "app") or (
        isinstance(node, ast.Attribute) and node.attr == "app"
    )


def test_only_broker_state_reads_the_app_state() -> None:
    root = Path(broker.__file__).parent
    untyped = [
        f"{path.relative_to(root.parent)}:{node.lineno}"
        for path in sorted(root.rglob("*.py"))
        if path.relative_to(root.parent).as_posix() != TYPED_STATE
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "state" and is_app(node.value)
    ]
    assert untyped == []
