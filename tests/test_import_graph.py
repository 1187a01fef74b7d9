"""The trainer package has no import circles (issue 16).

Every import counts: module level, inside functions (a "late import" that only hides a circle)
and under TYPE_CHECKING. The graph is read with `ast`, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_files(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted((root / "trainer").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the trainer modules it imports (`from pkg import name` counts as pkg.name when
    that is a module, else as the package)."""
    modules = module_files(root)
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in modules:
                        edges.add(full)
                    elif node.module in modules:
                        edges.add(node.module)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_find_cycle_reports_a_circle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_trainer_has_no_import_circles():
    graph = import_graph(ROOT)
    assert (
        "trainer.run.session" in graph and "trainer.checkpointing.store" in graph
    )  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_checkpointing_never_imports_the_session_or_the_loop():
    """Saving sits below the session: it reads a run through its fields, never imports it."""
    graph = import_graph(ROOT)
    for name, edges in graph.items():
        if name.startswith("trainer.checkpointing"):
            assert not edges & {"trainer.run.session", "trainer.run.loop", "trainer.parts.builder"}, name


def private_uses(path: Path) -> list[str]:
    """`obj._name` attribute uses (other than on self) and `from trainer... import _name` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trainer"):
            found += [f"{path.name}:{node.lineno} {a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_the_step_benchmark_builds_through_public_names_only():
    """bench/step.py measures the step the trainer builds: through `build_components`, never by
    re-implementing construction with private pieces."""
    source = (ROOT / "bench" / "step.py").read_text(encoding="utf-8")
    assert "build_components(" in source
    assert private_uses(ROOT / "bench" / "step.py") == []


# --- the layer table of docs/ARCHITECTURE.md, checked against the imports -------------------------


def layer_table(doc: Path) -> list[tuple[str, list[str]]]:
    """(layer, [path prefixes]) from the '## Layers' table, bottom layer first.

    The table lists the layers top down; each row's second cell names its folders and modules in
    backticks (`trainer/run/`, `trainer/cli.py`).
    """
    rows, in_section = [], False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            in_section = line.strip() == "## Layers"
            continue
        if in_section and line.startswith("|") and not set(line) <= set("|- "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            paths = [p for p in cells[1].split("`")[1::2] if p.startswith("trainer")]
            if paths:
                rows.append((cells[0].strip("*` "), paths))
    return rows[::-1]


def layer_index(module_path: str, table: list[tuple[str, list[str]]]) -> int | None:
    for index, (_layer, prefixes) in enumerate(table):
        for prefix in prefixes:
            if module_path == prefix or (prefix.endswith("/") and module_path.startswith(prefix)):
                return index
    return None


def test_the_layer_table_parses_and_names_every_module():
    table = layer_table(ROOT / "docs" / "ARCHITECTURE.md")
    assert [name for name, _ in table][:2] == ["runtime", "config"] and table[-1][0] == "cli"
    files = module_files(ROOT)
    unplaced = [
        str(p.relative_to(ROOT))
        for p in files.values()
        if layer_index(str(p.relative_to(ROOT)), table) is None
    ]
    assert unplaced == [], f"modules in no layer of docs/ARCHITECTURE.md: {unplaced}"


def test_every_import_goes_to_its_own_layer_or_below():
    """docs/ARCHITECTURE.md: a module imports only from its own layer or below. The document
    cannot drift from the code: a new upward import or a module outside the table fails here."""
    table = layer_table(ROOT / "docs" / "ARCHITECTURE.md")
    files = module_files(ROOT)
    upward = []
    for name, edges in import_graph(ROOT).items():
        here = layer_index(str(files[name].relative_to(ROOT)), table)
        for target in edges:
            there = layer_index(str(files[target].relative_to(ROOT)), table)
            if here is not None and there is not None and there > here:
                upward.append(f"{name} ({table[here][0]}) imports {target} ({table[there][0]})")
    assert upward == [], "imports against the layer table:\n" + "\n".join(sorted(upward))


def test_the_layer_check_sees_an_upward_import(tmp_path):
    doc = tmp_path / "A.md"
    doc.write_text(
        "## Layers\n\n| layer | modules |\n|---|---|\n| top | `trainer/top/` |\n| low | `trainer/low/` |\n"
    )
    table = layer_table(doc)
    assert layer_index("trainer/low/a.py", table) == 0 and layer_index("trainer/top/b.py", table) == 1
