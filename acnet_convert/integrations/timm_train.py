"""Run one of timm's scripts with the ``acnet_`` models registered, unchanged.

``python -m acnet_convert.integrations.timm_train path/to/train.py --model acnet_resnet18 [train.py's options]``
"""

from __future__ import annotations

import runpy
import sys

from ..errors import ACNetError
from . import timm as _registers_acnet_models  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    """Run the script ``argv[0]`` as ``__main__`` with ``argv`` as its command line."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].endswith(".py"):
        raise ACNetError("name the script first: python -m acnet_convert.integrations.timm_train train.py [options]")
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
