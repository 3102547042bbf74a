"""The core (mlsd, converters) never imports the TUI layer (textual, tui)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("textual", "tui", "textual_image")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_sources_do_not_import_the_tui():
    offenders = {}
    for package in ("mlsd", "converters"):
        for path in (ROOT / package).rglob("*.py"):
            bad = _imports(path) & set(FORBIDDEN)
            if bad:
                offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"core modules import the TUI layer: {offenders}"


def test_importing_every_core_module_loads_no_textual():
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts)
               for package in ("mlsd", "converters") for p in (ROOT / package).rglob("*.py")]
    modules = [m.removesuffix(".__init__") for m in modules]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
