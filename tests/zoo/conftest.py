"""The zoos run on two workers: every test of one model on the same worker (so the model is built once), and the
largest models all on one worker, one after another (two of them at once would not fit in memory)."""

import pytest
from roundtrip import LARGEST


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        params = getattr(item, "callspec", None)
        model = next((value for key, value in (params.params.items() if params else ())
                      if key in ("classifier", "segmenter", "name")), item.nodeid)  # fmt: skip
        item.add_marker(pytest.mark.xdist_group("largest" if model in LARGEST else str(model)))
