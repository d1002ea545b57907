"""The layering the architecture promises (docs/architecture.md), checked over the source with `ast`:

- no import loop between modules, nor between the packages of src/medcritical/;
- a stage never imports a stage after it in the data flow, nor what runs the stages (the recipe, the
  steps over URIs, the round loop, the report, the CLI, the pipeline);
- a building block imports no stage but `data` (the question schema every part shares).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# The stages in data-flow order; each may import the ones before it, never those after it.
STAGE_ORDER = ["data", "distill", "training", "selfplay", "evaluation"]
# Below every stage: shared building blocks a stage may import.
FOUNDATION = {
    "core",  # the stage contract, recipe sections, figures as text, shipped files
    "analysis",  # statistics, plots, format diagnostics
    "grader",
    "prompts",
    "modeling",
    "io",
    "storage",
    "errors",  # the one module at the package root: every layer's user errors
}
# Above every stage: what runs the stages and reads across them; no stage or building block imports these.
ORCHESTRATION = {"orchestration", "platform", "cli", "components", "pipelines"}
# Above the orchestration: where the stages run (KFP, TrainJobs, the sizing preflight); the orchestration never
# imports it, so a stage runs the same from the CLI, a Job, a component or the round loop.
PLATFORM = "platform"
# At the package root only the package's own __init__ and errors (below every layer, imported by all of them).
ROOT_MODULES = {"medcritical.errors"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in (SRC / "medcritical").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at module top level) for every project import in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("medcritical") and target != name:
                found.append((target, node.lineno, id(node) in top_level))
                break
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {target for target, _, _ in _imports(name, path, modules)} for name, path in modules.items()}


def _package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_loop_between_modules():
    assert _cycles(_graph()) == []


def test_no_import_loop_between_packages():
    packages: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        for target in targets:
            if _package(target) != _package(module):
                packages.setdefault(_package(module), set()).add(_package(target))
    assert _cycles(packages) == []


def test_stages_import_only_what_comes_before_them():
    wrong = []
    for module, targets in _graph().items():
        source = _package(module)
        if source not in STAGE_ORDER and source not in FOUNDATION:
            continue
        for target in targets:
            package = _package(target)
            if package in ORCHESTRATION:
                wrong.append(f"{module} imports {target} (orchestration sits above every stage)")
            elif source in FOUNDATION and package in STAGE_ORDER and package != "data":
                wrong.append(f"{module} imports {target} (a building block imports no stage)")
            elif (
                source in STAGE_ORDER
                and package in STAGE_ORDER
                and STAGE_ORDER.index(package) > STAGE_ORDER.index(source)
            ):
                wrong.append(f"{module} imports {target} (a later stage)")
    assert wrong == []


def test_orchestration_never_imports_the_platform():
    wrong = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        if _package(module) == "orchestration"
        for target in targets
        if _package(target) == PLATFORM
    ]
    assert wrong == []


def test_the_package_root_holds_only_layer_folders():
    """The tree reads like docs/architecture.md: every module sits in its layer's folder."""
    root = SRC / "medcritical"
    assert {m for m, path in _modules().items() if path.parent == root and path.name != "__init__.py"} == ROOT_MODULES


def test_every_package_is_placed_in_a_layer():
    placed = set(STAGE_ORDER) | FOUNDATION | ORCHESTRATION
    assert {_package(m) for m in _modules() if m.count(".")} - placed == set()


# Where a project import may sit inside a function without saying why: the CLI (so `medcritical --help`
# starts in half a second instead of importing torch, transformers and TRL) and the KFP components
# (KFP ships a component function's own source to the pod: its imports must be inside it).
LAZY_BY_DESIGN = ("medcritical.cli",)


def test_project_imports_sit_at_the_top_or_say_why():
    unexplained = []
    for name, path in _modules().items():
        if name.startswith(LAZY_BY_DESIGN):
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for target, line, top_level in _imports(name, path, _modules()):
            if top_level:
                continue
            said = "#" in lines[line - 1] or lines[line - 2].strip().startswith("#")
            if not said:
                unexplained.append(f"{path.relative_to(SRC)}:{line} imports {target} inside a function")
    assert unexplained == []


# Issue 26: a module is read whole and a function at one glance; longer ones are split, or say why beside them.
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
LONG_REASON = "# long:"


def test_no_library_file_over_450_lines():
    long_files = []
    for path in sorted((SRC / "medcritical").rglob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(SRC)}: {lines} lines")
    assert long_files == []


def test_no_function_over_80_lines_without_a_reason_beside_it():
    """A function longer than 80 lines (its `def` to its last line) carries a comment starting
    `# long:` on the line right above it that says why it reads best as one piece."""
    unexplained = []
    for path in sorted((SRC / "medcritical").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            if length <= MAX_FUNCTION_LINES:
                continue
            first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
            above = lines[first - 2].strip() if first >= 2 else ""
            if not above.startswith(LONG_REASON):
                unexplained.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} is {length} lines")
    assert unexplained == []
