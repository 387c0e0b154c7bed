"""The import graph of src/ilrdpo, read with ast (nothing is imported): its cycles, the imports made
inside functions (each must be of a heavy or optional package, HEAVY, or of a project module that
loads one), and the imports that run up the layers (LAYERS).

    python scripts/import_graph.py          # a summary; exit status 1 on a cycle or an upward import

tests/test_imports.py runs the same checks.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "ilrdpo"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# Lowest first; a module may import modules of its own layer and of the layers below. A module
# takes the layer of its top-level name under ilrdpo (evaluation.report: evaluation).
LAYERS: list[tuple[str, set[str]]] = [
    ("base: imports nothing of ilrdpo", {"errors", "faults", "ranks", "progress", "loss", "loss_types", "logprobs",
                                        "interrupts", "decisions", "lora"}),
    ("data: settings, records, files", {"settings", "config", "removed_keys", "files", "records", "data", "pairing",
                                        "alpha", "rundir", "runstate", "resume", "distributed", "tracking", "hub",
                                        "evaluation", "serving"}),
    ("models: models and what runs them", {"models", "batching", "scoring", "generation"}),
    ("engines: parallel training", {"engines", "zero", "checkpoint", "guard"}),
    ("stages: the loop's stages and the library functions", {"train", "sampled_reference", "eval_stage", "evaluate",
                                                             "preflight", "loop",
                                                             "offline", "tuning", "best_of", "chat"}),
    ("commands", {"api", "cli", "cli_args", "demo", "__main__", PACKAGE}),
]


# Third-party packages that take seconds to import (torch and what stands on it) or are optional
# extras: the only reason a function imports lazily, so that `ilrdpo --help`, config-help and the
# torch-free commands start at once, and a missing extra fails only where it is used.
HEAVY = {"torch", "transformers", "peft", "datasets", "accelerate", "deepspeed", "optuna", "sentence_transformers",
         "matplotlib", "numpy", "scipy", "sklearn", "huggingface_hub", "safetensors", "gguf", "trl", "wandb",
         "tensorboard", "sacrebleu", "rouge_score", "alpaca_eval", "openai"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. ilrdpo.train
    target: str  # the project module it names, e.g. ilrdpo.records
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


def _targets(node: ast.AST, current: str, is_package: bool, known: set[str]) -> list[str]:
    """The project modules an import statement names (`from ilrdpo import zero` names ilrdpo.zero)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        package = current.split(".") if is_package else current.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    if base.split(".")[0] != PACKAGE:
        return []
    names = [f"{base}.{a.name}" for a in node.names]
    return [n for n in names if n in known] or [base]


def _walk(tree: ast.AST, in_function: bool = False):
    """(node, inside a function) for every node, skipping `if TYPE_CHECKING:` blocks."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            continue
        inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield child, inner
        yield from _walk(child, inner)


def imports() -> list[Import]:
    """Every import of a project module by a project module."""
    found = modules()
    out = []
    for name, path in found.items():
        tree = ast.parse(path.read_text(), str(path))
        for node, in_function in _walk(tree):
            for target in _targets(node, name, path.name == "__init__.py", set(found)):
                if target != name:
                    out.append(Import(name, target, node.lineno, in_function))
    return out


def function_level_imports() -> list[tuple[str, int, str]]:
    """(module, line, imported name) of every import statement inside a function, project or not."""
    out = []
    for name, path in modules().items():
        for node, in_function in _walk(ast.parse(path.read_text(), str(path))):
            if in_function and isinstance(node, (ast.Import, ast.ImportFrom)):
                what = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                out.append((name, node.lineno, ("." * getattr(node, "level", 0)) + (what or "")))
    return out


def third_party_at_top(name: str, path: Path) -> set[str]:
    """The third-party packages a module imports at its top level (not inside functions)."""
    out = set()
    for node, in_function in _walk(ast.parse(path.read_text(), str(path))):
        if not in_function and isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif not in_function and isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out - {PACKAGE}


def heavy_modules(edges: list[Import]) -> set[str]:
    """Project modules whose import loads a HEAVY package, directly or through their top-level imports."""
    found = modules()
    heavy = {name for name, path in found.items() if third_party_at_top(name, path) & HEAVY}
    parents = [Import(name, parent, 0, False) for name in found  # importing a.b.c runs a.b's __init__
               for parent in (name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)) if parent in found]
    top = [e for e in [*edges, *parents] if not e.in_function]
    while True:
        more = {e.source for e in top if e.target in heavy} - heavy
        if not more:
            return heavy
        heavy |= more


def needless_lazy_imports(edges: list[Import]) -> list[str]:
    """`module:line name` of each import inside a function that defers nothing heavy: a
    third-party package outside HEAVY, or a project module that loads none (a package counts by
    its __init__)."""
    heavy, known = heavy_modules(edges), set(modules())
    out = []
    for module, line, what in function_level_imports():
        if what.startswith(".") or what.split(".")[0] == PACKAGE:
            targets = [e.target for e in edges if e.source == module and e.line == line] or [what]
            if not any(t in heavy or t not in known for t in targets):
                out.append(f"{module}:{line} {what}")
        elif what.split(".")[0] not in HEAVY and what.split(".")[0] not in sys.stdlib_module_names | {""} or what.split(".")[0] in sys.stdlib_module_names:
            out.append(f"{module}:{line} {what}")
    return out


def cycles(edges: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def top_name(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_of(module: str) -> int | None:
    """The index of the module's layer in LAYERS; None for a module no layer lists."""
    return next((k for k, (_, members) in enumerate(LAYERS) if top_name(module) in members), None)


def unlayered() -> list[str]:
    return sorted(m for m in modules() if layer_of(m) is None)


def upward_imports(edges: list[Import]) -> list[Import]:
    """Imports of a module in a higher layer than the importer's."""
    return [e for e in edges if (layer_of(e.target) or 0) > (layer_of(e.source) or 0)]


def main() -> int:
    edges = imports()
    found_cycles = cycles(edges)
    upward = upward_imports(edges)
    inside = function_level_imports()
    project_inside = [i for i in inside if i[2].startswith(PACKAGE) or i[2].startswith(".")]
    print(f"modules: {len(modules())}, project import edges: {len(edges)}")
    print(f"imports inside functions: {len(inside)} (of project modules: {len(project_inside)})")
    for module, line, what in project_inside:
        print(f"  {module}:{line} {what}")
    print(f"cycles: {len(found_cycles)}")
    for component in found_cycles:
        print("  " + " <-> ".join(component))
    print(f"upward imports: {len(upward)}")
    for e in upward:
        print(f"  {e.source}:{e.line} -> {e.target} ({LAYERS[layer_of(e.source)][0].split(':')[0]} -> "
              f"{LAYERS[layer_of(e.target)][0].split(':')[0]})")
    missing = unlayered()
    print(f"modules in no layer: {len(missing)} {' '.join(missing)}")
    needless = needless_lazy_imports(edges)
    print(f"imports inside functions that defer nothing heavy: {len(needless)}")
    for item in needless:
        print(f"  {item}")
    return 1 if found_cycles or upward or missing or needless else 0


if __name__ == "__main__":
    sys.exit(main())
