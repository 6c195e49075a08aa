"""Exports a PyTorch module to ONNX the way the peers run it: with each zero Pad that only
feeds a convolution folded into that convolution's own padding.

PyTorch has no asymmetric convolution padding, so a TensorFlow-style SAME convolution
(EfficientNet-Lite's, in its package's code and in `dsm_peer.py` for stride 2) is
exported as a Pad node and a Conv. ONNX Runtime fused the package model's 17 Pads
itself, but kept the five of the network `dsm_peer.py` rebuilds, each breaking its
channel-blocked layout with a reorder out and back in (its profiler: 0.8 ms of Pad and
0.8 ms of reorders in a 7.7 ms pass at 2 threads). ONNX's Conv takes its four pads
separately, so here the peer gets each such convolution as one node, as a hand-written
ONNX model would have it, whichever way it was exported.
"""

import os
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper


def export(model: torch.nn.Module, example: torch.Tensor, path: str, dynamic_batch: bool = True,
           opset: int | None = None) -> int:
    """Writes `model` to `path` as ONNX with pads folded into convolutions; returns how
    many Pad nodes were folded."""
    with tempfile.TemporaryDirectory() as d:
        raw = os.path.join(d, "raw.onnx")
        kw = {"dynamic_axes": {"x": {0: "n"}, "y": {0: "n"}}} if dynamic_batch else {}
        if opset is not None:
            kw["opset_version"] = opset
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes are not ours to act on
            torch.onnx.export(model, (example,), raw, input_names=["x"], output_names=["y"],
                              dynamo=False, **kw)
        # Constant folding alone (ORT's basic level) turns the pads the exporter computes
        # from constants into initializers that can be read.
        folded = os.path.join(d, "folded.onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = folded
        ort.InferenceSession(raw, opts, providers=["CPUExecutionProvider"])
        m = onnx.load(folded)
        n = fold_pads(m.graph)
        onnx.save(m, path)
        # The folded model must compute what the exported one does, on an input that is
        # not zero (a zero image would not show a pad in the wrong place).
        rng = np.random.default_rng(0)
        x = {"x": rng.standard_normal(tuple(example.shape)).astype(np.float32)}
        plain = ort.InferenceSession(raw, providers=["CPUExecutionProvider"]).run(None, x)[0]
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, x)[0]
    err = float(np.max(np.abs(got - plain)) / max(float(np.max(np.abs(plain))), 1e-12))
    if err > 1e-5:
        raise SystemExit(f"folding {n} pads into convolutions changed the output ({err:.2e})")
    return n


def fold_pads(g: onnx.GraphProto) -> int:
    """Folds every constant-zero Pad of the two spatial axes whose only reader is a Conv
    into that Conv's `pads`; returns how many."""
    inits = {i.name: i for i in g.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    graph_outputs = {o.name for o in g.output}
    folded = []
    for pad in g.node:
        if pad.op_type != "Pad" or len(pad.input) < 2 or pad.input[1] not in inits:
            continue
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        if mode != b"constant":
            continue
        if len(pad.input) > 2 and pad.input[2]:
            value = inits.get(pad.input[2])
            if value is None or np.any(numpy_helper.to_array(value) != 0):
                continue
        if len(pad.input) > 3 and pad.input[3]:  # explicit axes: not the exporter's form
            continue
        p = numpy_helper.to_array(inits[pad.input[1]]).tolist()
        if len(p) != 8 or p[0] or p[1] or p[4] or p[5] or min(p) < 0:
            continue
        users = readers.get(pad.output[0], [])
        if len(users) != 1 or users[0].op_type != "Conv" or pad.output[0] in graph_outputs:
            continue
        conv = users[0]
        if conv.input[0] != pad.output[0]:
            continue
        attrs = {a.name: a for a in conv.attribute}
        if "auto_pad" in attrs and attrs["auto_pad"].s not in (b"", b"NOTSET"):
            continue
        old = list(attrs["pads"].ints) if "pads" in attrs else [0, 0, 0, 0]
        # ONNX Pad: [n, c, h, w begins, n, c, h, w ends]; Conv: [h, w begins, h, w ends].
        new = [old[0] + p[2], old[1] + p[3], old[2] + p[6], old[3] + p[7]]
        if "pads" in attrs:
            conv.attribute.remove(attrs["pads"])
        conv.attribute.append(onnx.helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        g.node.remove(pad)
    # Pads read by no node any more would each draw a warning from ONNX Runtime.
    used = {i for node in g.node for i in node.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return len(folded)
