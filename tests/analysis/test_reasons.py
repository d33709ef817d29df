"""Every reason the planner gives maps to a stable code; known texts map to the documented codes."""

import pytest
import torchvision
from torch import nn

from acnet_convert import plan
from acnet_convert.analysis.reasons import CODES, OTHER, reason_code, reason_codes


class Odd(nn.Module):
    """Convs skipped or converted for many different reasons."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c, self.ln = nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.even = nn.Conv2d(4, 4, 2)
        self.one = nn.Conv2d(4, 4, 1)
        self.wide = nn.Conv2d(4, 4, 7, padding=3)
        self.hooked = nn.Conv2d(4, 4, 3, padding=1)
        self.hooked.register_forward_hook(lambda *args: None)

    def forward(self, x):
        x = self.bn_a(self.a(x))
        y = self.b(x)
        x = x + y + y.relu()
        x = self.ln(self.c(x))
        return self.even(self.one(self.hooked(self.wide(x))))


@pytest.mark.parametrize(
    "options",
    [{}, {"mode": "fast"}, {"include": "a"}, {"exclude": ["b", "c"]}, {"max_kernel": 5}, {"block": "repvgg"},
     {"block": {"one": "dbb", "wide": "qarepvgg"}}],  # fmt: skip
)
def test_every_reason_the_planner_gives_has_a_code(options):
    for model in (Odd(), torchvision.models.resnet18(), torchvision.models.mobilenet_v3_small()):
        for site in plan(model, **options).sites:
            assert OTHER not in reason_codes(site.reason), site.reason


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("", ""),
        ("not matched by include", "not-included"),
        ("matched by exclude", "excluded"),
        ("kernel side above max_kernel=5", "above-max-kernel"),
        ("its output feeds relu(), not a BatchNorm module", "no-batchnorm-after"),
        ("its output feeds 2 operations", "output-shared"),
        ("BatchNorm bn1 stays after the block (fast mode)", "bn-kept"),
        ("needs at least two kernel sides >= 3", "block-unsupported"),
        ("repvgg: 1x1 conv: the branches would add nothing a 1x1 kernel cannot hold; converted as acb",
         "kind-unsupported"),
        ("has hooks registered on it", "hooks"),
        ("shared: called 2 times per forward, so it absorbs no BatchNorm", "repeated-calls"),
        ("MyConv overrides forward() (describe it in the conv adapter table if it only pads)", "overrides-forward"),
        ("something new", OTHER),
    ],
)
def test_known_texts(reason, code):
    assert reason_code(reason) == code and (code in CODES or code == "")


def test_a_kind_fallback_has_both_codes():
    assert reason_codes("dbb: needs a square kernel; converted as acb") == ["kind-unsupported", "fallback-kind"]


def test_codes_are_unique():
    assert len(set(CODES)) == len(CODES)
