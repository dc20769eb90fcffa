"""The package's layering, read from the source: imports go one way,
``train -> loss / memory -> ops -> (kernels | _C | reference)``, no module imports another's
private names, and each op of the backend registry is found by its name in every layer."""

from __future__ import annotations

import ast
import os

import pytest

from icakd_fast import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: layers, lowest first: a module may import its own layer and the ones below
LAYERS = (
    # kernels, the compiled library's loader, the reference, shared leaves
    ("icakd_fast.kernels", "icakd_fast.reference", "icakd_fast._ext", "icakd_fast._validate",
     "icakd_fast._inter_form"),
    # the backends' registry and the autograd ops over them
    ("icakd_fast._backend", "icakd_fast.ops"),
    # the public functional API and the pieces the loss is built from
    ("icakd_fast.functional", "icakd_fast._inter_gram", "icakd_fast.hooks"),
    ("icakd_fast.memory", "icakd_fast.loss", "icakd_fast.cskd", "icakd_fast.methods"),
    ("icakd_fast.train", "icakd_fast.study", "icakd_fast.info", "icakd_fast"),
)


def _sources():
    """(module name, path) of every Python file of the package (kernels/ is icakd_fast.kernels)."""
    out = []
    for top, name in (("icakd_fast", "icakd_fast"), ("kernels", "icakd_fast.kernels")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in sorted(files):
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, top))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out.append((".".join([name] + rel), os.path.join(dirpath, f)))
    return out


SOURCES = _sources()


def _is_package(path):
    return os.path.basename(path) == "__init__.py"


def _imports(module, path):
    """(imported module, imported names, line) of every import statement, relative ones resolved."""
    tree = ast.parse(open(path).read(), path)
    package = module if _is_package(path) else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, tuple(a.name for a in node.names), node.lineno))
    return [(t, names, line) for t, names, line in out if t == "icakd_fast" or t.startswith("icakd_fast.")]


def _layer(module):
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def _submodule_names(target):
    """The names that are modules of ``target`` (``from package import module``)."""
    return {m.rpartition(".")[2] for m, _ in SOURCES if m.rpartition(".")[0] == target}


def test_every_module_has_a_layer():
    assert [m for m, _ in SOURCES if _layer(m) is None] == []


def test_imports_point_down_the_layers():
    wrong = []
    for module, path in SOURCES:
        mine = _layer(module)
        for target, names, line in _imports(module, path):
            # ``from package import module`` imports the module, not the package
            subs = _submodule_names(target)
            targets = [f"{target}.{n}" for n in names if n in subs] or [target]
            for t in targets:
                if t == "icakd_fast" and module != "icakd_fast":
                    continue  # only `from icakd_fast import __version__`-style reads
                theirs = _layer(t)
                if theirs is not None and theirs > mine:
                    wrong.append(f"{path}:{line}: {module} (layer {mine}) imports {t} (layer {theirs})")
    assert wrong == []


def _top_level_deps(module, path):
    """The package modules that importing ``module`` imports at once (statements at the top level
    of the file, or in a top-level if/try; function bodies run later)."""
    tree = ast.parse(open(path).read(), path)
    lines, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            lines.add(node.lineno)
        elif isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "handlers", []) + getattr(node, "finalbody", [])
        elif isinstance(node, ast.ExceptHandler):
            todo += node.body
    known = dict(SOURCES)
    deps = set()
    for target, names, line in _imports(module, path):
        if line not in lines:
            continue
        subs = _submodule_names(target)
        deps.update(f"{target}.{n}" for n in names if n in subs)
        deps.add(target)
    return {d for d in deps if d in known and d != module}


def test_no_import_cycles_at_module_level():
    graph = {m: _top_level_deps(m, p) for m, p in SOURCES}

    def ancestors(m):  # a module's own packages are already being imported when it runs
        parts = m.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    cycles, done = [], set()

    def visit(m, stack):
        if m in stack:
            cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            return
        if m in done:
            return
        for d in sorted(graph.get(m, ())):
            if d not in ancestors(m):
                visit(d, stack + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])
    assert cycles == []


def test_backends_do_not_import_the_registry():
    """The registry (``_backend``) loads each backend's module and asks it what it supports; a
    backend that imported the registry back would make the two a circle."""
    backends = [(m, p) for m, p in SOURCES if m in ("icakd_fast.ops._cpp_impl", "icakd_fast.ops._triton_impl")]
    assert len(backends) == 2
    wrong = [f"{m} imports {t}" for m, p in backends for t, _, _ in _imports(m, p) if t == "icakd_fast._backend"]
    assert wrong == []


def test_no_module_imports_another_modules_private_names():
    """Modules talk through public names: ``from x import _name`` only within one package's
    own tree of private helpers is not allowed either (private modules themselves may be
    imported by name)."""
    wrong = []
    for module, path in SOURCES:
        for target, names, line in _imports(module, path):
            subs = _submodule_names(target)
            for n in names:
                if n.startswith("_") and not n.startswith("__") and n not in subs:
                    wrong.append(f"{path}:{line}: {module} imports {target}.{n}")
    assert wrong == []


def test_the_replaced_private_hooks_are_gone():
    """The bank's update hook, resync schedule and stamp, and the ops the loss calls, are public:
    no module reaches for the private names they replaced."""
    gone = ("._enqueue(", "._next_resync_classes(", "._stamp.value", "IF._intra_class_loss", "._class_centroids(",
            "._inter_class_loss(")
    found = []
    for module, path in SOURCES:
        text = open(path).read()
        found += [f"{path}: {g}" for g in gone if g in text and not (module == "icakd_fast.memory" and g == "._stamp.value")]
    assert found == []


OP_FILES = ("icakd_fast/ops/{op}.py", "icakd_fast/reference/{op}.py", "kernels/{op}.py", "csrc/{op}.cpp",
            "csrc/cpu/{op}_cpu.cpp", "csrc/cuda/{op}_cuda.cu")
#: the op files of the layout, and the registry's op groups each one holds
OP_SET = {
    "cam": ("cam", "cam_loss", "class_activation", "grad_cam_weights"),
    "bank": ("class_bank", "fifo_bank", "bank_update"),
    "structure": ("centroids", "intra", "inter", "structure"),
}


@pytest.mark.parametrize("op", sorted(OP_SET))
@pytest.mark.parametrize("pattern", OP_FILES)
def test_one_op_one_place(op, pattern):
    """An op's public function, autograd, reference, Triton kernels, schema, CPU and CUDA kernels
    are found by the op's name, in the same place for every op."""
    assert os.path.exists(os.path.join(ROOT, pattern.format(op=op))), pattern.format(op=op)


def test_the_op_set_covers_the_registry():
    assert sorted(g for groups in OP_SET.values() for g in groups) == sorted(_backend.OPS)
