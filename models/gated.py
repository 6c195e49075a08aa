"""PyTorch reference of dynsparse's trained gates, with exactly the runtime's semantics.

A gated convolution decides from its input x, before it runs:
  channel gate  score[o] = b[o] + sum_c W[o, c] * mean(x[c])          (Linear on the pooled input)
  spatial gate  score[t] = b + mean over the input window of tile t of sum_c w[c] * x[c]
A threshold p keeps what has sigmoid(score) >= p; a ratio r keeps the best ceil(r * n),
ties to the lower index; counts round up to the executing kernel's tile (channels: the
micro-kernel's rows, 1 here unless asked; tiles: whole 32-column GEMM panels). Dropped
channels are zero; skipped output pixels are zero, or the residual in a residual block.
These are the rules of src/exec/gating.rs; tests/gated_parity.rs checks the runtime
against this file's masks and logits.

Training (see `Run`): the same hard masks in the forward pass, with straight-through
gradients into the gates' sigmoids, so a gate learns from the task loss what its cut
costs; the budget term pushes the executed FLOPs under a target.
"""

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

NR = 32  # columns of one CPU GEMM panel: kept tile counts cover whole panels


def cpu_tiling(oh: int, ow: int):
    """The runtime's tile edge for an oh x ow output (gating::cpu_tiling), or None."""
    for g in (4, 2):
        if oh % g == 0 and ow % g == 0 and (oh // g) * (ow // g) >= 16:
            return g
    return None


def kept_count(n: int, keep: float, r: int) -> int:
    """gating::kept_count: keep of n rounded up to a multiple of r, in [min(r, n), n]."""
    r = max(r, 1)
    k = math.ceil(n * min(max(keep, 0.0), 1.0) / r) * r
    return min(max(k, min(r, n)), n)


def logit(p: float) -> float:
    """gating::channel_bar: the score at which sigmoid(score) = p, in f32."""
    return float(torch.tensor(math.log(p / (1.0 - p)), dtype=torch.float32))


def select(scores: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """0/1 mask of the n[b] best scores of each row, ties to the lower index."""
    order = torch.sort(scores.detach(), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (rank < n[:, None]).to(scores.dtype)


def select_groups(scores: torch.Tensor, n: torch.Tensor, group: int) -> torch.Tensor:
    """gating::select_groups: 0/1 mask of n[b] units of each row chosen in aligned groups
    of `group` (the last one shorter when `group` does not divide the count). Groups rank
    by mean score (ties to the lower group) and are kept whole while they fit; the first
    that does not fit gives its best units (ties to the lower index) for the rest."""
    if group <= 1:
        return select(scores, n)
    b, c = scores.shape
    s = scores.detach()
    ng = (c + group - 1) // group
    pad = ng * group - c
    sizes = torch.full((ng,), group, device=s.device)
    sizes[-1] = c - (ng - 1) * group
    means = F.pad(s, (0, pad)).view(b, ng, group).sum(2) / sizes
    order = torch.sort(means, dim=1, descending=True, stable=True).indices
    sorted_sizes = sizes[order]
    before = torch.empty_like(order).scatter_(1, order, torch.cumsum(sorted_sizes, 1) - sorted_sizes)
    unit_group = torch.arange(c, device=s.device) // group
    start, size = before[:, unit_group], sizes[unit_group]
    whole = start + size <= n[:, None]
    partial = (start < n[:, None]) & (n[:, None] < start + size)
    # Each unit's rank inside its group, best first.
    inner = F.pad(s, (0, pad), value=float("-inf")).view(b, ng, group)
    inner_order = torch.sort(inner, dim=2, descending=True, stable=True).indices
    rank = torch.empty_like(inner_order)
    rank.scatter_(2, inner_order, torch.arange(group, device=s.device).expand_as(inner_order))
    rank = rank.view(b, ng * group)[:, :c]
    return (whole | (partial & (rank < n[:, None] - start))).to(scores.dtype)


class Cut:
    """What a gate keeps: everything, a ratio, or a threshold on sigmoid(score)."""

    def __init__(self, ratio=None, threshold=None):
        self.ratio, self.threshold = ratio, threshold

    def active(self) -> bool:
        return self.ratio is not None or self.threshold is not None

    def mask(self, scores: torch.Tensor, round_to: int, group: int = 1) -> torch.Tensor:
        n_units = scores.shape[1]
        if self.ratio is not None:
            n = torch.full((scores.shape[0],), kept_count(n_units, self.ratio, round_to), device=scores.device)
        elif self.threshold is not None:
            above = (scores.detach() >= logit(self.threshold)).sum(1)
            r = max(round_to, 1)
            n = ((above + r - 1) // r * r).clamp(min(r, n_units), n_units)
        else:
            return torch.ones_like(scores)
        return select_groups(scores, n, group)


class ChannelGate(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.fc = nn.Linear(cin, cout)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.constant_(self.fc.bias, 1.5)  # starts open: sigmoid(1.5) = 0.82

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


class SpatialGate(nn.Module):
    """Scores the g x g output tiles of a convolution (kernel k, stride s, padding k // 2)
    on an in_hw input from the mean of a 1x1 score map over each tile's input window."""

    def __init__(self, cin: int, in_hw, k: int, stride: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cin) * 0.01)
        self.bias = nn.Parameter(torch.tensor([1.5]))
        h, w = in_hw
        pad = k // 2
        oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        g = cpu_tiling(oh, ow)
        assert g is not None, f"no tiling for a {oh}x{ow} output"
        self.g, self.out_hw, self.tiles_hw = g, (oh, ow), (oh // g, ow // g)

        def span(first, out, length):
            last = max(min(first + g, out), first + 1) - 1
            lo, hi = first * stride - pad, last * stride + k - pad
            return min(max(lo, 0), length), min(max(hi, 0), length)

        ys = [span(t * g, oh, h) for t in range(oh // g)]
        xs = [span(t * g, ow, w) for t in range(ow // g)]
        y0, y1 = zip(*[ys[i // len(xs)] for i in range(len(ys) * len(xs))])
        x0, x1 = zip(*[xs[i % len(xs)] for i in range(len(ys) * len(xs))])
        for name, v in (("y0", y0), ("y1", y1), ("x0", x0), ("x1", x1)):
            self.register_buffer(name, torch.tensor(v), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.einsum("nchw,c->nhw", x, self.weight).double()
        sat = F.pad(m.cumsum(1).cumsum(2), (1, 0, 1, 0))
        flat = sat.flatten(1)
        w1 = sat.shape[2]

        def at(y, x):
            return flat[:, y * w1 + x]

        s = at(self.y1, self.x1) - at(self.y0, self.x1) - at(self.y1, self.x0) + at(self.y0, self.x0)
        area = ((self.y1 - self.y0) * (self.x1 - self.x0)).double()
        return (s / area).float() + self.bias

    def pixels(self, tile_mask: torch.Tensor) -> torch.Tensor:
        th, tw = self.tiles_hw
        m = tile_mask.view(-1, 1, th, tw)
        return m.repeat_interleave(self.g, 2).repeat_interleave(self.g, 3)

    def flops(self, kept_in: torch.Tensor) -> torch.Tensor:
        plane = (self.y1.max() * self.x1.max()).item()
        return 2 * kept_in * plane + 2 * plane + 4 * len(self.y0)


class Run:
    """One forward pass's policy and its record.

    channels, tiles: Cut for every gate. ste: straight-through gradients (training).
    round_c: channel counts round up to this (the runtime uses its micro-kernel's rows).
    group_c: kept channels are chosen in aligned groups of this many (--channel-groups).
    Records per gated convolution its masks, and per sample the executed FLOPs (gates
    included) and the dense FLOPs, counted the way the runtime counts them."""

    def __init__(self, channels=None, tiles=None, ste=False, round_c=1, record=False, group_c=1):
        # A Cut for every gate, or a dict of Cuts by convolution name (see plan_budget).
        self.channels, self.tiles = channels or Cut(), tiles or Cut()
        self.ste, self.round_c, self.record, self.group_c = ste, round_c, record, group_c
        self.masks = {}
        self.flops = 0.0
        self.dense = 0.0

    def gate(self, scores, cut, round_to, group=1):
        hard = cut.mask(scores, round_to, group)
        if self.ste:
            p = torch.sigmoid(scores)
            return hard + p - p.detach()
        return hard

    def conv(self, name, conv, bn, x, kept_in, cg=None, sg=None, residual=None, act=True):
        """A convolution + BatchNorm (+ residual) + ReLU under this run's gates. kept_in:
        per sample, the count of input channels that hold data. Returns the output and
        the per-sample kept output channel count."""
        n, cout = x.shape[0], conv.out_channels
        mc = mt = None
        ccut = self.channels.get(name, Cut()) if isinstance(self.channels, dict) else self.channels
        tcut = self.tiles.get(name, Cut()) if isinstance(self.tiles, dict) else self.tiles
        if cg is not None and ccut.active():
            mc = self.gate(cg(x), ccut, self.round_c, self.group_c)
        if sg is not None and tcut.active():
            mt = self.gate(sg(x), tcut, max(NR // (sg.g * sg.g), 1))
        y = bn(conv(x))
        if residual is not None:
            y = y + residual
        if act:
            y = F.relu(y)
        if mc is not None:
            y = y * mc[:, :, None, None]
        f64 = torch.float64  # FLOP counts stay exact integers
        kept_out = mc.sum(1).to(f64) if mc is not None else torch.full((n,), float(cout), dtype=f64)
        oh, ow = y.shape[2:]
        taps = conv.kernel_size[0] * conv.kernel_size[1]
        positions = torch.full((n,), float(oh * ow), dtype=f64)
        gate_flops = torch.zeros(n, dtype=f64)
        plane = x.shape[2] * x.shape[3]
        if mc is not None:
            gate_flops = gate_flops + kept_in * plane + 2 * kept_in * cout
        if mt is not None:
            px = sg.pixels(mt)
            y = y * px + (residual * (1 - px) if residual is not None else 0)
            positions = mt.sum(1).to(f64) * sg.g * sg.g
            gate_flops = gate_flops + sg.flops(kept_in)
        self.flops = self.flops + 2 * positions * kept_out * kept_in * taps + gate_flops
        self.dense += 2.0 * oh * ow * cout * conv.in_channels * taps
        if self.record:
            self.masks[name] = (
                None if mc is None else mc.detach().bool(),
                None if mt is None else mt.detach().bool(),
            )
        return y, kept_out


class GatedBlock(nn.Module):
    """torchvision's BasicBlock with a channel and a spatial gate on conv1 and a spatial
    gate on conv2 (whose skipped tiles pass the identity through)."""

    def __init__(self, inplanes: int, planes: int, stride: int, in_hw):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        out_hw = ((in_hw[0] - 1) // stride + 1, (in_hw[1] - 1) // stride + 1)
        self.gate1c = ChannelGate(inplanes, planes)
        self.gate1s = SpatialGate(inplanes, in_hw, 3, stride)
        self.gate2s = SpatialGate(planes, out_hw, 3, 1)
        self.out_hw = out_hw

    def forward(self, x, run: Run, prefix: str):
        n = x.shape[0]
        full = torch.full((n,), float(x.shape[1]), dtype=torch.float64)
        if self.downsample is not None:
            identity, _ = run.conv(prefix + ".downsample.0", self.downsample[0], self.downsample[1], x, full, act=False)
        else:
            identity = x
        y, kept = run.conv(prefix + ".conv1", self.conv1, self.bn1, x, full, self.gate1c, self.gate1s)
        return run.conv(prefix + ".conv2", self.conv2, self.bn2, y, kept, None, self.gate2s, residual=identity)[0]


class GatedResNet(nn.Module):
    """CIFAR-style ResNet (as models/torch_models.py) with gated blocks, any input size."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_hw=(32, 32)):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        hw, inplanes = tuple(in_hw), 16
        self.stages = nn.ModuleList()
        for li, planes in enumerate((16, 32, 64)):
            blocks = []
            for bi in range(n):
                s = 2 if li > 0 and bi == 0 else 1
                blocks.append(GatedBlock(inplanes, planes, s, hw))
                hw, inplanes = blocks[-1].out_hw, planes
            self.stages.append(nn.ModuleList(blocks))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x, run: Run = None):
        run = run or Run()
        n = x.shape[0]
        x, _ = run.conv("conv1", self.conv1, self.bn1, x, torch.full((n,), 3.0, dtype=torch.float64))
        for li, stage in enumerate(self.stages):
            for bi, block in enumerate(stage):
                x = block(x, run, f"layer{li + 1}.{bi}")
        run.flops = run.flops + 2.0 * self.fc.in_features * self.fc.out_features
        run.dense += 2.0 * self.fc.in_features * self.fc.out_features
        return self.fc(x.mean((2, 3)))

    def export(self) -> dict:
        """State dict with the names `dynsparse convert --arch resnet20` reads, the gates
        as `{conv}.gate.channel.*` and `{conv}.gate.spatial.*`."""
        return {exported_name(k): v.detach().float().contiguous() for k, v in self.state_dict().items()}

    def load_exported(self, tensors: dict) -> None:
        """Loads what `export` wrote (a demo.safetensors)."""
        state = self.state_dict()
        self.load_state_dict({k: tensors[exported_name(k)].to(v.dtype) for k, v in state.items()})


def exported_name(k: str) -> str:
    """A GatedResNet state-dict name as `export` writes it."""
    parts = k.split(".")
    if parts[0] != "stages":
        return k
    block = f"layer{int(parts[1]) + 1}.{parts[2]}"
    rest = parts[3:]
    if rest[0] == "gate1c":
        return f"{block}.conv1.gate.channel.{rest[-1]}"
    if rest[0] in ("gate1s", "gate2s"):
        return f"{block}.conv{rest[0][4]}.gate.spatial.{rest[-1]}"
    return ".".join([block] + rest)


def plan_budget(model: GatedResNet, budget: float, with_tiles: bool, round_c: int):
    """The runtime's FLOP-budget planner (EngineExecutor::cuts and fill_budget): the
    largest ratio common to every gate whose planned FLOPs (gates aside) fit
    floor(budget x dense), found by bisection, then the least-kept gate grown one
    rounding step at a time while the budget allows. Returns (channel cuts, tile cuts)
    by convolution name for `Run`, or None when dense fits."""
    layers = []  # (name, cin, cout, taps, out pixels, channel gate?, tiling g or None, reads)
    stem = model.conv1
    for li, stage in enumerate(model.stages):
        for bi, block in enumerate(stage):
            p = f"layer{li + 1}.{bi}"
            oh, ow = block.out_hw
            if block.downsample is not None:
                d = block.downsample[0]
                layers.append((p + ".downsample.0", d.in_channels, d.out_channels, 1, oh * ow, False, None, None))
            c1, c2 = block.conv1, block.conv2
            layers.append((p + ".conv1", c1.in_channels, c1.out_channels, 9, oh * ow, True, block.gate1s, None))
            layers.append((p + ".conv2", c2.in_channels, c2.out_channels, 9, oh * ow, False, block.gate2s, p + ".conv1"))
    h = model.stages[0][0].gate1s.y1.max().item()
    w = model.stages[0][0].gate1s.x1.max().item()
    fixed = 2 * stem.in_channels * stem.out_channels * 9 * h * w + 2 * model.fc.in_features * model.fc.out_features
    dense = fixed + sum(2 * cin * cout * taps * px for _, cin, cout, taps, px, _, _, _ in layers)

    def planned(rc, rt):
        total, kept = fixed, {}
        for name, cin, cout, taps, px, ch, sg, reads in layers:
            ic = kept.get(reads, cin)
            oc = kept_count(cout, rc[name], round_c) if ch and name in rc else cout
            if ch and name in rc:
                kept[name] = oc
            if sg is not None and name in rt:
                step = max(NR // (sg.g * sg.g), 1)
                px = kept_count(len(sg.y0), rt[name], step) * sg.g * sg.g
            total += 2 * oc * ic * taps * px
        return total

    def at(r):
        return {n: r for n, *_ in layers}, ({n: r for n, *_ in layers} if with_tiles else {})

    limit = math.floor(budget * dense)
    if planned(*at(1.0)) <= limit:
        return None
    if planned(*at(sys.float_info.min)) > limit:
        raise ValueError(f"a budget of {budget} is below the least these gates can execute")
    lo, hi = sys.float_info.min, 1.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if planned(*at(mid)) <= limit:
            lo = mid
        else:
            hi = mid
    rc, rt = at(lo)
    units = []  # (name, tiles?, units, step), in node order, channels before tiles
    for name, cin, cout, taps, px, ch, sg, reads in layers:
        if ch:
            units.append((name, False, cout, round_c))
        if sg is not None and name in rt:
            units.append((name, True, len(sg.y0), max(NR // (sg.g * sg.g), 1)))

    def kept_of(u):
        return kept_count(u[2], (rt if u[1] else rc)[u[0]], u[3])

    while True:
        units = [u for u in units if kept_of(u) < u[2]]
        units.sort(key=lambda u: kept_of(u) / u[2])
        grown = False
        while units:
            u = units[0]
            nxt = kept_of(u) + u[3]
            r = 1.0 if nxt >= u[2] else nxt / u[2] - 1e-9
            trial_c, trial_t = dict(rc), dict(rt)
            (trial_t if u[1] else trial_c)[u[0]] = r
            if planned(trial_c, trial_t) <= limit:
                rc, rt, grown = trial_c, trial_t, True
                break
            units.pop(0)
        if not grown:
            return {n: Cut(ratio=r) for n, r in rc.items()}, {n: Cut(ratio=r) for n, r in rt.items()}
