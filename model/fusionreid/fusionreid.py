"""FusionReID: a ResNet and a ViT on the same image, fused by local refinement and mutual attention.

For B images [B, 3, H, W] (released: 256x128, normalised with mean 0.5 / std 0.5), C identities
and the released widths (ResNet-50 2048, ViT-B 768, fusion width ``mix_dim`` 768):

1. CNN branch (:class:`model.backbones.resnet_transreid.TransReIDResNet`: no stem ReLU, 2x2
   max-pool, last stride 1): map M [B, 2048, H/16, W/16]; ``cnn`` = GeM(M) [B, 2048].
2. ViT branch (:class:`model.backbones.vit.OverlapViT`: 16x16 patches at stride 12, camera
   embedding SIE x 3.0): tokens [B, 1 + ny*nx, 768] (21 x 10 = 210 patches at 256x128) after the
   final LayerNorm; ``vit`` = the class token [B, 768].
3. Fusion (:class:`DualAttentionMutualFusion`): a Local Refinement Unit on M (2048 -> 768) and
   one on the patch tokens read as a [B, 768, ny, nx] map; ``lru_cnn`` = a_0 and ``lru_vit`` =
   b_0 are their GeM summaries; the Heterogeneous Transmission Module (``HTM_LAYER`` = 2 layers)
   refines them into ``htm_cnn`` = a_L and ``htm_vit`` = b_L [B, 768]. The token grid is
   computed from the patch geometry, so any input size the ViT was built for works (the
   released code took it from a table of four sizes, the same numbers for those sizes).
4. Six heads, in the released order ``cnn``, ``vit``, ``lru_cnn``, ``lru_vit``, ``htm_cnn``,
   ``htm_vit`` (released names Original_r, Original_f, LRU_r, LRU_f, HTM_r, HTM_f): each a
   BNNeck (BatchNorm1d, weight 1, bias frozen at 0) and a bias-free classifier (N(0, 0.001)).

Train mode returns ``feat_<head>`` (pre-BN) [B, D] and ``logits_<head>`` [B, C] for the six
heads (``train_outputs``, in the released order logits, feature per head). Eval mode returns
L2-normalised embedding sets [B, D]:

* ``concat6``: cat[cnn, vit, lru_cnn, lru_vit, htm_cnn, htm_vit] (2048 + 5 x 768 = 5,888 at the
  released widths), all pre-BN, normalised **as a whole** (the released default descriptor;
  its squared Euclidean distance is the released ranking distance);
* ``concat6_bn``: the same over the six BNNeck outputs (the released neck-after descriptor);
* ``<head>`` and ``<head>_bn``: one head's pre-BN / BNNeck feature (the released single-feature
  options with neck before / after).

Presets (``embedding_presets``): ``concat6`` (default), ``concat6_bn``, each single set, and
``parts6`` / ``parts6_bn`` (the six features each normalised on its own, then weighted 1 each:
the balanced alternative to the whole-vector normalisation, in which the 2,048-d ResNet part
dominates). ``select_embeddings(names)`` limits the eval output to some sets (features of a
large gallery then take less memory).

Camera ids go to the ViT's camera embedding in training and at test time, as released; the
embedding exists when ``sie_camera`` and ``num_cameras > 1``, and then ``camids`` must be given.
``modality`` is ignored (single-modality ReID). Unlike the released model, a batch of one
image can be evaluated (the released forward squeezed the batch axis away and crashed).

Twelve trainable tensors (ResNet-50, two HTM layers) get an exactly zero loss gradient, as
released (only weight decay moves them): the four conv biases of the two LRUs (each feeds a
training-mode BN), the ResNet-50 ``bn1.bias`` (a per-channel shift commutes with the max-pool
into the next BNs), the ViT's final LayerNorm bias, the four key-LayerNorm biases of the
fusion units (softmax-invariant) and the MLP output biases of the last HTM layer's fusion
units.

:class:`FusionReIDVI` (``fusionreid_vi``) is "FusionReID-VI (project extension)", a
visible-infrared adaptation that was never published; see its docstring.
"""
import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from engine.solver import bias_groups
from model.backbones.resnet_transreid import build_transreid_resnet
from model.backbones.vit import OverlapViT, find_vit_imagenet_weights, load_imagenet
from model.base import VISIBLE, ReIDModel, modality_ids
from model.fusionreid.htm import HeterogeneousTransmissionModule
from model.fusionreid.lru import LocalRefinementUnit
from model.heads import BNNeckHead
from model.pooling import GeM
from model.registry import MODELS
from utils.errors import ConfigError

HEADS = ("cnn", "vit", "lru_cnn", "lru_vit", "htm_cnn", "htm_vit")
VI_SIE = ("camera", "modality", "camera_modality")
VI_STEMS = ("shared", "modality")
VI_LABEL = "FusionReID-VI (project extension)"


class DualAttentionMutualFusion(nn.Module):
    """The fusion part: two LRUs, their GeM summaries and the HTM stack.

    ``forward(cnn_map [B, Dc, h, w], patch_tokens [B, ny*nx, Dv], grid (ny, nx))
    -> (a_0, b_0, a_L, b_L)``, each [B, mix_dim]. The refined CNN map becomes h*w tokens
    (token = w * row + column) and the refined ViT map ny*nx tokens in the patch order.
    """

    def __init__(self, cnn_dim, vit_dim, mix_dim=768, depth=2, num_heads=12):
        super().__init__()
        self.lru_cnn = LocalRefinementUnit(cnn_dim, mix_dim)
        self.lru_vit = LocalRefinementUnit(vit_dim, mix_dim)
        self.pool_cnn = GeM()
        self.pool_vit = GeM()
        self.htm = HeterogeneousTransmissionModule(mix_dim, depth, num_heads)

    def forward(self, cnn_map, patch_tokens, grid):
        batch, n, dim = patch_tokens.shape
        if n != grid[0] * grid[1]:
            raise ValueError("%d patch tokens do not form a %dx%d grid" % (n, grid[0], grid[1]))
        refined_cnn = self.lru_cnn(cnn_map)
        refined_vit = self.lru_vit(patch_tokens.transpose(1, 2).reshape(batch, dim, grid[0], grid[1]))
        a0 = self.pool_cnn(refined_cnn).flatten(1)
        b0 = self.pool_vit(refined_vit).flatten(1)
        a, b = self.htm(refined_cnn.flatten(2).transpose(1, 2), refined_vit.flatten(2).transpose(1, 2), a0, b0)
        return a0, b0, a, b


def _presets():
    presets = {"concat6": {"concat6": 1.0}, "concat6_bn": {"concat6_bn": 1.0},
               "parts6": {h: 1.0 for h in HEADS}, "parts6_bn": {h + "_bn": 1.0 for h in HEADS}}
    for h in HEADS:
        presets[h] = {h: 1.0}
        presets[h + "_bn"] = {h + "_bn": 1.0}
    return presets


def _choice(value, choices, key):
    if value not in choices:
        raise ConfigError("%s must be one of %s, got %r" % (key, ", ".join(choices), value))
    return value


def _positive(value, key):
    if int(value) < 1:
        raise ConfigError("%s must be a positive integer, got %r" % (key, value))
    return int(value)


@MODELS.register("fusionreid")
class FusionReID(ReIDModel):
    """ResNet + ViT fusion with six BNNeck heads; see the module docstring."""

    method_label = "FusionReID"
    train_outputs = tuple(name for h in HEADS for name in ("logits_" + h, "feat_" + h))
    embedding_sets = ("concat6", "concat6_bn") + HEADS + tuple(h + "_bn" for h in HEADS)
    embedding_presets = _presets()
    default_embedding = "concat6"

    def __init__(self, cnn, vit, num_classes, mix_dim=768, htm_depth=2, htm_heads=12):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError("num_classes must be positive, got %r" % (num_classes,))
        self.cnn = cnn
        self.cnn_pool = GeM()
        self.vit = vit
        self.dmf = DualAttentionMutualFusion(cnn.out_channels, vit.embed_dim, mix_dim, htm_depth, htm_heads)
        dims = dict(zip(HEADS, (cnn.out_channels, vit.embed_dim) + (mix_dim,) * 4))
        self.heads = nn.ModuleDict(
            (h, BNNeckHead(dims[h], num_classes, neck_init="default", neck_bias="frozen", classifier="normal"))
            for h in HEADS
        )
        self.eval_sets = None

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg, num_classes):
        if cls is FusionReID:
            for key, default in (("VI_SIE", "camera"), ("VI_CNN_STEM", "shared"), ("VI_VIT_STEM", "shared")):
                if cfg.MODEL.FUSIONREID[key] != default:
                    raise ConfigError("MODEL.FUSIONREID.%s is an option of MODEL.NAME fusionreid_vi (%s); "
                                      "fusionreid reproduces the released model (%s)" % (key, VI_LABEL, default))
        return cls(*cls._branches(cfg, cls._sie_entries(cfg)), num_classes, **cls._fusion_args(cfg),
                   **cls._extra_args(cfg))

    @staticmethod
    def _sie_entries(cfg):
        own = cfg.MODEL.FUSIONREID
        return int(own.NUM_CAMERAS) if own.SIE_CAMERA else 0

    @staticmethod
    def _fusion_args(cfg):
        own = cfg.MODEL.FUSIONREID
        mix_dim = _positive(own.MIX_DIM, "MODEL.FUSIONREID.MIX_DIM")
        heads = _positive(own.HTM_NUM_HEADS, "MODEL.FUSIONREID.HTM_NUM_HEADS")
        if mix_dim % heads:
            raise ConfigError("MODEL.FUSIONREID.MIX_DIM %d is not a multiple of MODEL.FUSIONREID.HTM_NUM_HEADS %d"
                              % (mix_dim, heads))
        return {"mix_dim": mix_dim, "htm_depth": _positive(own.HTM_LAYER, "MODEL.FUSIONREID.HTM_LAYER"),
                "htm_heads": heads}

    @staticmethod
    def _extra_args(cfg):
        return {}

    @staticmethod
    def _branches(cfg, sie_entries):
        """(ResNet, ViT) of the config, with ImageNet weights when MODEL.PRETRAINED."""
        m, own = cfg.MODEL, cfg.MODEL.FUSIONREID
        size = tuple(int(v) for v in cfg.INPUT.SIZE_TRAIN)
        if tuple(int(v) for v in cfg.INPUT.SIZE_TEST) != size:
            raise ConfigError("FusionReID's ViT position embedding is built for INPUT.SIZE_TRAIN %s; INPUT.SIZE_TEST "
                              "must be the same, got %s" % (list(size), list(cfg.INPUT.SIZE_TEST)))
        if sie_entries < 0:
            raise ConfigError("MODEL.FUSIONREID.NUM_CAMERAS must be >= 0, got %r" % (sie_entries,))
        if not float(own.DROP_PATH) >= 0.0:
            raise ConfigError("MODEL.FUSIONREID.DROP_PATH must be >= 0, got %r" % (own.DROP_PATH,))
        cnn = build_transreid_resnet(m.BACKBONE, m.LAST_STRIDE, own.STANDARD_STEM, m.PRETRAINED, m.PRETRAIN_PATH,
                                     m.DOWNLOAD)
        vit = OverlapViT(
            img_size=size,
            patch_size=_positive(own.PATCH_SIZE, "MODEL.FUSIONREID.PATCH_SIZE"),
            stride=_positive(own.STRIDE_SIZE, "MODEL.FUSIONREID.STRIDE_SIZE"),
            embed_dim=_positive(own.VIT_EMBED_DIM, "MODEL.FUSIONREID.VIT_EMBED_DIM"),
            depth=_positive(own.VIT_DEPTH, "MODEL.FUSIONREID.VIT_DEPTH"),
            num_heads=_positive(own.VIT_NUM_HEADS, "MODEL.FUSIONREID.VIT_NUM_HEADS"),
            num_cameras=sie_entries,
            sie_coe=float(own.SIE_COE),
            drop_path_rate=float(own.DROP_PATH),
        )
        if m.PRETRAINED:
            load_imagenet(vit, find_vit_imagenet_weights(own.VIT_PRETRAIN_PATH))
        return cnn, vit

    # -- forward -----------------------------------------------------------------------------

    def _sie_ids(self, camids, modality, n, device):
        """Rows of the ViT's side-information table for each image: the camera id."""
        return camids

    def _cnn_map(self, images, modality):
        return self.cnn(images)

    def _vit_tokens(self, images, modality, sie_ids):
        return self.vit(images, sie_ids)

    def features(self, images, modality=None, camids=None):
        """The six pre-BN features {head: [B, D]}."""
        n = images.shape[0]
        sie_ids = None if self.vit.sie_embed is None else self._sie_ids(camids, modality, n, images.device)
        cnn_map = self._cnn_map(images, modality)
        tokens = self._vit_tokens(images, modality, sie_ids)
        a0, b0, a, b = self.dmf(cnn_map, tokens[:, 1:], self.vit.grid)
        return dict(zip(HEADS, (self.cnn_pool(cnn_map).flatten(1), tokens[:, 0], a0, b0, a, b)))

    def forward(self, images, modality=None, camids=None):
        feats = self.features(images, modality, camids)
        bns = {h: self.heads[h].bnneck(f) for h, f in feats.items()}
        if self.training:
            out = {}
            for h in HEADS:
                out["logits_" + h] = self.heads[h].classify(bns[h])
                out["feat_" + h] = feats[h]
            return out
        return self._embeddings(feats, bns)

    def _embeddings(self, feats, bns):
        wanted = self.embedding_sets if self.eval_sets is None else self.eval_sets
        out = {}
        for name in wanted:
            if name == "concat6":
                out[name] = F.normalize(torch.cat([feats[h] for h in HEADS], dim=1), dim=1)
            elif name == "concat6_bn":
                out[name] = F.normalize(torch.cat([bns[h] for h in HEADS], dim=1), dim=1)
            elif name.endswith("_bn"):
                out[name] = F.normalize(bns[name[:-3]], dim=1)
            else:
                out[name] = F.normalize(feats[name], dim=1)
        return out

    def select_embeddings(self, names=None):
        """Return only the eval sets `names` (in ``embedding_sets`` order) from now on; None: all."""
        if names is None:
            self.eval_sets = None
            return
        unknown = sorted(set(names) - set(self.embedding_sets))
        if unknown:
            raise ValueError("unknown FusionReID embedding sets %s (known: %s)"
                             % (", ".join(unknown), ", ".join(self.embedding_sets)))
        self.eval_sets = tuple(n for n in self.embedding_sets if n in set(names))

    # -- optimisation ------------------------------------------------------------------------

    def param_groups(self, cfg):
        """Two SGD groups as released (:func:`engine.solver.bias_groups`): tensors whose name
        contains ``bias`` at lr factor SOLVER.BIAS_LR_FACTOR with weight decay
        SOLVER.WEIGHT_DECAY_BIAS, every other trainable tensor (BN/LN gains, tokens and
        embeddings, GeM exponents and PReLU slopes included) at the full lr with
        SOLVER.WEIGHT_DECAY. The frozen BNNeck biases are in neither."""
        if float(cfg.SOLVER.BIAS_LR_FACTOR) < 0:
            raise ConfigError("SOLVER.BIAS_LR_FACTOR must be >= 0, got %r" % (cfg.SOLVER.BIAS_LR_FACTOR,))
        return bias_groups(self.named_parameters(), cfg)


def _stem_of(cnn):
    return nn.Sequential(OrderedDict(conv1=cnn.conv1, bn1=cnn.bn1, relu=cnn.relu, maxpool=cnn.maxpool))


@MODELS.register("fusionreid_vi")
class FusionReIDVI(FusionReID):
    """FusionReID-VI (project extension): FusionReID for visible-infrared ReID. Not published;
    not a reproduction of anything.

    The same network as :class:`FusionReID`, with the modality brought in through options:

    * ``sie``: what indexes the ViT's side-information table: ``"camera"`` (the camera, as
      FusionReID; SYSU-MM01's cameras already imply the modality), ``"modality"`` (2 entries,
      0 visible / 1 infrared) or ``"camera_modality"`` (entry ``camera * 2 + modality``,
      2 x NUM_CAMERAS entries). The camera is ``camids - camera_base``: the visible-infrared
      datasets number their cameras from 1 (SYSU-MM01 1-6, RegDB 1-2, LLCM 1-9), so
      ``camera_base`` is 1 by default. At test time the image's own camera / modality is used.
    * ``cnn_stem``: ``"shared"`` (one ResNet) or ``"modality"``: infrared rows go through their
      own stem (conv1, bn1, max-pool; a copy of the visible stem at construction, so ImageNet
      weights start both) and share layer1..layer4.
    * ``vit_stem``: ``"shared"`` (infrared images replicated to 3 channels by the data) or
      ``"modality"``: infrared rows get their own patch embedding (a copy at construction);
      the tokens, position embedding and blocks are shared.

    The shared settings with camera SIE are the minimal change. In training mode a
    modality-specific stem normalises its BN over its own modality's rows only.
    """

    method_label = VI_LABEL

    def __init__(self, cnn, vit, num_classes, mix_dim=768, htm_depth=2, htm_heads=12, sie="camera",
                 cnn_stem="shared", vit_stem="shared", camera_base=1):
        super().__init__(cnn, vit, num_classes, mix_dim, htm_depth, htm_heads)
        self.sie = _choice(sie, VI_SIE, "MODEL.FUSIONREID.VI_SIE")
        self.camera_base = int(camera_base)
        entries = 0 if vit.sie_embed is None else vit.sie_embed.shape[0]
        self.num_cameras = entries // 2 if self.sie == "camera_modality" else entries
        self.cnn_stem = _choice(cnn_stem, VI_STEMS, "MODEL.FUSIONREID.VI_CNN_STEM")
        self.vit_stem = _choice(vit_stem, VI_STEMS, "MODEL.FUSIONREID.VI_VIT_STEM")
        if self.cnn_stem == "modality":
            self.infrared_cnn_stem = copy.deepcopy(_stem_of(cnn))
        if self.vit_stem == "modality":
            self.infrared_patch_embed = copy.deepcopy(vit.patch_embed)

    @staticmethod
    def _sie_entries(cfg):
        own = cfg.MODEL.FUSIONREID
        if not own.SIE_CAMERA:
            return 0
        sie = _choice(own.VI_SIE, VI_SIE, "MODEL.FUSIONREID.VI_SIE")
        return {"camera": int(own.NUM_CAMERAS), "modality": 2, "camera_modality": 2 * int(own.NUM_CAMERAS)}[sie]

    @staticmethod
    def _extra_args(cfg):
        own = cfg.MODEL.FUSIONREID
        return {"sie": own.VI_SIE, "cnn_stem": own.VI_CNN_STEM, "vit_stem": own.VI_VIT_STEM,
                "camera_base": own.VI_CAMERA_BASE}

    def _sie_ids(self, camids, modality, n, device):
        if self.sie == "modality":
            return self._modality_rows(modality, n, device)
        if camids is None:
            raise ValueError("%s with %s SIE: pass camids" % (VI_LABEL, self.sie))
        cams = torch.as_tensor(camids, device=device).long().reshape(-1) - self.camera_base
        if cams.numel() != n:
            raise ValueError("%d camera ids for a batch of %d images" % (cams.numel(), n))
        low, high = int(cams.min()), int(cams.max())
        if low < 0 or high >= self.num_cameras:
            raise ValueError("%s: camera ids must lie in %d..%d (MODEL.FUSIONREID.VI_CAMERA_BASE and NUM_CAMERAS), "
                             "got %d..%d" % (VI_LABEL, self.camera_base, self.camera_base + self.num_cameras - 1,
                                             low + self.camera_base, high + self.camera_base))
        if self.sie == "camera":
            return cams
        return cams * 2 + self._modality_rows(modality, n, device)

    @staticmethod
    def _modality_rows(modality, n, device):
        if modality is None:
            raise ValueError("%s with modality-specific parts: pass the modality of the images" % VI_LABEL)
        return modality_ids(modality, n, device).long()

    def _per_modality(self, images, modality, visible_fn, infrared_fn):
        """visible_fn on the visible rows, infrared_fn on the infrared rows, in batch order."""
        mod = self._modality_rows(modality, images.shape[0], images.device)
        rows = [(mod == VISIBLE).nonzero().squeeze(1), (mod != VISIBLE).nonzero().squeeze(1)]
        parts, order = [], []
        for fn, idx in zip((visible_fn, infrared_fn), rows):
            if idx.numel():
                parts.append(fn(images[idx]))
                order.append(idx)
        return torch.cat(parts)[torch.argsort(torch.cat(order))]

    def _cnn_map(self, images, modality):
        if self.cnn_stem == "shared":
            return self.cnn(images)
        cnn = self.cnn
        x = self._per_modality(images, modality, _stem_of(cnn), self.infrared_cnn_stem)
        return cnn.layer4(cnn.layer3(cnn.layer2(cnn.layer1(x))))

    def _vit_tokens(self, images, modality, sie_ids):
        if self.vit_stem == "shared":
            return self.vit(images, sie_ids)
        vit = self.vit
        patches = self._per_modality(images, modality, vit.patch_embed, self.infrared_patch_embed)
        tokens = torch.cat([vit.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1) + vit.pos_embed
        if vit.sie_embed is not None:
            ids = torch.as_tensor(sie_ids, device=images.device).long()
            if ids.shape != (images.shape[0],) or int(ids.min()) < 0 or int(ids.max()) >= vit.sie_embed.shape[0]:
                raise ValueError("SIE ids must be [%d] values in 0..%d" % (images.shape[0], vit.sie_embed.shape[0] - 1))
            tokens = tokens + vit.sie_coe * vit.sie_embed[ids]
        tokens = vit.pos_drop(tokens)
        for block in vit.blocks:
            tokens = block(tokens)
        return vit.norm(tokens)
