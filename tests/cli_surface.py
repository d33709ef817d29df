"""The command line's surface as data: every command, its parameters, their flags, types, defaults and help."""

import typer.main


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
