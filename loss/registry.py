"""The criterion registry: ``CRITERIA.get(cfg.LOSS.NAME)`` is a criterion class.

A criterion is built as ``cls(cfg)`` and follows the contract of :mod:`loss.base`.
"""
from utils.registry import Registry

CRITERIA = Registry("criterion", "LOSS.NAME", modules=("loss.cmfn", "loss.ivreid", "loss.fusionreid"))
