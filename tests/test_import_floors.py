"""Dependencies point one way (docs/architecture.md): each part of the package imports only the
parts on the floors below its own, at module level or inside a function alike. Read from the
source with ``ast``, so the test runs in well under a second and imports nothing it checks.
"""
import ast
import os
import subprocess
import sys
import textwrap

from train_utils import PYTHON, ROOT

PACKAGE = "megatron_normformer"

FLOORS = (
    ("runtime",),  # signals, start-up phases, /proc, launcher environment: no torch at import
    ("config",),
    ("deepspeed_repairs",),  # beside config, which is all it imports
    ("parallel",),
    ("model",),
    ("data",),
    ("interop",),  # fairseq / transformers checkpoints as models, with our tokenizers
    ("checkpoint",),  # inference.py loads every format, interop's included
    ("arguments", "memory", "inference", "testing"),
    ("training",),
    ("analysis",),
)
"""Bottom first. A part may import its own modules and every part on a lower floor; a part on
the same floor or above is an import that runs up the floors."""

EXCEPTIONS = {
    ("runtime.launch_env", "config.base"):
        "a malformed launcher environment is a ConfigError, which the entry points print as one "
        "line; config/base.py imports nothing of the package",
}
"""Imports allowed against FLOORS, (importing module, imported module) without the package
prefix, each with its reason. The test fails on any other, and on an entry here no longer
imported, so the list only shrinks."""

FLOOR_OF = {part: floor for floor, parts in enumerate(FLOORS) for part in parts}


def _modules():
    """(dotted name without the package prefix, path) of every module of the package."""
    top = os.path.join(ROOT, PACKAGE)
    for folder, _, files in os.walk(top):
        for name in sorted(files):
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), top)[:-3].replace(os.sep, ".")
                module = rel.removesuffix(".__init__").removesuffix("__init__")
                yield module, os.path.join(folder, name)


def _imports(path):
    """The package's modules imported anywhere in ``path`` (prefix dropped), with line numbers."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from megatron_normformer import data``: the part is the imported name
            names = ([f"{PACKAGE}.{alias.name}" for alias in node.names]
                     if node.module == PACKAGE else [node.module])
        else:
            continue
        for name in names:
            if name.startswith(PACKAGE + "."):
                yield name[len(PACKAGE) + 1:], node.lineno


def _upward_imports():
    found = {}
    for module, path in _modules():
        if not module:
            continue
        part = module.split(".")[0]
        for target, line in _imports(path):
            other = target.split(".")[0]
            if other != part and FLOOR_OF[other] >= FLOOR_OF[part]:
                found[(module, target)] = f"{os.path.relpath(path, ROOT)}:{line}"
    return found


def test_every_part_has_a_floor():
    parts = {module.split(".")[0] for module, _ in _modules() if module}
    assert parts == set(FLOOR_OF), "a new part of the package needs its floor in FLOORS"


def test_no_import_runs_up_the_floors():
    found = _upward_imports()
    new = {pair: where for pair, where in found.items() if pair not in EXCEPTIONS}
    assert new == {}, "imports against docs/architecture.md's floors (importer, imported): where"
    assert set(EXCEPTIONS) <= set(found), "an exception no longer needed: remove it from EXCEPTIONS"


def test_an_upward_import_is_found(tmp_path):
    """The check itself: a data module importing training is reported, with its line."""
    path = tmp_path / "x.py"
    path.write_text("import os\n\ndef f():\n    from megatron_normformer.training import loop\n")
    assert list(_imports(str(path))) == [("training", 4)]
    assert FLOOR_OF["training"] > FLOOR_OF["data"]


def test_entry_scripts_install_the_handlers_before_torch_loads():
    """What pretrain_gpt.py and pretrain_bert.py run before ``install`` loads neither torch nor
    DeepSpeed (nor numpy)."""
    for script in ("pretrain_gpt.py", "pretrain_bert.py"):
        with open(os.path.join(ROOT, script)) as f:
            main = f.read().split('if __name__ == "__main__":\n', 1)[1]
        first = textwrap.dedent(main[:main.index("\n", main.index(".install("))])
        code = (first + "\nimport sys\n"
                "print(sorted({'torch', 'deepspeed', 'numpy'} & set(sys.modules)))\n")
        out = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             check=True)
        assert out.stdout == "[]\n", (script, out.stdout)


if __name__ == "__main__":
    for pair, where in sorted(_upward_imports().items()):
        print(where, *pair, "(exception)" if pair in EXCEPTIONS else "")
    sys.exit(0)
