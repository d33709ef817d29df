"""``python -m acnet_convert.cli``: the acnet command."""

from .main import app

app(prog_name="acnet")
