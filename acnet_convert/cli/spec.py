"""Model specs: build a model from ``model.py[:NAME]``, ``pkg.mod[:NAME]``, ``torchvision:NAME`` or ``timm:NAME``."""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from ..errors import ACNetError, first_line

if TYPE_CHECKING:
    from torch import nn

FACTORY = "build_model"
FORMS = "path/model.py[:NAME], package.module[:NAME], torchvision:NAME or timm:NAME"
_IDENTIFIER_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_NETWORK_ERRORS = {  # exception classes (by name) that mean a download failed
    "URLError", "HTTPError", "ConnectionError", "gaierror", "timeout", "TimeoutError", "Timeout", "ConnectTimeout",
    "MaxRetryError", "NewConnectionError", "LocalEntryNotFoundError", "OfflineModeIsEnabled", "ContentTooShortError",
}  # fmt: skip


def parse_args(pairs: Sequence[str]) -> dict[str, object]:
    """Turn ``key=value`` strings into keyword arguments; values are Python literals, else strings."""
    kwargs: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ACNetError(f"--arg {pair!r} is not key=value: write it like --arg num_classes=10")
        if key in kwargs:
            raise ACNetError(f"--arg {key} is given twice: keep one")
        kwargs[key] = _literal(text.strip())
    return kwargs


def _literal(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return {"true": True, "false": False, "none": None, "null": None}.get(text.lower(), text)


@dataclass
class ModelSpec:
    """A model spec and its ``key=value`` constructor arguments, as typed on the command line."""

    text: str
    args: tuple[str, ...] = field(default_factory=tuple)

    @cached_property
    def kwargs(self) -> dict[str, object]:
        """The constructor arguments, parsed."""
        return parse_args(self.args)

    @cached_property
    def factory(self) -> Callable[..., object]:
        """The class or function the spec names (imported once per spec)."""
        return _locate(self.text, self.kwargs)

    @property
    def stem(self) -> str:
        """A short name for default output files: the model's name."""
        if self.text.endswith(".py"):
            return Path(self.text).stem
        return self.text.rpartition(":")[2].rpartition(".")[2]

    def build(self) -> nn.Module:
        """A fresh model built from the spec with its arguments."""
        from torch import nn

        factory, kwargs = self.factory, self.kwargs
        try:
            model = factory(**kwargs)
        except Exception as exc:
            raise self._build_error(exc) from exc
        if not isinstance(model, nn.Module):
            returned = type(model).__name__
            raise ACNetError(f"{self.text} returned a {returned}, not a torch.nn.Module: name a model class or factory")
        return model

    def _build_error(self, exc: Exception) -> ACNetError:
        """What went wrong building the model: an unknown or missing --arg, a download, or the model's own error."""
        if _download_failure(exc):
            return ACNetError(
                f"this model downloads weights when built ({first_line(_download_failure(exc))}): pass "
                f"{self._no_download_hint()}, or download the weights while online first"
            )
        text = str(exc)
        unknown = re.search(r"unexpected keyword argument '(\w+)'", text) if isinstance(exc, TypeError) else None
        if unknown and unknown.group(1) in self.kwargs:
            return ACNetError(
                f"--arg {unknown.group(1)} is not an argument of {self.text}{self._takes(unknown[1], _callee(exc))}"
            )
        missing = re.search(r"missing \d+ required \w+ arguments?: (.+)$", text) if isinstance(exc, TypeError) else None
        if missing:
            names = re.findall(r"'(\w+)'", missing.group(1))
            example = " ".join(f"--arg {name}=..." for name in names)
            return ACNetError(f"{self.text} needs the argument(s) {', '.join(names)}: pass {example}")
        return ACNetError(
            f"building {self.text} failed{_user_line(exc)}: {first_line(exc)}; check the code and the --arg values"
        )

    def _takes(self, unknown: str, callee: Callable[..., object] | None = None) -> str:
        """' (it takes a, b); did you mean a?' from the signatures of the factory and of the ``callee`` it passes its
        keyword arguments on to, or ': check the --arg names' when there is none to read."""
        names = list(dict.fromkeys([*_parameters(self.factory), *(_parameters(callee) if callee else [])]))
        if not names:
            return ": check the --arg names"
        return f" (it takes {', '.join(names)}){_suggest(unknown, names) or ': check the --arg names'}"

    def _no_download_hint(self) -> str:
        """The --arg that builds this model without pretrained weights."""
        prefix = self.text.partition(":")[0]
        names = set(_parameters(self.factory))
        if prefix == "torchvision" or "weights" in names:
            return "--arg weights=None"
        if prefix == "timm" or "pretrained" in names:
            return "--arg pretrained=False"
        return "the --arg that turns pretrained weights off"


def _download_failure(exc: BaseException) -> BaseException | None:
    """The network error in ``exc``'s chain of causes, or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if {cls.__name__ for cls in type(exc).__mro__} & _NETWORK_ERRORS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _callee(exc: TypeError) -> Callable[..., object] | None:
    """The callable that a TypeError's "X() got an unexpected keyword argument" names, as the code that called it
    sees it (a torchvision or timm builder passes its keyword arguments on to the model class)."""
    named = re.match(r"(\w+)(?:\.__init__)?\(\) got an unexpected", str(exc))
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if named is None or tb is None:
        return None
    seen = [*tb.tb_frame.f_locals.values(), *tb.tb_frame.f_globals.values()]
    return next((value for value in seen if callable(value) and getattr(value, "__name__", None) == named[1]), None)


def _parameters(factory: Callable[..., object]) -> list[str]:
    """The keyword parameters ``factory`` names (empty when it takes ``**kwargs`` or has no signature)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _locate(text: str, kwargs: dict[str, object]) -> Callable[..., object]:
    prefix, colon, name = text.partition(":")
    if prefix in ("torchvision", "timm") and colon:
        if not name:
            raise ACNetError(f"{text!r} names no model: write {prefix}:NAME, e.g. torchvision:resnet18")
        return _torchvision(name) if prefix == "torchvision" else _timm(name)
    if text.endswith(".py"):
        source, name = text, ""
    else:
        source, _, name = text.rpartition(":") if ":" in text else (text, "", "")
    if name and not _IDENTIFIER_PATH.fullmatch(name):
        raise ACNetError(f"{name!r} in spec {text!r} is not a Python name: write the spec as {FORMS}")
    if source.endswith(".py"):
        module, where = _import_file(Path(source)), source
    elif _IDENTIFIER_PATH.fullmatch(source):
        module, where = _import_module(source), source
    else:
        raise ACNetError(f"cannot read the model spec {text!r}: write it as {FORMS}")
    return _attribute(module, name, where) if name else _discover(module, where, kwargs)


def _torchvision(name: str) -> Callable[..., nn.Module]:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise ACNetError(f"torchvision has no model {name!r}{_suggest(name, names)}")
    return lambda **kwargs: torchvision.models.get_model(name, **kwargs)


def _timm(name: str) -> Callable[..., nn.Module]:
    try:
        import timm
    except ImportError as exc:
        raise ACNetError("timm specs need timm: pip install 'acnet-convert[timm]'") from exc
    if not timm.is_model(name):
        raise ACNetError(f"timm has no model {name!r}{_suggest(name, timm.list_models())}")
    return lambda **kwargs: timm.create_model(name, **kwargs)


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ACNetError(f"model file {path} not found: check the path")
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"acnet_model_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # let the file import its neighbours, as `python model.py` would
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[module_name]
        raise ACNetError(f"{path.name} line {exc.lineno}: syntax error ({exc.msg}): fix the file") from exc
    except Exception as exc:
        del sys.modules[module_name]
        raise ACNetError(f"importing {path.name} failed{_user_line(exc)}: {first_line(exc)}; fix the file") from exc
    return module


def _import_module(name: str) -> ModuleType:
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # packages in the working directory, as `python -m` finds them
    try:
        _add_module_folder(name)
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise ACNetError(
                f"no module named {exc.name!r}: check the spec, install the package or run from its directory"
            ) from exc
        raise ACNetError(f"importing {name} failed{_user_line(exc)}: {first_line(exc)}; install what it needs") from exc
    except Exception as exc:
        raise ACNetError(f"importing {name} failed{_user_line(exc)}: {first_line(exc)}; fix the module") from exc


def _add_module_folder(name: str) -> None:
    """Put the folder of module ``name``'s file on sys.path (last), so that it can import the files beside it."""
    try:
        found = importlib.util.find_spec(name)
    except ValueError:  # a module already imported without a spec
        return
    if found is not None and found.origin and found.has_location:
        folder = str(Path(found.origin).parent)
        if folder not in sys.path:
            sys.path.append(folder)


def _attribute(module: ModuleType, name: str, where: str) -> Callable[..., object]:
    obj: object = module
    for part in name.split("."):
        if not hasattr(obj, part):
            candidates = _candidates(module)
            listing = f"; it defines {', '.join(candidates)}" if candidates else ""
            raise ACNetError(f"{where} has no {name!r}{_suggest(name, candidates) or listing}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ACNetError(f"{where}:{name} is a {type(obj).__name__}; name a model class or a function that returns one")
    return obj


def _discover(module: ModuleType, where: str, kwargs: dict[str, object]) -> Callable[..., object]:
    """``build_model`` if the module defines it, else its only model class that ``kwargs`` can construct."""
    factory = getattr(module, FACTORY, None)
    if callable(factory):
        return factory
    classes = _model_classes(module)
    buildable = [cls for cls in classes if _accepts(cls, kwargs)]
    if len(buildable) == 1:
        return buildable[0]
    if not classes:
        raise ACNetError(
            f"{where} defines no nn.Module subclass and no {FACTORY}(): add one, or name one as {where}:NAME"
        )
    names = ", ".join(cls.__name__ for cls in (buildable or classes))
    if not buildable and len(classes) == 1:
        unknown = [key for key in kwargs if key not in _parameters(classes[0])]
        if unknown and _parameters(classes[0]):
            takes = _parameters(classes[0])
            raise ACNetError(
                f"--arg {unknown[0]} is not an argument of {where}:{classes[0].__name__} (it takes {', '.join(takes)})"
                f"{_suggest(unknown[0], takes) or ': check the --arg names'}"
            )
    if not buildable:
        raise ACNetError(
            f"no model class in {where} can be built with these arguments (found {names}): "
            f"pass its arguments with --arg key=value, name it as {where}:NAME, or add {FACTORY}()"
        )
    raise ACNetError(f"{where} defines several models ({names}): name one as {where}:NAME, or add {FACTORY}()")


def _model_classes(module: ModuleType) -> list[type]:
    from torch import nn

    return [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__
    ]


def _candidates(module: ModuleType) -> list[str]:
    """Names of the model classes and public functions a module defines."""
    functions = [
        name
        for name, obj in vars(module).items()
        if inspect.isfunction(obj) and obj.__module__ == module.__name__ and not name.startswith("_")
    ]
    return [cls.__name__ for cls in _model_classes(module)] + functions


def _accepts(cls: type, kwargs: dict[str, object]) -> bool:
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError:
        return False
    except ValueError:  # no signature available: let the call decide
        return True
    return True


def _suggest(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _user_line(exc: BaseException) -> str:
    """' at FILE line N' for the innermost frame outside Python's and torch's own code, or ''."""
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if "importlib" not in frame.filename and frame.filename != __file__ and "site-packages" not in frame.filename
    ]
    return f" at {Path(frames[-1].filename).name} line {frames[-1].lineno}" if frames else ""
