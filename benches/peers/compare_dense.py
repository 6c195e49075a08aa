"""Dense latency, dynsparse against ONNX Runtime on the same weights, as a Markdown table.

Runs `examples/dense_latency` (ours) and `ort_dense.py` (ONNX Runtime) alternately,
model by model, for several rounds (which of the two goes first alternates from round to
round), so that drift on a shared machine hits both sides of each pair within seconds;
reports the median of the per-round medians, their ratio ours/ORT, and the median and
range of the per-round ratios.

usage: python3 benches/peers/compare_dense.py [--rounds 3] [--runs 15] [--threads 2]
Needs: target/fixtures (tests/make_reference.py), onnxruntime and onnx installed, and
`cargo build --release --example dense_latency`.
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ARCHS = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_lite0"]


def run_json_lines(cmd, env=None):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def converted_models(archs):
    """target/ARCH.dsm for each architecture, converted from the test fixtures' checkpoint
    when missing."""
    models = []
    for arch in archs:
        out = os.path.join(ROOT, "target", f"{arch}.dsm")
        if not os.path.exists(out):
            ckpt = glob.glob(os.path.join(ROOT, "target", "fixtures", arch, "checkpoint.*"))[0]
            subprocess.run([os.path.join(ROOT, "target", "release", "dynsparse"), "convert", "--arch", arch,
                            "--input", ckpt, "--output", out], check=True, capture_output=True)
        models.append(out)
    return models


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="1,8")
    a = ap.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    models = converted_models(ARCHS)
    ours, ort = {}, {}
    ours_bin = os.path.join(ROOT, "target", "release", "examples", "dense_latency")
    ort_py = os.path.join(ROOT, "benches", "peers", "ort_dense.py")
    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
        for arch, model in zip(ARCHS, models):
            def run_ours():
                for row in run_json_lines([ours_bin, "--runs", str(a.runs), "--batch", a.batch, model], env):
                    ours.setdefault((row["model"], row["batch"]), []).append(row["median_ms"])

            def run_ort():
                for row in run_json_lines([sys.executable, ort_py, "--runs", str(a.runs),
                                           "--threads", str(a.threads), "--batch", a.batch, arch]):
                    ort.setdefault((row["model"], row["batch"]), []).append(row["median_ms"])

            for side in ((run_ours, run_ort) if r % 2 == 0 else (run_ort, run_ours)):
                side()
    print("| model | batch | dynsparse ms | ONNX Runtime ms | ours/ORT | per round: median (range) |")
    print("|---|---|---|---|---|---|")
    for key in sorted(ours, key=lambda k: (ARCHS.index(k[0]), k[1])):
        o, p = statistics.median(ours[key]), statistics.median(ort[key])
        pairs = [x / y for x, y in zip(ours[key], ort[key])]
        print(f"| {key[0]} | {key[1]} | {o:.1f} | {p:.1f} | {o / p:.2f} | "
              f"{statistics.median(pairs):.2f} ({min(pairs):.2f}–{max(pairs):.2f}) |")


if __name__ == "__main__":
    main()
