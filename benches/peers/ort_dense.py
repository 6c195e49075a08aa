"""Dense latency of ONNX Runtime on the same weights dynsparse runs, for ours/ORT ratios.

Builds each PyTorch model from a checkpoint made by tests/make_reference.py (or, for
efficientnet_lite0, the real package weights), exports it to ONNX (pads folded into
convolutions, `onnx_export.py`), and times ONNX Runtime (intra-op threads as given,
sequential execution, all graph optimizations) at each batch size: median, p10, p90 of
repeated runs on random input. Prints JSON lines.

usage: python3 benches/peers/ort_dense.py [--threads 2] [--batch 1,8] [--runs 20] ARCH...
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
from make_reference import ARCHS  # noqa: E402

sys.path.insert(0, HERE)
import onnx_export  # noqa: E402


def load(arch: str, fixtures: str) -> torch.nn.Module:
    make, size, fmt = ARCHS[arch]
    model = make()
    ckpt = os.path.join(fixtures, arch, "checkpoint." + ("safetensors" if fmt == "safetensors" else "pth"))
    if fmt == "safetensors":
        from safetensors.torch import load_file

        state = load_file(ckpt)
    else:
        state = torch.load(ckpt, map_location="cpu")
    model.load_state_dict(state)
    return model.eval(), size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--fixtures", default=os.path.join(HERE, "..", "..", "target", "fixtures"))
    ap.add_argument("archs", nargs="+")
    a = ap.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for arch in a.archs:
        model, size = load(arch, a.fixtures)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, f"{arch}.onnx")
            x = torch.randn(1, 3, size, size)
            onnx_export.export(model, x, path, opset=17)
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        for b in map(int, a.batch.split(",")):
            xb = np.random.default_rng(0).standard_normal((b, 3, size, size)).astype(np.float32)
            for _ in range(3):
                sess.run(None, {"x": xb})
            ms = []
            for _ in range(a.runs):
                t = time.perf_counter()
                sess.run(None, {"x": xb})
                ms.append((time.perf_counter() - t) * 1e3)
            q = np.percentile(ms, [50, 10, 90])
            print(json.dumps({"model": arch, "batch": b, "median_ms": round(q[0], 3),
                              "p10_ms": round(q[1], 3), "p90_ms": round(q[2], 3), "runtime": f"onnxruntime {ort.__version__}"}),
                  flush=True)


if __name__ == "__main__":
    main()
