"""Ultralytics' own trainer trains YOLO models with ACNet blocks; the result predicts, validates, exports, ships plain.

Each model trains on a tiny synthetic detection set (8 images of 64x64) on the CPU: one epoch, interrupted after its
checkpoint is written, then resumed from ``last.pt`` for a second; nothing may reach the network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from acnet_convert import ACNetError, deploy
from acnet_convert.blocks.registry import block_class, is_block, kinds

CONFIGS = ("yolov8n.yaml", "yolo11n.yaml")
IMGSZ = 64


class Interrupt(Exception):
    """Raised by a callback to stop training right after the first checkpoint is written."""


@dataclass
class Run:
    """What one model's training, resumption and use recorded."""

    root: Path
    blocks_in_training: list[int] = field(default_factory=list)
    blocks_in_ema: list[int] = field(default_factory=list)
    block_params_not_optimised: list[int] = field(default_factory=list)
    interrupted_epoch: int | None = None
    interrupted_blocks: int = 0
    resumed_from: int | None = None
    resumed_blocks: int = 0
    results_rows: int = 0
    val_map: float | None = None
    fused_blocks: int | None = None
    fused: bool = False
    predictions: int = 0
    onnx: Path | None = None


def eligible_convs(model: nn.Module) -> int:
    """Conv2d modules with odd kernel sides, at least two of them >= 3 (counted without acnet-convert)."""
    return sum(
        1 for m in model.modules()
        if type(m) is nn.Conv2d and all(k % 2 for k in m.kernel_size) and sum(k >= 3 for k in m.kernel_size) >= 2
    )  # fmt: skip


def count_blocks(model: nn.Module) -> int:
    return sum(is_block(m) for m in model.modules())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Ultralytics configured into a temporary folder, offline, with every network connection refused and recorded."""
    root = tmp_path_factory.mktemp("yolo")
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    installed = Path(importlib.util.find_spec("ultralytics").origin).parent.parent   # found without importing it
    outside = [installed / "tests", Path.home() / ".config" / "Ultralytics"]
    existed = [path.exists() for path in outside]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("YOLO_OFFLINE", "1")
        mp.setenv("YOLO_CONFIG_DIR", str(root / "config"))
        mp.setenv("MPLCONFIGDIR", str(root / "matplotlib"))           # Ultralytics imports matplotlib
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        import matplotlib
        from ultralytics import settings
        from ultralytics.utils import USER_CONFIG_DIR

        settings.update(runs_dir=str(root / "runs"), datasets_dir=str(root / "datasets"),
                        weights_dir=str(root / "weights"))  # fmt: skip
        font = USER_CONFIG_DIR / "Arial.ttf"                           # reading a dataset downloads it when missing
        if not font.exists():
            shutil.copy(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font)
        data = write_dataset(root / "data")
        yield {"root": root, "data": data, "attempts": attempts}
    assert not attempts, f"something tried to reach the network: {attempts[:3]}"
    assert [path.exists() for path in outside] == existed, "something was written outside the temporary folder"


def write_dataset(folder: Path) -> Path:
    """Eight 64x64 images per split, each with one red square and its YOLO label; returns the dataset yaml."""
    import cv2

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (folder / "images" / split).mkdir(parents=True)
        (folder / "labels" / split).mkdir(parents=True)
        for i in range(8):
            image = np.full((IMGSZ, IMGSZ, 3), 40, np.uint8)
            x0, y0 = rng.integers(4, 36, 2)
            image[y0 : y0 + 24, x0 : x0 + 24] = (50, 50, 200)
            cv2.imwrite(str(folder / "images" / split / f"{i}.jpg"), image)
            box = f"0 {(x0 + 12) / IMGSZ} {(y0 + 12) / IMGSZ} {24 / IMGSZ} {24 / IMGSZ}\n"
            (folder / "labels" / split / f"{i}.txt").write_text(box)
    yaml = folder / "data.yaml"
    yaml.write_text(f"path: {folder}\ntrain: images/train\nval: images/val\nnames:\n  0: square\n")
    return yaml


def train_args(env: dict, name: str) -> dict:
    return dict(data=str(env["data"]), epochs=2, imgsz=IMGSZ, batch=4, workers=0, device="cpu", plots=False,
                amp=False, val=True, project=str(env["root"] / "runs"), name=name, exist_ok=True, verbose=False,
                seed=0)  # fmt: skip


@pytest.fixture(scope="module", params=CONFIGS)
def run(request, env):
    """Train one epoch with blocks, interrupt, resume from last.pt, then validate, predict and export."""
    from ultralytics import YOLO

    from acnet_convert.integrations.ultralytics import acnet_trainer

    cfg = request.param
    record = Run(root=env["root"] / "runs" / cfg.split(".")[0])

    def watch(trainer):
        record.blocks_in_training.append(count_blocks(trainer.model))
        record.blocks_in_ema.append(count_blocks(trainer.ema.ema))
        optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        blocks = [m for m in trainer.model.modules() if is_block(m)]
        record.block_params_not_optimised.append(
            sum(id(p) not in optimised for b in blocks for p in b.parameters() if p.requires_grad)
        )

    def interrupt(trainer):
        raise Interrupt

    model = YOLO(cfg)
    model.add_callback("on_pretrain_routine_end", watch)
    model.add_callback("on_model_save", interrupt)
    with pytest.raises(Interrupt):
        model.train(trainer=acnet_trainer(model, init="scratch"), **train_args(env, record.root.name))
    last = record.root / "weights" / "last.pt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    record.interrupted_epoch, record.interrupted_blocks = ckpt["epoch"], count_blocks(ckpt["ema"])

    model = YOLO(str(last))
    model.add_callback("on_pretrain_routine_end", watch)
    model.train(resume=True, trainer=acnet_trainer(model))
    record.resumed_from = model.trainer.start_epoch
    record.resumed_blocks = count_blocks(model.trainer.model)
    record.results_rows = len((record.root / "results.csv").read_text().strip().splitlines()) - 1

    outputs = dict(imgsz=IMGSZ, device="cpu", project=str(record.root), exist_ok=True)  # pytest changes the default
    record.val_map = model.val(data=str(env["data"]), batch=4, plots=False, name="val", **outputs).box.map50
    record.predictions = len(model.predict(np.zeros((IMGSZ, IMGSZ, 3), np.uint8), name="predict", **outputs))
    model.fuse()
    record.fused_blocks, record.fused = count_blocks(model.model), model.model.is_fused()
    record.onnx = Path(model.export(format="onnx", imgsz=IMGSZ, device="cpu", simplify=False))
    return cfg, record


def original(cfg: str) -> nn.Module:
    """The plain model the run started from (one class, like the dataset)."""
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel(cfg, nc=1, verbose=False)


def trained(record: Run) -> nn.Module:
    """The acified model the run left in best.pt, in float32 and eval mode."""
    ckpt = torch.load(record.root / "weights" / "best.pt", map_location="cpu", weights_only=False)
    return ckpt["model"].float().eval()


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def test_blocks_replace_every_eligible_conv_before_the_optimizer_is_built(run):
    cfg, record = run
    expected = eligible_convs(original(cfg))
    assert expected > 30
    assert record.blocks_in_training == [expected, expected]      # first run, then the resumed one
    assert record.blocks_in_ema == [expected, expected]
    assert record.block_params_not_optimised == [0, 0]


def test_checkpoints_hold_blocks_and_training_resumes_from_last(run):
    cfg, record = run
    expected = eligible_convs(original(cfg))
    assert record.interrupted_epoch == 0 and record.interrupted_blocks == expected
    assert record.resumed_from == 1 and record.resumed_blocks == expected
    assert record.results_rows == 2                                # one row per epoch, the second after resuming
    assert count_blocks(trained(record)) == expected


def test_validation_prediction_and_fusion_work_on_the_trained_model(run):
    _, record = run
    assert record.val_map is not None and 0.0 <= record.val_map <= 1.0
    assert record.predictions == 1
    assert record.fused_blocks == 0 and record.fused               # YOLO.fuse() deployed the blocks first


def test_onnx_export_matches_the_deployed_model(run):
    import onnxruntime

    _, record = run
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    model = trained(record)
    deployed = deploy(model).eval()
    with torch.no_grad():
        want = deployed(x)[0]
        acnet = model(x)[0]
    session = onnxruntime.InferenceSession(str(record.onnx), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert got.shape == want.shape
    assert relative(got, want) <= 1e-4                             # ONNX Runtime vs deployed PyTorch, float32
    assert relative(want, acnet) <= 1e-4                           # deployed vs the trained blocks, float32


def test_deployed_model_has_the_original_architecture(run):
    from acnet_convert.integrations.ultralytics import deploy_model

    cfg, record = run
    before = original(cfg)
    after = deploy_model(trained(record))
    absorbed = {f"{name}.bn" for name, m in before.named_modules()
                if isinstance(getattr(m, "conv", None), nn.Conv2d) and hasattr(m, "bn") and eligible_convs(m.conv)}
    classes_before = {name: type(m) for name, m in before.named_modules() if name not in absorbed}
    assert {name: type(m) for name, m in after.named_modules()} == classes_before
    removed = sum(p.numel() for name in absorbed for p in before.get_submodule(name).parameters())
    biases = sum(before.get_submodule(name[: -len(".bn")]).conv.out_channels for name in absorbed)
    count = sum(p.numel() for p in after.parameters())
    assert count == sum(p.numel() for p in before.parameters()) - removed + biases
    assert not after.__dict__.keys() & {"fuse", "acnet_plan"}


def test_deployed_checkpoint_loads_and_predicts_without_acnet_convert(run, env, tmp_path):
    from acnet_convert.integrations.ultralytics import save_deployed

    _, record = run
    out = save_deployed(record.root / "weights" / "best.pt", tmp_path / "plain.pt")
    with zipfile.ZipFile(out) as archive:
        pickled = b"".join(archive.read(n) for n in archive.namelist() if n.endswith(".pkl"))
    assert b"acnet_convert" not in pickled
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["acnet_convert"] = None                        # importing it now fails
        import numpy as np, torch
        from ultralytics import YOLO
        model = YOLO({str(out)!r})
        assert len(model.predict(np.zeros(({IMGSZ}, {IMGSZ}, 3), np.uint8), imgsz={IMGSZ}, device="cpu")) == 1
        with torch.no_grad():
            y = model.model.float().eval()(torch.load({str(tmp_path / "x.pt")!r}))[0]
        torch.save(y, {str(tmp_path / "y.pt")!r})
        assert not [name for name in sys.modules if name.startswith("acnet_convert") and sys.modules[name]]
    """)
    environment = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(env["root"] / "config"),
                   "MPLCONFIGDIR": str(env["root"] / "matplotlib")}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        want = deploy(trained(record))(x)[0]
    assert relative(torch.load(tmp_path / "y.pt"), want) <= 1e-3   # the file stores fp16 weights, as Ultralytics does


def fuse_cases() -> list[tuple[str, str]]:
    """Every registered block kind and mode."""
    cases = []
    for kind in kinds():
        for mode in ("exact", "fast"):
            try:
                block_class(kind, mode)
            except ACNetError:
                continue
            cases.append((kind, mode))
    return cases


@pytest.mark.parametrize("kind,mode", fuse_cases())
def test_ultralytics_fuse_deploys_every_block_kind_exactly(env, kind, mode):
    import inspect

    from acnet_convert import acify
    from acnet_convert.integrations.ultralytics import acify_model

    torch.manual_seed(0)
    choice = {"block": kind} if "block" in inspect.signature(acify).parameters else {}
    model = acify_model(original("yolov8n.yaml"), mode=mode, init="scratch", **choice)
    for m in model.modules():                                      # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        want = model(x)[0]
        fused = model.fuse(verbose=False)
        got = fused(x)[0]
    assert count_blocks(fused) == 0 and fused.is_fused()
    assert relative(got, want) <= 1e-4                             # float32 on both sides


@pytest.mark.parametrize("cfg", ["yolov8n-cls.yaml", "yolov8n-seg.yaml", "yolov8n-pose.yaml", "yolov8n-obb.yaml",
                                 "yolov10n.yaml"])  # fmt: skip
def test_ultralytics_fuse_deploys_the_blocks_of_every_task(env, cfg):
    from ultralytics import YOLO

    from acnet_convert.integrations.ultralytics import acify_model

    torch.manual_seed(0)
    model = YOLO(cfg).model
    own = [m for m in model.modules() if type(m).__name__ in ("RepConv", "RepVGGDW", "Conv2")]  # fused by Ultralytics
    expected = eligible_convs(model) - sum(eligible_convs(m) for m in own)
    model = acify_model(model, init="scratch").eval()
    assert count_blocks(model) == expected > 0
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        want = first_tensor(model(x))
        fused = model.fuse(verbose=False)
        got = first_tensor(fused(x))
    assert count_blocks(fused) == 0 and fused.is_fused()
    assert relative(got, want) <= 1e-4                             # float32 on both sides


def first_tensor(output: object) -> torch.Tensor:
    """The first tensor of a model's (possibly nested) output."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    return output


def test_training_from_a_plain_checkpoint_keeps_its_function(env, tmp_path):
    from ultralytics import YOLO

    from acnet_convert.integrations.ultralytics import acnet_trainer

    path = tmp_path / "plain.pt"
    YOLO("yolov8n.yaml").save(path)
    model = YOLO(str(path))
    trainer = acnet_trainer(model)(overrides={**train_args(env, "from-pt"), "model": str(path)})
    acified = trainer.get_model(cfg=model.model.yaml, weights=model.model, verbose=False).eval()
    assert count_blocks(acified) == eligible_convs(model.model)
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():                                          # boxes: the class branch depends on the classes
        boxes, want = acified(x)[0][:, :4], model.model.float().eval()(x)[0][:, :4]
    assert relative(boxes, want) <= 1e-4                           # init="preserve", float32


def test_fine_tuning_an_acnet_model_on_other_classes_rebuilds_its_blocks(env, tmp_path):
    from ultralytics import YOLO

    from acnet_convert.integrations.ultralytics import acify_model, acnet_trainer

    torch.manual_seed(0)
    source = acify_model(original("yolov8n.yaml"), init="scratch")
    data = tmp_path / "two.yaml"
    data.write_text(env["data"].read_text().replace("  0: square\n", "  0: square\n  1: circle\n"))
    model = YOLO("yolov8n.yaml")
    overrides = {**train_args(env, "two"), "data": str(data), "model": "yolov8n.yaml"}
    trainer = acnet_trainer(model, mode="fast")(overrides=overrides)
    tuned = trainer.get_model(cfg="yolov8n.yaml", weights=source, verbose=False)
    assert tuned.model[-1].nc == 2 and count_blocks(tuned) == count_blocks(source)
    assert {type(m) for m in tuned.modules() if is_block(m)} == {type(m) for m in source.modules() if is_block(m)}
    backbone = {k: v for k, v in source.state_dict().items() if k.startswith("model.0.")}
    assert backbone and all(torch.equal(tuned.state_dict()[k], v) for k, v in backbone.items())


def test_user_errors_name_the_fix(env):
    from ultralytics import YOLO

    from acnet_convert.integrations.ultralytics import acnet_trainer, save_deployed

    with pytest.raises(ACNetError, match="Ultralytics model"):
        acnet_trainer(nn.Conv2d(3, 3, 3))
    with pytest.raises(ACNetError, match="unknown acify option"):
        acnet_trainer(YOLO("yolov8n.yaml"), nitt="scratch")
    plain = env["root"] / "plain.pt"
    YOLO("yolov8n.yaml").save(plain)
    with pytest.raises(ACNetError, match="plain already"):
        save_deployed(plain)


def test_importing_acnet_convert_does_not_import_ultralytics():
    code = "import sys, acnet_convert, acnet_convert.integrations; assert 'ultralytics' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolov10n.yaml"])  # yolov10n: blocks inside RepVGGDW too
def test_a_plain_acify_fuses_exactly_with_ultralytics_own_fuse(env, cfg):
    from ultralytics.nn.tasks import DetectionModel

    from acnet_convert import acify

    model = acify(DetectionModel(cfg, nc=1, verbose=False), init="scratch").double().eval()
    assert count_blocks(model) == eligible_convs(original(cfg))
    for m in model.modules():                                      # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 3, IMGSZ, IMGSZ, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)[0]
        deployed = deploy(model).fuse(verbose=False)               # a deployed model fuses too
        fused = model.fuse(verbose=False)
        got = fused(x)[0]
    assert fused is model and count_blocks(fused) == 0 and fused.is_fused() and deployed.is_fused()
    assert relative(got, want) <= 1e-8                             # float64 on both sides
    assert relative(deployed(x)[0], want) <= 1e-8


def test_a_plain_acify_of_yolo_model_validates_predicts_and_exports(env, tmp_path, monkeypatch):
    from ultralytics import YOLO

    from acnet_convert import acify

    monkeypatch.chdir(tmp_path)                                    # where the export of a model from a yaml lands
    yolo = YOLO("yolov8n.yaml")
    yolo.model = acify(yolo.model, init="scratch")
    outputs = dict(imgsz=IMGSZ, device="cpu", project=str(env["root"] / "plain-acify"), exist_ok=True)
    metrics = yolo.val(data=str(env["data"]), batch=4, plots=False, name="val", **outputs)
    assert 0.0 <= metrics.box.map50 <= 1.0
    assert len(yolo.predict(np.zeros((IMGSZ, IMGSZ, 3), np.uint8), name="predict", **outputs)) == 1
    predicting = yolo.predictor.model.model                        # what Ultralytics fused to predict with
    assert count_blocks(predicting) == 0 and predicting.is_fused()
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        want = yolo.model.eval()(x)[0]
    onnx = yolo.export(format="onnx", imgsz=IMGSZ, device="cpu", simplify=False)   # fuses a copy of the model
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert Path(onnx).resolve().parent == tmp_path.resolve()
    assert relative(got, want) <= 1e-4                             # ONNX Runtime vs the blocks, float32
