"""The one map from block kind and mode to class.

A block kind is a name (``"acb"``, ``"dbb"``, ``"repvgg"``, ...) with one class per mode: ``"exact"`` (the
paper's block, a BatchNorm on every branch) and, where its branches are linear, ``"fast"`` (one conv per
forward, the BatchNorm after the conv left in place).  The built-in kinds are listed once, in
``constants.BUILTIN_KINDS``, and imported on first use; everything else in the package reaches block classes
through ``block_class`` and ``is_block``.
"""

from __future__ import annotations

import importlib

from torch import nn

from ..constants import BLOCK_MODES, BUILTIN_KINDS
from ..errors import ACNetError
from .base import ReparamBlock

_CLASSES: dict[tuple[str, str], type[ReparamBlock]] = {}
_loaded = False


def register_block(
    kind: str | type[ReparamBlock] | None = None, cls: type[ReparamBlock] | None = None, *, mode: str | None = None
) -> None:
    """Make a block class the block of its kind in its mode: ``register_block(cls)`` reads ``cls.kind`` and
    ``cls.mode``.

    The 0.2 form ``register_block(kind, cls, mode=None)`` still works.  A kind (or mode) the class sets itself must
    agree with the one given; one it only inherits, or lacks, is set on the class, so that its blocks name the kind
    and mode they are registered under.  A class registered for a kind and mode already taken (a built-in one
    included) replaces the class registered before.
    """
    if isinstance(kind, type) and cls is None:
        kind, cls = None, kind
    if not (isinstance(cls, type) and issubclass(cls, ReparamBlock)):
        called = f"{kind!r}, ..." if kind is not None else getattr(cls, "__name__", repr(cls))
        raise ACNetError(f"register_block({called}) needs a subclass of acnet_convert.ReparamBlock")
    kind, mode = _agreed(cls, "kind", kind), _agreed(cls, "mode", mode)
    if kind is None:
        raise ACNetError(f"register_block({cls.__name__}) needs {cls.__name__}.kind: set it on the class")
    if mode not in BLOCK_MODES:
        raise ACNetError(f"unknown mode {mode!r} for block kind {kind!r}: use one of {', '.join(BLOCK_MODES)}")
    if not isinstance(kind, str) or not kind.replace("_", "").isalnum():
        raise ACNetError(f"block kind {kind!r} is not a simple name: use letters, digits and underscores")
    cls.kind, cls.mode = kind, mode
    _load_builtins()
    _CLASSES[(kind, mode)] = cls


def block_class(kind: str, mode: str = "exact") -> type[ReparamBlock]:
    """The class registered for ``kind`` in ``mode``; ``ACNetError`` naming the registered ones otherwise."""
    _load_builtins()
    if mode not in BLOCK_MODES:
        raise ACNetError(f"unknown mode {mode!r}: use one of {', '.join(BLOCK_MODES)}")
    cls = _CLASSES.get((kind, mode))
    if cls is None:
        if kind in kinds():
            modes = [m for k, m in _CLASSES if k == kind]
            raise ACNetError(f"block kind {kind!r} has no {mode} mode: use mode={modes[0]!r}")
        raise ACNetError(f"unknown block kind {kind!r}: use one of {', '.join(kinds())}")
    return cls


def kinds() -> tuple[str, ...]:
    """The registered block kinds: the built-in ones in ``constants.BUILTIN_KINDS`` order, then the others in
    registration order."""
    _load_builtins()
    return tuple(dict.fromkeys(kind for kind, _ in _CLASSES))


def is_block(module: object) -> bool:
    """Whether ``module`` is a re-parameterisable block (of any kind)."""
    return isinstance(module, ReparamBlock)


def has_blocks(model: nn.Module) -> bool:
    """Whether ``model`` contains a block (or is one)."""
    return any(is_block(m) for m in model.modules())


def _agreed(cls: type[ReparamBlock], name: str, given: str | None) -> str | None:
    """``given`` if the class's own ``name`` attribute is unset or the same, else ``ACNetError``; the class's
    (own or inherited) attribute when nothing is given."""
    own = cls.__dict__.get(name)
    if given is None:
        return getattr(cls, name, None)
    if own is not None and own != given:
        raise ACNetError(
            f"register_block got {name} {given!r} for {cls.__name__}, whose {name} is {own!r}: "
            f"call register_block({cls.__name__}), or set {cls.__name__}.{name} = {given!r}"
        )
    return given


def _load_builtins() -> None:
    """Register the classes of ``constants.BUILTIN_KINDS`` ("module:Class" under this package), importing their
    modules."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for kind, classes in BUILTIN_KINDS.items():
        for mode, where in classes.items():
            module, name = where.split(":")
            cls = getattr(importlib.import_module(f"{__package__}.{module}"), name)
            if (cls.kind, cls.mode) != (kind, mode):
                raise ACNetError(f"constants.BUILTIN_KINDS lists {where} as {kind}/{mode}, the class says "
                                 f"{cls.kind}/{cls.mode}: make them agree")  # fmt: skip
            _CLASSES[(kind, mode)] = cls
