"""The package's shape: layers import only downwards, no import cycles, no private names across modules, small
modules, a torch-free command line, and a contributor's page that lists every module."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "acnet_convert"
MAX_LINES = 400
# Lowest first: a module may import from its own layer (without cycles) and from the layers below it.
LAYERS = [
    ("ground", ["errors", "constants", "modules"]),
    ("algebra", ["kernels", "preconditioners"]),
    ("blocks", ["blocks", "repopt"]),
    ("analysis", ["analysis"]),
    ("checks", ["checks"]),
    ("public API", ["api", "scale_search"]),
    ("files", ["files"]),
    ("front ends", ["cli", "integrations", "training", "demo", "lightning_callback", "__init__"]),
]
RANK = {top: rank for rank, (_, tops) in enumerate(LAYERS) for top in tops}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of the package inside ``path``."""
    package = name.split(".")[:-1]  # the package a relative import starts from (an __init__'s own package)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1] if node.level > 1 else package
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.append((target, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("acnet_convert"):
            target = node.module.removeprefix("acnet_convert").lstrip(".")
            found.append((target, [a.name for a in node.names], node.lineno))
    return found


def resolve(target: str, names: list[str], known: dict[str, Path]) -> list[str]:
    """The package modules an import reaches: the module itself, or submodules imported by name."""
    reached = []
    for n in names:
        sub = f"{target}.{n}" if target else n
        if sub in known or f"{sub}.__init__" in known:
            reached.append(sub if sub in known else f"{sub}.__init__")
    if target in known:
        reached.append(target)
    elif target and f"{target}.__init__" in known:
        reached.append(f"{target}.__init__")
    elif not target and not reached:
        reached.append("__init__")
    return reached


def top(name: str) -> str:
    return name.split(".")[0]


def test_every_module_belongs_to_a_layer():
    assert sorted(n for n in modules() if top(n) not in RANK) == []


def test_layers_import_only_downwards():
    known = modules()
    upward = []
    for name, path in known.items():
        for target, names, line in imports(name, path):
            for reached in resolve(target, names, known):
                if top(reached) != "__init__" and RANK[top(reached)] > RANK[top(name)]:
                    upward.append(f"{name}:{line} imports {reached}")
                if top(reached) == "__init__" and top(name) != "__init__" and names != ["__version__"]:
                    upward.append(f"{name}:{line} imports from the package root ({names})")
    assert upward == []


def test_no_import_cycles():
    known = modules()
    graph = {name: {r for t, ns, _ in imports(name, path) for r in resolve(t, ns, known) if r != name}
             for name, path in known.items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_private_name_is_imported_from_another_module():
    known = modules()
    private = [f"{name}:{line} imports {n} from {target}" for name, path in known.items()
               for target, names, line in imports(name, path) for n in names
               if n.startswith("_") and n != "__version__"]
    assert private == []


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_are_small(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"


def test_the_command_line_imports_no_torch():
    code = "import sys, acnet_convert.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_contributors_page_lists_every_module_with_its_docstring():
    """Each module has a row in docs/architecture.md naming it and quoting its docstring's first paragraph."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| `acnet")]
    wanted = []
    for path in modules().values():
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        summary = doc.split("\n\n")[0].replace("\n", " ").replace("|", "\\|")
        wanted.append((f"`acnet_convert/{path.relative_to(PACKAGE)}`", summary))
    missing = [name for name, summary in wanted
               if not any(row.startswith(f"| {name} |") and row.rstrip().endswith(f"| {summary} |") for row in rows)]
    assert missing == []
    assert len(rows) == len(wanted)
