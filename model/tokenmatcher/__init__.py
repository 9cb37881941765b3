"""TokenMatcher (AAAI 2025), the unsupervised VI-ReID pipeline CMAG is built on: its encoder.

:mod:`.encoder` (the multi-class-token ViT, registered as the model ``tokenmatcher``),
:mod:`.ics_stem` (the per-modality conv stem), :mod:`.pretrained` (the TransReID-SSL starting
weights) and :mod:`.convert` (released TokenMatcher / CMAG checkpoints).
"""
