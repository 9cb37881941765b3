"""TransReID-SSL pretrained weights (``vit_base_ics_cfs_lup.pth``) loaded into a :class:`TokenMatcherEncoder`.

The reference run starts from TransReID-SSL's ViT-B with an ICS stem, self-supervised on
LUPerson. The file is not on any model hub; pass its path (``MODEL.PRETRAIN_PATH``). It is read
with ``weights_only=True`` (numpy float scalars and ``argparse.Namespace``, which DINO
checkpoints carry, are the only Python objects allowed). :func:`load_pretrained` fills the
encoder as the reference does:

* the ``teacher`` / ``model`` / ``state_dict`` wrappers are unwrapped, and the ``module.`` /
  ``base.`` prefixes stripped; keys containing ``head``, ``dist``, ``pre_logits``, ``fc.``,
  ``classifier`` or ``bottleneck`` are skipped;
* the single pretrained class token [1, 1, E] is broadcast into all K class tokens, so they all
  start identical (the token-diversity loss is what pulls them apart);
* ``patch_embed.*`` (the ICS stem) goes into both modality stems;
* ``blocks.<i>`` fills the shared block i for i < D-1; ``blocks.<D-1>`` and ``norm`` fill the
  last block and LayerNorm (the reference copies them into its ``b1`` after loading; this model
  holds only the copy), so they start as the pretrained last block and norm; deeper file
  blocks are left out and listed;
* ``pos_embed`` [1, 1 + n, E] is resized by :func:`resize_pos_embed`: the n = gh0 * gw0 grid
  rows (gh0 = int(sqrt(n * hw_ratio)), gw0 = gh0 // hw_ratio: 16 x 8 for n = 128 and ratio 2)
  are resampled bilinearly (align_corners False) to the model's grid, and the K class positions
  keep the model's own fresh initialisation; the pretrained class position is discarded. A
  pos_embed already of the model's shape is copied unchanged;
* the per-token BatchNorm heads are not touched (fresh: weight 1, bias 0).

A tensor of the wrong shape is reported and left as initialised, as in the reference; a file
from which nothing can be loaded is an error. The report line reads ``Load a / b layers.``: a
tensors written out of the b the file could fill (every tensor but the per-token heads; at the
reference size 196 / 196). The reference prints 196 / 201: its count also includes the five
tensors of an unused BatchNorm template this model does not hold.
"""
import argparse
import math
import re

import torch

from engine.checkpoint import CheckpointError
from model.backbones.pos_embed import resample_grid
from model.pretrained import PretrainedWeightsError
from model.tokenmatcher.convert import load_allowlisted, stem_key

WRAPPERS = ("teacher", "model", "state_dict")
PREFIXES = ("module.", "base.")
SKIPPED = ("head", "dist", "pre_logits", "fc.", "classifier", "bottleneck")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def pretrained_grid(num_positions, hw_ratio):
    """(gh0, gw0) of a pretrained patch grid of `num_positions` rows with height/width `hw_ratio`."""
    gh = int(math.sqrt(num_positions * hw_ratio))
    gw = gh // int(hw_ratio)
    if gh * gw != num_positions:
        raise PretrainedWeightsError("a pretrained position grid of %d rows is not gh x gh/%d (gh = %d)"
                                     % (num_positions, hw_ratio, gh))
    return gh, gw


def resize_pos_embed(pretrained, fresh, grid, num_tokens, hw_ratio=2):
    """[1, K + gh*gw, E]: `fresh`'s K class positions, then `pretrained`'s grid (its row 0, the
    class position, dropped) resampled to `grid` = (gh, gw)."""
    old = pretrained_grid(pretrained.shape[1] - 1, hw_ratio)
    patches = resample_grid(pretrained[:, 1:], old, grid)
    return torch.cat([fresh[:, :num_tokens], patches.to(fresh.dtype)], dim=1)


def unwrap_state_dict(obj):
    """The tensor dict inside a pretraining file: wrappers unwrapped, prefixes stripped."""
    while isinstance(obj, dict):
        inner = next((obj[w] for w in WRAPPERS if isinstance(obj.get(w), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise PretrainedWeightsError("the pretrained file holds a %s, not a state dict" % type(obj).__name__)
    state = {}
    for key, value in obj.items():
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if torch.is_tensor(value):
            state[key] = value
    return state


def destinations(key, depth):
    """Keys of the encoder that pretrained key `key` fills (none for a key it has no place for)."""
    if key in ("cls_token", "pos_embed"):
        return [key]
    if key.startswith("patch_embed."):
        inner = stem_key(key[len("patch_embed."):])
        return ["stems.visible." + inner, "stems.infrared." + inner]
    if key.startswith("norm."):
        return ["last_norm." + key[len("norm."):]]
    match = _BLOCK.match(key)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        if index < depth - 1:
            return [key]
        if index == depth - 1:
            return ["last_block." + rest]
    return []


def load_pretrained(model, path, hw_ratio=2, log=print):
    """Fill `model` from the TransReID-SSL file `path` (module docstring); returns a report dict:
    ``loaded`` / ``loadable`` (tensors written / tensors a file can fill), ``skipped`` (file keys
    filtered out), ``unmatched`` (file keys with no place) and ``mismatched`` (wrong shapes)."""
    try:
        obj = load_allowlisted(path, extra_globals=[argparse.Namespace], what="pretrained weights")
    except CheckpointError as exc:
        raise PretrainedWeightsError(str(exc)) from None
    state = unwrap_state_dict(obj)
    own = model.state_dict()
    loadable = [k for k in own if not k.startswith("token_bns.")]
    report = {"loaded": 0, "loadable": len(loadable), "skipped": [], "unmatched": [], "mismatched": []}
    with torch.no_grad():
        for key, value in state.items():
            if any(word in key for word in SKIPPED):
                report["skipped"].append(key)
                continue
            targets = destinations(key, model.depth)
            if not targets:
                report["unmatched"].append(key)
            for target in targets:
                dest = own[target]
                if target == "pos_embed" and value.shape != dest.shape:
                    value = resize_pos_embed(value, dest, model.grid, model.num_tokens, hw_ratio)
                    log("Resized position embedding from %s to %s (grid %dx%d)"
                        % (tuple(state[key].shape), tuple(dest.shape), model.grid[0], model.grid[1]))
                try:
                    dest.copy_(value)  # broadcasts the single class token into all K
                except RuntimeError:
                    report["mismatched"].append("%s %s -> %s %s" % (key, tuple(value.shape), target, tuple(dest.shape)))
                    continue
                report["loaded"] += 1
    log("Load %d / %d layers." % (report["loaded"], report["loadable"]))
    for label in ("unmatched", "mismatched"):
        if report[label]:
            log("pretrained %s (not loaded): %s" % (label, ", ".join(report[label])))
    if report["loaded"] == 0:
        raise PretrainedWeightsError("nothing in %s fits the encoder (%d keys: %s ...); expected the TransReID-SSL "
                                     "ViT with an ICS stem (vit_base_ics_cfs_lup.pth)"
                                     % (path, len(state), ", ".join(list(state)[:4])))
    return report
