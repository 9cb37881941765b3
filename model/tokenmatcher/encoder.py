"""The TokenMatcher / CMAG encoder: a ViT with K class tokens and one ICS conv stem per modality.

For N images [N, 3, H, W] (reference: 384 x 128), K class tokens (4 on SYSU, 6 on RegDB),
embedding width E (768) and depth D (12):

1. each row goes through the stem of its modality (:class:`ICSStem`, ``stems.visible`` or
   ``stems.infrared``): patch tokens [N, P, E], P = gh * gw (24 x 8 = 192). In train mode each
   stem's BatchNorms therefore see only the rows of their own modality;
2. the K class tokens (``cls_token`` [1, K, E]) are prepended and ``pos_embed`` [1, K + P, E]
   added;
3. blocks 0 .. D-2 (timm's pre-norm ViT ``Block``: qkv bias, exact GELU, LayerNorm eps 1e-6,
   stochastic depth linspace(0, DROP_PATH, D)[i], block 0 without);
4. ``last_block`` and ``last_norm``: the reference's ``b1``, a copy of block D-1 (stochastic
   depth DROP_PATH) and of the final LayerNorm made after loading the pretrained weights (the
   pretrained last block and norm start it, :mod:`model.tokenmatcher.pretrained`). The
   reference keeps the originals too but never runs them; this model does not hold them;
5. ``tokens`` [N, K, E]: the K class-token outputs (the "raw tokens" of the token-diversity
   loss), and per token a BatchNorm1d(E) head (``token_bns.<i>``, weight 1, bias 0 and frozen):
   ``feat`` [N, K*E] = concat_i token_bns.i(tokens[:, i]), token i in columns [i*E, (i+1)*E).
   In train mode the heads normalise over all rows of the batch, both modalities together.

Modality: this project passes ``modality`` per row, 0 visible / 1 infrared (or a name for all
rows). The reference's switch ``forward(x1, x2, modal)`` maps onto it as: modal 1 (visible
stem) = every row visible; modal 2 (thermal stem) = every row infrared; modal 0 (training,
``cat(visible(x1), thermal(x2))``) = a batch holding both, e.g. the RGB rows then the IR rows.
Rows keep their batch order in every output (the reference's ``feats[:B1]`` / ``feats[B1:]``
are the visible / infrared rows of ``feat``). ``camids`` is accepted and ignored.

Outputs: train mode ``{"feat": [N, K*E], "tokens": [N, K, E]}``, neither normalised (the cluster
memories normalise ``feat`` themselves); eval mode ``{"feat": L2-normalised feat}``. The
reference's test and clustering descriptor averages the unnormalised ``feat`` of an image and
of its horizontal mirror and then L2-normalises: :func:`flip_average` (the evaluator's
``TEST.FLIP_MODE mean`` averages normalised sets instead, which is not the same).

Ghost batches (``ghost_batches`` G > 1, train mode only): the reference trains under
``nn.DataParallel`` on 4 GPUs, which splits the visible rows and the infrared rows each into G
consecutive chunks (``torch.chunk``) and runs chunk j of both on replica j, so every
BatchNorm normalises over one replica's rows and only replica 0's running statistics are kept.
With G > 1 the forward does the same on one device: ghost batch j = visible chunk j + infrared
chunk j, each its own pass; the BatchNorm running statistics end as after ghost batch 0 alone.
Use G = 1 when the batch is already split across processes.

Sizes are configurable (input size, K, E, D, heads, MLP ratio, stem width, patch size); the
defaults are the reference's. Parameter initialisation: class tokens and position embedding
truncated normal (std 0.02), Linear weights truncated normal (std 0.02) with zero biases,
LayerNorms 1 / 0, the stems as :mod:`model.tokenmatcher.ics_stem` says.
"""
import torch
import torch.nn.functional as F
from torch import nn

from utils.compat import timm  # noqa: F401  (registers timm after torchvision for the imports below)
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from engine.distributed import unwrap_model
from model.base import INFRARED, VISIBLE, ReIDModel, modality_ids
from model.pretrained import PretrainedWeightsError
from model.registry import MODELS
from model.tokenmatcher.ics_stem import ICSStem, stem_grid
from model.tokenmatcher.pretrained import load_pretrained
from utils.errors import ConfigError


def _layer_norm(dim, **factory):
    return nn.LayerNorm(dim, eps=1e-6, **factory)


def _init_vit_weights(module):
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@MODELS.register("tokenmatcher")
class TokenMatcherEncoder(ReIDModel):
    # trained without labels by train_usl.py: no supervised criterion fits it
    supervised = False
    train_outputs = ("feat", "tokens")
    embedding_sets = ("feat",)
    embedding_presets = {"feat": {"feat": 1.0}}
    default_embedding = "feat"

    def __init__(self, img_size=(384, 128), num_tokens=4, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 stem_width=64, patch_size=16, drop_path=0.3, ghost_batches=1):
        super().__init__()
        for name, value in (("num_tokens", num_tokens), ("depth", depth), ("num_heads", num_heads),
                            ("stem_width", stem_width), ("ghost_batches", ghost_batches)):
            if int(value) < 1:
                raise ConfigError("TokenMatcher encoder: %s must be a positive integer, got %r" % (name, value))
        if int(embed_dim) % int(num_heads):
            raise ConfigError("TokenMatcher encoder: embed_dim %d is not divisible by num_heads %d"
                              % (embed_dim, num_heads))
        if not 0.0 <= float(drop_path) < 1.0:
            raise ConfigError("TokenMatcher encoder: drop_path must be in [0, 1), got %r" % (drop_path,))
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.num_tokens, self.embed_dim, self.depth = int(num_tokens), int(embed_dim), int(depth)
        self.ghost_batches = int(ghost_batches)
        self.grid = stem_grid(self.img_size, patch_size)
        num_patches = self.grid[0] * self.grid[1]

        self.cls_token = nn.Parameter(torch.zeros(1, self.num_tokens, self.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens + num_patches, self.embed_dim))
        self.stems = nn.ModuleDict({
            "visible": ICSStem(stem_width, self.embed_dim, patch_size),
            "infrared": ICSStem(stem_width, self.embed_dim, patch_size),
        })
        rates = torch.linspace(0, float(drop_path), self.depth, device="cpu").tolist()
        blocks = [Block(self.embed_dim, int(num_heads), float(mlp_ratio), qkv_bias=True, drop_path=rate,
                        norm_layer=_layer_norm) for rate in rates]
        self.blocks = nn.ModuleList(blocks[:-1])
        self.last_block = blocks[-1]
        self.last_norm = _layer_norm(self.embed_dim)
        self.token_bns = nn.ModuleList(nn.BatchNorm1d(self.embed_dim) for _ in range(self.num_tokens))
        for bn in self.token_bns:
            bn.bias.requires_grad_(False)

        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_vit_weights)

    @classmethod
    def from_config(cls, cfg, num_classes=None):
        """The encoder of ``cfg.MODEL.TOKENMATCHER`` at ``cfg.INPUT.SIZE_TRAIN``; with
        ``MODEL.PRETRAINED``, filled from the TransReID-SSL file ``MODEL.PRETRAIN_PATH``.
        `num_classes` is ignored: the model has no classifier."""
        t = cfg.MODEL.TOKENMATCHER
        size = [int(v) for v in cfg.INPUT.SIZE_TRAIN]
        if [int(v) for v in cfg.INPUT.SIZE_TEST] != size:
            raise ConfigError("INPUT.SIZE_TEST %s must equal INPUT.SIZE_TRAIN %s: the TokenMatcher encoder's "
                              "position embedding fixes its input size" % (list(cfg.INPUT.SIZE_TEST), size))
        model = cls(img_size=size, num_tokens=t.NUM_TOKENS, embed_dim=t.EMBED_DIM, depth=t.DEPTH,
                    num_heads=t.NUM_HEADS, mlp_ratio=t.MLP_RATIO, stem_width=t.STEM_WIDTH, patch_size=t.PATCH_SIZE,
                    drop_path=t.DROP_PATH, ghost_batches=t.GHOST_BATCHES)
        if cfg.MODEL.PRETRAINED:
            if not cfg.MODEL.PRETRAIN_PATH:
                raise PretrainedWeightsError(
                    "MODEL.PRETRAINED is on but MODEL.PRETRAIN_PATH is empty: the TokenMatcher encoder starts from "
                    "TransReID-SSL's vit_base_ics_cfs_lup.pth (not on any model hub; download it from the "
                    "TransReID-SSL release), or set MODEL.PRETRAINED False")
            load_pretrained(model, cfg.MODEL.PRETRAIN_PATH, hw_ratio=t.PRETRAIN_HW_RATIO)
        return model

    @property
    def feat_dim(self):
        return self.num_tokens * self.embed_dim

    def _stem_tokens(self, images, modality):
        """Patch tokens [N, P, E], each row through the stem of its modality, rows in batch order."""
        parts, rows = [], []
        for value, stem in ((VISIBLE, self.stems["visible"]), (INFRARED, self.stems["infrared"])):
            index = torch.nonzero(modality == value).squeeze(1)
            if index.numel() == images.shape[0]:
                return stem(images)
            if index.numel():
                parts.append(stem(images[index]))
                rows.append(index)
        order = torch.cat(rows)
        if order.numel() != images.shape[0]:
            raise ValueError("modality must hold 0 (visible) or 1 (infrared) per row, got values %s"
                             % sorted(set(modality.tolist())))
        return torch.cat(parts)[torch.argsort(order)]

    def _encode(self, images, modality):
        n = images.shape[0]
        x = torch.cat([self.cls_token.expand(n, -1, -1), self._stem_tokens(images, modality)], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        tokens = self.last_norm(self.last_block(x))[:, :self.num_tokens]
        feat = torch.cat([bn(tokens[:, i]) for i, bn in enumerate(self.token_bns)], dim=1)
        return feat, tokens

    def _batchnorms(self):
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _encode_ghost(self, images, modality):
        """:meth:`_encode` over ghost batches (module docstring); rows back in batch order."""
        chunks = []
        for value in (VISIBLE, INFRARED):
            index = torch.nonzero(modality == value).squeeze(1)
            split = list(index.chunk(self.ghost_batches)) if index.numel() else []
            chunks.append(split + [index[:0]] * (self.ghost_batches - len(split)))
        groups = [torch.cat(pair) for pair in zip(*chunks)]
        groups = [g for g in groups if g.numel()]
        if len(groups) < 2:
            return self._encode(images, modality)
        outputs, kept = [], None
        for j, rows in enumerate(groups):
            outputs.append(self._encode(images[rows], modality[rows]))
            if j == 0:
                kept = [(buf, buf.clone()) for bn in self._batchnorms() for buf in bn.buffers()]
        # Autograd keeps the running statistics among BatchNorm's saved tensors (its backward in
        # training does not read them); restoring them through .data leaves the graph valid.
        for buf, value in kept:
            buf.data.copy_(value)
        inverse = torch.argsort(torch.cat(groups))
        feat = torch.cat([f for f, _ in outputs])[inverse]
        tokens = torch.cat([t for _, t in outputs])[inverse]
        return feat, tokens

    def _check_images(self, images):
        if images.dim() != 4 or tuple(images.shape[2:]) != self.img_size:
            raise ValueError("the TokenMatcher encoder was built for [N, 3, %d, %d] images, got %s"
                             % (self.img_size + (tuple(images.shape),)))

    def embed(self, images, modality):
        """The unnormalised descriptor ``feat`` [N, K*E] in the current mode (no ghost batches)."""
        self._check_images(images)
        return self._encode(images, modality_ids(modality, images.shape[0], images.device))[0]

    def forward(self, images, modality, camids=None):
        self._check_images(images)
        modality = modality_ids(modality, images.shape[0], images.device)
        if not self.training:
            return {"feat": F.normalize(self._encode(images, modality)[0], dim=1)}
        encode = self._encode_ghost if self.ghost_batches > 1 else self._encode
        feat, tokens = encode(images, modality)
        return {"feat": feat, "tokens": tokens}

    def param_groups(self, cfg):
        """One group of every trainable tensor at SOLVER.BASE_LR (lr factor 1) and
        SOLVER.WEIGHT_DECAY, as the reference's SGD; the frozen head biases are left out."""
        return [{"name": "encoder", "params": [p for p in self.parameters() if p.requires_grad], "lr_factor": 1.0}]


def flip_average(model, images, modality, normalize=True):
    """The reference descriptor: (embed(x) + embed(x mirrored on the width axis)) / 2 [N, K*E],
    then L2-normalised unless `normalize` is False (the clustering step builds its centroids from
    the unnormalised average). Runs in the model's current mode; callers use eval and no_grad."""
    encoder = unwrap_model(model)
    feat = (encoder.embed(images, modality) + encoder.embed(torch.flip(images, dims=[3]), modality)) / 2
    return F.normalize(feat, dim=1) if normalize else feat
