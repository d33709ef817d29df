"""Planning again gives, for every site 0.2.0 recorded in reasons.json, the same action, reason text and codes."""

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torchvision
from test_reasons import Odd

from acnet_convert import acify, plan
from acnet_convert.analysis import CODES

TESTS = Path(__file__).parents[1]
RECORDED = json.loads((TESTS / "fixtures" / "v0.2.0" / "reasons.json").read_text())
# the classes of tests/api/test_api.py that take no arguments
API_MODELS = ("Net", "CalledTwice", "SharedOutput", "BnTwice", "FunctionalBN", "Looped", "MisorderedRegistration",
              "ReadsWeight", "CalledTwiceUnderTwoNames", "Untraceable", "UntraceableReadsWeight",
              "UntraceableSharedOutput")  # fmt: skip


def _module(path: Path):
    """The module at ``path``, imported under a name of its own (the test folders are not packages); registered in
    sys.modules so that the planner can read its classes' source."""
    spec = importlib.util.spec_from_file_location(f"recorded_{path.stem}", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_api = _module(TESTS / "api" / "test_api.py")
MODELS = {"Odd": Odd, "TinyNet": _module(TESTS / "fixtures" / "models.py").TinyNet,
          "resnet18": torchvision.models.resnet18, "mobilenet_v3_small": torchvision.models.mobilenet_v3_small,
          **{name: getattr(_api, name) for name in API_MODELS}}  # fmt: skip


def _model(name: str):
    base, _, acified = name.partition("+")
    model = MODELS[base]()
    if acified:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = acify(model)
    return model


def _cases() -> dict[tuple[str, str], list[dict]]:
    cases: dict[tuple[str, str], list[dict]] = {}
    for site in RECORDED["sites"]:
        cases.setdefault((site["model"], json.dumps(site["options"], sort_keys=True)), []).append(site)
    return cases


def test_the_code_list_is_the_020_one():
    assert list(CODES) == RECORDED["codes"]


def test_every_recorded_model_is_planned():
    assert {name.partition("+")[0] for name, _ in _cases()} == set(MODELS)


@pytest.mark.parametrize(("model", "options"), list(_cases()))
def test_every_recorded_site_gets_the_020_action_reason_and_codes(model, options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # include patterns that match nothing in some models
        sites = {s.name: s for s in plan(_model(model), **json.loads(options)).sites}
    for recorded in _cases()[(model, options)]:
        site = sites[recorded["site"]]
        assert (site.action, site.reason, site.codes) == (recorded["action"], recorded["reason"], recorded["codes"])
        assert site.code == (recorded["codes"][0] if recorded["codes"] else "")
