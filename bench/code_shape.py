"""The shape of the code, for issue 13's before/after table: the longest functions, the
command line's size and its longest handler, and the annotations that say nothing.

    python bench/code_shape.py [ROOT]      # ROOT: a checkout (default: this one)
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ANY = re.compile(r"(sae|lm|saes|source|model): Any|-> Any")


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    rows, n_any = [], 0
    for p in sorted((root / "dictlens").rglob("*.py")):
        text = p.read_text()
        n_any += len(ANY.findall(text))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{p.relative_to(root)}:{node.name}"))
    rows.sort(reverse=True)
    print("| lines | function |\n|---:|---|")
    for n, name in rows[:15]:
        print(f"| {n} | {name} |")
    cli = [root / "dictlens" / "cli.py"] if (root / "dictlens" / "cli.py").is_file() else \
        sorted((root / "dictlens" / "cli").rglob("*.py"))
    lines = sum(len(p.read_text().splitlines()) for p in cli)
    handlers = [(n.end_lineno - n.lineno + 1, n.name) for p in cli for n in ast.parse(p.read_text()).body
                if isinstance(n, ast.FunctionDef) and n.name.startswith("_cmd")]
    print(f"\ncommand line: {lines} lines; longest handler: {max(handlers) if handlers else None}")
    print(f"sae/lm/source/model: Any and -> Any annotations: {n_any}")


if __name__ == "__main__":
    main()
