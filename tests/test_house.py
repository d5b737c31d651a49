"""The house rules a reader relies on: imports run one way, and examples use only the packages' small APIs.

Imports run one way: `quant/` imports no other package of ours; `model/` uses
`quant/` only (to quantize while loading); `lora/` uses `quant/` (it wraps Linear4bit) and `model/`
(export reads checkpoints); `train/` uses the three below it. So the packages stand in layers,
quant < model < lora < train, and an import only ever points to a lower layer: no circle can form.
"""
import ast
import importlib
import os

from conftest import ROOT

LAYERS = {"quant": 0, "model": 1, "lora": 2, "train": 3}
APIS = (*LAYERS, "pricer")   # the packages whose `__init__` is the API an example may use


def python_files(folder: str):
    for root, _, names in os.walk(os.path.join(ROOT, folder)):
        yield from (os.path.join(root, n) for n in sorted(names) if n.endswith(".py"))


def imports(path: str):
    """(line, module, names) for every absolute import in a file, those inside functions included."""
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, [alias.name for alias in node.names]


def test_packages_import_only_downward():
    wrong = []
    for package, layer in LAYERS.items():
        for path in python_files(package):
            for line, module, _ in imports(path):
                top = module.split(".")[0]
                if top in LAYERS and top != package and LAYERS[top] >= layer:
                    wrong.append(f"{os.path.relpath(path, ROOT)}:{line} imports {module} ({package} -> {top})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_examples_use_only_the_packages_apis():
    """`from model import X` with X in model.__all__; never `model.load`, `import lora.fused`, a private name."""
    exported = {name: set(importlib.import_module(name).__all__) for name in APIS if name != "pricer"}
    import sys

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    exported["pricer"] = set(importlib.import_module("pricer").__all__)
    wrong = []
    for path in python_files("examples"):
        inside_pricer = os.path.dirname(path).endswith("pricer")
        for line, module, names in imports(path):
            top = module.split(".")[0]
            if top not in APIS or (inside_pricer and top == "pricer"):
                continue
            where = f"{os.path.relpath(path, ROOT)}:{line}"
            if module != top or names is None:
                wrong.append(f"{where}: {'import ' if names is None else 'from '}{module}: use `from {top} import ...`")
            else:
                wrong += [f"{where}: {name} is not in {top}.__all__" for name in names if name not in exported[top]]
    assert not wrong, "\n".join(wrong)


def test_every_mutant_still_finds_the_code_it_breaks():
    """`make mutants` replaces one snippet of a file; a snippet that moved or changed would leave its mutant
    unrun (mutants.py stops at it), so each must stand exactly once in its file as the code is now."""
    from mutant_list import MUTANTS

    stale = []
    for m in MUTANTS:
        with open(os.path.join(ROOT, m.file), encoding="utf-8") as f:
            n = f.read().count(m.old)
        if n != 1:
            stale.append(f"{m.name!r}: {m.file} holds its snippet {n} times")
    assert not stale, "\n".join(stale)
