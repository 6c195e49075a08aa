"""PyTorch side of the GPU validation (runs on the lent GPU machine, see run_on_device.sh).

  make DIR                  write torchvision resnet18/resnet50 checkpoints with random
                            weights and randomized BatchNorm statistics, a random input
                            batch and PyTorch's float64 CPU logits for it
  compare RESULT.json REF   compare `dynsparse infer --json` logits with REF.npy
  pair A.json B.json        compare two `dynsparse infer --json` results (say CUDA and CPU
                            under the same gate policy): logits, top-1, executed FLOPs
"""
import json
import sys

import numpy as np


def make(out):
    import os

    import torch
    import torchvision

    os.makedirs(out, exist_ok=True)
    torch.manual_seed(20261122)
    x = torch.randn(3, 3, 224, 224)
    np.save(f"{out}/input_b3.npy", x.numpy().astype(np.float32))
    for arch in ["resnet18", "resnet50"]:
        m = getattr(torchvision.models, arch)(weights=None).eval()
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.2, 0.2)
                    mod.running_var.uniform_(0.5, 1.5)
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.uniform_(-0.2, 0.2)
        torch.save(m.state_dict(), f"{out}/{arch}.pth")
        with torch.no_grad():
            logits = m.double()(x.double()).numpy()
        np.save(f"{out}/{arch}_logits_b3.npy", logits)
        print(f"{arch}: checkpoint and float64 logits written", flush=True)


def compare(result, ref):
    with open(result) as f:
        got = np.array([r["logits"] for r in json.load(f)["results"]], dtype=np.float64)
    want = np.load(ref).astype(np.float64)
    rel = np.abs(got - want).max() / np.abs(want).max()
    same_top1 = (got.argmax(1) == want.argmax(1)).mean()
    print(f"{result}: max |diff| / max |ref| = {rel:.2e}, top-1 agreement {same_top1:.2f}")
    return rel


def pair(a, b):
    with open(a) as f:
        ra = json.load(f)["results"]
    with open(b) as f:
        rb = json.load(f)["results"]
    la = np.array([r["logits"] for r in ra], dtype=np.float64)
    lb = np.array([r["logits"] for r in rb], dtype=np.float64)
    rel = np.abs(la - lb).max() / np.abs(lb).max()
    same_top1 = (la.argmax(1) == lb.argmax(1)).mean()
    fa = [r["stats"]["flops_executed"] / r["stats"]["flops_dense"] for r in ra]
    fb = [r["stats"]["flops_executed"] / r["stats"]["flops_dense"] for r in rb]
    print(
        f"{a} vs {b}: max |diff| / max |b| = {rel:.2e}, top-1 agreement {same_top1:.2f}, "
        f"executed FLOP fractions {min(fa):.4f}-{max(fa):.4f} vs {min(fb):.4f}-{max(fb):.4f}"
    )


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "make":
        make(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "compare":
        rel = compare(sys.argv[2], sys.argv[3])
        tol = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-2
        sys.exit(0 if rel <= tol else 1)
    elif len(sys.argv) >= 4 and sys.argv[1] == "pair":
        pair(sys.argv[2], sys.argv[3])
    else:
        print(__doc__)
        sys.exit(2)
