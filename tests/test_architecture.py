"""The house: each floor imports only the floors below it, and the entry points import no other entry point."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kvcompress"

# What each part of the package may import from kvcompress (besides itself). `utils`, `config` and `records` are
# the ground floor: small helpers, the structured configs and the provenance every floor may read.
GROUND = {"utils", "config", "records"}
FLOORS: dict[str, set[str]] = {
    "utils": set(),
    "config": set(),
    "records": {"utils"},
    "models": {"utils"},
    "methods": {"models", *GROUND},
    "data": GROUND,
    "evaluation": {"models", "methods", "data", *GROUND},
    "training": {"models", "methods", "data", "evaluation", *GROUND},
    "run": {"models", "methods", "data", "evaluation", "training", *GROUND},
    "reproduce": {"run", "evaluation", "data", "models", "methods", *GROUND},
    "bench": {"evaluation", "models", "methods", *GROUND},
    # entry points: thin, over the harness; none imports another
    "train": {"run"},
    "eval": {"run"},
    "report": {"evaluation"},
    "stages": {"training"},
    "costs": {"utils"},
    "__init__": {"models", "methods"},
}


def kvcompress_imports(path: Path) -> set[str]:
    """The top-level kvcompress parts a file imports (`kvcompress.models.caches` -> `models`)."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = (
                [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                if node.module == "kvcompress"
                else [node.module]
            )
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            bits = name.split(".")
            if bits[0] == "kvcompress" and len(bits) > 1:
                parts.add(bits[1])
    return parts


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_floor_imports_only_the_floors_below_it() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = part_of(path)
        assert part in FLOORS, f"{path} is in no floor of tests/test_architecture.py::FLOORS"
        for imported in kvcompress_imports(path) - {part}:
            if imported not in FLOORS[part]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports kvcompress.{imported}")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_the_train_entry_point() -> None:
    users = [p for p in PACKAGE.rglob("*.py") if "train" in kvcompress_imports(p) and p.stem != "train"]
    assert not users
