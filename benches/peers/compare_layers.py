"""Layer by layer against ONNX Runtime: our dense pass and ORT's (batch 1 unless
`--batch`), on the same weights, convolution beside convolution, with GFLOP/s, and sums
by kind of layer.

Rounds alternate: `dynsparse bench --layers` (dense, at the batch) and then ORT's profiler
(`ort_profile.py`), so that drift on a shared machine hits both alike; each layer's time
is the median over rounds of each round's median. Convolutions are matched in graph
order, which both keep. A layer our engine runs inside the one before it (a depthwise
layer computed band by band with its 1×1 expansion: 0 ms in our table) is shown with
that layer, its ORT time added there. ORT's other nodes (layout reorders, pads, pools,
the classifier) are summed apart.

usage: python3 benches/peers/compare_layers.py MODEL.dsm [--threads 2] [--runs 30]
       [--rounds 2] [--batch 1] [--peak GFLOPS] [--binary PATH (default: this checkout's
       target/release/dynsparse)]

`--peak` (from `cargo run --release --example kernel_peak`, the figure for the same
number of threads) adds each layer's share of it.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
sys.path.insert(0, HERE)
import dsm_peer  # noqa: E402
import ort_profile  # noqa: E402

# ONNX Runtime's names for a convolution node: its channel-blocked one, and a convolution
# with its activation fused where that layout is not used.
CONV_OPS = ("Conv", "FusedConv")


def ours(binary: str, model: str, threads: int, runs: int, batch: int) -> list[dict]:
    """Our dense layers at `batch` (name, ms for the batch, flops_dense per sample), from
    the bench's JSON."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "bench.json")
        cmd = [binary, "bench", "--model", model, "--batch", str(batch), "--runs", str(runs),
               "--threads", str(threads), "--layers", "--json", out]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr}")
        with open(out) as f:
            report = json.load(f)
    dense = [r for r in report["results"] if r["policy"] == "dense" and r["batch"] == batch]
    if not dense:
        sys.exit(f"the bench report has no dense batch-{batch} result")
    return dense[0]["layers"]


def kind(op: dict, flops: int) -> tuple[str, str]:
    """(kind of layer, its shape in words) for a conv node of the model description."""
    kh, kw = op["kernel"]
    sh, _ = op["stride"]
    cin, cout, groups = op["in_channels"], op["out_channels"], op["groups"]
    per_out = 2 * cout * (cin // groups) * kh * kw
    hw = math.isqrt(flops // per_out) if per_out else 0
    if groups > 1 and groups == cin:
        k = f"depthwise {kh}×{kw}" + (" stride 2" if sh == 2 else "")
        return k, f"dw {kh}×{kw}/{sh} {cin} @{hw}²"
    k = "1×1" if (kh, kw) == (1, 1) else f"{kh}×{kw}"
    if sh == 2:
        k += " stride 2"
    return k, f"{kh}×{kw}/{sh} {cin}→{cout} @{hw}²"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--peak", type=float, help="the micro-kernel's GFLOP/s on these threads")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "dynsparse"))
    a = ap.parse_args()
    if a.rounds < 1 or a.runs < 1 or a.batch < 1:
        sys.exit("--rounds, --runs and --batch must be at least 1")
    if not os.path.exists(a.binary):
        sys.exit(f"{a.binary} not found: build it first (cargo build --release)")
    nodes = {n["name"]: n["op"] for n in dsm_peer.load(a.model).nodes}

    our_ms, ort_ms = defaultdict(list), defaultdict(list)
    layers, ours_convs, ort_other = None, None, defaultdict(list)
    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds}: dynsparse, then onnxruntime", file=sys.stderr)
        got = ours(a.binary, a.model, a.threads, a.runs, a.batch)
        if layers is None:
            layers = got
            ours_convs = [i for i, l in enumerate(layers)
                          if nodes.get(l["name"], {}).get("type") == "conv"]
        for i, l in enumerate(got):
            our_ms[i].append(l["ms"])
        profiled = ort_profile.profile(a.model, a.threads, a.runs, a.batch)
        convs = [(n, ms) for n, op, ms in profiled if op in CONV_OPS]
        others = defaultdict(float)
        for _, op, ms in profiled:
            if op not in CONV_OPS:
                others[op] += ms
        for op, ms in others.items():
            ort_other[op].append(ms)
        if len(convs) != len(ours_convs):
            sys.exit(f"{len(ours_convs)} convolutions here, {len(convs)} in ONNX Runtime's "
                     "profile: cannot match them in order")
        for i, (_, ms) in zip(ours_convs, convs):
            ort_ms[i].append(ms)

    med = {i: statistics.median(v) for i, v in our_ms.items()}
    ort = {i: statistics.median(v) for i, v in ort_ms.items()}
    # A banded layer (0 ms here) joins the convolution before it, and the pair is summed
    # as a kind of its own.
    rows, by_kind = [], defaultdict(lambda: [0.0, 0.0, 0])
    for i, l in enumerate(layers):
        if i not in ort:
            continue
        k, shape = kind(nodes[l["name"]], l["flops_dense"])
        if med[i] == 0.0 and rows:
            rows[-1]["ort"] += ort[i]
            rows[-1]["flops"] += l["flops_dense"]
            rows[-1]["shape"] += f" + {shape}"
            rows[-1]["kind"] += f" with {k} (banded)"
            continue
        rows.append({"name": l["name"], "shape": shape, "kind": k, "flops": l["flops_dense"],
                     "ours": med[i], "ort": ort[i]})
    print(f"{os.path.basename(a.model)}: dense, batch {a.batch}, {a.threads} threads, median over "
          f"{a.rounds} rounds of {a.runs} runs each\n")
    peak = " | ours % peak | ORT % peak" if a.peak else ""
    print(f"| layer | shape | MFLOPs | ours ms | ORT ms | ours/ORT | ours GFLOP/s | ORT GFLOP/s{peak} |")
    print("|---|---|---|---|---|---|---|---" + ("|---|---" if a.peak else "") + "|")
    for r in rows:
        flops = a.batch * r["flops"]
        g_ours = flops / r["ours"] / 1e6 if r["ours"] else float("nan")
        g_ort = flops / r["ort"] / 1e6 if r["ort"] else float("nan")
        extra = f" | {100 * g_ours / a.peak:.0f} | {100 * g_ort / a.peak:.0f}" if a.peak else ""
        print(f"| {r['name']} | {r['shape']} | {flops / 1e6:.1f} | {r['ours']:.3f} | "
              f"{r['ort']:.3f} | {r['ours'] / r['ort']:.2f} | {g_ours:.0f} | {g_ort:.0f}{extra} |")
        s = by_kind[r["kind"]]
        s[0] += r["ours"]
        s[1] += r["ort"]
        s[2] += 1
    print("\n| kind | layers | ours ms | ORT ms | ours/ORT |\n|---|---|---|---|---|")
    for k, (o, t, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"| {k} | {n} | {o:.2f} | {t:.2f} | {o / t:.2f} |")
    o = sum(r["ours"] for r in rows)
    t = sum(r["ort"] for r in rows)
    print(f"| all convolutions | {len(rows)} | {o:.2f} | {t:.2f} | {o / t:.2f} |")
    rest = sum(med[i] for i in med if i not in ort)
    print(f"\nour other layers (pools, classifier): {rest:.2f} ms; ONNX Runtime's other nodes: "
          + ", ".join(f"{op} {statistics.median(v):.2f} ms" for op, v in ort_other.items()))


if __name__ == "__main__":
    main()
