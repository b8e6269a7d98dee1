#!/usr/bin/env python
"""Write a jsonl corpus of real English text from the docstrings of the local Python stdlib.

No download and no imports of the modules: the stdlib sources are parsed with ``ast`` in sorted
path order, so the output is deterministic for a given Python installation. One document per
module: its docstring, then the docstrings of its classes and functions, each docstring kept once
across the whole corpus.

Example::

    python tools/make_demo_corpus.py --output data/demo.jsonl --min-chars 1000000
"""
import argparse
import ast
import inspect
import json
import os
import sys
import sysconfig
import warnings
from typing import Iterator, List, Set

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__",
             "lib2to3", "turtledemo", "ensurepip", "venv", "tkinter"}
MIN_DOCSTRING_CHARS = 40


def stdlib_sources(root: str) -> Iterator[str]:
    """``.py`` files of the stdlib, sorted, tests and bundled packages excluded."""
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(directory, name)


def docstrings(path: str) -> List[str]:
    """The module, class and function docstrings of a source file, in source order."""
    try:
        with open(path, "rb") as f:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(f.read())
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    found = []
    for node in nodes:
        text = ast.get_docstring(node, clean=False)
        if text:
            found.append(inspect.cleandoc(text))
    return found


def build_corpus(root: str) -> Iterator[str]:
    """One text per module, duplicate docstrings removed."""
    seen: Set[str] = set()
    for path in stdlib_sources(root):
        kept = []
        for text in docstrings(path):
            if len(text) >= MIN_DOCSTRING_CHARS and text not in seen:
                seen.add(text)
                kept.append(text)
        if kept:
            yield "\n\n".join(kept)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="jsonl file to write")
    parser.add_argument("--min-chars", type=int, default=1_000_000,
                        help="fail if the corpus has fewer characters")
    parser.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    args = parser.parse_args(argv)
    root = sysconfig.get_paths()["stdlib"]
    chars = docs = 0
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for text in build_corpus(root):
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            chars += len(text)
            docs += 1
            if args.max_docs is not None and docs >= args.max_docs:
                break
    if chars < args.min_chars and args.max_docs is None:
        os.remove(tmp)
        print(f"error: the stdlib under {root} gives only {chars} characters "
              f"(--min-chars {args.min_chars})", file=sys.stderr)
        return 1
    os.replace(tmp, args.output)
    print(f"wrote {args.output}: {docs} documents, {chars} characters", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
