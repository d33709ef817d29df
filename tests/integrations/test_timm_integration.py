"""timm: its reparameterize_model folds every block kind exactly; acnet_<arch> models train with timm's own pieces."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from PIL import Image
from timm.utils import reparameterize_model
from torch import nn

import acnet_convert.integrations.timm as acnet_timm
from acnet_convert import ACNetError, acify, deploy
from acnet_convert.blocks import block_class, is_block, kinds


def eligible_convs(model: nn.Module) -> int:
    """Conv2d modules with odd kernel sides, at least two of them >= 3 (counted without acnet-convert)."""
    return sum(
        1 for m in model.modules()
        if type(m) is nn.Conv2d and all(k % 2 for k in m.kernel_size) and sum(k >= 3 for k in m.kernel_size) >= 2
    )  # fmt: skip


def count_blocks(model: nn.Module) -> int:
    return sum(is_block(m) for m in model.modules())


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def kind_options(kind: str) -> dict | None:
    """acify's options selecting ``kind``; None when this acify cannot select it."""
    if "block" in inspect.signature(acify).parameters:
        return {"block": kind}
    return {} if kind == "acb" else None


def cases() -> list[tuple[str, str]]:
    """Every registered block kind in each mode it has, that acify can select."""
    found = []
    for kind in kinds():
        for mode in ("exact", "fast"):
            try:
                block_class(kind, mode)
            except ACNetError:
                continue
            if kind_options(kind) is not None:
                found.append((kind, mode))
    return found


def scramble_batchnorms(model: nn.Module) -> None:
    """Give every BatchNorm statistics and an affine map that are far from the identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("kind,mode", cases())
def test_reparameterize_model_folds_every_kind_like_deploy(kind, mode):
    torch.manual_seed(0)
    model = acify(timm.create_model("resnet18", num_classes=10), mode=mode, init="scratch", **kind_options(kind))
    assert count_blocks(model) > 0
    scramble_batchnorms(model)
    model.eval()
    folded = reparameterize_model(model)
    deployed = deploy(model)
    assert count_blocks(folded) == 0
    assert {n: type(m) for n, m in folded.named_modules()} == {n: type(m) for n, m in deployed.named_modules()}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        got, want = folded.double()(x), deployed.double()(x)
        trained = model.double()(x)
    assert relative(got, want) <= 1e-8                             # float64, timm's fold vs deploy
    assert relative(got, trained) <= 1e-5                          # fused weights are float32 parameters


def test_every_timm_architecture_has_an_acnet_name():
    names = timm.list_models(f"{acnet_timm.PREFIX}*")
    assert len(names) == len([n for n in timm.list_models() if not n.startswith(acnet_timm.PREFIX)])
    assert "acnet_resnet18" in names and "acnet_efficientnet_b0" in names
    assert timm.models.model_entrypoint("acnet_resnet18") is acnet_timm.acnet_resnet18


def test_acnet_model_is_the_timm_model_with_blocks():
    model = timm.create_model("acnet_resnet18", num_classes=10)
    plain = timm.create_model("resnet18", num_classes=10)
    assert type(model) is type(plain) and model.num_classes == 10
    assert model.pretrained_cfg["architecture"] == "resnet18"      # timm's data config still resolves
    assert count_blocks(model) == eligible_convs(plain) == 17
    fast = timm.create_model("acnet_resnet18", acnet_mode="fast")
    assert {type(m).mode for m in fast.modules() if is_block(m)} == {"fast"}


def test_kind_options_pass_through_acnet_keywords_and_large_kernels_take_the_dilated_kind():
    mobile = timm.create_model("acnet_resnet10t", acnet_block="mobileone", acnet_block_options={"mobileone": {"k": 2}})
    assert {m.options["k"] for m in mobile.modules() if is_block(m)} == {2}
    torch.manual_seed(0)
    model = timm.create_model("acnet_convnext_atto", acnet_block="dilated", acnet_init="scratch", num_classes=3)
    depthwise = [m for m in timm.create_model("convnext_atto").modules() if isinstance(m, nn.Conv2d)
                 and m.groups == m.in_channels == m.out_channels and m.kernel_size == (7, 7)]  # fmt: skip
    assert sum(block.kind == "dilated" for block in model.modules() if is_block(block)) == len(depthwise) > 0
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        assert relative(reparameterize_model(model)(x), want) <= 1e-5  # float32


def test_register_fixes_options_under_a_new_name():
    name = acnet_timm.register("resnet10t", "acnet_scratch_resnet10t", init="scratch", mode="fast")
    model = timm.create_model(name, num_classes=3)
    assert count_blocks(model) == eligible_convs(timm.create_model("resnet10t")) > 0
    assert {type(m).mode for m in model.modules() if is_block(m)} == {"fast"}


def test_user_errors_name_the_fix():
    with pytest.raises(ACNetError, match="timm.list_models"):
        acnet_timm.register("no_such_net")
    with pytest.raises(ACNetError, match="unknown acify option"):
        acnet_timm.register("resnet18", "acnet_typo", nit="scratch")
    with pytest.raises(ACNetError, match="unknown init"):
        timm.create_model("acnet_resnet18", acnet_init="bogus")
    with pytest.raises(ACNetError, match="use vit_tiny_patch16_224"):
        timm.create_model("acnet_vit_tiny_patch16_224", img_size=32)


def write_image_folder(root) -> None:
    """Two classes of four 40x40 images each, in ImageFolder layout."""
    generator = torch.Generator().manual_seed(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            pixels = torch.randint(0, 256, (40, 40, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / label / f"{i}.png")


def test_two_training_steps_with_timm_pieces_then_resume_and_fold(tmp_path):
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.models import load_checkpoint
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    write_image_folder(tmp_path / "train")
    model = timm.create_model("acnet_resnet18", num_classes=2, acnet_init="scratch")
    config = resolve_data_config({"input_size": (3, 32, 32)}, model=model)
    dataset = create_dataset("", root=str(tmp_path / "train"), is_training=True)
    loader = create_loader(dataset, input_size=config["input_size"], batch_size=4, is_training=True,
                           use_prefetcher=False, num_workers=0, mean=config["mean"], std=config["std"])  # fmt: skip
    optimizer = create_optimizer_v2(model, "sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
    ema = ModelEmaV3(model, decay=0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    for x, y in loader:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)
    assert len(loader) == 2 and torch.isfinite(loss)
    blocks = [name for name, m in model.named_modules() if is_block(m)]
    in_blocks = [n for n in before if any(n.startswith(f"{b}.") for b in blocks)]
    assert in_blocks and all(not torch.equal(model.get_parameter(n), before[n]) for n in in_blocks)

    torch.save({"state_dict": model.state_dict(), "state_dict_ema": ema.module.state_dict()}, tmp_path / "ckpt.pth")
    resumed = timm.create_model("acnet_resnet18", num_classes=2)  # what train.py's --resume loads into
    load_checkpoint(resumed, str(tmp_path / "ckpt.pth"), use_ema=True)
    x = next(iter(loader))[0]
    with torch.no_grad():
        want = ema.module.eval()(x)
        assert relative(resumed.eval()(x), want) <= 1e-6           # same weights, float32
        folded = reparameterize_model(resumed)(x)
    assert relative(folded, want) <= 1e-4                          # folded vs trained blocks, float32


def test_launcher_runs_a_timm_script_with_acnet_models(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import argparse, sys
        import timm
        from timm.utils import ParseKwargs
        from acnet_convert.blocks import is_block

        parser = argparse.ArgumentParser()
        parser.add_argument("--model")
        parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs)
        args = parser.parse_args()
        model = timm.create_model(args.model, num_classes=5, **args.model_kwargs)
        modes = sorted({type(m).mode for m in model.modules() if is_block(m)})
        print(sum(is_block(m) for m in model.modules()), *modes)
    """))
    command = [sys.executable, "-m", "acnet_convert.integrations.timm_train", str(script),
               "--model", "acnet_resnet18", "--model-kwargs", "acnet_mode=fast"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["17", "fast"]


def test_launcher_needs_a_script():
    from acnet_convert.integrations.timm_train import main

    with pytest.raises(ACNetError, match="name the script"):
        main(["--model", "acnet_resnet18"])


def test_importing_acnet_convert_does_not_import_the_integrations():
    code = "import sys, acnet_convert.integrations; assert 'acnet_convert.integrations.timm' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
