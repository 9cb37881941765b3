"""Parameter counts and inference FLOPs of the configured model.

    python tools/model_info.py --dataset sysu [--num-classes N] [--json PATH] [KEY VALUE ...]

Prints the total and trainable parameters, the parameters of every top-level module (the
backbone split into its stems and stages), and the FLOPs of one eval-mode forward of a
single visible image at ``INPUT.SIZE_TEST`` (``torch.utils.flop_counter.FlopCounterMode``,
which counts 1 multiply-accumulate as 2 FLOPs; element-wise ops, norms and softmax are not
counted). For the released configurations the released code's own parameter total (its
``net.parameters()``, docs/cmfn.md) is printed beside it: that code instantiates three
ResNet-50s and other tensors it never uses, which this project does not build.

The model is built with ``MODEL.PRETRAINED False``: weights do not change the counts.
"""
import argparse
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import build_model  # noqa: E402
from utils.config import add_config_arguments, config_from_args  # noqa: E402
from utils.io import save_json  # noqa: E402
from utils.errors import run_cli  # noqa: E402

# Training identities of the released datasets (SYSU-MM01 train + val ids, RegDB per trial,
# LLCM's training list).
NUM_CLASSES = {"sysu": 395, "llcm": 713, "regdb": 206}
# Figures of the released model (docs/cmfn.md): its net.parameters() total, how many of
# those never receive a gradient (not built here), the frozen Haar filter values it lists as
# parameters (constants here), and its inference GFLOPs per image (SYSU at 384x192, RegDB at
# 384x144). Those FLOPs include the two MBUE context convs (3x3 C->C/4 at the MBUE
# resolution) whose output the released model discards and which are not built here.
RELEASED = {
    "sysu": {"released_total": 131370058, "released_unused": 51987776, "haar_filters": 16384,
             "released_gflops": 118.7, "dead_context_gflops": 2 * 2 * 1024 * 256 * 9 * 24 * 12 / 1e9},
    "llcm": {"released_total": 132021322, "released_unused": 51987776, "haar_filters": 16384},
    "regdb": {"released_total": 89588298, "released_unused": 64070720, "haar_filters": 8192,
              "released_gflops": 71.9, "dead_context_gflops": 2 * 2 * 512 * 128 * 9 * 48 * 18 / 1e9},
}


def count_parameters(module):
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total, trainable


def module_table(model):
    """(name, total, trainable) per top-level module; the backbone is split into its children."""
    rows = []
    for name, child in model.named_children():
        parts = list(child.named_children()) if name == "backbone" else [(None, child)]
        for sub, module in parts:
            rows.append((name if sub is None else "%s.%s" % (name, sub),) + count_parameters(module))
    return rows


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


# The counter knows the CUDA attention kernels only; on CPU scaled_dot_product_attention runs
# this op, whose q.k and attention.v products would otherwise go uncounted.
CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def count_flops(model, height, width, modality="visible"):
    """(total FLOPs, {top-level module: FLOPs}) of one eval forward of a [1,3,H,W] image."""
    model.eval()
    x = torch.randn(1, 3, height, width)
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS)
    with torch.no_grad(), counter:
        model(x, modality=modality)
    root = type(model).__name__
    per_module = {}
    for name, counts in counter.get_flop_counts().items():
        parts = name.split(".")
        if parts[0] != root or len(parts) < 2:
            continue
        depth = 3 if parts[1] == "backbone" else 2
        if len(parts) == depth:
            per_module[".".join(parts[1:])] = sum(counts.values())
    return counter.get_total_flops(), per_module


def model_info(cfg, num_classes, flops=True):
    model = build_model(cfg, num_classes)
    total, trainable = count_parameters(model)
    info = {
        "model": cfg.MODEL.NAME,
        "backbone": cfg.MODEL.BACKBONE,
        "dataset": cfg.DATASET.NAME,
        "mbue_after": cfg.MODEL.CMFN.MBUE_AFTER,
        "num_classes": num_classes,
        "feat_dim": model.feat_dim,
        "num_copies": model.num_copies,
        "params_total": total,
        "params_trainable": trainable,
        "params_frozen": total - trainable,
        "buffers": sum(b.numel() for b in model.buffers()),
        "modules": [{"name": n, "params": t, "trainable": tr} for n, t, tr in module_table(model)],
    }
    released = RELEASED.get(cfg.DATASET.NAME)
    released_layout = cfg.MODEL.NAME == "cmfn" and cfg.MODEL.BACKBONE == "resnet50" and not any(cfg.MODEL.CMFN.FIX.values())
    if released and released_layout:
        info["released"] = released
    if flops:
        height, width = cfg.INPUT.SIZE_TEST
        total_flops, per_module = count_flops(model, height, width)
        info["input_size"] = [height, width]
        info["flops_per_image"] = total_flops
        info["flops_per_module"] = per_module
    return info


def format_info(info):
    lines = [
        "%s (%s, %s configuration, MBUE after %s), %d classes, feature %d-d x %d copies"
        % (info["model"], info["backbone"], info["dataset"], info["mbue_after"], info["num_classes"],
           info["feat_dim"], info["num_copies"]),
        "",
        "%-28s %14s %14s" % ("module", "parameters", "trainable"),
    ]
    for row in info["modules"]:
        lines.append("%-28s %14s %14s" % (row["name"], "{:,}".format(row["params"]), "{:,}".format(row["trainable"])))
    lines.append("%-28s %14s %14s" % ("total", "{:,}".format(info["params_total"]), "{:,}".format(info["params_trainable"])))
    lines.append("frozen parameters: {:,} (the BNNeck bias); buffers: {:,}".format(info["params_frozen"], info["buffers"]))
    released = info.get("released")
    if released:
        used = released["released_total"] - released["released_unused"]
        lines += [
            "released code: {:,} parameters, of which {:,} never receive a gradient (two extra "
            "ResNet-50 bodies, base conv1/bn1, MBUE context convs, compression1{}) and are not built here".format(
                released["released_total"], released["released_unused"],
                "; base.layer4 and layer5 on RegDB" if info["dataset"] == "regdb" else ""),
            "released effective: {:,} = this model's {:,} + {:,} fixed Haar filter values (constants here, "
            "frozen parameters there){}".format(
                used, info["params_total"], released["haar_filters"],
                "" if used == info["params_total"] + released["haar_filters"] else "  MISMATCH"),
        ]
    if "flops_per_image" in info:
        h, w = info["input_size"]
        lines += ["", "FLOPs per image at %dx%d (eval, visible, batch 1; 1 MAC = 2 FLOPs): %.1f G"
                  % (h, w, info["flops_per_image"] / 1e9)]
        for name, value in info["flops_per_module"].items():
            lines.append("  %-26s %8.2f G" % (name, value / 1e9))
        if released and "released_gflops" in released:
            lines.append(
                "released model: about %.1f GFLOPs per image, of which %.2f G are the released MBUE "
                "context convs (output discarded, not built here): %.1f G comparable"
                % (released["released_gflops"], released["dead_context_gflops"],
                   released["released_gflops"] - released["dead_context_gflops"])
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-classes", type=int, help="classifier size (default: the dataset's training ids)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (a full forward)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args, extra_opts=["MODEL.PRETRAINED", "False"])
    num_classes = args.num_classes or NUM_CLASSES.get(cfg.DATASET.NAME, cfg.DATASET.DEMO_TRAIN_IDS)
    torch.manual_seed(0)
    info = model_info(cfg, num_classes, flops=not args.no_flops)
    print(format_info(info))
    if args.json:
        save_json(args.json, info)
    return info


if __name__ == "__main__":
    sys.exit(run_cli(main))
