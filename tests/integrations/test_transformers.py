"""Hugging Face transformers models train with ACNet blocks under ``Trainer``, resume, and ship in the original format.

Each model is built from a tiny config (a few layers, image size 32) and trains two steps on eight random images,
on the CPU and offline; a second Trainer resumes from the first one's checkpoint after its first step.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from testkit import randomize_bn
from torch import nn

from acnet_convert import ACNetError, deploy
from acnet_convert.blocks import is_block

transformers = pytest.importorskip("transformers")

STEPS = 2
CONFIGS = {  # tiny configs of four architectures; MobileNetV2 pads with a helper that torch.fx cannot trace
    "resnet": lambda: transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                layer_type="basic", num_labels=3, image_size=32),
    "mobilenet_v2": lambda: transformers.MobileNetV2Config(depth_multiplier=0.25, image_size=32, num_labels=3),
    "efficientnet": lambda: transformers.EfficientNetConfig(width_coefficient=0.1, depth_coefficient=0.1,
                                                            hidden_dim=128, image_size=32, num_labels=3),
    "convnext": lambda: transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                                    layer_scale_init_value=1.0, image_size=32, num_labels=3),
}  # fmt: skip


class Images(torch.utils.data.Dataset):
    """Eight random images with random labels out of three."""

    def __init__(self, channels: int):
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(8, channels, 32, 32, generator=generator)
        self.labels = torch.randint(0, 3, (8,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


class StartStep(transformers.TrainerCallback):
    """Records the step a run starts from."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step


@dataclass
class Run:
    """What one model's training and resumed training left."""

    original: nn.Module
    trained: nn.Module
    resumed: nn.Module
    resumed_from_step: int
    blocks_not_optimised: int
    checkpoint: Path
    callback: object
    out: Path


def arguments(folder: Path) -> object:
    return transformers.TrainingArguments(
        output_dir=str(folder), max_steps=STEPS, save_steps=1, per_device_train_batch_size=4, learning_rate=0.01,
        use_cpu=True, dataloader_num_workers=0, report_to="none", logging_strategy="no", eval_strategy="no",
        disable_tqdm=True, seed=0,
    )  # fmt: skip


def eligible_convs(model: nn.Module) -> int:
    """Conv2d modules (of any subclass) with odd kernel sides of at least 3 (counted without acnet-convert)."""
    return sum(isinstance(m, nn.Conv2d) and all(k % 2 and k >= 3 for k in m.kernel_size) for m in model.modules())


def count_blocks(model: nn.Module) -> int:
    return sum(is_block(m) for m in model.modules())


@pytest.fixture(scope="module", params=list(CONFIGS))
def run(request, tmp_path_factory):
    """Train two steps with the callback (no example inputs given), then resume a fresh model from step 1."""
    from acnet_convert.integrations.transformers import ACNetCallback

    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageClassification.from_config(CONFIGS[request.param]())
    data = Images(model.config.num_channels)
    for m in model.modules():  # HF's weights of std 0.02 (BatchNorms' too) let the signal of so narrow a model vanish
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    randomize_bn(model, data.pixels[:4])
    original = copy.deepcopy(model)
    callback = ACNetCallback(out=root / "deployed", init="scratch")
    trainer = transformers.Trainer(model=model, args=arguments(root / "run"), train_dataset=data, callbacks=[callback])
    trainer.train()
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    blocks = [m for m in trainer.model.modules() if is_block(m)]
    not_optimised = sum(id(p) not in optimised for b in blocks for p in b.parameters())

    checkpoint = root / "run" / "checkpoint-1"
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    fresh = transformers.AutoModelForImageClassification.from_config(config)
    start = StartStep()
    again = transformers.Trainer(model=fresh, args=arguments(root / "resumed"), train_dataset=data,
                                 callbacks=[ACNetCallback(block="repvgg"), start])  # fmt: skip
    # block="repvgg" is ignored: the checkpoint's config records the plan, and its blocks are built
    again.train(resume_from_checkpoint=str(checkpoint))
    return Run(original, trainer.model, again.model, start.step, not_optimised, checkpoint, callback,
               root / "deployed")  # fmt: skip


def test_every_eligible_conv_becomes_a_block_before_the_optimizer_is_built(run):
    assert count_blocks(run.trained) == eligible_convs(run.original) > 0
    assert run.blocks_not_optimised == 0


def test_checkpoints_carry_the_plan_and_a_resumed_run_ends_where_the_first_did(run):
    recorded = json.loads((run.checkpoint / "config.json").read_text())["acnet_plan"]
    assert recorded == run.trained.acnet_plan.to_dict()
    assert run.resumed_from_step == 1
    kinds = [type(m) for m in run.trained.modules() if is_block(m)]
    assert [type(m) for m in run.resumed.modules() if is_block(m)] == kinds
    resumed, trained = run.resumed.state_dict(), run.trained.state_dict()
    assert resumed.keys() == trained.keys()
    for key, value in trained.items():                             # the same second step, on the same batch
        assert torch.allclose(resumed[key], value, rtol=1e-5, atol=1e-6), key


def test_save_pretrained_original_format_loads_into_the_unmodified_class(run, tmp_path):
    from acnet_convert.integrations.transformers import save_original

    cls = type(run.original)
    loaded, info = cls.from_pretrained(run.out, output_loading_info=True)         # what the callback wrote, float32
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    assert "acnet_plan" not in json.loads((run.out / "config.json").read_text())
    x = torch.randn(2, run.original.config.num_channels, 32, 32)
    with torch.no_grad():
        want, got = run.callback.deployed.eval()(x).logits, loaded.eval()(x).logits
    assert (want[0] - want[1]).abs().max() > 0.01 * want.abs().max()             # the outputs depend on the input
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4           # float32 on both sides

    trained = copy.deepcopy(run.trained).double()
    save_original(trained, tmp_path / "float64")
    loaded = cls.from_pretrained(tmp_path / "float64", dtype=torch.float64).eval()
    with torch.no_grad():
        want, got = deploy(trained).eval()(x.double()).logits, loaded(x.double()).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-8           # float64 on both sides


def test_every_deployed_conv_has_its_original_class(run):
    convs = {name: type(m) for name, m in run.original.named_modules() if isinstance(m, nn.Conv2d)}
    deployed = dict(run.callback.deployed.named_modules())
    assert {name: type(deployed[name]) for name in convs} == convs


def test_user_errors_name_the_fix(tmp_path):
    from acnet_convert.integrations.transformers import ACNetCallback, acify_model, save_original

    model = transformers.AutoModelForImageClassification.from_config(CONFIGS["resnet"]())
    with pytest.raises(ACNetError, match="PreTrainedModel"):
        acify_model(nn.Sequential(nn.Conv2d(3, 3, 3)))
    with pytest.raises(ACNetError, match="unknown acify option 'nitt'"):
        ACNetCallback(nitt="scratch")
    with pytest.raises(ACNetError, match="save_original takes"):
        save_original(model, tmp_path)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ACNetError, match="before building the optimizer"):
        transformers.Trainer(model=model, args=arguments(tmp_path), callbacks=[ACNetCallback()],
                             optimizers=(optimizer, None))  # fmt: skip


def test_a_config_without_image_size_is_analysed_by_torch_fx():
    from acnet_convert.integrations.transformers import acify_model

    model = transformers.AutoModelForImageClassification.from_config(CONFIGS["resnet"]())
    del model.config.image_size                                    # as in ResNetConfig(), RegNetConfig()
    eligible = eligible_convs(model)
    assert count_blocks(acify_model(model)) == eligible > 0
    assert all(site.evidence == "fx" for site in model.acnet_plan.converted)


def test_importing_acnet_convert_does_not_import_transformers():
    code = "import sys, acnet_convert, acnet_convert.integrations; assert 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
