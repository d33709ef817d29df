"""``python -m acnet_convert.demo``: the demo, with the options of ``acnet demo``."""

import sys

from ..cli import app

app(["demo", *sys.argv[1:]], prog_name="python -m acnet_convert.demo")
