"""DistributedDataParallel on CPU: two gloo processes train an acified CNN; rank 0 deploys it exactly.

SyncBatchNorm is covered in test_training.py: in torch 2.x, DDP refuses SyncBatchNorm on CPU modules and its
train-mode forward inside a process group needs GPU tensors, so it cannot be trained across CPU processes.
"""

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_model
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from acnet_convert import acify, deploy, verify
from acnet_convert.demo.models import SmallCNN
from acnet_convert.training import ACNetTraining

WORLD_SIZE = 2
STEPS = 4


def loopback_interface() -> str:
    """The name of the loopback interface, so that gloo talks over 127.0.0.1 only."""
    return next(name for _, name in socket.if_nameindex() if name.startswith("lo"))


def tiny_cnn() -> nn.Module:
    return SmallCNN(in_channels=3, num_classes=4, width=8)


def train_worker(rank: int, store: str, out: str) -> None:
    """One rank: acify, wrap in DDP, train on this rank's own batches, save the weights; rank 0 also deploys."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
        with ACNetTraining(tiny_cnn(), out=Path(out) / "deployed.safetensors", init="scratch") as run:
            ddp = DistributedDataParallel(run.model)
            optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            for _ in range(STEPS):
                x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 4, (8,))  # rank-specific data
                loss = F.cross_entropy(ddp(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        torch.save({n: p.detach() for n, p in run.model.named_parameters()}, Path(out) / f"rank{rank}.pt")
        if rank == 0:
            probe = torch.randn(4, 3, 12, 12)
            result = verify(run.model, run.deployed, probe, rtol=1e-5)
            with torch.no_grad():
                outputs = run.deployed(probe)
            torch.save({"relative": result.relative, "probe": probe, "outputs": outputs}, Path(out) / "verify.pt")
    finally:
        dist.destroy_process_group()


def spawn(worker, tmp_path: Path, monkeypatch) -> None:
    """Run ``worker`` on WORLD_SIZE CPU processes joined by gloo over loopback."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", loopback_interface())
    mp.spawn(worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)


def test_ddp_ranks_end_identical_and_rank0_deploys_exactly(tmp_path, monkeypatch):
    spawn(train_worker, tmp_path, monkeypatch)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # DDP averages gradients: the ranks agree bit for bit
    torch.manual_seed(0)
    untrained = acify(tiny_cnn(), init="scratch")
    assert not torch.equal(untrained.classifier.weight, rank0["classifier.weight"]), "training changed the weights"
    rank0_deploy = torch.load(tmp_path / "verify.pt", weights_only=True)
    assert rank0_deploy["relative"] <= 1e-5  # float32 forward of a float64-exact fusion

    written = deploy(acify(tiny_cnn()), check=False).eval()
    load_model(written, tmp_path / "deployed.safetensors")  # written once, by rank 0
    with torch.no_grad():
        assert torch.equal(written(rank0_deploy["probe"]), rank0_deploy["outputs"])
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["deployed.safetensors"]
