"""The encoder of a CMAG model trained here: TokenMatcher's encoder under CMAG's name.

CMAG evaluates exactly TokenMatcher's encoder (K class tokens, two ICS stems, per-token BN
heads; input [N, 3, H, W] -> ``feat`` [N, K * C]), with the same state-dict layout: its
training-time modules (:mod:`model.cmag`) are not part of it. The subclass exists so that
everything that prints or writes the method of a model trained by ``train_usl.py --method
cmag`` (the training log, ``metrics.jsonl``, test.py's JSON) carries :data:`METHOD_LABEL`,
which says that the cross-modal attention such a model was trained with is this project's
reconstruction. A released CMAG checkpoint converted by tools/convert_official_checkpoint.py
stays a ``tokenmatcher`` encoder: its weights are the authors'.
"""
from model.cmag.cross_modal_attention import NAME as CMA_NAME
from model.registry import MODELS
from model.tokenmatcher.encoder import TokenMatcherEncoder

METHOD_LABEL = ("CMAG (trained here; its cross-modal attention is this project's reconstruction, %s)"
                % CMA_NAME)


@MODELS.register("cmag")
class CMAGEncoder(TokenMatcherEncoder):
    """TokenMatcher's encoder, labelled as trained by this project's CMAG recipe (module docstring)."""

    method_label = METHOD_LABEL
