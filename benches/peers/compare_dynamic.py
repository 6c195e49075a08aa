"""Dynamic against dense latency on the CPU, and against ONNX Runtime dense, as a Markdown table.

For each model and batch: our dense pass, then FLOP budgets (channel gates alone, and
channel + spatial gates) at the given fractions, all interleaved run by run inside
`examples/dense_latency`; ONNX Runtime runs between our rounds. Reports medians of the
per-round medians, the executed FLOP fraction (gates included), and the ratios to our
dense and to ONNX Runtime's dense latency measured in the same call.

usage: python3 benches/peers/compare_dynamic.py [--rounds 3] [--runs 10] [--threads 2]
       [--batch 1,8] [--budgets 0.75,0.5,0.25] [--archs resnet18,resnet50,mobilenet_v2]
Needs what compare_dense.py needs (fixtures, onnxruntime, the dense_latency example).
"""

import argparse
import os
import statistics
import sys

from compare_dense import ROOT, converted_models, run_json_lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--budgets", default="0.75,0.5,0.25")
    ap.add_argument("--archs", default="resnet18,resnet50,mobilenet_v2")
    a = ap.parse_args()
    archs = a.archs.split(",")
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    models = converted_models(archs)
    ours, flops, ort = {}, {}, {}
    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
        for model in models:
            cmd = [os.path.join(ROOT, "target", "release", "examples", "dense_latency"), "--runs", str(a.runs),
                   "--batch", a.batch, "--budget", a.budgets, "--budget-spatial", a.budgets, model]
            for row in run_json_lines(cmd, env):
                key = (row["model"], row["batch"], row["policy"])
                ours.setdefault(key, []).append(row["median_ms"])
                flops[key] = row["flop_fraction"]
        for row in run_json_lines([sys.executable, os.path.join(ROOT, "benches", "peers", "ort_dense.py"),
                                   "--runs", str(a.runs), "--threads", str(a.threads), "--batch", a.batch, *archs]):
            ort.setdefault((row["model"], row["batch"]), []).append(row["median_ms"])
    print("| model | batch | policy | FLOPs executed | ms | vs our dense | vs ORT dense |")
    print("|---|---|---|---|---|---|---|")
    for key in sorted(ours, key=lambda k: (archs.index(k[0]), k[1])):
        ms = statistics.median(ours[key])
        dense = statistics.median(ours[(key[0], key[1], "dense")])
        peer = statistics.median(ort[(key[0], key[1])])
        print(f"| {key[0]} | {key[1]} | {key[2]} | {flops[key]:.3f} | {ms:.1f} | {ms / dense:.2f} | {ms / peer:.2f} |")


if __name__ == "__main__":
    main()
