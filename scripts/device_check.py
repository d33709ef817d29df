"""Correctness of acnet-convert on one device: mixed-precision training and exact deployment, both modes.

On a CUDA machine:
    python scripts/device_check.py --device cuda
It prints one line per check and exits 1 if any fails.  The test suite runs it on the CPU.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F
import torchvision

from acnet_convert import FastACBlock, acify, deploy, verify


def amp_dtypes(device: torch.device) -> list[torch.dtype]:
    """The autocast dtypes worth checking on ``device``."""
    if device.type == "cuda":
        return [torch.float16, torch.bfloat16] if torch.cuda.is_bf16_supported() else [torch.float16]
    return [torch.bfloat16]


def train_and_deploy(mode: str, amp: torch.dtype, device: torch.device, side: int) -> dict:
    """A few autocast training steps of resnet18 in ``mode``, then deploy; the error of the deployed model."""
    torch.manual_seed(0)
    model = acify(torchvision.models.resnet18(num_classes=10), init="scratch", mode=mode).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    x, y = torch.randn(16, 3, side, side, device=device), torch.randint(0, 10, (16,), device=device)
    losses = []
    for _ in range(6):
        with torch.autocast(device.type, dtype=amp):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    model.eval()
    deployed = deploy(model)
    # compared in float64, so that TF32 convs on the GPU do not hide the fusion; the deployed weights are float32
    error = verify(model.double(), deployed.double(), x.double(), rtol=math.inf).relative  # judged by the caller
    return {"losses": losses, "error": error}


def fast_gradients_match(device: torch.device) -> float:
    """Largest relative difference between FastACBlock's gradients and autograd through the plain composition."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1, groups=2, bias=True, device=device, dtype=torch.float64)
    block = FastACBlock.from_conv(conv, init="scratch")
    x = torch.randn(4, 16, 12, 12, device=device, dtype=torch.float64, requires_grad=True)
    inputs = [x, *block.parameters()]
    grad_out = torch.randn(4, 32, 12, 12, device=device, dtype=torch.float64)
    plain = F.conv2d(x, block.composed_weight(), block.bias, 1, 1, 1, 2)
    want = torch.autograd.grad(plain, inputs, grad_out)
    got = torch.autograd.grad(block(x), inputs, grad_out)
    return max(((w - g).abs().max() / w.abs().max().clamp_min(1)).item() for w, g in zip(want, got))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--side", type=int, default=64, help="input image side")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    failures = 0
    grad_error = fast_gradients_match(device)
    ok = grad_error <= 1e-10
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} fast-mode gradients vs plain composition, float64: relative {grad_error:.1e}")
    for mode in ("exact", "fast"):
        for amp in amp_dtypes(device):
            result = train_and_deploy(mode, amp, device, args.side)
            losses, error = result["losses"], result["error"]
            ok = all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0] and error <= 1e-6
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {mode:5s} autocast {str(amp).removeprefix('torch.'):8s} on {device}: "
                  f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, deployed vs trained in float64: relative {error:.1e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
