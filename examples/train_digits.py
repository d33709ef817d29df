"""Train the paper's small CNN with ACNet on scikit-learn's 8x8 digits in a plain PyTorch loop, then deploy it."""

import argparse
import time

import torch
from torch.nn import functional as F

from acnet_convert import acify, deploy, verify
from acnet_convert.demo.experiment import load_digits
from acnet_convert.demo.models import SmallCNN
from acnet_convert.training import save_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="SGD steps of 64 images")
    parser.add_argument("--init", choices=["preserve", "scratch"], default="preserve")
    parser.add_argument("--gamma-init", type=float, default=1 / 3, help="used by --init scratch (default 1/3)")
    parser.add_argument("--out", help="write the deployed weights here (.safetensors, or anything else for torch.save)")
    args = parser.parse_args()

    torch.manual_seed(0)
    data = load_digits()  # scikit-learn's 8x8 digits: 1347 train / 450 test, stratified, standardised
    x_train, y_train, x_test, y_test = data.x_train, data.y_train, data.x_test, data.y_test
    model = SmallCNN(in_channels=1, num_classes=10, width=16)
    model = acify(model, init=args.init, gamma_init=args.gamma_init)  # the one line, before the optimizer is built
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)

    start = time.perf_counter()
    batches = torch.Generator().manual_seed(1)
    model.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(y_train), (64,), generator=batches)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step}: loss {loss.item():.4f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s")

    model.eval()
    deployed = deploy(model)
    result = verify(model, deployed, x_test, rtol=1e-5)
    with torch.no_grad():
        predicted, deployed_predicted = model(x_test).argmax(1), deployed(x_test).argmax(1)
    accuracy = (predicted == y_test).float().mean().item()
    print(f"test accuracy {accuracy:.4f} on {len(y_test)} images")
    print(f"deployed model: same predictions on all test images: {torch.equal(predicted, deployed_predicted)}, "
          f"max relative output error {result.relative:.2e}")  # fmt: skip
    if args.out:
        print(f"deployed weights written to {save_weights(deployed, args.out)}")


if __name__ == "__main__":
    main()
