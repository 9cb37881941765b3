"""Released FusionReID state dicts -> this project's FusionReID state dict.

The released model (``FusionReID_<epoch>.pth``, optionally with DDP's ``module.`` prefix) keeps
its own attribute names; this project names modules for what they are. The mapping is a pure
rename (no tensor is changed), by released prefix:

=====================================  ============================================
released                               here
=====================================  ============================================
``resnet.base.<X>``                    ``cnn.<X>`` (torchvision ResNet names)
``resnet.gap.p``                       ``cnn_pool.p``
``transformer.base.<X>``               ``vit.<X>`` (timm names, ``sie_embed``)
``transformer.base.fc.*``              dropped (never used by the released forward)
``res_LRU.*`` / ``former_LRU.*``       ``dmf.lru_cnn.*`` / ``dmf.lru_vit.*`` (:func:`lru_key`)
``gap_r.p`` / ``gap_f.p``              ``dmf.pool_cnn.p`` / ``dmf.pool_vit.p``
``HTM.blocks.<i>.*``                   ``dmf.htm.layers.<i>.*`` (:func:`htm_layer_key`)
``resnet.bottleneck|classifier``       ``heads.cnn.bnneck|classifier``
``transformer.bottleneck|classifier``  ``heads.vit.bnneck|classifier``
``bottleneck_k`` / ``classifier_k``    ``heads.<lru_cnn|lru_vit|htm_cnn|htm_vit>.bnneck|classifier``
=====================================  ============================================

Inside the fusion modules: LRU ``dwconv`` / ``ptconv`` -> ``depthwise`` / ``pointwise``; SEU
``blocks.0.<X>`` -> ``block.<X>`` (timm ``Block`` names) and ``norm``; MFU ``blocks.0.norm1`` ->
``norm1``, ``blocks.0.attn.norm`` -> ``key_norm``, ``blocks.0.attn.{q,k,v,proj}`` ->
``query`` / ``key`` / ``value`` / ``proj``, ``blocks.0.norm2`` -> ``norm2``, ``blocks.0.mlp.*``
-> ``mlp.*``; HTM layer ``SEU1`` / ``SEU2`` / ``MUF_RES`` / ``MFU_FORMER`` -> ``encode_cnn`` /
``encode_vit`` / ``fuse_cnn`` / ``fuse_vit``.

``convert_state_dict(sd) -> (state_dict, report)``; ``report`` = ``{"converted": n,
"dropped": [released keys deliberately left out], "unmapped": [released keys it does not
know]}``. Unknown keys are reported, never guessed; the caller decides whether that is fatal
(loading the result with ``strict=True`` names anything missing).
"""
import re

from model.backbones import resnet_transreid, vit

DROPPED_PREFIXES = ("transformer.base.fc.",)
HEAD_NAMES = ("cnn", "vit", "lru_cnn", "lru_vit", "htm_cnn", "htm_vit")
_HEAD_INDEX = {"1": "lru_cnn", "2": "lru_vit", "3": "htm_cnn", "4": "htm_vit"}
_LRU_LEAVES = {"dwconv": "depthwise", "ptconv": "pointwise", "bn1": "bn1", "act1": "act1",
               "bn2": "bn2", "act2": "act2"}
_MFU_PARTS = {"blocks.0.norm1.": "norm1.", "blocks.0.attn.norm.": "key_norm.", "blocks.0.attn.q.": "query.",
              "blocks.0.attn.k.": "key.", "blocks.0.attn.v.": "value.", "blocks.0.attn.proj.": "proj.",
              "blocks.0.norm2.": "norm2.", "blocks.0.mlp.fc1.": "mlp.fc1.", "blocks.0.mlp.fc2.": "mlp.fc2."}
_HTM_UNITS = {"SEU1.": "encode_cnn.", "SEU2.": "encode_vit.", "MUF_RES.": "fuse_cnn.", "MFU_FORMER.": "fuse_vit."}
_SEU_BLOCK = re.compile(r"^blocks\.0\.((?:norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(?:weight|bias))$")
_HTM_LAYER = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HEAD = re.compile(r"^(bottleneck|classifier)_([1-4])\.(.+)$")
_BN_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def lru_key(key):
    """A released LocalRefinementUnits key (``dwconv.weight``) -> ``depthwise.weight``; None if unknown."""
    module, _, leaf = key.partition(".")
    if module not in _LRU_LEAVES or leaf not in _BN_LEAVES:
        return None
    return _LRU_LEAVES[module] + "." + leaf


def seu_key(key):
    """A released Shared_Encoding_Unit key -> SharedEncodingUnit key; None if unknown."""
    if key in ("norm.weight", "norm.bias"):
        return key
    match = _SEU_BLOCK.match(key)
    return "block." + match.group(1) if match else None


def mfu_key(key):
    """A released Mutual_Fsuion_Unit key -> MutualFusionUnit key; None if unknown."""
    for old, new in _MFU_PARTS.items():
        if key.startswith(old) and key[len(old):] in ("weight", "bias"):
            return new + key[len(old):]
    return None


def htm_layer_key(key):
    """A released HTM layer (Reflection_item) key -> HTMLayer key; None if unknown."""
    for old, new in _HTM_UNITS.items():
        if key.startswith(old):
            inner = (seu_key if old.startswith("SEU") else mfu_key)(key[len(old):])
            return None if inner is None else new + inner
    return None


def htm_key(key):
    """A released Heterogenous_Transmission_Module key -> HeterogeneousTransmissionModule key."""
    match = _HTM_LAYER.match(key)
    if not match:
        return None
    inner = htm_layer_key(match.group(2))
    return None if inner is None else "layers.%s.%s" % (match.group(1), inner)


def dmf_key(key):
    """A released key of the fusion part (``res_LRU``, ``former_LRU``, ``gap_r``, ``gap_f``,
    ``HTM``) -> the key inside :class:`model.fusionreid.fusionreid.DualAttentionMutualFusion`."""
    for old, new, inner in (("res_LRU.", "lru_cnn.", lru_key), ("former_LRU.", "lru_vit.", lru_key),
                            ("HTM.", "htm.", htm_key)):
        if key.startswith(old):
            mapped = inner(key[len(old):])
            return None if mapped is None else new + mapped
    return {"gap_r.p": "pool_cnn.p", "gap_f.p": "pool_vit.p"}.get(key)


def _head_key(module, leaf):
    part = {"bottleneck": "bnneck", "classifier": "classifier"}[module]
    if (part == "bnneck" and leaf in _BN_LEAVES) or (part == "classifier" and leaf == "weight"):
        return part + "." + leaf
    return None


def model_key(key):
    """A released FusionReID key (no ``module.`` prefix) -> this project's key; None if unknown
    or dropped."""
    if key.startswith(resnet_transreid.RELEASED_PREFIX):
        return "cnn." + resnet_transreid.released_key(key[len(resnet_transreid.RELEASED_PREFIX):])
    if key == "resnet.gap.p":
        return "cnn_pool.p"
    if key.startswith(vit.RELEASED_PREFIX):
        mapped = vit.released_key(key[len(vit.RELEASED_PREFIX):])
        return None if mapped is None else "vit." + mapped
    for branch, head in (("resnet.", "cnn"), ("transformer.", "vit")):
        for module in ("bottleneck", "classifier"):
            prefix = branch + module + "."
            if key.startswith(prefix):
                mapped = _head_key(module, key[len(prefix):])
                return None if mapped is None else "heads.%s.%s" % (head, mapped)
    match = _HEAD.match(key)
    if match:
        mapped = _head_key(match.group(1), match.group(3))
        return None if mapped is None else "heads.%s.%s" % (_HEAD_INDEX[match.group(2)], mapped)
    mapped = dmf_key(key)
    return None if mapped is None else "dmf." + mapped


def convert_state_dict(state_dict):
    """(converted state dict, report) for a released FusionReID state dict; see the module docstring."""
    out, dropped, unmapped = {}, [], []
    for key, value in state_dict.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name.startswith(DROPPED_PREFIXES):
            dropped.append(key)
            continue
        mapped = model_key(name)
        if mapped is None:
            unmapped.append(key)
        elif mapped in out:
            raise ValueError("released keys %r and another one both map to %r" % (key, mapped))
        else:
            out[mapped] = value
    return out, {"converted": len(out), "dropped": dropped, "unmapped": unmapped}
