"""Code copied into the self-contained Hub modeling files (and our own eager kernel) stays equal to its source.

A block marked `# Copied from <module>.<name>` (optionally `with A->B, C->D`) must equal the named function or
class of the installed package, after those renames: the check transformers' utils/check_copies.py makes for its own
model files. Blank lines and trailing spaces do not count.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
from pathlib import Path

import pytest

import selective_attention

ROOT = Path(selective_attention.__file__).parent
MARKER = re.compile(r"^\s*# Copied from ([\w.]+)(?: with (.+))?$")


def marked_copies() -> list[tuple[str, int, str, list[tuple[str, str]], str]]:
    """(file, line, source name, renames, copied code) for every marker in the package."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        blocks = {node.lineno - len(node.decorator_list): node for node in ast.walk(ast.parse(text))
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        for number, line in enumerate(lines, start=1):
            match = MARKER.match(line)
            if not match:
                continue
            node = blocks.get(number + 1)
            assert node is not None, f"{path}:{number}: a '# Copied from' marker must sit right above a def or class"
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            renames = [tuple(part.strip().split("->")) for part in match.group(2).split(",")] if match.group(2) else []
            found.append((str(path.relative_to(ROOT.parent)), number, match.group(1), renames,
                          "\n".join(lines[first - 1:node.end_lineno])))
    return found


def source_of(dotted: str) -> str:
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            target = getattr(target, name)
        return inspect.getsource(target)
    raise ImportError(dotted)


def normalized(code: str) -> str:
    return "\n".join(line.rstrip() for line in textwrap.dedent(code).splitlines() if line.strip())


COPIES = marked_copies()


def test_the_hub_files_carry_markers():
    files = {copy[0] for copy in COPIES}
    assert {"selective_attention/gqa/modeling_selective_llama.py",
            "selective_attention/gqa/head_mask_selective_llama.py"} <= files


@pytest.mark.parametrize("path,line,source,renames,code", COPIES, ids=[f"{c[0]}:{c[1]}" for c in COPIES])
def test_copy_equals_its_source(path, line, source, renames, code):
    expected = source_of(source)
    for old, new in renames:
        expected = re.sub(rf"\b{re.escape(old)}\b", new, expected)
    assert normalized(code) == normalized(expected), f"{path}:{line} no longer equals {source}: update the copy"


def test_a_changed_copy_is_caught():
    path, line, source, renames, code = next(c for c in COPIES if c[2].endswith("repeat_kv"))
    assert normalized(code.replace("n_rep == 1", "n_rep < 2")) != normalized(source_of(source))
