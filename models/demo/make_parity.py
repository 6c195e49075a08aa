"""Writes tests/fixtures/gated_demo.json: what the PyTorch reference of the gates
(models/gated.py) computes for the committed demo model on its sample canvases — per
gated convolution and sample, the kept channels and tiles and how close the nearest score
came to the cut (a margin below 1e-4 marks a near-tie the runtime may break either way),
the logits and the executed FLOPs — under a few policies, with channel counts unrounded.
tests/gated_parity.rs checks the runtime against it.

    python3 models/demo/make_parity.py
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from gated import Cut, GatedResNet, Run, logit, plan_budget  # noqa: E402

ROOT = os.path.join(HERE, "..", "..")
# name: (channels, tiles) as {"ratio": r} / {"threshold": t}, or {"budget": b, "tiles": bool}
POLICIES = {
    "threshold": ({"threshold": 0.5}, {"threshold": 0.5}),
    "ratio": ({"ratio": 0.5}, {"ratio": 0.5}),
    "mixed": ({"threshold": 0.3}, {"ratio": 0.75}),
    "budget": {"budget": 0.4, "tiles": True},
    "budget_channels": {"budget": 0.6, "tiles": False},
}


def cuts(model, spec):
    """Channel and tile cuts for a policy spec (budgets planned as the runtime plans them)."""
    if isinstance(spec, dict):
        return plan_budget(model, spec["budget"], spec["tiles"], 1)
    return tuple(Cut(**c) for c in spec)


def load_model(pre) -> GatedResNet:
    side = pre["crop"][0]
    model = GatedResNet(20, 10, (side, side))
    state = load_file(os.path.join(HERE, "demo.safetensors"))
    # export() renames; invert it by matching the exported keys to the module's own.
    exported = model.export()
    own = list(model.state_dict().keys())
    assert len(own) == len(exported)
    names = dict(zip(exported.keys(), own))
    model.load_state_dict({names[k]: v for k, v in state.items()})
    return model.eval()


def margin(scores: torch.Tensor, cut: Cut, kept: torch.Tensor) -> float:
    """Distance from the nearest score to the cut: the bar for a threshold, or the gap
    between the last kept and the first dropped score for a ratio."""
    if cut.threshold is not None:
        return float((scores - logit(cut.threshold)).abs().min())
    if kept.all() or not kept.any():
        return float("inf")
    return float(scores[kept].min() - scores[~kept].max())


def main() -> None:
    pre = json.load(open(os.path.join(HERE, "preprocess.json")))
    model = load_model(pre)
    names = sorted(os.listdir(os.path.join(HERE, "samples")))[:4]
    imgs = [np.asarray(Image.open(os.path.join(HERE, "samples", n)).convert("L"), np.float32) / np.float32(255.0) for n in names]
    x = torch.from_numpy(np.stack(imgs))[:, None]
    x = ((x - pre["mean"][0]) / pre["std"][0]).repeat(1, 3, 1, 1)

    # Gate scores, as each gate saw them, for the margins.
    seen = {}

    def hook(mod, inp, out):
        seen[mod] = out.detach()

    gates = {}
    for name, mod in model.named_modules():
        if name.endswith(("gate1c", "gate1s", "gate2s")):
            mod.register_forward_hook(hook)
            parts = name.split(".")
            conv = f"layer{int(parts[1]) + 1}.{parts[2]}.conv{1 if parts[3] != 'gate2s' else 2}"
            gates[mod] = (conv, "channels" if parts[3] == "gate1c" else "tiles")

    out = {"samples": names, "policies": {}}
    for pname, spec in POLICIES.items():
        cc, tc = cuts(model, spec)
        run = Run(cc, tc, record=True)
        seen.clear()
        with torch.no_grad():
            logits = model(x, run)
        layers = {}
        for mod, (conv, kind) in gates.items():
            mc, mt = run.masks[conv]
            mask = mc if kind == "channels" else mt
            cut = cc if kind == "channels" else tc
            cut = cut.get(conv, Cut()) if isinstance(cut, dict) else cut
            if mask is None:
                continue
            layers.setdefault(conv, {})[kind] = [
                {"kept": [int(i) for i in torch.nonzero(mask[s]).flatten()], "margin": margin(seen[mod][s], cut, mask[s])}
                for s in range(len(names))
            ]
        out["policies"][pname] = {
            "spec": spec,
            "logits": logits.tolist(),
            "flops": [int(round(float(f))) for f in run.flops],
            "layers": layers,
        }
    path = os.path.join(ROOT, "tests", "fixtures", "gated_demo.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
