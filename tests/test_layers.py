"""The folders are the architecture: every import inside ``deq_fast`` points down the layer stack
(docs/architecture.md#import-rule). Read from the source (module-level and function-level imports),
so an upward arrow fails here before it reaches a reviewer."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# bottom to top; a module may import its own layer and the layers below it
LAYERS = [
    ("deq_fast.kernels", "deq_fast.profiling", "deq_fast._C"),
    ("deq_fast.ops",),
    ("deq_fast.solvers",),
    ("deq_fast.compat",),
    ("deq_fast.implicit",),
    ("deq_fast.nn",),
    ("deq_fast.torchdeq", "deq_fast.models", "deq_fast.data"),
    ("deq_fast.train",),
    ("deq_fast.selftest", "deq_fast"),            # the tools and the lazy top-level names
]


def layer_of(module: str) -> int:
    best, depth = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > depth:
                best, depth = i, len(p)
    assert best is not None, module
    return best


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["deq_fast"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            found |= {f"{base}.{a.name}" if base == "deq_fast" else base for a in node.names}
    return {m for m in found if m == "deq_fast" or m.startswith("deq_fast.")}


def sources():
    yield from (ROOT / "deq_fast").rglob("*.py")
    yield from (ROOT / "kernels").rglob("*.py")


def test_no_import_points_up_the_layers():
    upward = []
    for path in sources():
        module = module_name(path)
        own = layer_of(module)
        for target in imports_of(path, module):
            if layer_of(target) > own:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports pointing up the layer stack:\n" + "\n".join(sorted(upward))


def test_kernels_never_import_the_rest_of_the_package():
    for path in (ROOT / "kernels").rglob("*.py"):
        outside = {m for m in imports_of(path, module_name(path))
                   if not m.startswith("deq_fast.kernels")}
        assert not outside, (path, outside)


def test_models_and_data_do_not_import_each_other():
    for path in sources():
        module = module_name(path)
        for target in imports_of(path, module):
            for a, b in (("deq_fast.models", "deq_fast.data"), ("deq_fast.data", "deq_fast.models")):
                assert not (module.startswith(a) and target.startswith(b)), f"{module} -> {target}"


def test_the_layer_table_knows_every_package():
    for path in sources():
        layer_of(module_name(path))          # raises for a module outside the table
