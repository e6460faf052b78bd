"""How big and how tangled the codebase is: the measured targets of the "minimal house" issue.

    python -m bench.codesize            # print the table
    python -m bench.codesize --check    # also exit 1 when a target is missed (CI runs this)

Counted: every .py file of the repository outside tests/, bench/ and hidden folders (docs/ included).
- lines: all physical lines; code lines: lines that are not blank, not comments and not docstrings;
- the longest files (target <= 350 lines) and functions (target <= 60 lines, decorators excluded);
- import cycles between the project's own modules (target: none).
"""

from __future__ import annotations

import argparse
import ast
import io
import sys
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"lines": 7000, "code_lines": 4700, "file_lines": 350, "function_lines": 60}


def project_files(root: Path = REPO) -> list[Path]:
    skip = {"tests", "bench"}
    return sorted(p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & skip)
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def code_lines(source: str) -> int:
    """Lines holding a token other than a comment, a docstring or layout."""
    tree = ast.parse(source)
    doc = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            doc.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in doc)
    return len(lines)


def functions(path: Path, tree: ast.AST) -> list[tuple[int, str]]:
    return [(node.end_lineno - node.lineno + 1, f"{path.relative_to(REPO)}:{node.name}")
            for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, tree: ast.AST, known: set[str]) -> set[str]:
    """The project modules `path` imports at module level (function-level imports are deferred on purpose)."""
    pkg = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found = set()
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import mod` needs pkg.mod (pkg is initialising already); `from mod import name`, mod
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        found.update(n for n in names if n in known)
    return found - {module_name(path)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def measure(root: Path = REPO) -> dict:
    files = project_files(root)
    sources = {p: p.read_text(encoding="utf-8") for p in files}
    trees = {p: ast.parse(s) for p, s in sources.items()}
    known = {module_name(p) for p in files}
    graph = {}
    for p, t in trees.items():
        graph.setdefault(module_name(p), set()).update(imports(p, t, known))
    return {
        "files": len(files),
        "lines": sum(s.count("\n") for s in sources.values()),
        "code_lines": sum(code_lines(s) for s in sources.values()),
        "longest_files": sorted(((s.count("\n"), str(p.relative_to(root))) for p, s in sources.items()),
                                reverse=True),
        "longest_functions": sorted((f for p, t in trees.items() for f in functions(p, t)), reverse=True),
        "cycles": cycles(graph),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed (default: only print)")
    args = p.parse_args(argv)
    m = measure()
    over_files = [f for f in m["longest_files"] if f[0] > TARGETS["file_lines"]]
    over_funcs = [f for f in m["longest_functions"] if f[0] > TARGETS["function_lines"]]
    rows = [
        ("python lines (no tests/, bench/)", m["lines"], f"<= {TARGETS['lines']}", m["lines"] <= TARGETS["lines"]),
        ("code lines (no blank/comment/docstring)", m["code_lines"], f"<= {TARGETS['code_lines']}",
         m["code_lines"] <= TARGETS["code_lines"]),
        (f"files over {TARGETS['file_lines']} lines", len(over_files), "0", not over_files),
        (f"functions over {TARGETS['function_lines']} lines", len(over_funcs), "0", not over_funcs),
        ("import cycles", len(m["cycles"]), "0", not m["cycles"]),
    ]
    print(f"{m['files']} files")
    print(f"| {'measure':<42} | {'value':>6} | {'target':>7} | ok |")
    for name, value, target, ok in rows:
        print(f"| {name:<42} | {value:>6} | {target:>7} | {'yes' if ok else 'NO'} |")
    for n, name in over_files:
        print(f"  file {name}: {n} lines")
    for n, name in over_funcs:
        print(f"  function {name}: {n} lines")
    for c in m["cycles"]:
        print("  cycle: " + " <-> ".join(c))
    if args.check and not all(ok for *_, ok in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
