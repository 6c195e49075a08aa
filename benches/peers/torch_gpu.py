"""Dense PyTorch + cuDNN latency on the GPU: the peer the CUDA executor is measured against.

Runs torchvision's resnet18/resnet50/mobilenet_v2 and timm's efficientnet_lite0 (random
weights: latency does not depend on their values) in channels_last, eager and captured as a
CUDA graph, with TF32 and with FP16, timing each forward with CUDA events.

    python3 benches/peers/torch_gpu.py [--models resnet50,...] [--batches 1,8,64] [--json FILE]
"""
import argparse
import json
import statistics
import sys

import torch


def build(name):
    if name == "efficientnet_lite0":
        import timm

        return timm.create_model("efficientnet_lite0", pretrained=False)
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def flops_per_image(model):
    total = 0

    def conv_hook(m, inp, out):
        nonlocal total
        k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
        total += 2 * out.numel() // out.shape[0] * k

    def linear_hook(m, inp, out):
        nonlocal total
        total += 2 * m.in_features * m.out_features

    hooks = [
        m.register_forward_hook(conv_hook if isinstance(m, torch.nn.Conv2d) else linear_hook)
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.inference_mode():
        model(torch.randn(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    return total


def time_it(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(round((len(times) - 1) * f)))]
    return statistics.median(times), q(0.1), q(0.9)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,mobilenet_v2,efficientnet_lite0,resnet18")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--modes", default="eager-tf32,graph-tf32,eager-fp16,graph-fp16")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cudnn {torch.backends.cudnn.version()}", flush=True)
    rows = []
    for name in args.models.split(","):
        try:
            base = build(name).eval()
        except Exception as e:  # timm missing, unknown model
            print(f"{name}: skipped ({e})", flush=True)
            continue
        flops = flops_per_image(base)
        for mode in args.modes.split(","):
            graph, dtype = mode.startswith("graph"), (torch.half if mode.endswith("fp16") else torch.float)
            model = build(name).eval().to("cuda", dtype).to(memory_format=torch.channels_last)
            for batch in map(int, args.batches.split(",")):
                row = {"model": name, "batch": batch, "mode": mode, "flops_per_image": flops}
                try:
                    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
                    x = x.contiguous(memory_format=torch.channels_last)
                    with torch.inference_mode():
                        if graph:
                            s = torch.cuda.Stream()
                            s.wait_stream(torch.cuda.current_stream())
                            with torch.cuda.stream(s):
                                for _ in range(3):
                                    model(x)
                            torch.cuda.current_stream().wait_stream(s)
                            g = torch.cuda.CUDAGraph()
                            with torch.cuda.graph(g):
                                model(x)
                            fn = g.replay
                        else:
                            fn = lambda: model(x)
                        med, p10, p90 = time_it(fn, args.warmup, args.iters)
                    row.update(median_ms=med, p10_ms=p10, p90_ms=p90,
                               images_per_s=batch / med * 1e3,
                               tflops=flops * batch / med / 1e9)
                except Exception as e:
                    row["error"] = str(e)
                rows.append(row)
                print(f"{name} b{batch} {mode}: " +
                      (f"{row['median_ms']:.3f} ms" if "median_ms" in row else row["error"]), flush=True)
            del model
            torch.cuda.empty_cache()
    print("\n| model | batch | mode | median ms | p10 | p90 | img/s | TFLOP/s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "median_ms" in r:
            print(f"| {r['model']} | {r['batch']} | {r['mode']} | {r['median_ms']:.3f} | {r['p10_ms']:.3f} | "
                  f"{r['p90_ms']:.3f} | {r['images_per_s']:.0f} | {r['tflops']:.1f} |")
        else:
            print(f"| {r['model']} | {r['batch']} | {r['mode']} | error: {r['error'][:60]} | | | | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "cudnn": torch.backends.cudnn.version(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
