"""The quantisation report: SQNR against its closed form, the flag rule, the INT8 PTQ check and the JSON record.

Closed form used below.  Symmetric max-abs quantisation to b bits has Q = 2**(b-1) - 1 levels a side and step
s = max|w| / Q.  When the step is small against the spread of the weights, the rounding error of each weight is
uniform on [-s/2, s/2], so its mean square is s^2 / 12 and

    SQNR = 10 log10(sum w^2 / (n s^2 / 12)).

For w ~ U(-a, a): E[w^2] = a^2 / 3 and max|w| -> a, so SQNR -> 10 log10(4 Q^2) = 6.02 + 20 log10(Q):
48.2 dB at 8 bits, 22.9 dB at 4 bits.  Per output channel, each channel c of n_c weights has its own step s_c
and the noise is sum_c n_c s_c^2 / 12.  A planted outlier A >> a sets the step (s = A / Q), so the SQNR falls
by about 20 log10(A / a); once s / 2 > a, every weight but the outlier rounds to zero and, the outlier itself
being exact, SQNR = 10 log10(sum w^2 / (sum w^2 - A^2)) exactly.
"""

import copy
import json
import math
import types
import warnings

import pytest
import torch
from torch import nn

from acnet_convert import ACBlock, ACNetError, QuantReport, quant_report
from acnet_convert.checks.ptq import ENGINES
from acnet_convert.checks.quant import DB_PER_BIT, KEEP_ADVICE, PER_CHANNEL_ADVICE, SQNR_CAP_DB
from acnet_convert.demo.models import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")
A = 0.1  # half-width of the uniform weights
OUTLIER = 50 * A


class Branchy(nn.Module):
    """A conv net whose forward branches on a tensor value, which torch.fx cannot trace."""

    def __init__(self, bn: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()

    def forward(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else -self.conv(x)


def uniform_conv(cout: int = 64, cin: int = 64) -> nn.Conv2d:
    """A 3x3 conv whose weights are uniform on [-A, A]."""
    conv = nn.Conv2d(cin, cout, 3, bias=False)
    with torch.no_grad():
        conv.weight.uniform_(-A, A)
    return conv


def closed_form_db(w: torch.Tensor, steps: torch.Tensor) -> float:
    """10 log10(sum w^2 / sum_c n_c s_c^2 / 12) for one step per output channel (or one for all)."""
    per_row = w[0].numel()
    noise = (steps.double().square() * per_row / 12).sum().item() * (w.shape[0] if steps.numel() == 1 else 1)
    return 10 * math.log10(w.double().square().sum().item() / noise)


def sqnr(report: QuantReport, name: str, bits: int, scope: str) -> float:
    """One layer's SQNR figure from a report."""
    return next(layer for layer in report.layers if layer.name == name).figures.sqnr_db[f"int{bits}"][scope]


def test_uniform_kernel_sqnr_matches_closed_form():
    model = nn.Sequential(uniform_conv())
    w = model[0].weight.detach()
    report = quant_report(model)
    for bits in (8, 4):
        levels = 2 ** (bits - 1) - 1
        tensor, channel = sqnr(report, "0", bits, "per_tensor"), sqnr(report, "0", bits, "per_channel")
        assert tensor == pytest.approx(closed_form_db(w, w.abs().max() / levels), abs=0.5)  # 0.5 dB
        assert channel == pytest.approx(closed_form_db(w, w.abs().amax((1, 2, 3)) / levels), abs=0.5)  # 0.5 dB
        assert tensor == pytest.approx(20 * math.log10(2 * levels), abs=0.5)  # 10 log10(4 Q^2), 0.5 dB
    assert report.layers[0].figures.max_over_std == pytest.approx(math.sqrt(3), rel=0.02)  # a / (a / sqrt 3), 2%


def test_planted_outlier_sqnr_matches_closed_form():
    model = nn.Sequential(uniform_conv())
    with torch.no_grad():
        model[0].weight[0, 0, 1, 1] = OUTLIER
    w = model[0].weight.detach()
    report = quant_report(model)
    steps = w.abs().amax((1, 2, 3)) / 127
    outlier_step = torch.tensor([OUTLIER / 127])
    assert sqnr(report, "0", 8, "per_tensor") == pytest.approx(closed_form_db(w, outlier_step), abs=0.5)  # 0.5 dB
    assert sqnr(report, "0", 8, "per_channel") == pytest.approx(closed_form_db(w, steps), abs=0.5)  # 0.5 dB
    energy = w.double().square().sum().item()
    assert OUTLIER / 7 / 2 > A  # at 4 bits every other weight rounds to zero
    exact = 10 * math.log10(energy / (energy - OUTLIER**2))
    assert sqnr(report, "0", 4, "per_tensor") == pytest.approx(exact, abs=1e-6)  # exact arithmetic, 1e-6 dB
    drop = sqnr(quant_report(nn.Sequential(uniform_conv())), "0", 8, "per_tensor") - sqnr(report, "0", 8, "per_tensor")
    assert drop > 20 * math.log10(OUTLIER / A) - 3  # the step grew 50x: ~34 dB lost, less the outlier's energy gain


def test_centre_energy_and_channel_spread():
    conv = uniform_conv()
    figures = quant_report(nn.Sequential(conv)).layers[0].figures
    assert figures.centre_cross_energy == pytest.approx(5 / 9, abs=0.02)  # 5 of 9 taps, iid weights: 0.02
    assert figures.centre_tap_energy == pytest.approx(1 / 9, abs=0.02)  # 1 of 9 taps: 0.02
    with torch.no_grad():
        conv.weight[:, :, [0, 0, 2, 2], [0, 2, 0, 2]] = 0  # corners empty: only the cross is left
    assert quant_report(nn.Sequential(conv)).layers[0].figures.centre_cross_energy == pytest.approx(1.0, abs=1e-12)
    layers = nn.ModuleDict({
        "k1d": nn.Conv1d(2, 2, 3), "k1x1": nn.Conv2d(2, 2, 1), "k2x2": nn.Conv2d(2, 2, 2),
        "k3x1": nn.Conv2d(2, 2, (3, 1)), "k3x5": nn.Conv2d(2, 2, (3, 5)), "linear": nn.Linear(2, 2),
    })  # fmt: skip
    cross = {layer.name: layer.figures.centre_cross_energy for layer in quant_report(layers).layers}
    assert cross["k1d"] == pytest.approx(1.0) and 0 < cross["k3x5"] < 1
    assert cross["k1x1"] is cross["k2x2"] is cross["k3x1"] is cross["linear"] is None


def test_transposed_conv_channels_are_its_output_channels():
    deconv = nn.ConvTranspose2d(4, 6, 3, groups=2)  # weight (4, 3, 3, 3): output channel 4 is group 1, slot 1
    with torch.no_grad():
        deconv.weight.fill_(1.0)
        deconv.weight[2:4, 1] = 10.0
    figures = quant_report(nn.Sequential(deconv)).layers[0].figures
    assert figures.channel_spread == pytest.approx(10.0)  # channel peaks 1, 1, 1, 1, 10, 1: max over median
    assert figures.sqnr_db["int8"]["per_channel"] == SQNR_CAP_DB  # every channel is constant: exact
    assert figures.sqnr_db["int8"]["per_tensor"] < 60  # 1.0 is not on the grid of step 10 / 127


def test_a_batchnorm_after_a_layer_is_folded_in_first():
    conv, bn = uniform_conv(8, 4), nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.logspace(-1, 1, 8))
        bn.running_var.uniform_(0.5, 2.0)
    folded = nn.Conv2d(4, 8, 3, bias=False)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * (bn.weight / (bn.running_var + bn.eps).sqrt())[:, None, None, None])
    with_bn = quant_report(nn.Sequential(conv, bn)).layers[0]
    assert with_bn.bn == "1"
    want, got = quant_report(nn.Sequential(folded)).layers[0].figures.to_dict(), with_bn.figures.to_dict()
    for key in ("max_over_std", "channel_spread", "centre_cross_energy", "centre_tap_energy"):
        assert got[key] == pytest.approx(want[key], rel=1e-5)  # folded here in float64, there in float32: 1e-5
    for bits in ("int8", "int4"):
        assert got["sqnr_db"][bits] == pytest.approx(want["sqnr_db"][bits], abs=0.05)  # 0.05 dB, float32 rounding
    assert with_bn.figures.channel_spread > 5  # gamma spans 100x: the raw conv's spread (~1) would hide it
    with pytest.warns(UserWarning, match="cannot trace Branchy.*without folding") as caught:
        layer = quant_report(Branchy(bn=True)).layers[0]
    assert layer.bn is None
    assert caught[0].filename == __file__  # the warning points at the caller's line


def net() -> nn.Sequential:
    """Two 3x3 convs and a linear layer with PyTorch's default (uniform) initialisation."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


def test_flags_fire_on_a_planted_outlier_and_not_on_the_reference():
    reference = net()
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model[2].weight[3, 5, 1, 1] = 100 * model[2].weight.abs().max()
    report = quant_report(model, reference=reference)
    assert [layer.name for layer in report.flagged] == ["2"]
    flagged = report.flagged[0]
    assert flagged.advice == KEEP_ADVICE  # the outlier's channel is ruined per channel too
    assert "< 30.0 dB" in flagged.reason and "below the reference" in flagged.reason
    assert flagged.figures.max_over_std > 10 * flagged.reference.max_over_std
    assert quant_report(reference).flagged == []
    assert quant_report(reference, reference=reference).flagged == []


def test_spread_channel_scales_are_flagged_against_the_reference_with_per_channel_advice():
    reference = net()
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model[2].weight *= torch.logspace(0, 2, 16)[:, None, None, None]  # what folding BatchNorm scales can do
    report = quant_report(model, reference=reference)
    assert [layer.name for layer in report.flagged] == ["2"]
    assert report.flagged[0].advice == PER_CHANNEL_ADVICE
    assert report.flagged[0].figures.channel_spread > 10  # 100x between the extreme channels, the median ~10x
    assert report.flagged[0].figures.sqnr_db["int8"]["per_channel"] >= 30


def test_threshold_defaults_to_30_db_at_8_bits_and_scales_with_the_first_width():
    model = net()
    assert quant_report(model).threshold_db == 30.0
    assert quant_report(model, bits=(4,)).threshold_db == pytest.approx(30.0 - 4 * DB_PER_BIT)
    strict = quant_report(model, threshold_db=60.0)  # uniform weights give ~48 dB: every layer is below 60
    assert len(strict.flagged) == 3 and {layer.advice for layer in strict.flagged} == {KEEP_ADVICE}
    assert list(strict.layers[0].figures.sqnr_db) == ["int8", "int4"]


@pytest.fixture(scope="module")
def ptq_report() -> QuantReport:
    """A report with activation ranges and the INT8 PTQ check, on SmallCNN at 8x8 against itself as reference."""
    torch.manual_seed(0)
    model = SmallCNN(width=8).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.ao's deprecation warnings must not reach the caller
        return quant_report(model, reference=copy.deepcopy(model), inputs=torch.randn(16, 3, 8, 8))


def test_ptq_reports_agreement_and_output_error(ptq_report):
    result = ptq_report.ptq
    assert result.engine in ENGINES and "prepare_fx" in result.path
    assert result.top1_agreement >= 0.75  # 8-bit activations and weights on a 4-layer net: most argmaxes survive
    assert 0 < result.relative_error < 0.1  # measured ~0.01; quantisation must change something
    assert ptq_report.reference_ptq.top1_agreement == result.top1_agreement  # the same network
    for layer in ptq_report.layers:
        assert layer.figures.activation["min"] <= layer.figures.activation["max"]
    assert "INT8 PTQ top-1 agreement" in ptq_report.summary()


def test_ptq_leaves_the_model_as_it_was():
    model = SmallCNN(width=8).train()
    state = copy.deepcopy(model.state_dict())
    quant_report(model, inputs=torch.randn(4, 3, 8, 8))
    assert model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_missing_quantized_engine_fails_loudly(monkeypatch):
    monkeypatch.setattr(torch.backends, "quantized", types.SimpleNamespace(supported_engines=["qnnpack"]))
    with pytest.raises(ACNetError, match=r"^ptq: this torch build has no x86 or fbgemm quantized engine") as err:
        quant_report(net(), inputs=torch.randn(2, 3, 8, 8))
    assert "\n" not in str(err.value) and "ptq=False" in str(err.value)
    assert quant_report(net(), inputs=torch.randn(2, 3, 8, 8), ptq=False).ptq is None  # the fix it names works


def test_untraceable_model_fails_loudly():
    with pytest.raises(ACNetError, match=r"^ptq: torch.fx cannot trace Branchy") as err:
        quant_report(Branchy(), inputs=torch.randn(2, 3, 8, 8))
    assert "\n" not in str(err.value)


def test_to_dict_round_trips_through_json(ptq_report):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    nn.init.zeros_(model[2].weight)  # no signal: SQNR is capped, max|w|/std is None
    records = [ptq_report.to_dict(), quant_report(model).to_dict()]
    for record in records:
        assert json.loads(json.dumps(record, allow_nan=False)) == record
        assert {"layers", "ptq", "bits", "threshold_db", "flag_rule", "summary"} <= record.keys()
        for layer in record["layers"]:
            keys = {"name", "bn", "sqnr_db", "max_over_std", "centre_cross_energy", "flagged", "advice", "reference"}
            assert keys <= layer.keys()
            assert set(layer["sqnr_db"]) == {"int8", "int4"}
            assert all(set(v) == {"per_tensor", "per_channel"} for v in layer["sqnr_db"].values())
    with_ptq, plain = records
    assert with_ptq["layers"][0]["reference"]["sqnr_db"] == with_ptq["layers"][0]["sqnr_db"]
    assert {"top1_agreement", "max_abs_error", "relative_error", "path", "engine"} <= with_ptq["ptq"].keys()
    assert plain["ptq"] is None and plain["layers"][0]["reference"] is None
    zero = plain["layers"][1]
    assert zero["sqnr_db"]["int8"]["per_tensor"] == SQNR_CAP_DB and zero["max_over_std"] is None


def test_summary_and_table(ptq_report):
    model = net()
    with torch.no_grad():
        model[2].weight[0, 0, 1, 1] = 10.0
    report = quant_report(model, reference=net())
    worst = report.layers[1]
    line = report.summary()
    assert line.startswith("worst layer 2 (Conv2d): int8 per-tensor SQNR")
    assert f"{worst.figures.sqnr_db['int8']['per_tensor']:.1f} dB" in line
    assert f"(reference {worst.reference.sqnr_db['int8']['per_tensor']:.1f} dB)" in line
    assert "\n" not in line and "1 of 3 layers flagged" in line
    rows = report.table()
    assert len(rows) == 4 and len({len(row) for row in rows}) == 1 and rows[2][-2:] == ["FLAG", KEEP_ADVICE]
    assert "output range" in ptq_report.table()[0] and "output range" not in rows[0]
    assert str(report).endswith(line)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: quant_report(nn.Sequential(ACBlock.from_conv(nn.Conv2d(3, 4, 3)))), "deploy"),
        (lambda: quant_report(nn.ReLU()), "no conv or linear layer"),
        (lambda: quant_report(net(), reference=nn.ModuleDict({"fc": nn.Linear(2, 2)})), "shares no layer names"),
        (lambda: quant_report(net(), bits=(8, 1)), "bit widths from 2 to 16"),
        (lambda: quant_report(net(), inputs="image"), "tensor or a tuple of tensors"),
    ],
)
def test_user_errors_name_the_fix(call, message):
    with pytest.raises(ACNetError, match=message):
        call()


def test_deploy_prints_the_quantisation_summary_only_when_asked(capsys):
    from acnet_convert import acify, deploy
    from acnet_convert.demo.models import SmallCNN

    acified = acify(SmallCNN(width=8))
    deploy(acified)
    assert capsys.readouterr().out == ""
    deploy(acified, report_quant=True)
    line = capsys.readouterr().out.strip()
    assert line.startswith("quantisation: worst layer ") and "int8 per-tensor SQNR" in line and "\n" not in line
