"""Proof from the source code that untraceable code uses a conv only by calling it (so a block may replace it)."""

from __future__ import annotations

import ast
import inspect
import textwrap

from torch import nn

from .reasons import Reason

_HINT = "pass example_inputs to acify to analyse it by running the model"


def not_provably_called_only(model: nn.Module, name: str) -> Reason | None:
    """None when the untraceable code around conv ``name`` provably uses it only by calling it, else why not.

    Reads the source of every enclosing module: the conv's attribute may appear (outside
    ``__init__``) only as ``obj.attr(...)``.
    """
    parts = name.split(".")
    parent = model.get_submodule(".".join(parts[:-1]))
    if isinstance(parent, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        text = f"in a {type(parent).__name__} used by code torch.fx cannot trace: {_HINT}"
        return Reason("untraceable-container", text)
    for depth in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:depth]))
        try:
            uses = _attribute_uses(type(owner), parts[depth:])
        except (OSError, TypeError, SyntaxError):
            text = f"source of {type(owner).__name__} unavailable, torch.fx cannot trace it: {_HINT}"
            return Reason("untraceable-no-source", text)
        if not all(uses):
            text = f"{type(owner).__name__} uses .{parts[-1]} other than by calling it: {_HINT}"
            return Reason("untraceable-attribute-use", text)
    return None


def _attribute_uses(cls: type, path: list[str]) -> list[bool]:
    """For each read in the methods of ``cls`` (and its non-torch bases) that can be the submodule at ``path`` (relative
    to an instance of ``cls``): is it a direct call?"""
    attr = path[-1]
    found: list[bool] = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.nn") or klass is object:
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            method = _enclosing_function(node, parents)
            if method == "__init__":
                continue
            if isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.ctx, ast.Load):
                if not _may_be(node, path):
                    continue
                call = parents.get(node)
                found.append(isinstance(call, ast.Call) and call.func is node)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "setattr", "delattr"):
                found.append(not any(isinstance(a, ast.Constant) and a.value == attr for a in node.args))
    return found


def _may_be(node: ast.Attribute, path: list[str]) -> bool:
    """Whether ``a.b.c`` can be the submodule at ``path``: looked up on ``self``, the chain is the path; on
    anything else, the chain is the end of the path."""
    chain, base = [], node
    while isinstance(base, ast.Attribute):
        chain.insert(0, base.attr)
        base = base.value
    if isinstance(base, ast.Name) and base.id == "self":
        return chain == path
    return len(chain) <= len(path) and path[len(path) - len(chain) :] == chain


def _enclosing_function(node: ast.AST, parents: dict) -> str | None:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node.name
    return None
