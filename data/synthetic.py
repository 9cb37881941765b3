"""Procedurally drawn visible/infrared person images and the real datasets' on-disk layouts.

Used by ``tools/make_synthetic_dataset.py``, the demo dataset and the tests. Nothing here
downloads anything; every image is drawn with numpy + PIL ImageDraw.

Identity (fixed per (seed, id)): body height, head size, shoulder/hip width, leg and arm
thickness, sleeve length, trousers/shorts/skirt, hair, bag, the pattern of the top
(stripes, checks, a chest panel, two-tone, ...) and of the bottom, clothing colours, and the
infrared brightness of every material. The infrared brightness follows the visible luminance
of a material only roughly and carries no colour, so what carries identity across modalities
is the body shape, the proportions, the garment layout, the pattern geometry and the rough
brightness ordering of the garments, not a colour.

Camera (fixed per (seed, camera)): native image size, background (wall/floor colours and
fixed objects), person scale and position, lighting gain/colour cast (visible) or gain,
blur and noise (infrared: no colour, skin brighter than clothes).

Image (per (seed, id, camera, index)): facing front/back, mirrored, stride, arm swing,
position/scale jitter, exposure, occasionally a partial occluder. Every image has its own
RNG derived from those numbers, so any subset can be generated in any order, in parallel,
with identical results.

Drawing works on a material map at twice the output size (one uint8 label per pixel), which
is then turned into colours or infrared intensities by a per-identity palette, shaded,
downsampled with a box filter (anti-aliasing) and given camera noise.

Layouts (datasets/README.md): :func:`write_sysu`, :func:`write_regdb`, :func:`write_llcm`
write exactly the folder trees, list files and (SYSU) the official ``exp/rand_perm_cam.mat``
permutation file that the real datasets have.
"""
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Material labels of the drawing map.
BG, SKIN, HAIR, TOP, TOP2, BOTTOM, BOTTOM2, SHOES, BAG, OCCLUDER = range(10)
N_MATERIALS = 10

# Keys mixed into the seed so identity, camera and image streams never collide.
_ID_STREAM, _CAM_STREAM, _IMG_STREAM, _SPLIT_STREAM = 11, 12, 13, 14

SYSU_RGB_CAMS = (1, 2, 4, 5)
SYSU_IR_CAMS = (3, 6)
# Native (W, H) per SYSU camera: different per camera, as in the real data.
SYSU_CAM_SIZES = {1: (64, 128), 2: (60, 124), 3: (64, 128), 4: (72, 144), 5: (56, 120), 6: (64, 136)}
SYSU_INDOOR = (1, 2, 3)
SYSU_OUTDOOR = (4, 5, 6)
REGDB_SIZE = (64, 128)
LLCM_CAMS = tuple(range(1, 10))
LLCM_NIR_TEST_CAMS = (1, 2, 4, 5, 6, 7, 8, 9)
LLCM_SIZE = (64, 128)
_GEN_VERSION = 1


def _rng(seed, *keys):
    return np.random.default_rng([int(seed)] + [int(k) for k in keys])


# --------------------------------------------------------------------------------------------
# identities and cameras


@dataclass
class Identity:
    """Everything that stays the same for one person across cameras and modalities."""

    height: float  # person height as a fraction of the camera's person scale
    head: float  # head radius / height
    shoulder: float  # shoulder width / height
    hip: float  # hip width / height
    torso: float  # shoulder-to-hip length / height
    leg_w: float  # leg width / height
    arm_w: float  # arm width / height
    long_sleeves: bool
    lower: int  # 0 trousers, 1 shorts, 2 skirt
    hair: int  # 0 short, 1 long, 2 cap
    bag: int  # 0 none, 1 backpack, 2 shoulder bag
    bag_side: int  # -1 left, 1 right (before mirroring)
    top_pattern: int  # see _pattern_mask
    top_period: float  # pattern period / height
    bottom_pattern: int
    colors: np.ndarray  # [N_MATERIALS, 3] visible RGB in 0..1
    thermal: np.ndarray  # [N_MATERIALS] infrared intensity in 0..1


def _luminance(rgb):
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def make_identity(seed, pid):
    rng = _rng(seed, _ID_STREAM, pid)
    colors = np.zeros((N_MATERIALS, 3))
    thermal = np.zeros(N_MATERIALS)
    skin_tone = rng.uniform(0.35, 0.95)
    colors[SKIN] = np.array([0.95, 0.75, 0.62]) * skin_tone + rng.uniform(-0.03, 0.03, 3)
    colors[HAIR] = rng.choice([[0.08, 0.06, 0.05], [0.3, 0.2, 0.1], [0.6, 0.45, 0.25], [0.5, 0.5, 0.5], [0.15, 0.1, 0.1]])
    for part, second in ((TOP, TOP2), (BOTTOM, BOTTOM2), (BAG, None), (SHOES, None)):
        vivid = rng.uniform(0.0, 1.0, 3) ** rng.uniform(0.6, 1.6)
        saturation = rng.uniform(0.35, 1.0)
        base = vivid * saturation + _luminance(vivid) * (1 - saturation)
        colors[part] = base
        if second is not None:
            # The pattern colour differs clearly in luminance so the pattern survives in IR.
            shift = rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 0.6)
            colors[second] = np.clip(base + shift + rng.uniform(-0.2, 0.2, 3), 0.0, 1.0)
    # Infrared reflectance: follows each material's visible luminance, with a material-specific
    # deviation; clothes stay darker than skin.
    for part in (TOP, TOP2, BOTTOM, BOTTOM2, BAG, SHOES, HAIR):
        thermal[part] = 0.08 + 0.64 * (0.75 * _luminance(colors[part]) + 0.25 * rng.uniform())
    for part, second in ((TOP, TOP2), (BOTTOM, BOTTOM2)):
        gap = thermal[second] - thermal[part]
        if abs(gap) < 0.12:
            thermal[second] = thermal[part] + (0.12 if gap >= 0 else -0.12)
    thermal[SHOES] *= 0.6
    thermal[:] = np.minimum(thermal, 0.75)
    thermal[HAIR] = 0.08 + 0.2 * rng.uniform()
    thermal[SKIN] = rng.uniform(0.78, 0.95)
    return Identity(
        height=rng.uniform(0.86, 1.0),
        head=rng.uniform(0.055, 0.075),
        shoulder=rng.uniform(0.2, 0.32),
        hip=rng.uniform(0.16, 0.26),
        torso=rng.uniform(0.27, 0.36),
        leg_w=rng.uniform(0.05, 0.085),
        arm_w=rng.uniform(0.035, 0.06),
        long_sleeves=bool(rng.uniform() < 0.5),
        lower=int(rng.choice(3, p=[0.55, 0.25, 0.2])),
        hair=int(rng.choice(3, p=[0.5, 0.3, 0.2])),
        bag=int(rng.choice(3, p=[0.45, 0.3, 0.25])),
        bag_side=int(rng.choice([-1, 1])),
        top_pattern=int(rng.integers(0, 7)),
        top_period=rng.uniform(0.035, 0.08),
        bottom_pattern=int(rng.choice(3, p=[0.6, 0.2, 0.2])),
        colors=np.clip(colors, 0.0, 1.0),
        thermal=np.clip(thermal, 0.0, 1.0),
    )


@dataclass
class Camera:
    """Fixed properties of one camera (one modality of one viewpoint)."""

    size: tuple  # native (W, H)
    infrared: bool
    scale: float  # person height / image height
    x_center: float  # mean horizontal position of the person (fraction of W)
    foot: float  # mean foot position (fraction of H)
    wall: np.ndarray  # [3] wall colour (top of the gradient)
    wall2: np.ndarray  # [3] bottom of the wall gradient
    floor: np.ndarray  # [3] floor colour
    horizon: float  # floor line (fraction of H)
    objects: list  # fixed background rectangles: (x0, y0, x1, y1, rgb) in fractions
    gain: float
    cast: np.ndarray  # [3] colour cast (all ones for infrared)
    noise: float  # noise sigma in 0..1 units
    blur: float  # Gaussian blur radius (pixels at output size)


def make_camera(seed, cam_key, infrared, size):
    rng = _rng(seed, _CAM_STREAM, cam_key, int(infrared))
    if infrared:
        level = rng.uniform(0.08, 0.3)
        wall = np.full(3, level)
        wall2 = np.full(3, np.clip(level + rng.uniform(-0.08, 0.12), 0.02, 0.45))
        floor = np.full(3, np.clip(level + rng.uniform(-0.05, 0.15), 0.02, 0.5))
    else:
        wall = np.clip(rng.uniform(0.3, 0.8) + rng.uniform(-0.12, 0.12, 3), 0, 1)
        wall2 = np.clip(wall * rng.uniform(0.6, 1.1, 3), 0, 1)
        floor = np.clip(rng.uniform(0.2, 0.6) + rng.uniform(-0.1, 0.1, 3), 0, 1)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = rng.uniform(-0.2, 0.9), rng.uniform(0.0, 0.6)
        w, h = rng.uniform(0.1, 0.5), rng.uniform(0.1, 0.5)
        if infrared:
            color = np.full(3, rng.uniform(0.05, 0.5))
        else:
            color = np.clip(rng.uniform(0.1, 0.9) + rng.uniform(-0.25, 0.25, 3), 0, 1)
        objects.append((x0, y0, x0 + w, y0 + h, color))
    return Camera(
        size=tuple(size),
        infrared=bool(infrared),
        scale=rng.uniform(0.74, 0.9),
        x_center=rng.uniform(0.44, 0.56),
        foot=rng.uniform(0.93, 0.98),
        wall=wall,
        wall2=wall2,
        floor=floor,
        horizon=rng.uniform(0.55, 0.8),
        objects=objects,
        gain=rng.uniform(0.8, 1.15) if not infrared else rng.uniform(0.85, 1.2),
        cast=np.ones(3) if infrared else rng.uniform(0.85, 1.15, 3),
        noise=rng.uniform(0.03, 0.06) if infrared else rng.uniform(0.01, 0.03),
        blur=rng.uniform(0.5, 0.9) if infrared else rng.uniform(0.0, 0.3),
    )


# --------------------------------------------------------------------------------------------
# drawing


def _pattern_mask(kind, period, width, height):
    """Boolean [height, width] mask of the secondary colour for pattern `kind` (0 = solid)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    p = max(2.0, period)
    if kind == 1:  # horizontal stripes
        return (yy // p) % 2 == 1
    if kind == 2:  # vertical stripes
        return (xx // p) % 2 == 1
    if kind == 3:  # checks
        return ((yy // p) + (xx // p)) % 2 == 1
    if kind == 4:  # diagonal stripes
        return ((xx + yy) // (1.4 * p)) % 2 == 1
    if kind == 5:  # lower half in the second colour (two-tone)
        return yy > 0.5 * height
    if kind == 6:  # chest panel
        return (np.abs(xx - 0.5 * width) < 0.22 * width) & (yy > 0.15 * height) & (yy < 0.5 * height)
    return np.zeros((height, width), dtype=bool)


def _draw_person(ident, cam, rng, width, height, facing_back, mirror):
    """Material map [height, width] uint8 of one person (drawn at the supersampled size)."""
    m = Image.new("L", (width, height), BG)
    d = ImageDraw.Draw(m)
    scale = cam.scale * ident.height * rng.uniform(0.92, 1.06)
    ph = scale * height  # person height in pixels
    cx = (cam.x_center + rng.uniform(-0.08, 0.08)) * width
    foot = (cam.foot + rng.uniform(-0.03, 0.02)) * height
    top = foot - ph
    head_r = ident.head * ph
    neck_y = top + 2 * head_r
    sh_y = neck_y + 0.02 * ph
    hip_y = sh_y + ident.torso * ph
    # Seen partly from the side, the body looks narrower.
    turn = 1.0 if rng.uniform() < 0.7 else rng.uniform(0.6, 0.8)
    sw, hw = ident.shoulder * ph / 2 * turn, ident.hip * ph / 2 * turn
    lw, aw = ident.leg_w * ph, ident.arm_w * ph
    stride = rng.uniform(-1.0, 1.0) * 0.12 * ph
    swing = rng.uniform(-1.0, 1.0) * 0.07 * ph
    bag_side = ident.bag_side * (-1 if mirror else 1) * (-1 if facing_back else 1)

    def poly(points, mat):
        d.polygon([(float(x), float(y)) for x, y in points], fill=mat)

    def limb(x0, y0, x1, y1, w, mat):
        dx, dy = x1 - x0, y1 - y0
        n = max(np.hypot(dx, dy), 1e-6)
        ox, oy = -dy / n * w / 2, dx / n * w / 2
        poly([(x0 + ox, y0 + oy), (x1 + ox, y1 + oy), (x1 - ox, y1 - oy), (x0 - ox, y0 - oy)], mat)

    # Long hair hangs behind the shoulders.
    if ident.hair == 1:
        poly([(cx - head_r * 1.05, top + head_r), (cx + head_r * 1.05, top + head_r),
              (cx + head_r * 1.2, sh_y + 0.08 * ph), (cx - head_r * 1.2, sh_y + 0.08 * ph)], HAIR)
    if ident.bag == 1 and not facing_back:  # backpack seen from the front: its sides only
        poly([(cx - sw * 1.1, sh_y + 0.03 * ph), (cx + sw * 1.1, sh_y + 0.03 * ph),
              (cx + sw * 1.1, hip_y - 0.03 * ph), (cx - sw * 1.1, hip_y - 0.03 * ph)], BAG)
    # Legs (two tapered limbs from the hips), with shoes.
    leg_len = foot - hip_y
    knee_y = hip_y + 0.5 * leg_len
    lower_mat = BOTTOM
    for side, step in ((-1, stride), (1, -stride)):
        hx = cx + side * hw * 0.5
        fx = hx + step * 0.5
        if ident.lower == 0:
            limb(hx, hip_y, fx, foot, lw, lower_mat)
        else:
            kx = hx + step * 0.25
            limb(hx, hip_y, kx, knee_y, lw, lower_mat if ident.lower == 1 else SKIN)
            limb(kx, knee_y, fx, foot, lw * 0.85, SKIN)
        d.ellipse([fx - lw * 0.7, foot - lw * 0.45, fx + lw * 0.7, foot + lw * 0.15], fill=SHOES)
    if ident.lower == 1:  # shorts: waistband to just above the knee
        poly([(cx - hw, hip_y - 0.01 * ph), (cx + hw, hip_y - 0.01 * ph),
              (cx + hw * 1.05, knee_y - 0.05 * ph), (cx - hw * 1.05, knee_y - 0.05 * ph)], BOTTOM)
    elif ident.lower == 2:  # skirt
        poly([(cx - hw, hip_y - 0.02 * ph), (cx + hw, hip_y - 0.02 * ph),
              (cx + hw * 1.6, knee_y + 0.02 * ph), (cx - hw * 1.6, knee_y + 0.02 * ph)], BOTTOM)
    else:  # trousers: close the crotch gap
        poly([(cx - hw, hip_y - 0.01 * ph), (cx + hw, hip_y - 0.01 * ph),
              (cx + hw * 0.6, hip_y + 0.08 * ph), (cx - hw * 0.6, hip_y + 0.08 * ph)], BOTTOM)
    # Torso.
    poly([(cx - sw, sh_y), (cx + sw, sh_y), (cx + hw, hip_y + 0.01 * ph), (cx - hw, hip_y + 0.01 * ph)], TOP)
    d.ellipse([cx - sw - aw * 0.5, sh_y - aw * 0.4, cx - sw + aw * 1.2, sh_y + aw * 1.2], fill=TOP)
    d.ellipse([cx + sw - aw * 1.2, sh_y - aw * 0.4, cx + sw + aw * 0.5, sh_y + aw * 1.2], fill=TOP)
    # Arms: sleeve to the elbow (short) or the wrist (long), skin below.
    hand_y = hip_y + 0.06 * ph
    for side, sw_sign in ((-1, 1), (1, -1)):
        x0, y0 = cx + side * (sw - aw * 0.3), sh_y + aw * 0.3
        x2, y2 = x0 + side * 0.03 * ph + sw_sign * swing, hand_y
        x1, y1 = (x0 + x2) / 2, (y0 + y2) / 2
        limb(x0, y0, x1, y1, aw, TOP)
        limb(x1, y1, x2, y2, aw * 0.9, TOP if ident.long_sleeves else SKIN)
        d.ellipse([x2 - aw * 0.5, y2 - aw * 0.3, x2 + aw * 0.5, y2 + aw * 0.7], fill=SKIN)
    # Neck and head.
    poly([(cx - head_r * 0.4, neck_y - head_r * 0.3), (cx + head_r * 0.4, neck_y - head_r * 0.3),
          (cx + head_r * 0.45, sh_y + 0.01 * ph), (cx - head_r * 0.45, sh_y + 0.01 * ph)], SKIN)
    head_box = [cx - head_r * 0.85, top, cx + head_r * 0.85, top + 2 * head_r]
    d.ellipse(head_box, fill=HAIR if facing_back else SKIN)
    if ident.hair == 2:  # cap
        d.chord([head_box[0] - head_r * 0.1, top - head_r * 0.15, head_box[2] + head_r * 0.1, top + head_r * 1.3],
                180, 360, fill=BAG)
    elif not facing_back:
        d.chord([head_box[0], top, head_box[2], top + head_r * 1.1], 180, 360, fill=HAIR)
    # Bags.
    if ident.bag == 1 and facing_back:
        poly([(cx - sw * 0.75, sh_y + 0.03 * ph), (cx + sw * 0.75, sh_y + 0.03 * ph),
              (cx + sw * 0.7, hip_y - 0.02 * ph), (cx - sw * 0.7, hip_y - 0.02 * ph)], BAG)
    elif ident.bag == 1:
        for side in (-1, 1):
            limb(cx + side * sw * 0.55, sh_y, cx + side * sw * 0.6, hip_y - 0.08 * ph, aw * 0.45, BAG)
    elif ident.bag == 2:
        bx = cx + bag_side * (hw + 0.05 * ph)
        limb(cx - bag_side * sw * 0.6, sh_y, bx, hip_y - 0.02 * ph, aw * 0.35, BAG)
        poly([(bx - 0.06 * ph, hip_y - 0.04 * ph), (bx + 0.06 * ph, hip_y - 0.04 * ph),
              (bx + 0.06 * ph, hip_y + 0.06 * ph), (bx - 0.06 * ph, hip_y + 0.06 * ph)], BAG)
    mat = np.array(m)
    # Garment patterns: relative to the garment box so they scale with the person.
    if ident.top_pattern:
        y0, y1 = int(max(sh_y, 0)), int(min(hand_y, height))
        x0, x1 = int(max(cx - sw - aw, 0)), int(min(cx + sw + aw, width))
        if y1 > y0 and x1 > x0:
            box = mat[y0:y1, x0:x1]
            pm = _pattern_mask(ident.top_pattern, ident.top_period * ph, x1 - x0, y1 - y0)
            box[(box == TOP) & pm] = TOP2
    if ident.bottom_pattern:
        y0, y1 = int(max(hip_y, 0)), int(min(foot, height))
        x0, x1 = int(max(cx - hw * 1.7, 0)), int(min(cx + hw * 1.7, width))
        if y1 > y0 and x1 > x0:
            box = mat[y0:y1, x0:x1]
            kind = 1 if ident.bottom_pattern == 1 else 2
            pm = _pattern_mask(kind, 0.06 * ph, x1 - x0, y1 - y0)
            box[(box == BOTTOM) & pm] = BOTTOM2
    if mirror:
        mat = mat[:, ::-1]
    return mat


def render(ident, cam, rng):
    """One RGB PIL image of `ident` seen by `cam`, drawn with `rng`."""
    out_w, out_h = cam.size
    mat = _draw_person(ident, cam, rng, 2 * out_w, 2 * out_h, facing_back=bool(rng.uniform() < 0.5),
                       mirror=bool(rng.uniform() < 0.5))
    if rng.uniform() < 0.15:  # a passer-by or object partly in front of the person
        w = int(rng.uniform(0.3, 0.6) * out_w)
        y0 = int(rng.uniform(0.9, 1.6) * out_h)
        x0 = 0 if rng.uniform() < 0.5 else 2 * out_w - w
        mat[y0:, x0:x0 + w] = OCCLUDER
    if cam.infrared:
        palette = np.repeat(ident.thermal[:, None], 3, axis=1)
        palette[SKIN] = np.clip(palette[SKIN] + rng.uniform(-0.05, 0.05), 0, 1)
        palette[OCCLUDER] = np.full(3, rng.uniform(0.1, 0.5))
    else:
        palette = ident.colors.copy()
        palette[OCCLUDER] = rng.uniform(0.1, 0.9, 3)
    # Palette lookup and 2x box downsampling in PIL (anti-aliased edges, fast).
    person = Image.fromarray(mat, "P")
    person.putpalette((palette * 255 + 0.5).astype(np.uint8).reshape(-1).tolist())
    person = np.asarray(person.convert("RGB").reduce(2), dtype=np.float32) / 255.0
    alpha = np.asarray(Image.fromarray(((mat != BG) * 255).astype(np.uint8)).reduce(2), dtype=np.float32)[..., None] / 255.0
    # Soft shading across the body and cloth texture on the person only.
    xs = np.linspace(-1.0, 1.0, out_w, dtype=np.float32)[None, :, None]
    texture = rng.standard_normal((out_h, out_w, 1), dtype=np.float32) * np.float32(0.05 if cam.infrared else 0.03)
    person *= (0.88 + 0.12 * np.cos(xs * np.float32(np.pi / 2))) + texture
    img = person * alpha + _background(cam, out_w, out_h, rng) * (1 - alpha)
    img *= (cam.gain * rng.uniform(0.85, 1.15) * cam.cast).astype(np.float32)
    if cam.infrared:
        img = np.clip(img[..., :1], 0, 1) ** np.float32(rng.uniform(0.85, 1.15))
    img = np.clip(img, 0, 1)
    if cam.blur > 0.05:
        pil = Image.fromarray(((img[..., 0] if cam.infrared else img) * 255 + 0.5).astype(np.uint8))
        pil = pil.filter(ImageFilter.GaussianBlur(cam.blur))
        img = np.asarray(pil, dtype=np.float32).reshape(img.shape) / 255.0
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(cam.noise)
    img = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    if cam.infrared:
        img = np.repeat(img, 3, axis=2)
    return Image.fromarray(img)


def _background(cam, width, height, rng):
    """[height, width, 3] float32 background of the camera, slightly jittered per image."""
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = cam.wall.astype(np.float32) * (1 - t) + cam.wall2.astype(np.float32) * t
    img[int(cam.horizon * height):] = cam.floor
    shift = rng.uniform(-0.03, 0.03) * width
    for x0, y0, x1, y1, color in cam.objects:
        xa, xb = int(x0 * width + shift), int(x1 * width + shift)
        ya, yb = int(y0 * height), int(y1 * height)
        img[max(ya, 0):max(yb, 0), max(xa, 0):max(xb, 0)] = color
    return img


# --------------------------------------------------------------------------------------------
# parallel writing


def _save(task):
    path, seed, pid, cam_key, infrared, size, index = task
    ident = make_identity(seed, pid)
    cam = make_camera(seed, cam_key, infrared, size)
    img = render(ident, cam, _rng(seed, _IMG_STREAM, pid, cam_key, int(infrared), index))
    if path.lower().endswith(".bmp"):
        img.save(path)
    else:
        img.save(path, quality=92)
    return path


def _write_images(tasks, workers):
    """Render and save every task (path, seed, pid, cam_key, infrared, size, index)."""
    for folder in sorted({os.path.dirname(t[0]) for t in tasks}):
        os.makedirs(folder, exist_ok=True)
    workers = workers or 1
    if workers == 1 or len(tasks) < 64:
        for task in tasks:
            _save(task)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_save, tasks, chunksize=32))


def _write_text(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _write_manifest(root, info):
    info = dict(info, generator="data/synthetic.py", version=_GEN_VERSION)
    _write_text(os.path.join(root, "synthetic.json"), json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# SYSU-MM01


def sysu_plan(num_train, num_val, num_test, seed, images_per_cam=6):
    """The SYSU-layout identity plan: real ids, split and images per (id, camera).

    Ids are scattered over 1..~1.3*total (the real ids are not contiguous either). Each id
    is seen indoors (cams 1, 2, 3), outdoors (4, 5, 6) or both, and may miss one RGB camera
    of its group; it always has at least one RGB and one IR camera. Returns a dict with
    ``train``, ``val``, ``test`` (sorted id lists) and ``counts`` {(cam, id): n}.
    """
    rng = _rng(seed, _SPLIT_STREAM, 1)
    total = num_train + num_val + num_test
    pool = np.arange(1, int(total * 1.3) + 2)
    ids = np.sort(rng.choice(pool, total, replace=False))
    order = rng.permutation(total)
    train = sorted(int(x) for x in ids[order[:num_train]])
    val = sorted(int(x) for x in ids[order[num_train:num_train + num_val]])
    test = sorted(int(x) for x in ids[order[num_train + num_val:]])
    counts = {}
    for pid in sorted(int(x) for x in ids):
        r = _rng(seed, _SPLIT_STREAM, 2, pid)
        where = r.choice(3, p=[0.6, 0.2, 0.2])  # both, indoor only, outdoor only
        groups = [SYSU_INDOOR, SYSU_OUTDOOR] if where == 0 else [(SYSU_INDOOR, SYSU_OUTDOOR)[where - 1]]
        for group in groups:
            rgb = [c for c in group if c in SYSU_RGB_CAMS]
            if r.uniform() < 0.25:
                rgb.remove(rgb[int(r.integers(len(rgb)))])
            for cam in rgb + [c for c in group if c in SYSU_IR_CAMS]:
                counts[(cam, pid)] = int(max(2, images_per_cam + r.integers(-2, 3)))
    return {"train": train, "val": val, "test": test, "counts": counts}


def _rand_perm_cam(counts, max_id, seed):
    """The content of the official SYSU ``exp/rand_perm_cam.mat`` for the images in `counts`.

    Layout (what ``scipy.io.loadmat(path)["rand_perm_cam"]`` returns for the file that
    :func:`write_sysu` writes, and what readers of the real file index):

    * a 6 x 1 object array (a MATLAB 6 x 1 cell array), one cell per camera 1..6;
    * cell ``[cam - 1][0]`` is a `max_id` x 1 object array (an N x 1 cell array, N the number
      of ids) indexed by person id - 1 over the real ids 1..`max_id` (not by a position in an
      id list);
    * element ``[pid - 1, 0]`` is a uint8 matrix of 10 rows, one per trial, each row a random
      permutation of that identity's 1-based image numbers in that camera (``0001.jpg`` is 1):
      10 x n for n images, 10 x 0 where the identity has no image in that camera, so that a
      row ``[trial]`` is always an (empty) array.

    The numbers are integers (uint8), not float64, so readers that format them as file names
    with an integer format code (``"%04d"`` or ``"{:0>4d}".format(x)`` after ``.tolist()``)
    work. uint8 bounds n to 255 images per (identity, camera); larger counts raise ValueError.
    """
    cells = np.empty((6, 1), dtype=object)
    for cam in range(1, 7):
        per_id = np.empty((max_id, 1), dtype=object)
        for pid in range(1, max_id + 1):
            n = counts.get((cam, pid), 0)
            if n > np.iinfo(np.uint8).max:
                raise ValueError("rand_perm_cam.mat stores image numbers as uint8: camera %d, id %d has %d images (max 255)"
                                 % (cam, pid, n))
            r = _rng(seed, _SPLIT_STREAM, 3, cam, pid)
            per_id[pid - 1, 0] = np.array([r.permutation(n) + 1 for _ in range(10)], dtype=np.uint8).reshape(10, n)
        cells[cam - 1, 0] = per_id
    return cells


def write_sysu(root, num_train=24, num_val=6, num_test=20, seed=0, images_per_cam=6, workers=1):
    """Write a SYSU-MM01-layout dataset under `root` (created; must not hold a dataset)."""
    from scipy.io import savemat

    plan = sysu_plan(num_train, num_val, num_test, seed, images_per_cam)
    tasks = []
    for (cam, pid), n in sorted(plan["counts"].items()):
        for k in range(1, n + 1):
            path = os.path.join(root, "cam%d" % cam, "%04d" % pid, "%04d.jpg" % k)
            tasks.append((path, seed, pid, cam, cam in SYSU_IR_CAMS, SYSU_CAM_SIZES[cam], k))
    _write_images(tasks, workers)
    exp = os.path.join(root, "exp")
    for name in ("train", "val", "test"):
        _write_text(os.path.join(exp, "%s_id.txt" % name), ",".join(str(x) for x in plan[name]) + "\n")
    max_id = max(pid for _, pid in plan["counts"])
    savemat(os.path.join(exp, "rand_perm_cam.mat"), {"rand_perm_cam": _rand_perm_cam(plan["counts"], max_id, seed)})
    _write_manifest(root, {"layout": "sysu", "seed": seed, "train": num_train, "val": num_val, "test": num_test,
                           "images_per_cam": images_per_cam, "images": len(tasks)})
    return plan


# --------------------------------------------------------------------------------------------
# RegDB


def write_regdb(root, num_ids=20, seed=0, images_per_id=10, workers=1):
    """Write a RegDB-layout dataset: Visible/<id>/, Thermal/<id>/ .bmp and 10 trials' lists.

    Each trial splits the ids at random into halves; lists are in ascending id order with
    labels 0..n-1 (train and test separately), visible and thermal lists aligned.
    """
    ids = list(range(1, num_ids + 1))
    tasks, names = [], {}
    for pid in ids:
        r = _rng(seed, _SPLIT_STREAM, 4, pid)
        gender = "female" if r.uniform() < 0.5 else "male"
        side = "front" if r.uniform() < 0.5 else "back"
        frame0 = int(r.integers(100, 90000))
        for mod, folder, letter in (("v", "Visible", "v"), ("t", "Thermal", "t")):
            for k in range(images_per_id):
                rel = "%s/%d/%s_%s_%s_%05d_%d.bmp" % (folder, pid, gender, side, letter, frame0 + 3 * k, pid)
                names.setdefault((mod, pid), []).append(rel)
                # Visible and thermal frames are captured together: same pose (same index).
                tasks.append((os.path.join(root, rel), seed, pid, 1, mod == "t", REGDB_SIZE, k))
    _write_images(tasks, workers)
    for trial in range(1, 11):
        perm = _rng(seed, _SPLIT_STREAM, 5, trial).permutation(ids)
        train = sorted(int(x) for x in perm[: num_ids // 2])
        test = sorted(int(x) for x in perm[num_ids // 2:])
        for split, members in (("train", train), ("test", test)):
            for mod, word in (("v", "visible"), ("t", "thermal")):
                lines = ["%s %d" % (rel, label) for label, pid in enumerate(members) for rel in sorted(names[(mod, pid)])]
                _write_text(os.path.join(root, "idx", "%s_%s_%d.txt" % (split, word, trial)), "\n".join(lines) + "\n")
    _write_manifest(root, {"layout": "regdb", "seed": seed, "ids": num_ids, "images_per_id": images_per_id,
                           "images": len(tasks)})


# --------------------------------------------------------------------------------------------
# LLCM


def llcm_plan(num_train, num_test, seed, images_per_cam=3):
    """Ids (1..n), split, and images per (modality, camera, id) for the LLCM layout.

    Every id is seen by 2-4 of the 9 cameras in each modality (cameras switch between
    visible and near-infrared, so the two sets differ). Test NIR images avoid camera 3 as
    the released test lists do.
    """
    rng = _rng(seed, _SPLIT_STREAM, 6)
    ids = list(range(1, num_train + num_test + 1))
    perm = rng.permutation(ids)
    train = sorted(int(x) for x in perm[:num_train])
    test = sorted(int(x) for x in perm[num_train:])
    counts = {}
    for pid in ids:
        r = _rng(seed, _SPLIT_STREAM, 7, pid)
        for mod in ("vis", "nir"):
            cams = LLCM_NIR_TEST_CAMS if (mod == "nir" and pid in test) else LLCM_CAMS
            for cam in sorted(r.choice(cams, int(r.integers(2, 5)), replace=False)):
                counts[(mod, int(cam), pid)] = int(max(1, images_per_cam + r.integers(-1, 2)))
    return {"train": train, "test": test, "counts": counts}


def _llcm_name(seed, mod, cam, pid, k):
    r = _rng(seed, _SPLIT_STREAM, 8, cam, pid, int(mod == "nir"))
    stamp = int(r.integers(100000, 235959))
    return "%04d_c%02d_s%06d_f%d_%s.jpg" % (pid, cam, stamp, int(r.integers(1000, 9000)) + 7 * k, mod)


def write_llcm(root, num_train=20, num_test=20, seed=0, images_per_cam=3, workers=1):
    """Write an LLCM-layout dataset: training folders vis/ nir/, test_vis/ test_nir/, idx/."""
    plan = llcm_plan(num_train, num_test, seed, images_per_cam)
    test = set(plan["test"])
    tasks, lists = [], {}
    for (mod, cam, pid), n in sorted(plan["counts"].items()):
        for k in range(n):
            name = _llcm_name(seed, mod, cam, pid, k)
            if pid in test:
                rel = "test_%s/cam%d/%04d/%s" % (mod, cam, pid, name)
            else:
                rel = "%s/%04d/%s" % (mod, pid, name)
            lists.setdefault(("test" if pid in test else "train", mod), []).append((pid, rel))
            tasks.append((os.path.join(root, rel), seed, pid, cam, mod == "nir", LLCM_SIZE, k))
    _write_images(tasks, workers)
    for (split, mod), rows in lists.items():
        members = plan[split]
        label = {pid: i for i, pid in enumerate(members)}
        rows = sorted(rows, key=lambda r: (r[0], r[1]))
        text = "\n".join("%s %d" % (rel, label[pid]) for pid, rel in rows) + "\n"
        _write_text(os.path.join(root, "idx", "%s_%s.txt" % (split, mod)), text)
    _write_text(os.path.join(root, "idx", "test_id.txt"), ",".join(str(x) for x in plan["test"]) + "\n")
    _write_manifest(root, {"layout": "llcm", "seed": seed, "train": num_train, "test": num_test,
                           "images_per_cam": images_per_cam, "images": len(tasks)})
    return plan
