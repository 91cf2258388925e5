"""The design of docs/design.md, kept true: small modules, no import circle, imports that go one way.

The imports are read from the source (every `import` statement, inside functions too, except under
`if TYPE_CHECKING:`, which never runs), so a lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450
BIG_TRITON_FILES = {"kernels/nha_kernels/chunk_fwd.py", "kernels/nha_kernels/chunk_bwd.py"}

# The layers, lowest first: a module may import its own layer or a lower one, never a higher one.
# op <- model <- files, conversion and the data layer (corpora) <- the stages (finetune, eval) <- the commands.
LAYERS = {
    "nha_convert.errors": 0,
    "nha_convert.ops": 1,
    **{f"nha_convert.{m}": 2 for m in ("settings", "layer", "modeling", "cache", "decode_graph", "memory",
                                       "compat", "backend")},
    **{f"nha_convert.{m}": 3 for m in ("convert", "layer_selection", "hub", "loading", "io", "assets", "runlock",
                                       "run_folder", "losses", "corpora")},
    "nha_convert": 3,  # the package's own __init__: convert, load, save
    "nha_convert.finetune": 4,
    "nha_convert.eval": 4,
    "nha_convert.cli": 5,
}
NAMES = {0: "errors", 1: "op", 2: "model", 3: "files / conversion / corpora", 4: "stage", 5: "command"}


def _sources(*packages: str) -> dict[str, Path]:
    out = {}
    for package in packages:
        base = ROOT / package
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base.parent).with_suffix("").parts
            out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = path
    return out


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list = []

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            for child in node.orelse:  # the `else` of `if TYPE_CHECKING` does run
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


@lru_cache(maxsize=None)
def import_graph(*packages: str) -> dict[str, set[str]]:
    """{module: the modules of `packages` it imports}, a package's __init__ named by the package."""
    modules = _sources(*packages)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        edges = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = ".".join(here[: len(here) - node.level + 1]) if node.level else ""
                base = ".".join(p for p in (base, node.module or "") if p)
                # `from pkg import sub` names a module when pkg.sub is one, else something defined in pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def _layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_design.py and docs/design.md")
    return LAYERS[best]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_is_over_450_lines():
    files = sorted((ROOT / "nha_convert").rglob("*.py"))
    files += [p for p in sorted((ROOT / "kernels" / "nha_kernels").rglob("*.py"))
              if str(p.relative_to(ROOT)) not in BIG_TRITON_FILES]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"


def test_every_module_has_a_layer():
    for module in import_graph("nha_convert"):
        _layer(module)


def test_no_import_circle_in_nha_convert():
    circle = _cycle(import_graph("nha_convert"))
    assert circle is None, f"import circle: {' -> '.join(circle)}"


def test_no_import_circle_with_the_kernels():
    circle = _cycle(import_graph("nha_convert", "kernels/nha_kernels"))
    assert circle is None, f"import circle: {' -> '.join(circle)}"


def test_finetune_and_eval_never_import_each_other():
    graph = import_graph("nha_convert")
    crossing = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                      for x, y in (("finetune", "eval"), ("eval", "finetune"))
                      if a.startswith(f"nha_convert.{x}") and b.startswith(f"nha_convert.{y}"))
    assert not crossing, f"fine-tuning and evaluation import each other (move the shared code below both): {crossing}"


def test_no_module_imports_a_higher_layer():
    graph = import_graph("nha_convert")
    upward = sorted(f"{a} ({NAMES[_layer(a)]}) -> {b} ({NAMES[_layer(b)]})"
                    for a, targets in graph.items() for b in targets if _layer(b) > _layer(a))
    assert not upward, f"imports against the layering of docs/design.md: {upward}"


def test_the_walker_sees_lazy_imports_and_skips_type_checking(tmp_path):
    """The checks above are only as good as the import reader: an import inside a function counts, one under
    `if TYPE_CHECKING:` does not, and `from . import x` names the module x."""
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import b\nelse:\n    import c\n"
                     "def f():\n    from ..d import e\n")
    assert [(getattr(n, "module", None), n.level if isinstance(n, ast.ImportFrom) else 0)
            for n in _imports(tree)] == [("typing", 0), (None, 0), ("d", 2)]
    graph = import_graph("nha_convert")
    assert "nha_convert.corpora.retrieval" in graph["nha_convert.layer_selection"]  # imported inside a function
    assert "nha_convert.assets" in graph["nha_convert.corpora.sources"]  # `from .. import assets`
    assert "nha_convert.finetune.schema" not in graph["nha_convert.finetune.objectives"]  # TYPE_CHECKING only
