"""A small model with 3x3 and 5x5 convs, stride 2, groups and a depthwise conv, and its explicit CSLA form: every
branch its own trainable kernel and its own convolution (or pool) of the input, times constant per-channel scales."""

import torch
import torch.nn.functional as F
from torch import nn

from acnet_convert import plan
from acnet_convert.api import apply_plan

BRANCHES = {"acb": ("square", "row", "column"), "repvgg": ("square", "pointwise"), "dbb": ("square", "pointwise", "avg")}


class Net(nn.Module):
    """conv 3x3 (3->8), conv 5x5 stride 2 groups 2, depthwise 3x3, conv 3x3 (8->8), each with a BatchNorm."""

    def __init__(self, conv=nn.Conv2d):
        super().__init__()
        self.c1, self.b1 = conv(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = conv(8, 8, 5, stride=2, padding=2, groups=2, bias=False), nn.BatchNorm2d(8)
        self.c3, self.b3 = conv(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.c4, self.b4 = conv(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        x = F.relu(self.b3(self.c3(x)))
        x = F.relu(self.b4(self.c4(x)))
        return self.head(x.mean((2, 3)))


CONVS = ("c1", "c2", "c3", "c4")


class CSLAConv(nn.Module):
    """One conv's CSLA block: trainable branch kernels, constant scales, the branches computed one by one."""

    def __init__(self, conv: nn.Conv2d, kind: str, scales: dict[str, torch.Tensor]):
        super().__init__()
        self.kind, self.scales, self.stride, self.groups = kind, scales, conv.stride, conv.groups
        self.depthwise = conv.groups == conv.in_channels == conv.out_channels
        self.identity = kind == "repvgg" and conv.in_channels == conv.out_channels and conv.stride == (1, 1)
        out, width, kh, kw = conv.weight.shape
        self.k = (kh, kw)
        shapes = {"square": (kh, kw), "row": (1, kw), "column": (kh, 1), "pointwise": (1, 1), "avg": (1, 1)}
        for name in self.branches():
            shape = (out, 1 if name == "avg" and self.depthwise else width, *shapes[name])
            self.register_parameter(name, nn.Parameter(torch.randn(shape, dtype=torch.float64) * 0.3))
        if self.identity:
            self.beta = nn.Parameter(torch.rand(out, dtype=torch.float64) + 0.5)

    def branches(self):
        return [b for b in BRANCHES[self.kind] if not (self.kind == "dbb" and self.depthwise and b == "pointwise")]

    def scaled(self, name):
        return getattr(self, name) * self.scales[name].reshape(-1, 1, 1, 1)

    def forward(self, x):
        (kh, kw), s, g = self.k, self.stride, self.groups
        ph, pw = kh // 2, kw // 2
        y = F.conv2d(x, self.scaled("square"), None, s, (ph, pw), 1, g)
        if "row" in self.branches():
            y = y + F.conv2d(x, self.scaled("row"), None, s, (0, pw), 1, g)
            y = y + F.conv2d(x, self.scaled("column"), None, s, (ph, 0), 1, g)
        if "pointwise" in self.branches():
            y = y + F.conv2d(x, self.scaled("pointwise"), None, s, 0, 1, g)
        if "avg" in self.branches():
            pre = x * self.scaled("avg").reshape(1, -1, 1, 1) if self.depthwise else F.conv2d(x, self.scaled("avg"),
                                                                                              groups=g)
            y = y + F.avg_pool2d(pre, (kh, kw), s, (ph, pw))
        if self.identity:
            y = y + x * self.beta.reshape(1, -1, 1, 1)
        return y

    def kernel(self):
        """The one KxK kernel this block computes (each branch zero-padded into place)."""
        (kh, kw), out = self.k, self.square.shape[0]
        ph, pw = kh // 2, kw // 2
        w = self.scaled("square").detach().clone()
        if "row" in self.branches():
            w[:, :, ph : ph + 1, :] += self.scaled("row").detach()
            w[:, :, :, pw : pw + 1] += self.scaled("column").detach()
        if "pointwise" in self.branches():
            w[:, :, ph : ph + 1, pw : pw + 1] += self.scaled("pointwise").detach()
        if "avg" in self.branches():
            w += self.scaled("avg").detach() / (kh * kw)
        if self.identity:
            for o in range(out):
                w[o, o % w.shape[1], ph, pw] += self.beta[o].detach()
        return w


def scales_for(kind: str, conv: nn.Conv2d, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random per-channel scales, of both signs, away from zero."""
    depthwise = conv.groups == conv.in_channels == conv.out_channels
    names = [b for b in BRANCHES[kind] if not (kind == "dbb" and depthwise and b == "pointwise")]
    return {n: (torch.rand(conv.out_channels, generator=generator, dtype=torch.float64) + 0.3)
            * torch.where(torch.rand(conv.out_channels, generator=generator) < 0.3, -1.0, 1.0).double()
            for n in names}  # fmt: skip


def twins(kind: str, seed: int = 0):
    """(CSLA model, repopt model, plain model): the same function at the start, in float64."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    base = Net().double()
    csla = Net().double()
    csla.load_state_dict(base.state_dict())
    for name in CONVS:
        setattr(csla, name, CSLAConv(getattr(base, name), kind, scales_for(kind, getattr(base, name), generator)))
    plain = Net().double()
    plain.load_state_dict(base.state_dict())
    with torch.no_grad():
        for name in CONVS:
            getattr(plain, name).weight.copy_(getattr(csla, name).kernel())
    recorded = plan(plain, block=kind, mode="repopt")
    for site in recorded.converted:
        site.scales = {n: v.tolist() for n, v in getattr(csla, site.name).scales.items()}
    repopt = Net().double()
    repopt.load_state_dict(plain.state_dict())
    apply_plan(repopt, recorded)
    return csla, repopt, plain


def batches(steps: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 12, 12, generator=generator, dtype=torch.float64),
             torch.randint(0, 4, (4,), generator=generator)) for _ in range(steps)]  # fmt: skip


def train(model: nn.Module, data, optimizer) -> None:
    model.train()
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def kernels(model: nn.Module) -> dict[str, torch.Tensor]:
    """The KxK kernel of every converted conv."""
    return {n: m.kernel() if isinstance(m, CSLAConv) else m.weight.detach().clone()
            for n, m in ((n, getattr(model, n)) for n in CONVS)}  # fmt: skip
