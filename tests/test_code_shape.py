"""The house rules of docs/ARCHITECTURE.md that a reader can check by counting: no module of
`trainer/` over 450 lines (data tables live in their own modules), no function over 80 lines,
and only the command-line entry points at the top of the package (every other module sits in
its layer's folder)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
TOP_LEVEL = {"__init__.py", "cli.py", "cli_help.py", "extract_lora.py"}


def trainer_modules() -> list[Path]:
    return sorted((ROOT / "trainer").rglob("*.py"))


def long_functions(path: Path, limit: int, root: Path = ROOT) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_no_module_over_the_limit():
    long = [
        f"{p.relative_to(ROOT)} ({n} lines)"
        for p in trainer_modules()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    ]
    assert long == [], f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_over_the_limit():
    long = [found for p in trainer_modules() for found in long_functions(p, MAX_FUNCTION_LINES)]
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_function_count_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n")
    found = long_functions(tmp_path / "m.py", MAX_FUNCTION_LINES, root=tmp_path)
    assert found == [f"m.py:1 f ({MAX_FUNCTION_LINES + 1} lines)"]


def test_only_entry_points_at_the_top_of_the_package():
    top = {p.name for p in (ROOT / "trainer").glob("*.py")}
    assert top <= TOP_LEVEL, f"modules outside a layer folder: {sorted(top - TOP_LEVEL)}"
