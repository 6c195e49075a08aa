"""Dense latency, dynsparse against ONNX Runtime, paired run by run.

`compare_dense.py` alternates the two sides every few seconds; on a shared machine whose
speed changes over seconds (this project's 2-core VM ran at half speed for stretches)
one side of a round can land in a fast stretch and the other in a slow one. Here both
stay loaded: our side is `examples/dense_latency --serve` (one pass per request), ONNX
Runtime runs in this process, and each pair is a visit to each side, the order
alternating from pair to pair. A visit runs passes back to back for at least
`--visit-ms` (and at least `--passes` passes) and keeps the median of those that start
80 ms or more into it (at least the last two):
the first after the other side's turn runs on threads that have been idle (after a
0.1 s pause ResNet-18's pass took 22.7 ms against 15.7 back to back), and the passes
just after ONNX Runtime's turn share the cores with its threads, which keep spinning
after a run returns (about 40 ms of CPU time in the 50 ms after a MobileNetV2 pass).
With three passes a visit, our MobileNetV2 passes just after ONNX Runtime's took 10–25
ms against 4.3–5 otherwise, and the batch-1 ratio read 2.02 (1.06–3.05); with visits of
ten passes, 1.07 (1.04–1.10). Our side spins the same way (its workers linger 50 ms,
`Options::linger`), so a visit lasts 400 ms by default and its passes of the first
80 ms are not kept: two builds of ours alternated that way (a throwaway driver of the
same protocol, not in the tree) read 0.999–1.009, where visits of 100 ms keeping all
passes but the first read 0.653 for the build that lingers against one that does not.
How many passes make a visit is set before the pairs from each side's fastest of eight
passes in a row. Reports the median and 10th–90th percentile of the
per-pair ratios ours/ORT (the medians of the kept passes of each visit), and each
side's median pass. With `--budget F` our side runs at that FLOP budget (ONNX Runtime
stays dense): the dynamic-execution goal's ratio.

usage: python3 benches/peers/paired_dense.py [--pairs 30] [--passes 3] [--visit-ms 400] [--threads 2] [--batch 1,8] [--budget F] [ARCH...]
Needs: target/fixtures (tests/make_reference.py), onnxruntime, onnx and torch installed,
and `cargo build --release --example dense_latency --bin dynsparse`.
"""

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import onnx_export  # noqa: E402
from compare_dense import ARCHS, ROOT, converted_models  # noqa: E402
from ort_dense import load  # noqa: E402

# A visit's first milliseconds, whose passes share the cores with the other side's
# threads spinning after its turn (ONNX Runtime's, or our lingering workers).
SETTLE_MS = 80


def quantile(values, q):
    s = sorted(values)
    return s[round((len(s) - 1) * q)]


def session(arch, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    model, size = load(arch, os.path.join(ROOT, "target", "fixtures"))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{arch}.onnx")
        onnx_export.export(model, torch.randn(1, 3, size, size), path, opset=17)
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]), size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--budget", type=float)
    ap.add_argument("--visit-ms", type=float, default=400.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("archs", nargs="*", default=ARCHS)
    a = ap.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    ours_bin = os.path.join(ROOT, "target", "release", "examples", "dense_latency")
    rows = []
    for arch, model in zip(a.archs, converted_models(a.archs)):
        sess, size = session(arch, a.threads)
        budget = [] if a.budget is None else [str(a.budget)]
        ours = subprocess.Popen([ours_bin, "--serve", model, *budget], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)

        def run_ours(b):
            ours.stdin.write(f"{b}\n")
            ours.stdin.flush()
            line = ours.stdout.readline()
            if not line:
                sys.exit(f"{ours_bin} --serve {model} stopped")
            return float(line)

        for b in map(int, a.batch.split(",")):
            x = np.random.default_rng(0).standard_normal((b, 3, size, size)).astype(np.float32)

            def run_ort():
                t = time.perf_counter()
                sess.run(None, {"x": x})
                return (time.perf_counter() - t) * 1e3

            # The pass time that sizes the visits: each side's fastest of eight passes in
            # a row, once its first (buffers, a budget's plans) and the other side's
            # spinning are past. Taken from single passes in turns, each slowed by the
            # other side's spinning, it had been up to four times a pass (a budget's
            # visits at batch 1 held a quarter of their passes, and their settling time
            # dropped too few).
            warm = min(min(run() for _ in range(8)) for run in (lambda: run_ours(b), run_ort))
            passes = max(a.passes, 2, math.ceil(a.visit_ms / warm) + 1)
            # Passes started in a visit's first SETTLE_MS are not kept (but the last two
            # always are).
            skip = min(passes - 2, max(1, math.ceil(SETTLE_MS / warm)))
            mine, theirs, ratios = [], [], []
            for i in range(a.pairs):
                print(f"\r{arch} batch {b}: pair {i + 1}/{a.pairs}", end="", file=sys.stderr, flush=True)
                visit = {}
                for side in ((0, 1) if i % 2 == 0 else (1, 0)):
                    run = (lambda: run_ours(b)) if side == 0 else run_ort
                    visit[side] = [run() for _ in range(passes)][skip:]
                mine.append(statistics.median(visit[0]))
                theirs.append(statistics.median(visit[1]))
                ratios.append(statistics.median(visit[0]) / statistics.median(visit[1]))
            rows.append((arch, b, passes, statistics.median(mine), statistics.median(theirs),
                         statistics.median(ratios), quantile(ratios, 0.1), quantile(ratios, 0.9)))
        ours.stdin.close()
        ours.wait()
    print(file=sys.stderr)
    ours_policy = "dense" if a.budget is None else f"budget {a.budget}"
    print(f"ours {ours_policy}, ONNX Runtime dense, {a.threads} threads, {a.pairs} pairs per row "
          f"(passes a visit as listed, those of its first {SETTLE_MS} ms not kept; times are medians of the visits' "
          f"medians)\n")
    print(f"| model | batch | passes a visit | dynsparse ({ours_policy}) ms | ONNX Runtime ms "
          "| ours/ORT, median of pairs | p10–p90 |")
    print("|---|---|---|---|---|---|---|")
    for arch, b, n, m, t, r, lo, hi in rows:
        print(f"| {arch} | {b} | {n} | {m:.2f} | {t:.2f} | {r:.3f} | {lo:.2f}–{hi:.2f} |")


if __name__ == "__main__":
    main()
