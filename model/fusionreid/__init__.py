"""FusionReID: ResNet + ViT fusion (LRU, SEU, MFU, HTM), its FusionReID-VI project extension, and
the converter from released checkpoints."""
