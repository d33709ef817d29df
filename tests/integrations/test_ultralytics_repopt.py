"""mode="repopt" under Ultralytics' own trainer and optimizer: the convs stay plain, the optimizer receives the
preconditioned gradient, last.pt resumes with the same preconditioners, and the shipped model has none of them."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from test_ultralytics import IMGSZ, Interrupt, env, train_args  # noqa: F401 (env is a fixture)

from acnet_convert.repopt import has_masks, is_masked


def masked(model) -> list[str]:
    return [name for name, m in model.named_modules() if is_masked(m)]


def test_ultralytics_trains_resumes_and_ships_a_repopt_model(env, tmp_path):  # noqa: F811 (the fixture)
    from ultralytics import YOLO

    from acnet_convert.integrations.ultralytics import acnet_trainer, save_deployed

    seen = {}

    def watch_gradients(trainer):
        """The raw gradient of one conv (a hook before the preconditioner's) and the one the optimizer reads."""
        name = masked(trainer.model)[3]
        weight = trainer.model.get_submodule(name).weight
        assert not weight._backward_hooks  # the preconditioner hooks it at the first forward, after this one
        seen.update(name=name, mask=trainer.model.get_submodule(name).repopt_mask.clone(), raw=[], used=[],
                    optimizer=type(trainer.optimizer).__name__)  # fmt: skip
        weight.register_hook(lambda g: seen["raw"].append(g.clone()))
        weight.register_post_accumulate_grad_hook(lambda p: seen["used"].append(p.grad.clone()))

    def interrupt(trainer):
        raise Interrupt

    model = YOLO("yolov8n.yaml")
    model.add_callback("on_pretrain_routine_end", watch_gradients)
    model.add_callback("on_model_save", interrupt)
    args = {**train_args(env, "repopt"), "val": False}
    with pytest.raises(Interrupt):
        model.train(trainer=acnet_trainer(model, block="acb", mode="repopt"), **args)
    assert seen["raw"] and len(seen["raw"]) == len(seen["used"])
    for raw, used in zip(seen["raw"], seen["used"]):
        assert ((used - raw * seen["mask"]).abs().max() / used.abs().max()).item() <= 1e-6  # float32
        assert (used - raw).abs().max() > 1e-3 * used.abs().max()  # the mask acts
    last = env["root"] / "runs" / "repopt" / "weights" / "last.pt"
    trained = torch.load(last, map_location="cpu", weights_only=False)["ema"]
    sites = trained.acnet_plan.converted
    assert len(sites) > 30 and all(s.mode == "repopt" for s in sites) and set(masked(trained)) == {s.name for s in sites}

    resumed = YOLO(str(last))
    resumed.train(resume=True, trainer=acnet_trainer(resumed))
    assert resumed.trainer.start_epoch == 1
    assert set(masked(resumed.trainer.model)) == {s.name for s in sites}
    assert torch.equal(resumed.trainer.model.get_submodule(seen["name"]).repopt_mask, seen["mask"])

    out = save_deployed(env["root"] / "runs" / "repopt" / "weights" / "last.pt", tmp_path / "plain.pt")
    with zipfile.ZipFile(out) as archive:
        pickled = b"".join(archive.read(n) for n in archive.namelist() if n.endswith(".pkl"))
    assert b"acnet_convert" not in pickled and b"repopt_mask" not in pickled and b"WeightHook" not in pickled
    plain = YOLO(str(out))
    assert not has_masks(plain.model)
    assert len(plain.predict(np.zeros((IMGSZ, IMGSZ, 3), np.uint8), device="cpu", imgsz=IMGSZ, verbose=False)) == 1
