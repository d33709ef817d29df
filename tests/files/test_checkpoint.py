"""Checkpoint files: safe reads, atomic writes, strict loading, and the ``original`` deployed layout."""

import os
import stat

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from acnet_convert import ACBlock, ACNetError, acify, deploy, original_state_dict, verify
from acnet_convert.files.checkpoint import atomic_output, load_strict, metadata, read, write

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Every layout a converted conv can have: with/without bias, with/without a BatchNorm after it."""

    def __init__(self, eps=1e-5, alone_bias=True):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, eps=eps)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8, eps=eps)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=alone_bias)
        self.proj = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.conv3(x))
        return self.head(self.proj(x).mean((2, 3)))


X = torch.randn(2, 3, 12, 12)


def trained(model, steps=3, mode="exact"):
    """acify, then a few SGD steps so that every BatchNorm and branch moves away from its initial values."""
    acified = acify(model, mode=mode)
    dtype = next(acified.parameters()).dtype
    optimizer = torch.optim.SGD(acified.parameters(), lr=0.1)
    for _ in range(steps):
        loss = (
            acified(torch.randn(4, 3, 12, 12, dtype=dtype)).pow(2).mean()
            + sum(p.sum() for p in acified.parameters()) * 1e-2
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return acified.eval()


def leftovers(directory):
    return [p.name for p in directory.iterdir() if p.name.endswith(".partial")]


def test_safetensors_round_trip_keeps_tensors_and_metadata(tmp_path):
    state = Net().state_dict()
    recorded = metadata("acified", spec="net.py", args=("width=8",), options={"init": "preserve"}, input_shape=(1, 3, 12, 12))
    write(tmp_path / "a.safetensors", state, recorded)
    back = read(tmp_path / "a.safetensors")
    assert back.state_dict.keys() == state.keys() and all(torch.equal(back.state_dict[k], v) for k, v in state.items())
    assert (
        back.get("format") == "acified"
        and back.get("args") == ["width=8"]
        and back.get("input_shape") == [1, 3, 12, 12]
    )
    assert back.get("version")  # the writing version is recorded


def test_pt_output_is_a_plain_state_dict(tmp_path):
    model = Net()
    write(tmp_path / "a.pt", model.state_dict())
    fresh = Net()
    fresh.load_state_dict(torch.load(tmp_path / "a.pt", weights_only=True), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    assert read(tmp_path / "a.pt").metadata == {}


def test_tied_weights_are_written_to_safetensors(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    write(tmp_path / "tied.safetensors", model.state_dict())
    state = read(tmp_path / "tied.safetensors").state_dict
    assert torch.equal(state["0.weight"], state["1.weight"])


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": s, "epoch": 3},
        lambda s: {"model": s, "optimizer": {}},
        lambda s: {f"module.{k}": v for k, v in s.items()},
        lambda s: {"state_dict": {f"_orig_mod.{k}": v for k, v in s.items()}},
    ],
)
def test_wrappers_and_prefixes_are_unwrapped(tmp_path, wrap):
    state = Net().state_dict()
    torch.save(wrap(state), tmp_path / "w.pt")
    assert read(tmp_path / "w.pt").state_dict.keys() == state.keys()


class Custom:
    pass


def test_pickle_that_needs_code_is_refused(tmp_path):
    torch.save({"model": Custom()}, tmp_path / "evil.pt")
    with pytest.raises(ACNetError, match=r"Custom\) that load only by running code.*refused for safety"):
        read(tmp_path / "evil.pt")


@pytest.mark.parametrize(
    ("name", "make", "fragment"),
    [
        ("short.safetensors", lambda good: good.read_bytes()[:200], "not a valid safetensors file"),
        ("short.pt", None, "not a readable PyTorch or safetensors checkpoint"),
        ("text.pt", lambda good: b"hello, world\n", "not a readable PyTorch or safetensors checkpoint"),
        ("list.pt", "list", "holds a list, not a state_dict"),
        ("mixed.pt", "mixed", "entries epoch are not tensors"),
    ],
)
def test_unreadable_files_are_named(tmp_path, name, make, fragment):
    write(tmp_path / "good.safetensors", Net().state_dict())
    write(tmp_path / "good.pt", Net().state_dict())
    path = tmp_path / name
    if make == "list":
        torch.save([torch.zeros(1)], path)
    elif make == "mixed":
        torch.save({"w": torch.zeros(1), "epoch": 3}, path)
    elif make is None:
        path.write_bytes((tmp_path / "good.pt").read_bytes()[:3000])
    else:
        path.write_bytes(make(tmp_path / "good.safetensors"))
    with pytest.raises(ACNetError, match=fragment):
        read(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ACNetError, match="not found"):
        read(tmp_path / "nope.safetensors")
    with pytest.raises(ACNetError, match="is not a file"):
        read(tmp_path)


def test_load_strict_lists_every_kind_of_mismatch_and_leaves_the_model_untouched():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.zeros_like(v) for k, v in Net().state_dict().items()}
    del state["bn1.running_mean"]
    state["extra.weight"] = torch.zeros(1)
    state["head.weight"] = torch.zeros(3, 4)
    with pytest.raises(ACNetError) as caught:
        load_strict(model, state, source="w.pt", hint="check SPEC")
    message = str(caught.value)
    assert "1 missing (bn1.running_mean)" in message and "1 unexpected (extra.weight)" in message
    assert "head.weight [3, 4] vs [2, 4]" in message and message.endswith("check SPEC")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_atomic_output_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert not target.exists() and leftovers(tmp_path) == []


def test_existing_output_needs_force(tmp_path):
    target = tmp_path / "out.pt"
    target.write_bytes(b"keep me")
    with pytest.raises(ACNetError, match=r"already exists: pass force=True to overwrite it"):
        write(target, Net().state_dict())
    assert target.read_bytes() == b"keep me"
    write(target, Net().state_dict(), force=True)
    assert read(target).state_dict.keys() == Net().state_dict().keys() and leftovers(tmp_path) == []


def test_outputs_get_the_usual_permissions(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    write(tmp_path / "a.safetensors", Net().state_dict())
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o666 & ~mask


def test_missing_folders_are_created_and_removed_again_when_writing_fails(tmp_path):
    write(tmp_path / "sub" / "dir" / "a.pt", Net().state_dict())
    assert (tmp_path / "sub" / "dir" / "a.pt").is_file()
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "new" / "dir" / "b.pt") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_bad_output_names(tmp_path):
    with pytest.raises(ACNetError, match="cannot tell the format"):
        write(tmp_path / "a.bin", Net().state_dict())
    (tmp_path / "file.pt").write_bytes(b"")
    with pytest.raises(ACNetError, match="is a file, so .* cannot be written under it"):
        write(tmp_path / "file.pt" / "sub" / "a.pt", Net().state_dict())
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(ACNetError, match="is a directory"):
        write(tmp_path / "folder.pt", Net().state_dict())


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_original_layout_loads_into_the_unmodified_model_and_matches(mode):
    acified = trained(Net(), mode=mode)
    deployed = deploy(acified)
    fresh = Net()
    state = original_state_dict(deployed)
    fresh.load_state_dict(state, strict=True)
    assert {type(m) for m in fresh.modules()} == {type(m) for m in Net().modules()}
    assert fresh.bn1.bias.abs().max() > 0 and fresh.conv2.bias.abs().max() > 0  # the biases really moved
    verify(acified, fresh, X, rtol=1e-5)  # relative to max(1, max|ref|)


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1, 0.5, 1e-8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_absorbed_batchnorm_becomes_an_exact_identity_plus_bias(eps, dtype):
    acified = trained(Net(eps=eps).to(dtype))
    fresh = Net(eps=eps).to(dtype)
    fresh.load_state_dict(original_state_dict(deploy(acified)))
    y = torch.randn(2, 8, 5, 5, dtype=dtype) * 10
    for bn in (fresh.bn1, fresh.bn2):
        bn.eval()
        assert torch.equal(bn(y), y + bn.bias[:, None, None])  # exact, not approximately


def test_alone_conv_without_bias_is_refused_once_its_fused_bias_is_nonzero():
    untouched = acify(Net(alone_bias=False)).eval()  # preserve init: the new branches add exactly zero bias
    fresh = Net(alone_bias=False)
    fresh.load_state_dict(original_state_dict(deploy(untouched)))
    verify(untouched, fresh, X, rtol=1e-5)
    acified = trained(Net(alone_bias=False))
    with pytest.raises(ACNetError, match="conv3 has no bias and no BatchNorm after it.*use format plain"):
        original_state_dict(deploy(acified))


def test_models_already_containing_blocks_have_no_original_layout():
    model = nn.Sequential(ACBlock(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3))
    acified = acify(model)
    with pytest.raises(ACNetError, match="already contains blocks"):
        original_state_dict(deploy(acified))


def test_written_safetensors_load_with_the_plain_safetensors_api(tmp_path):
    acified = trained(Net())
    write(tmp_path / "t.safetensors", acified.state_dict())
    rebuilt = acify(Net())
    rebuilt.load_state_dict(safetensors.torch.load_file(tmp_path / "t.safetensors"), strict=True)
    verify(acified, rebuilt, X, rtol=0.0)  # identical weights: identical outputs


class Volume(nn.Module):
    """A Conv3d with its BatchNorm3d, then a ConvTranspose2d with a bias and no BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv3d(2, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4)
        self.up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1)

    def forward(self, x):
        return self.up(self.bn(self.conv(x)).relu().mean(2))


def test_original_layout_of_conv3d_and_transposed_conv_blocks():
    x = torch.randn(2, 2, 4, 6, 6)
    acified = acify(Volume(), example_inputs=(x,))
    with torch.no_grad():
        for p in acified.parameters():
            p.add_(0.1 * torch.randn_like(p))  # stands in for training: every branch and bias moves
    acified(x)  # train mode: the BatchNorms collect statistics
    acified.eval()
    fresh = Volume()
    fresh.load_state_dict(original_state_dict(deploy(acified)), strict=True)
    assert fresh.bn.bias.abs().max() > 0 and fresh.up.bias.abs().max() > 0
    verify(acified, fresh, x, rtol=1e-5)
