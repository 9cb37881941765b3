"""CMFN training-step speed: this project's step against a faithful fp32 reference of the released model.

One process, one paired batch (P identities x K images per modality: 2 x 2 = 4 visible + 4
infrared images by default, 128x64, ResNet-50 CMFN in its SYSU configuration), the same
weights, and the full training step::

    forward -> CMFN criterion (all terms, DCL on) -> backward -> SGD step

Steps measured, alternating round by round (the order rotates) so that a busy machine slows
all of them alike:

* ``reference_fp32``: :class:`ReleasedForward`, the forward of the released model written
  out in this file with its quirks and its dead work (see below), on this project's
  parameters; the released optimiser (plain SGD, Nesterov momentum 0.9, weight decay 5e-4,
  head at the base rate, the rest at 0.1x);
* ``project_fp32``: this project's model (NCHW), criterion and ``build_optimizer``, as
  train.py runs them by default;
* ``project_bf16_cl``: the same with bf16 autocast and channels_last model and inputs
  (``SOLVER.AMP bf16``, ``SOLVER.CHANNELS_LAST True``). On a device without native bf16
  kernels (a CPU without AVX-512 BF16 / AMX: there every bf16 convolution falls back to a
  slow reference kernel, about 50x slower than fp32) it is skipped unless named in
  ``--modes``, and ``project_fp32_cl`` is measured in its place;
* ``project_fp32_cl``: fp32 with channels_last model and inputs.

Before timing, the reference and the project step run once from the same weights and the
same random state (the dropout and stochastic-depth masks are drawn from the same stream in
the same order): their losses must agree (``--loss-tol``, relative), and the difference is
reported, with the difference of all gradients (L2, relative; a float rounding of 1e-6
flips a few ReLUs that sit at zero, so single gradient entries may differ by more) and the
FLOPs of both forward + backward passes (torch.utils.flop_counter).

The reference forward, step by step as the released code computes it, written from the
released model's description; this project's modules only lend it their parameters:

* the stems and the ResNet stages as torchvision computes them, and the channels-first
  LayerNorm of CSC-CMA as mean / variance / sqrt / affine elementwise ops;
* MFA with DEEN's strided 1x1 convs: the value conv and the channel-attention product are
  computed at every side position, and the stride-2 output conv reads a quarter of them;
* GlobalBlock as a Swin block: the normalised tokens are zero-padded to whole windows and
  every padded token goes through the qkv projection; attention as explicit softmax(q kᵀ)
  v with the relative-position bias gathered on every call;
* MBUE computes each branch's 3x3 context conv (C -> C/4, Kaiming-normal; not part of this
  project's model) and CSC-CMA ignores it: dead work, as released;
* stochastic depth draws its masks with this project's DropPath, so that both steps draw
  the same masks from the same seed and their losses can be compared.

Output: one JSON object (stdout, and ``--json PATH``): the setting; per step the wall ms/step
(median and min over ``--repeats`` rounds, and every round), images/s (input images per
second at the median) and the process CPU ms/step; the speedups over the reference (median
of the per-round ratios, the ratio of the minima, and the median CPU-time ratio); the loss
check; a torch.profiler table of the ten ops with the most self CPU time in one project fp32
step; the machine, with the load average before and after (other processes on the cores
inflate and scatter the times: compare the ratios, and the CPU times).

    python benchmarks/bench_train.py                            # defaults: 1 thread, ~2-3 min on a CPU
    python benchmarks/bench_train.py --repeats 5 --json runs/bench_train.json
    python benchmarks/bench_train.py --threads 0                # every core (torch's default)
    python benchmarks/bench_train.py --modes reference_fp32,project_fp32,project_bf16_cl
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.training import native_bf16  # noqa: E402
from utils.config import build_config  # noqa: E402

NUM_CLASSES = 395
EPOCH = 0  # an epoch with every loss term on (DCL weight 0.1)
MODES = ("reference_fp32", "project_fp32", "project_bf16_cl", "project_fp32_cl")
DEFAULT_MODES = MODES[:3]


# ------------------------------------------------------------------- released forward
def _bn(m, x):
    """nn.BatchNorm forward with the parameters and buffers of ``m`` (counter included)."""
    if m.training:
        m.num_batches_tracked.add_(1)
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, m.training, m.momentum, m.eps)


def _conv(m, x, stride=1, padding=0, dilation=1, groups=1):
    """The released conv (its hyper-parameters given here) with the weight of ``m``."""
    return F.conv2d(x, m.weight, m.bias, stride, padding, dilation, groups)


def _layer_norm_channels_first(norm, x):
    """The released channels-first LayerNorm, elementwise over dim 1 (biased variance)."""
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + norm.eps)
    return norm.weight[:, None, None] * x + norm.bias[:, None, None]


def released_stem(stem, x):
    x = F.relu(_bn(stem.bn, _conv(stem.conv, x, 2, 3)))
    return F.max_pool2d(x, 3, 2, 1)


def released_resnet_block(block, x):
    """A torchvision Bottleneck (ResNet-50) or BasicBlock (ResNet-18)."""
    if hasattr(block, "conv3"):
        out = F.relu(_bn(block.bn1, _conv(block.conv1, x)))
        out = F.relu(_bn(block.bn2, _conv(block.conv2, out, block.conv2.stride, 1)))
        out = _bn(block.bn3, _conv(block.conv3, out))
    else:
        out = F.relu(_bn(block.bn1, _conv(block.conv1, x, block.conv1.stride, 1)))
        out = _bn(block.bn2, _conv(block.conv2, out, 1, 1))
    if block.downsample is not None:
        x = _bn(block.downsample[1], _conv(block.downsample[0], x, block.downsample[0].stride))
    return F.relu(out + x)


def released_stage(stage, x):
    for block in stage:
        x = released_resnet_block(block, x)
    return x


def released_hce(hce, x, dilations=(2, 3, 5)):
    """DSNet MFACB: three dilated conv-BN-ReLU units, concat, 1x1 fuse, plus a 1x1 shortcut."""
    feats, out = [], x
    for unit, d in zip(hce.units, dilations):
        out = F.relu(_bn(unit.bn, _conv(unit.conv, out, 1, d, d)))
        feats.append(out)
    fused = F.relu(_bn(hce.fuse.bn, _conv(hce.fuse.conv, torch.cat(feats, 1))))
    return fused + F.relu(_bn(hce.shortcut.bn, _conv(hce.shortcut.conv, x)))


def released_dilated_bottleneck(block, x):
    out = F.relu(_bn(block.reduce.bn, _conv(block.reduce.conv, x)))
    out = F.relu(_bn(block.dilated.bn, _conv(block.dilated.conv, out, 1, 5, 5)))
    return _bn(block.expand.bn, _conv(block.expand.conv, out)) + x


def released_cnl(m, x_h, x_l, stride):
    b, low = x_h.shape[0], m.low_ch
    g_x = _conv(m.value, x_l).view(b, low, -1)
    theta_x = _conv(m.query, x_h).view(b, low, -1)
    phi_x = _conv(m.key, x_l, stride).view(b, low, -1).permute(0, 2, 1)
    energy = torch.matmul(theta_x, phi_x)
    y = torch.matmul(energy / energy.size(-1), g_x).view(b, low, *x_l.shape[2:])
    return _bn(m.out_proj.bn, _conv(m.out_proj.conv, y, stride)) + x_h


def released_pnl(m, x_h, x_l):
    b, low = x_h.shape[0], m.low_ch
    g_x = _conv(m.value, x_l).view(b, low, -1).permute(0, 2, 1)
    theta_x = _conv(m.query, x_h).view(b, low, -1).permute(0, 2, 1)
    phi_x = _conv(m.key, x_l).view(b, low, -1)
    energy = torch.matmul(theta_x, phi_x)
    y = torch.matmul(energy / energy.size(-1), g_x)
    y = y.permute(0, 2, 1).contiguous().view(b, low // 2, *x_h.shape[2:])
    return _bn(m.out_proj.bn, _conv(m.out_proj.conv, y)) + x_h


def released_mfa(mfa, x_h, x_l, stride):
    return released_pnl(mfa.position_nl, released_cnl(mfa.channel_nl, x_h, x_l, stride), x_l)


def released_local_block(m, x):
    y = _conv(m.depthwise, x, 1, 1, 1, x.shape[1]).permute(0, 2, 3, 1)
    y = F.gelu(F.linear(F.layer_norm(y, m.norm.normalized_shape, m.norm.weight, m.norm.bias, m.norm.eps),
                        m.pointwise.weight, m.pointwise.bias))
    return x + y.permute(0, 3, 1, 2)


def released_window_attention(attn, x):
    """Swin window attention, explicit: x [B*nW, N, C] -> [B*nW, N, C] (no mask)."""
    bw, n, c = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (c // heads) ** -0.5
    logits = q @ k.transpose(-2, -1)
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)]
    logits = logits + bias.view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(bw, n, c)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


def released_global_block(m, x):
    b, c, h, w = x.shape
    ws, s = m.window_size, m.shift_size
    shortcut = x
    t = F.layer_norm(x.flatten(2).transpose(1, 2), m.attn_norm.normalized_shape, m.attn_norm.weight,
                     m.attn_norm.bias, m.attn_norm.eps).view(b, h, w, c)
    pad_h, pad_w = (-h) % ws, (-w) % ws
    t = F.pad(t, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    t = torch.roll(t, shifts=(-s, -s), dims=(1, 2))
    t = t.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws * ws, c)
    t = released_window_attention(m.attention, t)
    t = t.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).contiguous().view(b, hp, wp, c)
    t = torch.roll(t, shifts=(s, s), dims=(1, 2))[:, :h, :w, :].contiguous()
    x = shortcut + m.drop_path(t.permute(0, 1, 3, 2).reshape(b, -1, c).view(b, c, h, w))
    tokens = x.permute(0, 1, 3, 2).reshape(b, -1, c)
    y = F.layer_norm(tokens, m.mlp_norm.normalized_shape, m.mlp_norm.weight, m.mlp_norm.bias, m.mlp_norm.eps)
    y = F.linear(F.gelu(F.linear(y, m.mlp.fc1.weight, m.mlp.fc1.bias)), m.mlp.fc2.weight, m.mlp.fc2.bias)
    return x + m.drop_path(y.view(b, c, h, w))


def released_align(m, x):
    return _conv(m.conv_out, F.gelu(_layer_norm_channels_first(m.norm, _conv(m.conv_in, x))))


def released_wtconv(m, x):
    c, (h, w) = x.shape[1], x.shape[-2:]
    x_even = F.pad(x, (0, w % 2, 0, h % 2)) if h % 2 or w % 2 else x
    bands = F.conv2d(x_even, m.haar, stride=2, groups=c)
    bands = _conv(m.wavelet_conv, bands, 1, "same", 1, 4 * c) * m.wavelet_scale
    wavelet = F.conv_transpose2d(bands, m.haar, stride=2, groups=c)[:, :, :h, :w]
    return _conv(m.base_conv, x, 1, "same", 1, c) * m.base_scale + wavelet


def released_irmlp(m, x):
    out = F.gelu(_conv(m.spatial, x, 1, 1)) + x
    out = F.gelu(_conv(m.expand, _bn(m.residual_bn, out)))
    return _bn(m.project.bn, _conv(m.project.conv, out))


def released_csc_cma(m, local, global_):
    b, d, h, w = local.shape
    la, ga = released_align(m.local_align, local), released_align(m.global_align, global_)
    ca = m.cross_attention
    heads = ca.num_heads
    la_t, ga_t = la.flatten(2).transpose(1, 2), ga.flatten(2).transpose(1, 2)
    q = F.linear(ga_t, ca.q_proj.weight, ca.q_proj.bias).view(b, h * w, heads, d // heads).transpose(1, 2)
    k = F.linear(la_t, ca.k_proj.weight, ca.k_proj.bias).view(b, h * w, heads, d // heads).transpose(1, 2)
    v = F.linear(la_t, ca.v_proj.weight, ca.v_proj.bias).view(b, h * w, heads, d // heads).transpose(1, 2)
    q, k = q.softmax(dim=-1), k.softmax(dim=-2)
    out = torch.matmul(q, torch.matmul(k.transpose(-2, -1), v)).transpose(1, 2).reshape(b, h * w, d)
    cross = F.linear(out, ca.out_proj.weight, ca.out_proj.bias).transpose(1, 2).reshape(b, d, h, w)
    stats = torch.cat([torch.max(la, dim=1, keepdim=True)[0], torch.mean(la, dim=1, keepdim=True)], dim=1)
    spatial = la * torch.sigmoid(_conv(m.spatial_gate.conv, stats, 1, 3))
    gate = m.channel_gate
    chan = torch.sigmoid(_conv(gate.expand, F.relu(_conv(gate.reduce, F.adaptive_avg_pool2d(ga, 1)))))
    weights = F.softmax(m.fusion_weights, dim=0)
    fused = weights[0] * cross + weights[1] * spatial + weights[2] * (ga * chan)
    en = m.enhancer
    e = _bn(en.bn2, _conv(en.pointwise, F.gelu(_bn(en.bn1, released_wtconv(en.wtconv, fused))))) + fused
    out = released_irmlp(m.irmlp, _layer_norm_channels_first(m.fusion_norm, torch.cat([local, global_, e], 1)))
    return e + out


def released_mbue(mbue, context_convs, x):
    """The released Multi_FUE: [x; branch1(x); branch2(x)] then dropout (MBUE's p)."""
    b1 = released_mbue_branch(mbue.branch1, context_convs[0], x, True)
    b2 = released_mbue_branch(mbue.branch2, context_convs[1], x, False)
    return F.dropout(torch.cat([x, b1, b2], 0), mbue.dropout.p, mbue.training)


def released_mbue_branch(branch, context_conv, x, shared_compression):
    compress_l = branch.compress if shared_compression else branch.compress_local
    compress_g = branch.compress if shared_compression else branch.compress_global
    local = released_local_block(branch.local_block, x)
    local = _bn(compress_l.bn, _conv(compress_l.conv, local))
    global_ = released_global_block(branch.global_block, x)
    global_ = _bn(compress_g.bn, _conv(compress_g.conv, global_))
    context_conv(x)  # the released context, passed to CSC-CMA, which ignores it
    o = released_csc_cma(branch.fusion, local, global_)
    return _conv(branch.up_proj, F.relu(o))


class ReleasedForward(nn.Module):
    """The released CMFN training forward (SYSU/LLCM configuration) on ``model``'s parameters.

    ``model`` is this project's CMFN built with the released defaults (MBUE after layer3, no
    FIX.* switch); the reference adds only the two context convs the released MBUE computes.
    ``forward(images [2B, 3, H, W], modality) -> {"pool", "logits", "ort"}`` like the model.
    """

    def __init__(self, model):
        super().__init__()
        mbue = model.mbue
        if model.mbue_after != "layer3" or mbue.branch1.context_conv is not None or not mbue.branch1.shared_compression:
            raise SystemExit("the released reference covers the released SYSU/LLCM CMFN only")
        self.model = model
        channels = model.backbone.stage_channels[3]
        self.context_convs = nn.ModuleList(nn.Conv2d(channels, channels // 4, 3, padding=1, bias=False)
                                           for _ in range(2))
        for conv in self.context_convs:
            nn.init.kaiming_normal_(conv.weight)

    def forward(self, images, modality, camids=None):
        model = self.model
        net = model.backbone
        b = images.shape[0] // 2
        if not bool((modality == torch.arange(2 * b, device=modality.device).ge(b).long()).all()):
            raise ValueError("the reference forward takes paired batches (B visible rows, then B infrared)")
        s = torch.cat([released_stem(net.visible_stem, images[:b]), released_stem(net.infrared_stem, images[b:])])
        x = released_stage(net.layer1, s)
        s = released_mfa(model.mfa1, x, released_hce(model.hce_a[1], released_hce(model.hce_a[0], s)), 1)
        x = released_stage(net.layer2, s)
        s = released_mfa(model.mfa2, x, released_hce(model.hce_b, s), 2)
        x = released_stage(net.layer3, s)
        s = released_mfa(model.mfa3, x, released_dilated_bottleneck(model.dilated_bottleneck, s), 2)
        x = released_stage(net.layer4, released_mbue(model.mbue, self.context_convs, s))
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        bn = _bn(model.head.bnneck, pool)
        logits = F.linear(bn, model.head.classifier.weight, model.head.classifier.bias)
        m = pool.shape[0] // 3
        ort = (pool[m:2 * m] * pool[2 * m:]).sum() / pool.shape[0]
        return {"pool": pool, "logits": logits, "ort": ort}


def released_optimizer(reference, cfg):
    """Plain SGD as released: head (BNNeck, classifier) at the base rate, the rest at 0.1x."""
    head, rest = [], []
    for name, p in reference.named_parameters():
        if p.requires_grad:
            (head if name.startswith("model.head.") else rest).append(p)
    lr = cfg.SOLVER.BASE_LR
    return torch.optim.SGD([{"params": head, "lr": lr}, {"params": rest, "lr": 0.1 * lr}], lr=lr,
                           momentum=0.9, weight_decay=5e-4, nesterov=True)


# ------------------------------------------------------------------------- benchmark
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (one step of every mode each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--modes", default=None, help="comma-separated subset of %s (default: %s; without native "
                                                 "bf16 kernels project_fp32_cl replaces project_bf16_cl)"
                   % (",".join(MODES), ",".join(DEFAULT_MODES)))
    p.add_argument("--backbone", default="resnet50", choices=("resnet50", "resnet18"))
    p.add_argument("--size", type=int, nargs=2, default=(128, 64), metavar=("H", "W"))
    p.add_argument("--ids", type=int, nargs=2, default=(2, 2), metavar=("P", "K"),
                   help="identities x images per modality (default 2 2: 4 visible + 4 infrared)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: steady times on a shared machine, and the default "
                        "run stays within ~3 minutes on 2 busy cores; 0: torch's default, every core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-tol", type=float, default=1e-4, help="relative loss difference allowed")
    p.add_argument("--no-profile", action="store_true", help="skip the profiler table")
    p.add_argument("--json", help="also write the JSON report here")
    return p.parse_args(argv)


def make_batch(p, k, size, device, seed):
    gen = torch.Generator().manual_seed(seed)
    b = p * k
    pids = torch.arange(p).repeat_interleave(k)
    return {
        "images": torch.randn(2 * b, 3, *size, generator=gen).to(device),
        "modality": torch.cat([torch.zeros(b), torch.ones(b)]).long().to(device),
        "pids": torch.cat([pids, pids]).to(device),
        "camids": torch.cat([torch.zeros(b), torch.ones(b)]).long().to(device),
    }


class Step:
    """One training step of `net` (the project model or the reference) with its optimizer."""

    def __init__(self, name, net, optimizer, criterion, batch, bf16, channels_last, device):
        self.name, self.net, self.optimizer, self.criterion = name, net, optimizer, criterion
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.batch = dict(batch, images=batch["images"].contiguous(memory_format=fmt))
        self.device = device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def __call__(self):
        b = self.batch
        with self.autocast:
            outputs = self.net(b["images"], b["modality"], b["camids"])
        total, _, _ = self.criterion(outputs, b, EPOCH)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()

    def timed(self):
        """(wall seconds, CPU seconds of this process) of one step."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        self()
        sync()
        return time.perf_counter() - start, time.process_time() - cpu


def _loss_and_grads(step, model, seed):
    """(loss, terms, {parameter name: gradient}, GFLOP of the forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(seed)
    b = step.batch
    with FlopCounterMode(display=False) as flops:
        with step.autocast:
            outputs = step.net(b["images"], b["modality"], b["camids"])
        total, terms, _ = step.criterion(outputs, b, EPOCH)
        step.net.zero_grad(set_to_none=True)
        total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    step.net.zero_grad(set_to_none=True)
    return total.item(), terms, grads, flops.get_total_flops() / 1e9


def check_same_loss(reference_step, project_step, model, seed):
    """Loss and gradients of both steps from the same weights and random state (no update;
    the BatchNorm buffers are restored afterwards)."""
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    ref, ref_terms, ref_grads, ref_gflop = _loss_and_grads(reference_step, model, seed)
    model.load_state_dict(buffers, strict=False)
    mine, terms, grads, gflop = _loss_and_grads(project_step, model, seed)
    model.load_state_dict(buffers, strict=False)
    same = sorted(ref_grads) == sorted(grads)
    ref_norm = sum(g.double().pow(2).sum() for g in ref_grads.values()).sqrt().item()
    grad_diff = (sum((grads[n].double() - g.double()).pow(2).sum() for n, g in ref_grads.items()).sqrt().item()
                 if same else float("inf"))
    return {
        "reference_loss": ref, "project_loss": mine, "abs_diff": abs(ref - mine),
        "rel_diff": abs(ref - mine) / max(abs(ref), 1e-12),
        "terms_abs_diff": {k: abs(ref_terms[k] - terms[k]) for k in terms},
        "same_parameters_get_gradients": same,
        "grad_rel_l2_diff": grad_diff / ref_norm,
        "gflop_forward_backward": {"reference_fp32": ref_gflop, "project_fp32": gflop,
                                   "reference_over_project": ref_gflop / gflop},
    }


def profile_table(step, rows=10):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if step.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows), file=sys.stderr)
    return {
        "self_cpu_total_ms": total / 1e3,
        "top_ops": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                     "self_cpu_pct": 100.0 * e.self_cpu_time_total / total, "calls": e.count} for e in top],
    }


def main(argv=None):
    args = parse_args(argv)
    from engine.distributed import resolve_device
    from engine.solver import build_optimizer
    from loss import build_criterion
    from model import build_model

    device = resolve_device(args.device)
    if args.threads < 0:
        raise SystemExit("--threads must be 0 (torch's default) or a positive count, got %d" % args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    modes = args.modes.split(",") if args.modes else list(DEFAULT_MODES)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit("unknown mode(s) %s; choose from %s" % (", ".join(unknown), ", ".join(MODES)))
    skipped = {}
    if not args.modes and not native_bf16(device.type):
        modes[modes.index("project_bf16_cl")] = "project_fp32_cl"
        skipped["project_bf16_cl"] = ("no native bf16 kernels on this %s (mkldnn bf16 unsupported): bf16 "
                                      "convolutions would run a slow fallback (pass --modes to run it anyway); "
                                      "project_fp32_cl measured instead" % device.type)
    for needed in ("reference_fp32", "project_fp32"):
        if needed not in modes:
            modes.insert(0 if needed == "reference_fp32" else 1, needed)

    cfg = build_config("sysu", opts=[
        "MODEL.BACKBONE", args.backbone, "MODEL.PRETRAINED", "False", "INPUT.SIZE_TRAIN", str(list(args.size)),
        "DATALOADER.NUM_IDS", str(args.ids[0]), "DATALOADER.NUM_POS", str(args.ids[1]), "DEVICE", str(device),
    ])
    torch.manual_seed(args.seed)
    model = build_model(cfg, NUM_CLASSES).to(device).train()
    reference = ReleasedForward(model).to(device).train()
    criterion = build_criterion(cfg)
    batch = make_batch(args.ids[0], args.ids[1], args.size, device, args.seed)
    steps = {
        "reference_fp32": Step("reference_fp32", reference, released_optimizer(reference, cfg), criterion, batch,
                               False, False, device),
        "project_fp32": Step("project_fp32", model, build_optimizer(cfg, model), criterion, batch, False, False,
                             device),
    }
    for mode, bf16 in (("project_bf16_cl", True), ("project_fp32_cl", False)):
        if mode in modes:
            twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
            steps[mode] = Step(mode, twin, build_optimizer(cfg, twin), criterion, batch, bf16, True, device)

    start = time.perf_counter()
    loss_check = check_same_loss(steps["reference_fp32"], steps["project_fp32"], model, args.seed)
    print("loss: reference %.6f, project %.6f, |diff| %.3g (relative %.3g); gradients differ by %.3g (relative "
          "L2 over all parameters)" % (loss_check["reference_loss"], loss_check["project_loss"],
                                       loss_check["abs_diff"], loss_check["rel_diff"], loss_check["grad_rel_l2_diff"]),
          file=sys.stderr)
    if not loss_check["rel_diff"] <= args.loss_tol:
        raise SystemExit("the reference and the project step disagree: relative loss difference %.3g > %g"
                         % (loss_check["rel_diff"], args.loss_tol))

    wall, cpu = {m: [] for m in modes}, {m: [] for m in modes}
    for r in range(args.warmup + args.repeats):
        order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotate: no mode always runs first
        for mode in order:
            w, c = steps[mode].timed()
            if r >= args.warmup:
                wall[mode].append(w)
                cpu[mode].append(c)
        if r >= args.warmup:
            done = ", ".join("%s %.0f ms (cpu %.0f)" % (m, 1e3 * wall[m][-1], 1e3 * cpu[m][-1]) for m in modes)
            print("round %d: %s" % (r - args.warmup, done), file=sys.stderr)
    images = batch["images"].shape[0]
    results = {}
    for mode in modes:
        t = wall[mode]
        results[mode] = {"ms_per_step_median": 1e3 * statistics.median(t), "ms_per_step_min": 1e3 * min(t),
                         "ms_per_step_all": [1e3 * s for s in t], "images_per_s": images / statistics.median(t),
                         "cpu_ms_per_step_median": 1e3 * statistics.median(cpu[mode])}
    speedups = {}
    for mode in modes:
        if mode != "reference_fp32":
            per_round = [a / b for a, b in zip(wall["reference_fp32"], wall[mode])]
            per_round_cpu = [a / b for a, b in zip(cpu["reference_fp32"], cpu[mode])]
            speedups["%s_vs_reference_fp32" % mode] = {
                "speedup_median": statistics.median(per_round), "speedup_per_round": per_round,
                "speedup_of_min_times": min(wall["reference_fp32"]) / min(wall[mode]),
                "cpu_time_speedup_median": statistics.median(per_round_cpu)}
    profile = None if args.no_profile else profile_table(steps["project_fp32"])
    report = {
        "benchmark": "cmfn_train_step_vs_released_reference",
        "setting": {"backbone": args.backbone, "size_hw": list(args.size), "P": args.ids[0], "K": args.ids[1],
                    "images_per_step": images, "feature_rows_per_step": 3 * images, "epoch": EPOCH,
                    "warmup_rounds": args.warmup, "repeats": args.repeats, "device": str(device),
                    "threads": torch.get_num_threads(), "seed": args.seed},
        "loss_check": loss_check,
        "results": results,
        "skipped": skipped,
        "speedups": speedups,
        "targets": {"project_fp32_vs_reference_fp32": 1.15, "project_bf16_cl_vs_reference_fp32": 2.5},
        "profile_project_fp32": profile,
        "timed_s": time.perf_counter() - start,
        "machine": {"python": platform.python_version(), "torch": str(torch.__version__),
                    "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "platform": platform.platform(), "native_bf16": native_bf16(device.type),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "load_avg_1m_before": load_before,
                    "load_avg_1m_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        from utils.io import save_text

        save_text(args.json, text + "\n")
    return report


if __name__ == "__main__":
    main()
