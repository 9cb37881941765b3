"""The model registry: ``MODELS.get(cfg.MODEL.NAME)`` is a model class.

Every registered class follows the model contract of :mod:`model.base` (named training
outputs, named test embeddings with presets, parameter groups); the modules listed here
register their classes when imported.
"""
from utils.registry import Registry

MODELS = Registry("model", "MODEL.NAME", modules=("model.cmfn.cmfn", "model.cmfn.baseline", "model.ivreid",
                                                        "model.fusionreid.fusionreid", "model.tokenmatcher.encoder",
                                                        "model.cmag.encoder"))
