"""Every decision the planner takes sets its stable code beside the text; the code list is fixed."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from acnet_convert import ReparamBlock, acify, plan, register_block
from acnet_convert.analysis import CODES, OTHER, Plan, Site


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
            assert OTHER not in site.codes and set(site.codes) <= set(CODES), site.reason
            assert len(site.codes) == (len(site.reason.split("; ")) if site.reason else 0), site.reason


class Chain(nn.Module):
    """``conv`` then ``after`` (a module or a function of the conv's output)."""

    def __init__(self, conv=None, after=None):
        super().__init__()
        self.conv = conv if conv is not None else nn.Conv2d(3, 4, 3, padding=1)
        self.after = after if after is not None else nn.BatchNorm2d(4)

    def forward(self, x):
        return self.after(self.conv(x))


class MyConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class Twice(Chain):
    def forward(self, x):
        return self.after(self.conv(self.conv(x)))


class Shared(Chain):
    def forward(self, x):
        y = self.conv(x)
        return self.after(y) + y


def hooked_conv():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    conv.register_forward_hook(lambda *args: None)
    return conv


# (model, options, the site's reason, its codes): each decision, and the code it sets
DECISIONS = [
    (Chain(), {}, "", []),
    (Chain(), {"include": "other"}, "not matched by include", ["not-included"]),
    (Chain(), {"exclude": "conv"}, "matched by exclude", ["excluded"]),
    (Chain(nn.Conv2d(3, 4, 7, padding=3)), {"max_kernel": 5}, "kernel side above max_kernel=5", ["above-max-kernel"]),
    (Chain(after=F.relu), {}, "its output feeds relu(), not a BatchNorm module", ["no-batchnorm-after"]),
    (Chain(after=nn.Identity()), {}, "its output feeds after (Identity), not a BatchNorm", ["no-batchnorm-after"]),
    (Shared(), {}, "its output feeds 2 operations", ["output-shared"]),
    (Chain(after=lambda y: y), {}, "its output is returned by forward()", ["output-returned"]),
    (Chain(), {"mode": "fast"}, "BatchNorm after stays after the block (fast mode)", ["bn-kept"]),
    (Chain(nn.Conv2d(3, 4, 1)), {}, "needs at least two kernel sides >= 3", ["block-unsupported"]),
    (Chain(nn.Conv2d(3, 4, 1)), {"block": "repvgg"},
     "repvgg: 1x1 conv: the branches would add nothing a 1x1 kernel cannot hold", ["kind-unsupported"]),
    (Chain(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4)), {"block": "repvgg"},
     "repvgg: Conv3d is not a plain nn.Conv2d; converted as acb", ["kind-unsupported", "fallback-kind"]),
    (Chain(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4)), {"block": "repvgg", "mode": "fast"},
     "repvgg: Conv3d is not a plain nn.Conv2d", ["kind-unsupported"]),
    (Chain(hooked_conv()), {}, "has hooks registered on it", ["hooks"]),
    (Twice(nn.Conv2d(4, 4, 3, padding=1)), {}, "shared: called 2 times per forward, so it absorbs no BatchNorm",
     ["repeated-calls"]),
    (Chain(MyConv(3, 4, 3)), {}, "MyConv overrides forward() (describe it in the conv adapter table if it only pads)",
     ["overrides-forward"]),
    (Chain(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))), {},
     "weight is parametrized (e.g. weight/spectral norm)", ["parametrized"]),
    (Chain(nn.LazyConv2d(4, 3)), {}, "lazy conv not initialised yet: run one forward first", ["lazy"]),
    (Chain(after=nn.BatchNorm2d(4, track_running_stats=False)), {},
     "BatchNorm after tracks no running statistics, so it cannot be folded", ["bn-no-running-stats"]),
    (Chain(after=nn.BatchNorm1d(4)), {}, "BatchNorm after is a BatchNorm1d, not BatchNorm2d/SyncBatchNorm",
     ["bn-wrong-type"]),
    (Chain(after=nn.BatchNorm2d(5)), {}, "BatchNorm after has a different number of channels", ["bn-channels"]),
]


@pytest.mark.parametrize(("model", "options", "reason", "codes"), DECISIONS)
def test_each_decision_sets_its_code(model, options, reason, codes):
    site = next(s for s in plan(model, **options).sites if s.name == "conv")
    assert (site.reason, site.codes, site.code) == (reason, codes, codes[0] if codes else "")


def test_a_block_already_in_the_model_has_its_code():
    site = plan(acify(Chain())).sites[0]
    assert (site.action, site.reason, site.codes) == ("done", "already a ACBlock", ["already-block"])


class Picky(ReparamBlock):
    """A user kind that wraps no conv, in its own words."""

    kind = "picky"

    @classmethod
    def conv_problem(cls, conv, layout="lines"):
        return "no conv is good enough"


def test_a_user_kinds_own_wording_gets_the_kind_code():
    register_block("picky", Picky)
    site = plan(Chain(), block="picky").sites[0]
    assert site.reason == "picky: no conv is good enough; converted as acb"
    assert site.codes == ["kind-unsupported", "fallback-kind"]


def test_codes_travel_with_the_plan_and_a_plan_recorded_without_them_says_other():
    recorded = plan(Chain(after=F.relu)).to_dict()
    assert recorded["sites"][0]["codes"] == ["no-batchnorm-after"]
    assert Plan.from_dict(recorded).sites[0].codes == ["no-batchnorm-after"]
    for site in recorded["sites"]:  # what 0.2.0 wrote: no codes
        del site["codes"]
    assert Plan.from_dict(recorded).sites[0].codes == [OTHER]
    converted = Site("conv", (3, 3), (1, 1), 1, "convert").as_dict()
    del converted["codes"]
    assert Site.from_dict(converted).codes == [] and Site.from_dict(converted).code == ""


def test_codes_are_unique_and_other_is_last():
    assert len(set(CODES)) == len(CODES) and CODES[-1] == OTHER


def test_a_float_conv_only_is_converted():
    conv = nn.Conv2d(3, 4, 3, padding=1).to(torch.float64)
    conv.weight = nn.Parameter(conv.weight.detach().to(torch.int64), requires_grad=False)
    site = next(s for s in plan(Chain(conv)).sites if s.name == "conv")
    assert (site.reason, site.codes) == ("weight dtype torch.int64 is not floating point", ["not-floating-point"])
