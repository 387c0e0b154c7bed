"""Every module under src/ilrdpo imports (catches syntax errors and broken imports in modules
that no other test reaches)."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

import pytest

import ilrdpo

MODULES = sorted(info.name for info in pkgutil.walk_packages(ilrdpo.__path__, prefix="ilrdpo."))


def test_the_walk_finds_the_core_modules():
    assert {"ilrdpo.config", "ilrdpo.records", "ilrdpo.loss", "ilrdpo.logprobs", "ilrdpo.data",
            "ilrdpo.models", "ilrdpo.train", "ilrdpo.loop", "ilrdpo.cli", "ilrdpo.errors"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    module = importlib.import_module(name)
    assert module.__name__ == name


# --- the import graph (read with ast: scripts/import_graph.py) -------------------------------------

def _graph():

    path = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"
    spec = importlib.util.spec_from_file_location("import_graph", path)
    graph = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = graph  # its dataclasses look their module up
    spec.loader.exec_module(graph)
    return graph


@pytest.mark.unit
def test_no_import_cycle():
    """No module imports, directly or through others, a module that imports it (imports inside
    functions count: they only defer the cycle)."""
    graph = _graph()
    assert graph.cycles(graph.imports()) == []


@pytest.mark.unit
def test_the_cycle_check_finds_a_cycle():
    graph = _graph()
    edges = [graph.Import("ilrdpo.a", "ilrdpo.b", 1, False), graph.Import("ilrdpo.b", "ilrdpo.c", 1, True),
             graph.Import("ilrdpo.c", "ilrdpo.a", 1, False), graph.Import("ilrdpo.c", "ilrdpo.d", 1, False)]
    assert graph.cycles(edges) == [["ilrdpo.a", "ilrdpo.b", "ilrdpo.c"]]


@pytest.mark.unit
def test_no_module_imports_a_higher_layer():
    """The layers of scripts/import_graph.py (base, data, models, engines, stages, commands): a
    module imports its own layer and the ones below, and every module has a layer."""
    graph = _graph()
    assert graph.unlayered() == []
    assert [f"{e.source}:{e.line} -> {e.target}" for e in graph.upward_imports(graph.imports())] == []


@pytest.mark.unit
def test_the_bottom_modules_import_nothing_of_the_project():
    """ranks (who is main, barriers) sits under everything; records leaves who writes to its callers."""
    graph = _graph()
    edges = graph.imports()
    assert [e.target for e in edges if e.source == "ilrdpo.ranks"] == []
    assert {e.target for e in edges if e.source == "ilrdpo.files"} <= {"ilrdpo.errors", "ilrdpo.faults"}
    assert {e.target for e in edges if e.source == "ilrdpo.records"} <= {"ilrdpo.errors", "ilrdpo.files"}


@pytest.mark.unit
def test_imports_inside_functions_defer_a_heavy_or_optional_package():
    """An import inside a function is there to keep torch and its kin (or an optional extra) out of
    `ilrdpo --help` and the torch-free commands: it names a HEAVY package or a project module that
    loads one. Any other belongs at the top of its module."""
    graph = _graph()
    assert graph.needless_lazy_imports(graph.imports()) == []


@pytest.mark.unit
def test_the_lazy_import_check_tells_heavy_from_light():
    """ilrdpo.models loads torch (a reason to defer it); ilrdpo.config and ilrdpo.files do not;
    importing ilrdpo.scoring.python_fn runs ilrdpo.scoring's __init__, which does."""
    graph = _graph()
    heavy = graph.heavy_modules(graph.imports())
    assert {"ilrdpo.models", "ilrdpo.scoring.python_fn", "ilrdpo.loop"} <= heavy
    assert not {"ilrdpo.config", "ilrdpo.files", "ilrdpo.errors", "ilrdpo.cli"} & heavy

