"""Convert the paper's small CNN, train it briefly, deploy it and prove the deployed model is the same."""

import time

import torch
from torch import nn

from acnet_convert import acify, deploy, verify
from acnet_convert.demo.models import SmallCNN


def main() -> None:
    torch.manual_seed(0)
    model = SmallCNN(in_channels=3, num_classes=10)
    start = time.perf_counter()
    acified = acify(model)
    print(acified.acnet_plan, "\n")

    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    optimizer = torch.optim.SGD(acified.parameters(), lr=0.05, momentum=0.9)
    for step in range(20):
        loss = nn.functional.cross_entropy(acified(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"trained 20 steps on a fixed random batch: loss {loss.item():.3f}")

    deployed = deploy(acified.eval())
    result = verify(acified, deployed, x)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"parameters: original {params(model):,}, training {params(acified):,}, deployed {params(deployed):,}")
    print(f"deployed vs acified: max abs error {result.max_abs:.2e} (relative {result.relative:.2e})")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
