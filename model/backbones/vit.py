"""A ViT with overlapping patches and a side-information (camera) embedding: FusionReID's ViT branch.

The TransReID-style ViT, built from timm's transformer ``Block``:

* patch embedding: ``Conv2d(in_chans, E, kernel patch_size, stride)`` with bias; with stride 12
  the 16x16 patches overlap. The grid is ``ny = (H - patch) // stride + 1`` rows by
  ``nx = (W - patch) // stride + 1`` columns (256x128 -> 21x10), flattened row-major
  (token n = nx * y + x);
* tokens: ``z = cat[cls_token, patches] + pos_embed + sie_coe * sie_embed[camids]``, with
  ``pos_embed`` [1, 1 + ny*nx, E] and ``sie_embed`` [num_cameras, 1, E] indexed per sample by
  the 0-based camera id and added to every token, the class token included. The camera
  embedding exists only when ``num_cameras > 1``;
* ``depth`` pre-norm blocks (multi-head self-attention with a qkv bias, MLP with exact GELU,
  LayerNorm eps ``norm_eps``, stochastic depth rising linearly from 0 to ``drop_path_rate``
  over the blocks), then a final LayerNorm on all tokens.

``forward(x [B, 3, H, W], camids [B] int64 or None) -> [B, 1 + ny*nx, E]``, every token after
the final norm; token 0 is the class token. The input size must be the ``img_size`` the
module was built for (the position embedding is sized for its grid). Defaults are ViT-B/16
(E 768, depth 12, 12 heads, MLP ratio 4) at 256x128 with stride 12 and SIE coefficient 3.0.

Without ImageNet weights: class token, position and camera embeddings truncated-normal (std
0.02), Linear layers truncated-normal (std 0.02) with zero bias, LayerNorms 1 / 0, the patch
conv weight N(0, sqrt(2 / (patch * patch * E))) with PyTorch's default bias init.

API:
    OverlapViT(img_size=(256, 128), patch_size=16, stride=12, in_chans=3, embed_dim=768, depth=12,
               num_heads=12, mlp_ratio=4.0, qkv_bias=True, num_cameras=0, sie_coe=3.0,
               drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1, norm_eps=1e-6)
        attributes ``grid`` (ny, nx), ``num_tokens`` (1 + ny*nx), ``embed_dim``
    load_imagenet(vit, weights, source=None) -> {"loaded", "missing", "unused", "skipped"}
        ``weights``: a timm-layout state dict, bare or under ``model`` / ``state_dict``, or a path
    resize_checkpoint_pos_embed(pos [1, 1 + g*g, E], (ny, nx)) -> [1, 1 + ny*nx, E]
    find_vit_imagenet_weights(path="") -> the file (``path``, else the torch hub cache)
    released_key(name) -> own key or None;  convert_released(state, prefix="transformer.base.")
        -> (mapped, dropped): the released ViT entries under this module's names; the never
        used ``fc`` classifier of the released module is dropped (it is not built here)
"""
import logging
import math
import os
from functools import partial

import torch
from torch import nn

from model.backbones.pos_embed import patch_grid, resample_grid
from model.backbones.resnet import _preview
from model.pretrained import PretrainedWeightsError, hub_checkpoint_dir
from utils.compat import timm  # noqa: F401  (registers timm after torchvision for the imports below)
from utils.errors import ConfigError
from timm.models.vision_transformer import Block

logger = logging.getLogger("cmfn")

RELEASED_PREFIX = "transformer.base."
# The ImageNet-21k pretrained, ImageNet-1k fine-tuned ViT-B/16 (timm's
# vit_base_patch16_224.orig_in21k_ft_in1k), under the name TransReID-family code gives it.
VIT_HUB_FILES = ("jx_vit_base_p16_224-80ecf9dd.pth",)
# Released checkpoint entries that have no counterpart here: the classifier the released
# ViT builds but never calls.
_RELEASED_UNUSED = ("fc.",)


class OverlapPatchEmbed(nn.Module):
    """Conv2d(in_chans, E, patch, stride): [B, C, H, W] -> [B, ny*nx, E], row-major tokens."""

    def __init__(self, img_size, patch_size, stride, in_chans, embed_dim):
        super().__init__()
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.grid = patch_grid(self.img_size, patch_size, stride)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)
        fan = patch_size * patch_size * embed_dim
        nn.init.normal_(self.proj.weight, 0.0, math.sqrt(2.0 / fan))

    def forward(self, x):
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError("the ViT was built for %dx%d inputs, got %dx%d"
                             % (self.img_size + tuple(x.shape[-2:])))
        return self.proj(x).flatten(2).transpose(1, 2)


class OverlapViT(nn.Module):
    """Overlapping-patch ViT with camera embedding: [B, 3, H, W] (+ camids [B]) -> [B, 1 + N, E]."""

    def __init__(self, img_size=(256, 128), patch_size=16, stride=12, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, num_cameras=0, sie_coe=3.0, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.1, norm_eps=1e-6):
        super().__init__()
        if embed_dim % num_heads:
            raise ConfigError("the ViT width %d is not a multiple of its %d heads" % (embed_dim, num_heads))
        self.embed_dim = embed_dim
        self.patch_embed = OverlapPatchEmbed(img_size, patch_size, stride, in_chans, embed_dim)
        self.grid = self.patch_embed.grid
        self.num_tokens = 1 + self.grid[0] * self.grid[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        self.num_cameras = int(num_cameras)
        self.sie_coe = float(sie_coe)
        if self.num_cameras > 1:
            self.sie_embed = nn.Parameter(torch.zeros(self.num_cameras, 1, embed_dim))
            nn.init.trunc_normal_(self.sie_embed, std=0.02)
        else:
            self.sie_embed = None
        self.pos_drop = nn.Dropout(drop_rate)
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=rate, norm_layer=norm_layer)
            for rate in rates
        ])
        self.norm = norm_layer(embed_dim)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x, camids=None):
        patches = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        if self.sie_embed is None:
            tokens = tokens + self.pos_embed
        else:
            tokens = tokens + self.pos_embed + self.sie_coe * self.sie_embed[self._camera_rows(camids, x)]
        tokens = self.pos_drop(tokens)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def _camera_rows(self, camids, x):
        if camids is None:
            raise ValueError("this ViT has a camera embedding for %d cameras: pass camids" % self.num_cameras)
        camids = torch.as_tensor(camids, device=x.device).long().reshape(-1)
        if camids.numel() != x.shape[0]:
            raise ValueError("%d camera ids for a batch of %d images" % (camids.numel(), x.shape[0]))
        low, high = int(camids.min()), int(camids.max())
        if low < 0 or high >= self.num_cameras:
            raise ValueError("camera ids must lie in 0..%d, got %d..%d" % (self.num_cameras - 1, low, high))
        return camids


def resize_checkpoint_pos_embed(pos, grid):
    """A checkpoint's position embedding [1, 1 + g*g, E] (class row, then a square g x g grid)
    resized to [1, 1 + ny*nx, E] for `grid` = (ny, nx): the class row is kept, the grid is
    resampled bilinearly (no antialias) as :func:`model.backbones.pos_embed.resample_grid` does."""
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[1] < 2:
        raise ValueError("a position embedding must have shape [1, 1 + g*g, E], got %s" % (tuple(pos.shape),))
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise ValueError("position embedding with %d patch rows is not a square grid" % (pos.shape[1] - 1))
    return torch.cat([pos[:, :1], resample_grid(pos[:, 1:], (side, side), grid)], dim=1)


def _read_vit_weights(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise PretrainedWeightsError("cannot read ViT ImageNet weights %s: %s" % (path, exc)) from None
    return state


def load_imagenet(vit, weights, source=None):
    """Copy a timm-layout ViT state dict into `vit` by name.

    `weights` is the state dict (bare or under ``model`` / ``state_dict``) or a path to it (read
    with ``weights_only=True``). Keys containing ``head`` or ``dist`` are skipped (classifier,
    distillation token); ``pos_embed`` is resized from the checkpoint's square grid to the
    module's grid when the shapes differ (:func:`resize_checkpoint_pos_embed`); everything else
    is copied as is (the 16x16 patch kernel also serves stride 12). Returns ``{"loaded",
    "missing", "unused", "skipped"}`` (module keys not filled, e.g. ``sie_embed``; file keys
    with no place here; file keys skipped by rule) and logs them. A shape mismatch, a file that
    is not a state dict, or one of which nothing fits raises :class:`PretrainedWeightsError`.
    """
    if isinstance(weights, (str, os.PathLike)):
        source = source or str(weights)
        weights = _read_vit_weights(weights)
    source = source or "<state dict>"
    for wrapper in ("model", "state_dict"):
        if isinstance(weights, dict) and isinstance(weights.get(wrapper), dict):
            weights = weights[wrapper]
            break
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise PretrainedWeightsError(
            "%s is not a ViT state dict (expected a dict of tensors with keys cls_token, pos_embed, "
            "patch_embed.proj.weight, blocks.0.* ..., optionally under 'model' or 'state_dict')" % source
        )
    own = vit.state_dict()
    mapped, unused, skipped = {}, [], []
    for key, value in weights.items():
        if "head" in key or "dist" in key:
            skipped.append(key)
            continue
        if key not in own:
            unused.append(key)
            continue
        if key == "pos_embed" and value.shape != own[key].shape:
            try:
                value = resize_checkpoint_pos_embed(value, vit.grid)
            except ValueError as exc:
                raise PretrainedWeightsError("ViT ImageNet weights %s: %s" % (source, exc)) from None
        if value.shape != own[key].shape:
            raise PretrainedWeightsError(
                "ViT ImageNet weights %s: %s has shape %s, this ViT expects %s"
                % (source, key, tuple(value.shape), tuple(own[key].shape))
            )
        mapped[key] = value
    if not mapped:
        raise PretrainedWeightsError(
            "ViT ImageNet weights %s: no entry fits this ViT (found %s)"
            % (source, ", ".join(sorted(weights)[:6]) or "no keys")
        )
    missing = sorted(set(own) - set(mapped))
    vit.load_state_dict(mapped, strict=False)
    logger.info(
        "ViT ImageNet weights %s: loaded %d tensors, %d missing%s, %d unexpected (unused)%s, %d skipped%s",
        source, len(mapped), len(missing), _preview(missing), len(unused), _preview(sorted(unused)),
        len(skipped), _preview(sorted(skipped)),
    )
    return {"loaded": sorted(mapped), "missing": missing, "unused": sorted(unused), "skipped": sorted(skipped)}


def find_vit_imagenet_weights(path=""):
    """The ViT-B/16 ImageNet file: `path` if given (it must exist), else the first of
    :data:`VIT_HUB_FILES` in the torch hub cache. Nothing is downloaded."""
    if path:
        if not os.path.isfile(path):
            raise PretrainedWeightsError(
                "the ViT ImageNet weights path %s does not exist; expected a timm ViT-B/16 state dict "
                "such as %s" % (path, VIT_HUB_FILES[0])
            )
        return path
    folder = hub_checkpoint_dir()
    for name in VIT_HUB_FILES:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    raise PretrainedWeightsError(
        "ViT ImageNet weights not found: none of %s is in %s and no path was given. Put timm's "
        "vit_base_patch16_224.orig_in21k_ft_in1k file (%s) there or give its path; or train from scratch."
        % (", ".join(VIT_HUB_FILES), folder, VIT_HUB_FILES[0])
    )


def released_key(name):
    """This module's key for a released key relative to ``transformer.base.``, or None when the
    released entry has no counterpart here (the unused ``fc`` classifier)."""
    if name.startswith(_RELEASED_UNUSED):
        return None
    return name


def convert_released(state, prefix=RELEASED_PREFIX):
    """The entries of a released state dict under `prefix`, renamed to this module's keys.

    Returns ``(mapped, dropped)``: ``{own key: tensor}`` and the released keys left out
    (``fc.weight``, ``fc.bias`` with the prefix). Entries outside `prefix` are ignored.
    """
    mapped, dropped = {}, []
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        own = released_key(key[len(prefix):])
        if own is None:
            dropped.append(key)
        else:
            mapped[own] = value
    return mapped, dropped
