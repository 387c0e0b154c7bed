"""The package's layout rules, checked on the source: who builds run paths, what the docs name.

Static checks (ast, no import of the modules they read): cheap, and they fail the moment a rule
is broken, where a reviewer might not notice.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ilrdpo"
ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def modules() -> list[str]:
    """Every module under src/ilrdpo as a dotted name (packages by their __init__)."""
    names = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def code_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal in a module that is not a docstring: the strings code
    uses (paths, messages), f-strings included (their literal parts)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


@pytest.mark.unit
def test_only_rundir_spells_the_iteration_folders():
    """RunDir is the only place that builds or discovers a run directory's iter_T/ paths (and the
    demo's heldout/iter_K files): no other module has "iter_" in a string its code uses."""
    found = [f"{path.relative_to(SRC)}:{line}: {text!r}" for path in sorted(SRC.rglob("*.py"))
             if path.name != "rundir.py" for line, text in code_strings(path) if "iter_" in text]
    assert not found, "\n".join(found)


@pytest.mark.unit
def test_the_check_sees_an_iteration_path_built_elsewhere(tmp_path):
    """The check above catches the forms a path takes in code, and leaves docstrings alone."""
    module = tmp_path / "m.py"
    module.write_text('"""Files of iter_T/."""\n\ndef f(root, k):\n    """iter_k."""\n'
                      '    return root / f"iter_{k}" / "eval.json"\n')
    assert [text for _, text in code_strings(module) if "iter_" in text] == ["iter_"]


def unnamed_modules(text: str, names: list[str]) -> list[str]:
    """The modules `text` does not name, as `ilrdpo.x.y` or by file (`x/y.py`, `y.py`; a package as
    `x/`); the package itself counts as named by its `__init__.py`."""
    missing = []
    for name in names:
        parts = name.split(".")[1:] or ["__init__"]
        spellings = {name, "/".join(parts) + ".py", parts[-1] + ".py", "/".join(parts) + "/"}
        if not any(re.search(rf"(?<![\w/.]){re.escape(s)}", text) for s in spellings):
            missing.append(name)
    return missing


@pytest.mark.unit
def test_architecture_names_every_module():
    """docs/architecture.md names every module under src/ilrdpo."""
    missing = unnamed_modules(ARCHITECTURE.read_text(encoding="utf-8"), modules())
    assert not missing, f"docs/architecture.md does not name: {', '.join(missing)}"


@pytest.mark.unit
def test_a_module_the_page_does_not_name_is_found():
    text = "| `loss.py` | ... |  `generation/` with `sampling.py`"
    assert unnamed_modules(text, ["ilrdpo.loss", "ilrdpo.generation", "ilrdpo.generation.sampling",
                                  "ilrdpo.generation.compact", "ilrdpo.lossy", "ilrdpo"]) == [
        "ilrdpo.generation.compact", "ilrdpo.lossy", "ilrdpo"]


def top_level_imports(module: str) -> set[str]:
    """The modules a project module imports at its top (not inside functions)."""
    path = SRC.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = SRC.parent / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.unit
def test_the_config_loads_without_torch():
    """Reading a config (and `ilrdpo config-help`, `--help`) must not import torch: the modules
    ilrdpo.config reaches through top-level imports import no torch, transformers or loss.py."""
    seen, todo, heavy = set(), ["ilrdpo.config"], set()
    while todo:
        module = todo.pop()
        seen.add(module)
        for name in top_level_imports(module):
            if name.split(".")[0] in ("torch", "transformers", "peft", "accelerate"):
                heavy.add(f"{module} -> {name}")
            elif name.startswith("ilrdpo.") and name not in seen:
                todo.append(name)
    assert not heavy and "ilrdpo.loss" not in seen, sorted(heavy)
