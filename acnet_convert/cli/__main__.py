"""``python -m acnet_convert.cli``: the acnet command."""

from .app import app

app(prog_name="acnet")
