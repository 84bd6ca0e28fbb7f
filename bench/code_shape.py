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
    # the command line: dictlens 0.1's cli.py and use/commands.py, or the cli/ package
    old = [root / "dictlens" / "cli.py", root / "dictlens" / "use" / "commands.py"]
    cli = [p for p in old if p.is_file()] or sorted((root / "dictlens" / "cli").rglob("*.py"))
    lines = sum(len(p.read_text().splitlines()) for p in cli)
    trees = [ast.parse(p.read_text()) for p in cli]
    # handlers: the functions a subcommand runs (set_defaults(func=...) or command(..., func))
    named = {kw.value.id for t in trees for c in ast.walk(t) if isinstance(c, ast.Call)
             for kw in c.keywords if kw.arg == "func" and isinstance(kw.value, ast.Name)}
    named |= {c.args[4].id for t in trees for c in ast.walk(t) if isinstance(c, ast.Call)
              and isinstance(c.func, ast.Name) and c.func.id == "command" and len(c.args) == 5
              and isinstance(c.args[4], ast.Name)}
    funcs = [(n.end_lineno - n.lineno + 1, n.name) for t in trees for n in t.body if isinstance(n, ast.FunctionDef)]
    handlers = [f for f in funcs if f[1] in named]
    print(f"\ncommand line: {lines} lines in {len(cli)} files; {len(handlers)} handlers, longest "
          f"{max(handlers) if handlers else None}; longest function {max(funcs)}")
    flags = sum(len(re.findall(r"add_argument\(", p.read_text())) for p in cli)
    print(f"add_argument calls written by hand in the command line: {flags}")
    print(f"sae/lm/source/model: Any and -> Any annotations: {n_any}")


if __name__ == "__main__":
    main()
