"""mode="repopt" under Lightning's own loop and the module's optimizer: the masks act as predicted, a checkpoint
resumes with them, and the deployed module has none."""

import copy

import torch
from test_training_lightning import Classifier, loader, trainer
from torch.nn import functional as F

from acnet_convert import acify
from acnet_convert.integrations.lightning import ACNetCallback
from acnet_convert.repopt import has_masks, is_masked

STEPS = 2


def masked_names(module):
    return [name for name, m in module.named_modules() if is_masked(m)]


def predicted(start: Classifier, masks: dict[str, torch.Tensor]) -> Classifier:
    """STEPS of the module's own SGD on the plain module, each conv's gradient multiplied by its mask by hand."""
    model = copy.deepcopy(start)
    optimizer = model.configure_optimizers()
    x, y = next(iter(loader()))
    for _ in range(STEPS):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for name, mask in masks.items():
            model.get_submodule(name).weight.grad.mul_(mask)
        optimizer.step()
    return model


def test_lightning_trains_a_repopt_module_as_predicted_resumes_and_deploys_plain(tmp_path):
    torch.manual_seed(0)
    start = Classifier()
    module = copy.deepcopy(start)
    first = trainer(ACNetCallback(block="acb", mode="repopt"), STEPS)
    first.fit(module, loader())
    names = masked_names(module)
    assert len(names) == 3 and [type(m) for m in module.modules()] == [type(m) for m in start.modules()]
    masks = {name: module.get_submodule(name).repopt_mask for name in names}
    want = predicted(start, masks)
    unmasked = predicted(start, {})
    for name in names:
        got, ref = module.get_submodule(name).weight, want.get_submodule(name).weight
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5, name  # float32
        plain = unmasked.get_submodule(name).weight
        assert (got - plain).abs().max() > 1e-3 * ref.abs().max(), name  # the masks act

    first.save_checkpoint(tmp_path / "steps.ckpt")
    resumed_module = Classifier()
    callback = ACNetCallback(block="acb", mode="repopt")
    resumed = trainer(callback, STEPS + 1)
    resumed.fit(resumed_module, loader(), ckpt_path=tmp_path / "steps.ckpt")
    assert resumed.global_step == STEPS + 1 and masked_names(resumed_module) == names
    assert resumed_module.acnet_plan.to_dict() == module.acnet_plan.to_dict()
    assert all(torch.equal(resumed_module.get_submodule(n).repopt_mask, masks[n]) for n in names)

    deployed = callback.deployed
    assert not has_masks(deployed)
    assert not any(m._forward_pre_hooks or m._non_persistent_buffers_set for m in deployed.modules())
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(deployed(x), resumed_module.eval()(x))
    assert list(deployed.state_dict()) == list(acify(Classifier(), mode="repopt").state_dict())
