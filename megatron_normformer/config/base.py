"""What every configuration module shares: the error users see, and flag help from field docstrings."""
from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Dict


class ConfigError(ValueError):
    """A configuration a user asked for that cannot work; the message names the flag."""


_FIELD_DOCS: Dict[type, Dict[str, str]] = {}


def field_help(cls, name: str) -> str:
    """The docstring under a dataclass field, used as argparse help."""
    if cls not in _FIELD_DOCS:
        _FIELD_DOCS[cls] = _collect_field_docs(cls)
    return _FIELD_DOCS[cls].get(name, "")


def _collect_field_docs(cls) -> dict:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
