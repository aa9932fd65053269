"""The house's rules, read from the source: no import cycle anywhere, and inside train_evaluate/
each group imports only the groups before it (the entry points may import any).

Every import counts, those inside functions too (a cycle that is only deferred is still one);
imports under ``if TYPE_CHECKING:`` are for type hints alone and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("compression", "lora", "data", "train_evaluate")
# train_evaluate's groups, lowest first; see docs/layout.md
GROUPS = ("runtime", "inputs", "outputs", "training", "search", "config")
ENTRY_POINTS = ("train_model", "evaluate", "compare", "report")
DRIVER_MAX_LINES = 250


def module_files() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def type_checking_only(tree: ast.AST) -> set[int]:
    """Line numbers of the statements under ``if TYPE_CHECKING:``."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project's modules that ``name`` imports (``from a import b`` counts a.b when it is a
    module, else a)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t if t in modules else base for t in targets]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" on the current path, "done" when fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_imports_itself_through_others(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def group_of(module: str) -> int | None:
    """The group's position in GROUPS; None for the package itself and the entry points."""
    parts = module.split(".")
    if parts[0] != "train_evaluate" or len(parts) < 2 or parts[1] not in GROUPS:
        return None
    return GROUPS.index(parts[1])


def test_each_group_imports_only_the_groups_before_it(graph):
    wrong = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if not target.startswith("train_evaluate."):
                continue
            here, there = group_of(module), group_of(target)
            if there is None and target.split(".")[1] in ENTRY_POINTS:
                if module.startswith("train_evaluate."):
                    wrong.append(f"{module} -> {target} (an entry point)")
            elif here is not None and there is not None and there > here:
                wrong.append(f"{module} -> {target}")
            elif not module.startswith("train_evaluate"):
                wrong.append(f"{module} -> {target} (a library package imports the tool)")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_every_module_of_train_evaluate_is_in_a_group_or_an_entry_point():
    loose = [
        path.name
        for path in (REPO / "train_evaluate").glob("*.py")
        if path.stem not in (*ENTRY_POINTS, "__init__")
    ]
    assert not loose, f"modules outside the groups {GROUPS}: {loose}"


def test_the_driver_stays_short():
    lines = len((REPO / "train_evaluate" / "train_model.py").read_text().splitlines())
    assert lines < DRIVER_MAX_LINES, f"train_model.py has {lines} lines"


# the driver's size rules (docs/layout.md): a module holds one concern, a function one step
MODULE_MAX_LINES = 500
FUNCTION_MAX_LINES = 80
LONGER_ALLOWED = {"train_evaluate.training.batched", "train_evaluate.config.cli.build_parser"}


def test_no_driver_module_or_function_outgrows_its_limit():
    too_long = []
    for name, path in module_files().items():
        if not name.startswith("train_evaluate"):
            continue
        source = path.read_text()
        if len(source.splitlines()) > MODULE_MAX_LINES and name not in LONGER_ALLOWED:
            too_long.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > FUNCTION_MAX_LINES and f"{name}.{node.name}" not in LONGER_ALLOWED:
                    too_long.append(f"{name}.{node.name}: {lines} lines")
    assert too_long == []
