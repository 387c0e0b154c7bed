"""Every module under src/ilrdpo imports (catches syntax errors and broken imports in modules
that no other test reaches)."""

from __future__ import annotations

import importlib
import pkgutil

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
