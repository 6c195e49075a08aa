"""Per-layer times of ONNX Runtime on a dynsparse model file, from ORT's own profiler.

Rebuilds the network from the .dsm (as dsm_peer.py does), exports it to ONNX (pads
folded into convolutions, `onnx_export.py`), runs it with `enable_profiling`, and prints
each node's median kernel time, to set beside `dynsparse bench --model M --batch 1
--layers` (`compare_layers.py` does both and matches the layers).

usage: python3 benches/peers/ort_profile.py MODEL.dsm [--runs 30] [--threads 2] [--batch 1]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict

import onnxruntime as ort
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsm_peer  # noqa: E402
import onnx_export  # noqa: E402


def profile(model: str, threads: int, runs: int, batch: int = 1) -> list[tuple[str, str, float]]:
    """Each node's median kernel time (ms) over `runs` runs of `batch` samples, in graph
    order, as (node name, op name, ms)."""
    m = dsm_peer.load(model)
    c, h, w = m.input["channels"], m.input["height"], m.input["width"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.onnx")
        onnx_export.export(m, torch.zeros(batch, c, h, w), path, dynamic_batch=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(d, "profile")
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        x = dsm_peer.bench_input((batch, c, h, w))
        for _ in range(runs):
            sess.run(None, {"x": x})
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    if not events:
        sys.exit("onnxruntime wrote an empty profile")
    times, ops = defaultdict(list), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            times[name].append(e["dur"] / 1000)
            ops[name] = e["args"].get("op_name", "")
    return [(name, ops[name], statistics.median(v)) for name, v in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    if a.batch < 1:
        sys.exit("--batch must be at least 1")
    nodes = profile(a.model, a.threads, a.runs, a.batch)
    print(f"onnxruntime {ort.__version__}, {a.threads} threads, batch {a.batch}, "
          f"median of {a.runs} runs, ms\n")
    print("| node | op | ms |\n|---|---|---|")
    for name, op, ms in nodes:
        print(f"| {name} | {op} | {ms:.3f} |")
    total = sum(ms for _, _, ms in nodes)
    print(f"\ntotal {total:.2f} ms (nodes run in graph order, as listed)")


if __name__ == "__main__":
    main()
