"""The Lightning callback: acify before optimizers are built, deploy at the end of fit, resume from a checkpoint."""

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
from safetensors.torch import load_model  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from acnet_convert import ACBlock, ACNetError, FastACBlock, acify, deploy, verify  # noqa: E402
from acnet_convert.demo.models import SmallCNN  # noqa: E402
from acnet_convert.integrations.lightning import ACNetCallback  # noqa: E402


class Classifier(pl.LightningModule):
    """A LightningModule around the paper's small CNN."""

    def __init__(self):
        super().__init__()
        self.net = SmallCNN(in_channels=3, num_classes=4, width=8)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        self.optimized = {id(p) for p in self.parameters()}  # what the optimizer was built from
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class LateClassifier(Classifier):
    """Builds its network in configure_model, after the callback's setup has run."""

    def __init__(self):
        pl.LightningModule.__init__(self)

    def configure_model(self):
        self.net = SmallCNN(in_channels=3, num_classes=4, width=8)


def loader() -> DataLoader:
    """One fixed batch of 16 per epoch: every step sees the same data, whatever the epoch bookkeeping on resume."""
    data = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 12, 12, generator=data), torch.randint(0, 4, (16,), generator=data)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def trainer(callback: ACNetCallback, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, callbacks=[callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


def test_callback_acifies_before_the_optimizer_and_writes_the_deployed_model(tmp_path):
    module, callback = Classifier(), ACNetCallback(out=tmp_path / "deployed.safetensors", init="scratch")
    before = module.net.classifier.weight.detach().clone()
    trainer(callback, 4).fit(module, loader())

    acblocks = [m for m in module.modules() if isinstance(m, ACBlock)]
    assert len(acblocks) == 3
    new_params = {id(b.branches[n].conv.weight) for b in acblocks for n in ("hor", "ver")}
    assert new_params <= module.optimized, "the optimizer was built after acify, so it trains the new branches"
    assert not torch.equal(module.net.classifier.weight, before), "fit trained the model"

    assert not any(isinstance(m, ACBlock) for m in callback.deployed.modules())
    x = torch.randn(4, 3, 12, 12)
    assert verify(module, callback.deployed, x, rtol=1e-5).relative <= 1e-5  # float32 forward of an exact fusion
    written = deploy(acify(Classifier()), check=False).eval()
    load_model(written, tmp_path / "deployed.safetensors")
    with torch.no_grad():
        assert torch.equal(written(x), callback.deployed(x))


def test_callback_passes_acify_options_through():
    module, callback = Classifier(), ACNetCallback(mode="fast", init="scratch")
    trainer(callback, 2).fit(module, loader())
    assert sum(isinstance(m, FastACBlock) for m in module.modules()) == 3
    assert not any(isinstance(m, FastACBlock) for m in callback.deployed.modules())
    assert verify(module, callback.deployed, torch.randn(4, 3, 12, 12), rtol=1e-5).relative <= 1e-5


def test_resuming_fit_from_an_acified_checkpoint_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    uninterrupted = Classifier()
    trainer(ACNetCallback(), 8).fit(uninterrupted, loader())

    torch.manual_seed(0)
    first = trainer(ACNetCallback(), 4)
    first.fit(Classifier(), loader())
    first.save_checkpoint(tmp_path / "step4.ckpt")
    torch.manual_seed(1)  # the checkpoint, not the seed, must decide every weight of the resumed run
    resumed_module = Classifier()
    resumed = trainer(ACNetCallback(), 8)
    resumed.fit(resumed_module, loader(), ckpt_path=tmp_path / "step4.ckpt")  # loads only if acify ran first

    assert resumed.global_step == 8
    want, got = uninterrupted.state_dict(), resumed_module.state_dict()
    assert want.keys() == got.keys() and any("branches.hor" in k for k in got)
    for name in want:
        assert torch.equal(want[name], got[name]), name  # weights, BN statistics and momentum all carried over


@pytest.mark.parametrize(("kind", "mode"), [("dbb", "exact"), ("dbb", "fast"), ("repvgg", "exact"),
                                           ("repvgg", "fast"), ("qarepvgg", "exact"), ("mobileone", "exact")])  # fmt: skip
def test_every_block_kind_trains_resumes_from_the_recorded_plan_and_writes_original_weights(tmp_path, kind, mode):
    options = {"block_options": {kind: {"k": 2}}} if kind == "mobileone" else {}  # a kind option, recorded too
    first = trainer(ACNetCallback(block=kind, mode=mode, init="scratch", **options), 2)
    first.fit(Classifier(), loader())
    first.save_checkpoint(tmp_path / "step2.ckpt")
    recorded = torch.load(tmp_path / "step2.ckpt", weights_only=False)["acnet_plan"]["sites"][0]
    assert recorded["kind"] == kind and recorded.get("options", {}) == options.get("block_options", {}).get(kind, {})

    module = Classifier()
    callback = ACNetCallback(block="acb", out=tmp_path / "original.safetensors", format="original")  # the plan wins
    resumed = trainer(callback, 4)
    resumed.fit(module, loader(), ckpt_path=tmp_path / "step2.ckpt")
    assert resumed.global_step == 4 and {s.kind for s in module.acnet_plan.converted} == {kind}
    original = Classifier()
    load_model(original, tmp_path / "original.safetensors", strict=True)  # the unmodified LightningModule
    verify(module, original, torch.randn(4, 3, 12, 12), rtol=1e-5)  # relative to max(1, max|ref|)


def test_callback_refuses_an_unknown_format():
    with pytest.raises(ACNetError, match="unknown format 'onnx'"):
        ACNetCallback(format="onnx")


def test_callback_names_the_fix_when_the_layers_are_built_later():
    with pytest.raises(ACNetError, match="configure_model"):
        trainer(ACNetCallback(), 1).fit(LateClassifier(), loader())


def test_callback_refuses_an_unknown_option():
    with pytest.raises(ACNetError, match="unknown acify option 'gamma'"):
        ACNetCallback(gamma=0.5)


def test_module_without_convs_is_refused():
    class NoConv(Classifier):
        def __init__(self):
            pl.LightningModule.__init__(self)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 4))

    with pytest.raises(ACNetError, match="has no conv"):
        trainer(ACNetCallback(), 1).fit(NoConv(), loader())
