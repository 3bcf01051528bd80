"""The layers of docs/architecture.md, read off the code: every import of every module of the package
(imports inside functions included) goes down the layers, and no set of modules imports itself round."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# elastic_decode.kernels and elastic_decode.train live in folders of their own (setup.py's package_dir).
FOLDERS = {"elastic_decode": ROOT / "elastic_decode", "elastic_decode.kernels": ROOT / "kernels",
           "elastic_decode.train": ROOT / "train"}
# Lower layers may not import higher ones (a module may import its own layer and any lower one).
LAYERS = [
    ("kernels", ["elastic_decode.kernels", "elastic_decode._C"]),
    ("vocabulary", ["elastic_decode.errors", "elastic_decode.sampling_params", "elastic_decode.config",
                    "elastic_decode.outputs", "elastic_decode.utils"]),
    ("distributed", ["elastic_decode.distributed"]),
    ("core", ["elastic_decode.core"]),
    ("models", ["elastic_decode.models"]),
    ("worker", ["elastic_decode.worker"]),
    ("engine", ["elastic_decode.engine"]),
    ("api", ["elastic_decode.llm", "elastic_decode.client"]),
    ("front doors", ["elastic_decode.cli", "elastic_decode.generate", "elastic_decode.eval", "elastic_decode.serve",
                     "elastic_decode.integrations", "elastic_decode._tp_worker", "elastic_decode._dp_replica",
                     "elastic_decode.train", "elastic_decode"]),
]


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "elastic_decode" and parts[0] in ("kernels", "train"):
                continue
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def _import_nodes(tree: ast.AST):
    """Every import statement, in functions too, but not under `if TYPE_CHECKING:` (never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _import_nodes(node)


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in _import_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            # `from pkg import module` imports the module; `from pkg import name` the package's __init__
            targets = submodules if len(submodules) == len(node.names) else [base, *submodules]
        for target in targets:
            while target and target not in known:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def layer(name: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{name} is in no layer"
    return best[0]


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found) | {"elastic_decode._C"}
    return {name: imports(name, path, known) for name, path in found.items()}


def test_every_import_goes_down_the_layers():
    upward = [(m, t, LAYERS[layer(m)][0], LAYERS[layer(t)][0]) for m, targets in graph().items() for t in targets
              if layer(t) > layer(m)]
    assert not upward, "\n".join(f"{m} ({lm}) imports {t} ({lt})" for m, t, lm, lt in upward)


def test_no_module_imports_itself_round():
    edges = graph()
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_layer_check_sees_imports_inside_functions():
    """The check itself: the old parallel.py imported the engine and the LLM inside its process mains."""
    source = "def main():\n    from ..engine import LLMEngine\n    from elastic_decode.llm import LLM\n"
    path = ROOT / "tests" / "_layer_probe.py"
    path.write_text(source)
    try:
        known = set(modules()) | {"elastic_decode.distributed.probe"}
        found = imports("elastic_decode.distributed.probe", path, known)
    finally:
        path.unlink()
    assert found == {"elastic_decode.engine", "elastic_decode.llm"}
    assert all(layer(t) > layer("elastic_decode.distributed.probe") for t in found)
