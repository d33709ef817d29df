"""Checkpoint files: safe reading, atomic writing, metadata (with the recorded plan), strict loading."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import secrets
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from .. import __version__
from ..analysis import Plan
from ..constants import FILE_FORMATS
from ..errors import ACNetError, first_line

WRAPPERS = ("state_dict", "model")  # {"state_dict": ...} / {"model": ...} checkpoints are unwrapped
PREFIXES = ("module.", "_orig_mod.")  # added by DistributedDataParallel / torch.compile; stripped when on every key
SUFFIXES = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch"}
_META = "acnet."
_PT_METADATA = "acnet"  # the entry of a .pt file's top-level dict that holds the metadata
_LISTED = 3  # keys named per problem in a mismatch message


@dataclass
class Checkpoint:
    """A state_dict read from a file, with the acnet metadata it carries (empty when none)."""

    state_dict: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    entries: tuple[str, ...] = ()  # the top-level entries of the file that hold a state_dict (e.g. an EMA copy)
    key: str | None = None  # the entry the state_dict was read from; None for a bare state_dict

    def get(self, key: str, default: object = None) -> object:
        """One metadata entry (``format``, ``plan``, ``model``, ``spec``, ``args``, ``options``, ``input_shape``,
        ``version``)."""
        text = self.metadata.get(_META + key)
        try:
            return default if text is None else json.loads(text)
        except json.JSONDecodeError as exc:
            raise ACNetError(f"the {key!r} metadata of this checkpoint is damaged ({exc}): write it again") from exc

    @property
    def plan(self) -> Plan | None:
        """The plan recorded in the file, or None (files written before plans were recorded, foreign files)."""
        recorded = self.get("plan")
        return None if recorded is None else Plan.from_dict(recorded)


def metadata(fmt: str, plan: Plan | None = None, **entries: object) -> dict[str, str]:
    """The metadata written with a checkpoint: its format, the plan that defines its structure, and ``entries``
    (``model``: the class; from the command line also ``spec``, ``args``, ``options``, ``input_shape``)."""
    if fmt not in FILE_FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    recorded = {"format": fmt, **({"plan": plan.to_dict()} if plan is not None else {}), **entries}
    recorded["version"] = __version__
    return {_META + key: json.dumps(_jsonable(value)) for key, value in recorded.items() if value is not None}


def _jsonable(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def read(path: str | Path, key: str | None = None) -> Checkpoint:
    """Read a safetensors or PyTorch checkpoint without running any code stored in it.

    ``key`` names the entry of a PyTorch checkpoint that holds the state_dict to read (e.g. ``"state_dict_ema"``);
    without it, a ``"state_dict"`` or ``"model"`` entry is unwrapped, and a file holding several others is refused.
    """
    path = Path(path)
    if not path.exists():
        raise ACNetError(f"checkpoint {path} not found: check the path")
    if not path.is_file():
        raise ACNetError(f"checkpoint {path} is not a file: give the path of a .safetensors or .pt file")
    if path.suffix == ".safetensors" or _has_safetensors_header(path):
        if key is not None:
            raise ACNetError(f"{path} is a safetensors file, which holds one state_dict: drop the key {key!r}")
        return _read_safetensors(path)
    return _read_torch(path, key)


def _has_safetensors_header(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < path.stat().st_size


def _read_safetensors(path: Path) -> Checkpoint:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types, and OSError on short reads
        raise ACNetError(
            f"{path} is not a valid safetensors file ({first_line(exc)}): it may be truncated; write it again"
        ) from exc
    return Checkpoint(_strip_prefixes(state), {k: v for k, v in metadata.items() if k.startswith(_META)})


def _read_torch(path: Path, key: str | None = None) -> Checkpoint:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not re.search(r"GLOBAL|reduce|unsupported class", str(exc), re.IGNORECASE):
            found = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            reason = found.group(1) if found else first_line(exc)
            raise _unreadable(path, reason) from exc
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (it needs {found.group(1)})" if found else ""
        raise ACNetError(
            f"{path} stores Python objects{what} that load only by running code from the file, which is refused "
            f"for safety: save the weights alone, e.g. torch.save(model.state_dict(), path), or use safetensors"
        ) from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, ... on truncated or foreign files
        raise _unreadable(path, first_line(exc)) from exc
    recorded = obj.get(_PT_METADATA) if isinstance(obj, Mapping) else None
    if not isinstance(recorded, Mapping) or not all(isinstance(v, str) for v in recorded.values()):
        recorded = {}
    entries = _entries(obj)
    key = key if key is not None else next((k for k in WRAPPERS if k in entries), None)
    metadata = {k: v for k, v in recorded.items() if k.startswith(_META)}
    return Checkpoint(_strip_prefixes(_unwrap(obj, path, key)), metadata, tuple(entries), key)


def _unreadable(path: Path, reason: str) -> ACNetError:
    return ACNetError(
        f"{path} is not a readable PyTorch or safetensors checkpoint ({reason}): "
        "it may be truncated, or not a checkpoint at all"
    )


def _entries(obj: object) -> list[str]:
    """The top-level entries of a loaded object that hold a state_dict (a non-empty mapping of tensors)."""
    if not isinstance(obj, Mapping):
        return []
    return [str(key) for key, value in obj.items() if _is_state_dict(value)]


def _is_state_dict(value: object) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(t, Tensor) for t in value.values())


def _unwrap(obj: object, path: Path, key: str | None = None) -> dict[str, Tensor]:
    """The state_dict inside a loaded object: its entry ``key``, its "state_dict"/"model" entry, or itself."""
    entries = _entries(obj)
    if key is not None:
        if key not in entries:
            held = f"its state_dict entries are {', '.join(entries)}" if entries else "it holds no such entries"
            raise ACNetError(f"{path} has no state_dict under {key!r}: {held}")
        obj = obj[key]
    elif isinstance(obj, Mapping):
        for wrapper in WRAPPERS:
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
        else:
            if len(entries) > 1:
                raise ACNetError(
                    f"{path} holds several state_dicts ({', '.join(entries)}): choose one with key="
                )
    if not isinstance(obj, Mapping) or not obj:
        raise ACNetError(f"{path} holds a {type(obj).__name__}, not a state_dict: save model.state_dict()")
    bad = [key for key, value in obj.items() if not isinstance(value, Tensor) and not str(key).endswith("_extra_state")]
    if bad:
        raise ACNetError(
            f"{path} is not a state_dict: entries {', '.join(map(str, bad[:_LISTED]))} are not tensors; "
            f"save model.state_dict(), or wrap it as {{'state_dict': ...}}"
        )
    return dict(obj)


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def ensure_writable(path: str | Path, *, force: bool = False) -> Path:
    """Refuse an output path that exists (unless ``force``), is a directory, or lies under a file."""
    path = Path(path)
    if path.is_dir():
        raise ACNetError(f"{path} is a directory: give a file name")
    if path.exists() and not force:
        raise ACNetError(
            f"{path} already exists: pass force=True to overwrite it, or choose another name"
        )
    existing = next(parent for parent in path.parents if parent.exists())
    if not existing.is_dir():
        raise ACNetError(f"{existing} is a file, so {path} cannot be written under it: choose another path")
    return path


@contextmanager
def atomic_output(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    Missing folders are created, and removed again on any failure; the temporary file is removed and ``path`` is
    left as it was.
    """
    path = ensure_writable(path, force=force)
    missing = [parent for parent in path.parents if not parent.exists()]  # deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        yield tmp
        if not tmp.is_file():
            raise ACNetError(f"nothing was written for {path}")
        if path.exists() and not force:
            raise ACNetError(f"{path} appeared while writing: pass force=True to overwrite it")
        tmp.chmod(0o666 & ~_umask())  # some writers create private files; outputs get the usual permissions
        os.replace(tmp, path)
        missing = []
    finally:
        tmp.unlink(missing_ok=True)
        for folder in missing:
            with contextlib.suppress(OSError):  # left where something else was written into it meanwhile
                folder.rmdir()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def serialization(path: str | Path) -> str:
    """'safetensors' or 'torch', from the name of a checkpoint to write."""
    container = SUFFIXES.get(Path(path).suffix)
    if container is None:
        raise ACNetError(f"cannot tell the format of {Path(path).name}: name it *.safetensors (recommended) or *.pt")
    return container


def write(
    path: str | Path,
    state_dict: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    force: bool = False,
) -> Path:
    """Write a state_dict atomically, as safetensors (with ``metadata``) or with ``torch.save``.

    A ``.pt`` file with metadata holds ``{"state_dict": ..., "acnet": metadata}``; an ``original``-format
    ``.pt`` file is a bare state_dict, so that deployment code loads it with ``torch.load`` alone.
    """
    path = Path(path)
    container = serialization(path)
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise ACNetError(f"{', '.join(not_tensors[:_LISTED])} in the state_dict are not tensors and cannot be written")
    state = {key: value.detach().cpu() for key, value in state_dict.items()}
    with atomic_output(path, force=force) as tmp:
        if container == "torch":
            bare = not metadata or json.loads(metadata.get(_META + "format", "null")) == "original"
            torch.save(state if bare else {"state_dict": state, _PT_METADATA: dict(metadata)}, tmp)
        else:
            safetensors.torch.save_file(_unshared(state), tmp, metadata={"format": "pt", **(metadata or {})})
    return path


def _unshared(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors, each with its own storage (safetensors refuses tied or strided ones)."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone().contiguous() if ptr in seen and value.numel() else value.contiguous()
        seen.add(ptr)
    return out


def load_strict(model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str, hint: str) -> None:
    """``model.load_state_dict(strict=True)``, with missing, unexpected and misshapen keys listed on failure."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    misshapen = [
        f"{key} {list(given.shape)} vs {list(value.shape)}"
        for key, value in expected.items()
        if isinstance(given := state_dict.get(key), Tensor) and isinstance(value, Tensor) and given.shape != value.shape
    ]
    listed = (("missing", missing), ("unexpected", unexpected), ("of the wrong shape, file vs model", misshapen))
    problems = [_listing(what, keys) for what, keys in listed if keys]
    if problems:
        raise ACNetError(f"{source} does not fit the model: {'; '.join(problems)}; {hint}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ACNetError(f"{source} does not load into the model ({first_line(exc)}); {hint}") from exc


def _listing(what: str, keys: list[str]) -> str:
    more = f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return f"{len(keys)} {what} ({', '.join(keys[:_LISTED])}{more})"
