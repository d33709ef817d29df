"""What several test folders share: BatchNorm randomisation, the command line's surface and command names, and
a copy of the package to follow a contributor's recipe on."""

import filecmp
import shutil
from pathlib import Path

import torch
import typer.main

import acnet_convert

PACKAGE = Path(acnet_convert.__file__).parent


def randomize_bn(model: torch.nn.Module, *inputs, steps: int = 3) -> None:
    """Give every BatchNorm random affine parameters and non-trivial running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        was_training = model.training
        model.train()
        for _ in range(steps):
            model(*inputs)
        model.train(was_training)


def command_names(app) -> list[str]:
    """The commands of the ``acnet`` app, in the order ``--help`` lists them."""
    return list(typer.main.get_command(app).commands)


def cli_surface(app) -> dict:
    group = typer.main.get_command(app)
    surface = {"": [group.help]}
    for name, command in sorted(group.commands.items()):
        surface[name] = [command.help] + [
            {"name": p.name, "flags": sorted([*p.opts, *p.secondary_opts]), "required": p.required,
             "multiple": bool(getattr(p, "multiple", False)), "default": repr(p.default),
             "type": str(getattr(getattr(p, "type_descriptor", None), "annotation", getattr(p, "type", None))),
             "metavar": p.metavar, "flag": getattr(p, "is_flag", None), "help": getattr(p, "help", None)}
            for p in command.params
        ]
    return surface


def copy_package(folder: Path) -> Path:
    """A copy of the installed package in ``folder`` (caches left out), to change as a recipe says."""
    copy = folder / "acnet_convert"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def changed_files(copy: Path) -> list[str]:
    """The files added, changed or removed in ``copy`` with respect to the installed package (caches ignored)."""

    def files(root: Path) -> set[Path]:
        return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}

    before, after = files(PACKAGE), files(copy)
    changed = (before ^ after) | {p for p in before & after if not filecmp.cmp(PACKAGE / p, copy / p, shallow=False)}
    return sorted(p.as_posix() for p in changed)
