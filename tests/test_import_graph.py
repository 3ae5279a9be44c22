"""The project's imports point one way: no cycle, no project module imported inside a function
(the usual way a cycle hides), and every application module imports only from layers below it.

The graph is read with `ast` (nothing is imported): every module of ``kwta_jax/``, the
``kernels/*.py`` installed as ``kwta_jax.kernels.*``, and the CLIs ``train.py`` and
``attack.py``. ``from package import name`` counts as an import of ``package.name`` when that
is a module, else of ``package``; imports under ``if TYPE_CHECKING:`` count too. A lazy import
of an optional third-party dependency inside a function is fine; only project modules count.

Print the graph, layer by layer:

    python tests/test_import_graph.py [REPO_ROOT]
"""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIS = ("train.py", "attack.py")

# Application modules by layer: a module may import only from lower layers (the op layer is
# layer 1 as a whole; its modules import each other, acyclically). A module not listed here is
# still checked for cycles and function-level imports.
LAYERS: dict[str, int] = {
    # Leaves: nothing from the project.
    "kwta_jax.flags": 0,
    "kwta_jax.progress": 0,
    "kwta_jax.checkpointing": 0,
    "kwta_jax.data": 0,
    "kwta_jax.sharding": 0,
    "kwta_jax.subsets": 0,
    "kwta_jax.interrupts": 0,
    # 1: the op layer (rank keys, selection, kernels, ops, layers, attacks, benchmark), and
    # the two that clean up under the interrupts leaf: files written whole, directory locks.
    "kwta_jax.atomic": 1,
    "kwta_jax.locking": 1,
    "kwta_jax.models": 2,
    "kwta_jax.adapters": 2,
    "kwta_jax.preflight": 3,
    "kwta_jax.suites": 2,
    "kwta_jax.results": 2,
    "kwta_jax.config": 3,
    "kwta_jax.runs": 4,
    "kwta_jax.training": 4,
    "kwta_jax.evaluation": 4,
    "kwta_jax.experiments": 4,
    "kwta_jax.diagnostics": 5,
    "kwta_jax.gpu_check": 5,
    "kwta_jax.torch_baselines": 2,
    "kwta_jax.robustness": 6,
    "kwta_jax.reports": 6,
    "kwta_jax.multihost": 5,
    "kwta_jax.train_workflow": 7,
    "kwta_jax.attack_workflow": 7,
    "kwta_jax.experiment_workflow": 8,
    "train": 9,
    "attack": 9,
}
OP_LAYER = 1
OP_MODULES = ("kwta_jax", "kwta_jax.backward", "kwta_jax.rank_keys", "kwta_jax.selection",
              "kwta_jax.ops", "kwta_jax.layers", "kwta_jax.benchmark", "kwta_jax.benchmark_cases",
              "kwta_jax.benchmark_targets")  # fmt: skip
OP_PACKAGES = ("kwta_jax.kernels", "kwta_jax.attacks")

# Function-level project imports in files this refactor may not edit; each is harmless (no
# cycle behind it) and can move to module level. Remove an entry once it is fixed.
KNOWN_FUNCTION_LEVEL: set[tuple[str, str]] = set()


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    in_function: bool


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` of the package, its kernels and the CLIs."""
    modules = {}
    for path in sorted((root / "kwta_jax").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((root / "kernels").glob("*.py")):
        name = "kwta_jax.kernels" if path.stem == "__init__" else f"kwta_jax.kernels.{path.stem}"
        modules[name] = path
    for cli in CLIS:
        if (root / cli).is_file():
            modules[Path(cli).stem] = root / cli
    return modules


def _targets(node: ast.Import | ast.ImportFrom, importer: str, modules) -> set[str]:
    """The project modules an import statement imports."""
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: resolved against the importer's package
            package = importer.rsplit(".", node.level)[0]
            base = f"{package}.{base}" if base else package
        candidates = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
            for alias in node.names
        ]
    found = set()
    for name in candidates:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != importer:
            found.add(name)
    return found


def find_imports(name: str, path: Path, modules) -> list[Import]:
    """Every import of a project module in file ``path`` (module ``name``)."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target in sorted(_targets(child, name, modules)):
                    found.append(Import(name, target, child.lineno, inside))
            visit(child, inside)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[Import]]:
    """``(edges, imports)``: ``{module: modules it imports}`` and every import found."""
    modules = project_modules(root)
    imports = [i for name, path in modules.items() for i in find_imports(name, path, modules)]
    edges = {name: set() for name in modules}
    for i in imports:
        edges[i.importer].add(i.imported)
    return edges, imports


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return sorted(components)


def layer_of(module: str) -> int | None:
    if module in LAYERS:
        return LAYERS[module]
    if module in OP_MODULES or any(module == p or module.startswith(p + ".") for p in OP_PACKAGES):
        return OP_LAYER
    return None


def layering_violations(edges: dict[str, set[str]]) -> list[str]:
    """Imports that do not point to a lower layer (inside the op layer: any direction)."""
    bad = []
    for importer, targets in sorted(edges.items()):
        for target in sorted(targets):
            a, b = layer_of(importer), layer_of(target)
            if a is None or b is None or a == b == OP_LAYER:
                continue
            if not a > b:
                bad.append(f"{importer} (layer {a}) imports {target} (layer {b})")
    return bad


def format_report(root: Path = ROOT) -> str:
    """The graph layer by layer, then cycles, function-level imports and layering problems."""
    edges, imports = import_graph(root)
    lines = []
    by_layer = sorted(edges, key=lambda m: (layer_of(m) is None, layer_of(m) or 0, m))
    for module in by_layer:
        layer = layer_of(module)
        deps = ", ".join(sorted(edges[module])) or "-"
        lines.append(f"[{'?' if layer is None else layer}] {module} -> {deps}")
    for cycle in find_cycles(edges):
        lines.append("cycle: " + " <-> ".join(cycle))
    local = [i for i in imports if i.in_function]
    for i in local:
        known = " (known, see KNOWN_FUNCTION_LEVEL)" if (i.importer, i.imported) in \
            KNOWN_FUNCTION_LEVEL else ""  # fmt: skip
        lines.append(f"function-level import: {i.importer}:{i.line} imports {i.imported}{known}")
    lines.extend(f"layering: {v}" for v in layering_violations(edges))
    lines.append(
        f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, "
        f"{len(find_cycles(edges))} cycles, {len(local)} function-level project imports"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------------------------


def test_the_graph_covers_the_package_the_kernels_and_the_clis():
    edges, _ = import_graph()
    assert {"kwta_jax.ops", "kwta_jax.kernels.kwta_cpu", "train", "attack"} <= set(edges)
    assert "kwta_jax.ops" in edges["kwta_jax.layers"]  # `from kwta_jax import ops`


def test_no_import_cycle():
    edges, _ = import_graph()
    assert find_cycles(edges) == [], format_report()


def test_no_project_module_is_imported_inside_a_function():
    _, imports = import_graph()
    local = [
        f"{i.importer}:{i.line} imports {i.imported}"
        for i in imports
        if i.in_function and (i.importer, i.imported) not in KNOWN_FUNCTION_LEVEL
    ]
    assert local == []


def test_application_modules_import_only_lower_layers():
    edges, _ = import_graph()
    assert layering_violations(edges) == []
    assert edges["kwta_jax.checkpointing"] == set()  # storage knows nothing of the project


def test_the_checker_sees_cycles_and_function_level_imports(tmp_path):
    pkg = tmp_path / "kwta_jax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from kwta_jax import b\n")
    (pkg / "b.py").write_text("def f():\n    from kwta_jax.a import g\n")
    edges, imports = import_graph(tmp_path)
    assert find_cycles(edges) == [["kwta_jax.a", "kwta_jax.b"]]
    assert [(i.importer, i.imported, i.in_function) for i in imports] == [
        ("kwta_jax.a", "kwta_jax.b", False),
        ("kwta_jax.b", "kwta_jax.a", True),
    ]


if __name__ == "__main__":
    print(format_report(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT))
