"""Dense peers for any dynsparse model file: ONNX Runtime (and PyTorch eager) on the very
weights in the .dsm, timed on the input `dynsparse bench` uses.

The model file is read directly: the JSON description in its safetensors metadata
becomes a small PyTorch module (convolutions with BatchNorm already folded, residual
adds, activations, pooling, linear layers), which is exported to ONNX. `dynsparse bench
--peers` runs this script after its own runs and prints ours/peer ratios; it also checks
that the peer computes what we compute, from the logits printed here.

usage: python3 benches/peers/dsm_peer.py --model M.dsm [--batch 1,8] [--runs 15]
       [--warmup 3] [--threads 2] [--torch] [--device cpu|cuda]
Prints one JSON object per (peer, batch): peer, batch, median_ms, p10_ms, p90_ms, and the
logits of the first sample.

With --device cuda the peers are PyTorch + cuDNN on the GPU instead (channels_last,
cudnn.benchmark): eager with TF32, a CUDA graph with TF32 and a CUDA graph in FP16. Each
timed call takes the input from host memory and returns the logits to it, as
`Runtime::infer` does, so the ratios `dynsparse bench --device cuda --peers` prints
compare the same work.
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open


class DsmModule(nn.Module):
    """The computation a dynsparse model description names, node by node."""

    def __init__(self, desc: dict, weights: dict):
        super().__init__()
        self.nodes = desc["nodes"]
        self.input = desc["input"]
        self.params = nn.ParameterDict(
            {k.replace(".", "__"): nn.Parameter(v, requires_grad=False) for k, v in weights.items()}
        )

    def w(self, name: str) -> torch.Tensor:
        return self.params[name.replace(".", "__")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for node in self.nodes:
            op, name = node["op"], node["name"]
            v = values[node["input"]]
            kind = op["type"]
            if kind == "conv":
                pad = op["padding"]
                # Python ints: the pads are then constants of the export, not values it
                # computes (`onnx_export.py` folds them into the convolution).
                h, w_ = int(v.shape[2]), int(v.shape[3])
                conv_pad = (0, 0)
                if pad["rule"] == "symmetric":
                    # In the convolution itself, so the peer can fuse it as it would.
                    conv_pad = tuple(pad["pad"])
                    padding = (0, 0, 0, 0)
                else:  # TensorFlow SAME: the extra pixel at the bottom/right
                    def total(i, k, s):
                        out = -(-i // s)
                        return max((out - 1) * s + k - i, 0)

                    th = total(h, op["kernel"][0], op["stride"][0])
                    tw = total(w_, op["kernel"][1], op["stride"][1])
                    padding = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
                    if padding[0] == padding[1] and padding[2] == padding[3]:
                        conv_pad, padding = (padding[2], padding[0]), (0, 0, 0, 0)
                if any(padding):
                    v = F.pad(v, padding)
                y = F.conv2d(v, self.w(name + ".weight"), self.w(name + ".bias"), tuple(op["stride"]), conv_pad, 1, op["groups"])
                if op.get("residual") is not None:
                    y = y + values[op["residual"]]
                act = op["act"]
                y = F.relu(y) if act == "relu" else (F.relu6(y) if act == "relu6" else y)
            elif kind == "max_pool":
                y = F.max_pool2d(v, tuple(op["kernel"]), tuple(op["stride"]), tuple(op["padding"]))
            elif kind == "global_avg_pool":
                y = v.mean((2, 3), keepdim=True)
            elif kind == "adaptive_avg_pool":
                y = F.adaptive_avg_pool2d(v, tuple(op["output"]))
            elif kind == "linear":
                y = F.linear(v.flatten(1), self.w(name + ".weight"), self.w(name + ".bias"))
                y = F.relu(y) if op["act"] == "relu" else (F.relu6(y) if op["act"] == "relu6" else y)
                y = y[:, :, None, None]
            else:
                raise SystemExit(f"node {name}: operation {kind} is not supported by this peer")
            values.append(y)
        return values[-1].flatten(1)


def load(path: str) -> DsmModule:
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "dynsparse":
            raise SystemExit(f"{path}: not a dynsparse model file")
        desc = json.loads(meta["dynsparse.model"])
        weights = {k: f.get_tensor(k) for k in f.keys() if ".gate." not in k}
    return DsmModule(desc, weights).eval()


def bench_input(shape) -> np.ndarray:
    """The input `dynsparse bench` times: ((i * 2654435761) mod 2^32 >> 8) / 2^23 - 1."""
    n = int(np.prod(shape))
    i = np.arange(n, dtype=np.uint64)
    v = ((i * 2654435761) % (1 << 32)) >> 8
    return (v.astype(np.float64) / float(1 << 23) - 1.0).astype(np.float32).reshape(shape)


def timed(run, warmup: int, runs: int, gap_ms: float = 0.0):
    """Median, 10th and 90th percentile (ms) of `runs` calls after `warmup`, each timed
    call `gap_ms` after the last ended; and the last call's output."""
    for _ in range(warmup):
        run()
    t = []
    for _ in range(runs):
        if gap_ms > 0:
            time.sleep(gap_ms / 1e3)
        t0 = time.perf_counter()
        out = run()
        t.append((time.perf_counter() - t0) * 1e3)
    t.sort()
    q = lambda p: t[round((len(t) - 1) * p)]  # noqa: E731
    return q(0.5), q(0.1), q(0.9), out


def gpu_peers(model: DsmModule, c: int, h: int, w: int, batch: int):
    """(name, run) pairs timing PyTorch + cuDNN host to host on the GPU."""
    cl = torch.channels_last
    version = torch.__version__.split("+")[0]
    m32 = model.to("cuda").to(memory_format=cl)
    m16 = copy.deepcopy(m32).half()
    x = torch.from_numpy(bench_input((batch, c, h, w)))

    def eager():
        with torch.inference_mode():
            xd = x.to("cuda", non_blocking=False).contiguous(memory_format=cl)
            return m32(xd).cpu().numpy()

    def graph(m, dtype):
        static_x = torch.zeros(batch, c, h, w, device="cuda", dtype=dtype)
        static_x = static_x.contiguous(memory_format=cl)
        with torch.inference_mode():
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    m(static_x)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                static_y = m(static_x)

        def run():
            static_x.copy_(x)
            g.replay()
            return static_y.float().cpu().numpy()

        return run

    return [
        (f"pytorch {version} cudnn eager tf32", eager),
        (f"pytorch {version} cudnn graph tf32", graph(m32, torch.float)),
        (f"pytorch {version} cudnn graph fp16", graph(m16, torch.half)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gap-ms", type=float, default=0.0,
                    help="pause before each timed call, as `dynsparse bench --gap-ms`")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--torch", action="store_true", help="also time PyTorch eager")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")  # the exporter's notes are not ours to act on
    torch.set_num_threads(a.threads)
    model = load(a.model)
    c, h, w = model.input["channels"], model.input["height"], model.input["width"]
    if a.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("PyTorch sees no CUDA device")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        for b in (int(v) for v in a.batch.split(",")):
            for name, run in gpu_peers(model, c, h, w, b):
                med, p10, p90, out = timed(run, a.warmup, a.runs, a.gap_ms)
                print(json.dumps({
                    "peer": name, "batch": b, "median_ms": med, "p10_ms": p10, "p90_ms": p90,
                    # FP16 can overflow on random weights: null, not NaN, keeps it JSON.
                    "logits": [float(v) if np.isfinite(v) else None for v in np.asarray(out)[0]],
                }), flush=True)
        return
    try:
        import onnx_export
        import onnxruntime as ort
    except ImportError:
        ort = None
        print("onnxruntime is not installed: pip install onnxruntime onnx", file=sys.stderr)
    sess = None
    if ort is not None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.onnx")
            onnx_export.export(model, torch.zeros(1, c, h, w), path)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = a.threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    for b in (int(v) for v in a.batch.split(",")):
        x = bench_input((b, c, h, w))
        peers = []
        if sess is not None:
            peers.append(("onnxruntime " + ort.__version__, lambda: sess.run(None, {"x": x})[0]))
        if a.torch:
            xt = torch.from_numpy(x)

            def eager():
                with torch.no_grad():
                    return model(xt).numpy()

            peers.append(("pytorch " + torch.__version__.split("+")[0] + " eager", eager))
        for name, run in peers:
            med, p10, p90, out = timed(run, a.warmup, a.runs, a.gap_ms)
            print(json.dumps({
                "peer": name, "batch": b, "median_ms": med, "p10_ms": p10, "p90_ms": p90,
                "logits": [float(v) for v in np.asarray(out)[0]],
            }), flush=True)


if __name__ == "__main__":
    main()
