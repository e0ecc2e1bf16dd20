"""The package's shape, read from its source: imports point one way (no circle, counting
imports placed inside functions too), no module takes another's private name, and the
loop's step fits on one screen."""

import ast
from pathlib import Path

import anychip

ROOT = Path(anychip.__file__).parent


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return out


def imports(name: str, tree: ast.Module, known: set[str]):
    """(imported module, names taken from it, line) for every anychip import anywhere in the file."""
    package = name if (ROOT.parent / name.replace(".", "/") / "__init__.py").exists() else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("anychip"):
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("anychip"):
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            yield target, [n for n in names if f"{target}.{n}" not in known], node.lineno
            for sub in submodules:
                yield sub, [], node.lineno


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    edges: dict[str, set[str]] = {m: set() for m in trees}
    for name, tree in trees.items():
        for target, _, _ in imports(name, tree, known):
            parts = target.split(".")
            for i in range(2, len(parts) + 1):  # importing a.b.c runs a.b's __init__ too
                dep = ".".join(parts[:i])
                if dep in known and dep != name and not name.startswith(dep + "."):
                    edges[name].add(dep)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.remove(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_even_through_imports_inside_functions():
    assert cycles(graph()) == []


def test_no_module_imports_another_modules_private_name():
    trees = modules()
    bad = [
        f"{name}:{line} takes {n} from {target}"
        for name, tree in trees.items()
        for target, names, line in imports(name, tree, set(trees))
        for n in names
        if n.startswith("_") and target != name
    ]
    assert bad == []


def test_the_training_step_fits_on_one_screen():
    tree = modules()["anychip.train.loop"]
    step = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train_step")
    assert step.end_lineno - step.lineno + 1 <= 50
