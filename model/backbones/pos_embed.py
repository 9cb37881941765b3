"""Patch grids and position-embedding resampling for ViT backbones.

``patch_grid((H, W), patch, stride) -> (ny, nx)``: the number of patch rows and columns of a
convolutional patch embedding (kernel ``patch``, stride ``stride``, no padding), e.g. 256x128
with 16/12 -> (21, 10), 384x128 with 16/16 -> (24, 8).

``resample_grid(pos [1, ny*nx, E], (ny, nx), (my, mx)) -> [1, my*mx, E]``: the patch part of a
position embedding, read row-major as a ny x nx grid, resized to my x mx by bilinear
interpolation with ``align_corners=False`` and no antialiasing, flattened row-major again. This
is the resampling the TransReID family uses (FusionReID, TokenMatcher/CMAG); timm's own
``resample_abs_pos_embed`` defaults to bicubic with antialiasing and gives other numbers. The
class-token rows are not part of the grid: callers keep or replace them.
"""
import torch.nn.functional as F

from utils.errors import ConfigError


def patch_grid(size, patch, stride):
    height, width = int(size[0]), int(size[1])
    if height < patch or width < patch:
        raise ConfigError("input size %dx%d is smaller than the %dx%d patch" % (height, width, patch, patch))
    return (height - patch) // stride + 1, (width - patch) // stride + 1


def resample_grid(pos, old_hw, new_hw):
    ny, nx = int(old_hw[0]), int(old_hw[1])
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[1] != ny * nx:
        raise ValueError("position grid of shape %s does not hold a %dx%d grid" % (tuple(pos.shape), ny, nx))
    if (ny, nx) == tuple(int(v) for v in new_hw):
        return pos
    grid = pos.reshape(1, ny, nx, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(int(v) for v in new_hw), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])
