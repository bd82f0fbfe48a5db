"""The toy world: a small, fully known picture world in which BLIP-Diffusion can be trained end to end
on a laptop; its attribute oracle, which reads the pictures back, is in oracle.py.

Real subject-driven generation is judged with DINO and CLIP similarities on photographs (DreamBooth's
metrics, used by the BLIP-Diffusion paper, sec. 4). Here every picture is drawn by this file from a
known identity, so "did the model keep the subject?" has an exact answer: the oracle (oracle.py, a
small CNN trained on the world's own pictures) names the category, body colour, pattern and context of any
picture, and its penultimate features stand in for DINO's in cosine-similarity scores.

The world:
  identity  (category, body colour, pattern, pattern colour): 6 silhouettes x 8 colours x (plain, or
            4 patterns x 7 other colours) = 1392 identities. A fixed 10% of them, a seeded
            permutation of the sorted tuples, is held out of all training for zero-shot evaluation.
  context   8 backgrounds a person tells apart at a glance, each procedurally textured and varied.
  sample    the identity drawn at a random position, scale and slight rotation on a context: the
            RGB image, the true alpha mask, the caption ("a red striped ball on the grass"; the
            pattern colour is left to the picture, as a real subject's details are), the category
            word and the attribute labels.

Shapes and patterns are signed distance functions (Inigo Quilez's 2D SDFs for the star and the heart);
a pixel's coverage is clip(0.5 - distance in pixels, 0, 1), which antialiases every edge with no
supersampling. Each subject has a thin outline in a darker shade of its body colour, so it stays
visible on a background of its own colour (a green ball on grass, a white one in snow).

    python toyworld.py show --out sheet.png
    python toyworld.py train-oracle --out weights/toy/oracle.safetensors
    python toyworld.py eval-oracle --weights weights/toy/oracle.safetensors
    python toyworld.py data --out runs/toy/data          # a training set on disk (toymodel.py runs it)
    python toyworld.py data --n 64 --backgrounds 0 --inputs --out examples/toy-data   # train.py --data toy
    python toyworld.py examples                          # examples/: the README's held-out subjects
    python toyworld.py evaluate --weights weights/toy   # the toy Table 1, read by the oracle (toyeval.py)
    python toyworld.py probe --weights weights/toy      # what the image tower and subject embeddings hold
"""

import functools
import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from checkpoint import write_atomically, write_folder_atomically
from pairs import confidence_from_mask
from shards import ShardWriter

# ---------------------------------------------------------------------------------------------
# The world's vocabulary
# ---------------------------------------------------------------------------------------------

CATEGORIES = ("ball", "box", "star", "heart", "ring", "cup")
COLORS = {  # everyday colour words -> RGB in [0, 1], far apart so a glance (and a small CNN) tells them apart
    "red": (0.85, 0.10, 0.10), "orange": (1.00, 0.55, 0.05), "yellow": (1.00, 0.90, 0.10),
    "green": (0.10, 0.70, 0.20), "blue": (0.10, 0.30, 0.95), "purple": (0.55, 0.15, 0.75),
    "pink": (1.00, 0.55, 0.78), "white": (0.97, 0.97, 0.97),
}
# Pattern -> the adjective the caption uses ("plain" says nothing: "a red ball").
PATTERNS = {"plain": "", "stripes": "striped", "dots": "dotted", "checks": "checked", "band": "banded"}
CONTEXTS = ("on the grass", "in the snow", "on the beach", "at night", "underwater", "in the desert",
            "on a wooden table", "in the city")


class Identity(NamedTuple):
    """One subject: what stays the same in every picture of it. pattern_color is None when plain."""
    category: str
    color: str
    pattern: str
    pattern_color: Optional[str]


@dataclass(frozen=True)
class WorldConfig:
    size: int = 64  # pixels; big enough that six silhouettes and five patterns read at a glance
    heldout_fraction: float = 0.1  # identities never used in training, for zero-shot evaluation
    split_seed: int = 0  # the held-out split is a permutation of the sorted identities by this seed
    scale: tuple = (0.2, 0.31)  # the subject's half-extent as a fraction of the image side
    max_rotation: float = 0.35  # radians either way; varies stripe angles without turning a heart over


@dataclass
class Sample:
    image: Image.Image  # RGB, size x size
    mask: np.ndarray  # (H, W) float32 alpha in [0, 1], antialiased edges
    caption: str  # "a red striped ball on the grass"
    category: str  # the subject word, "ball"
    attributes: dict  # category, color, pattern, pattern_color (None when plain), context


def all_identities():
    """Every identity, in a fixed order (the vocabulary's)."""
    out = []
    for category, color, pattern in itertools.product(CATEGORIES, COLORS, PATTERNS):
        if pattern == "plain":
            out.append(Identity(category, color, pattern, None))
        else:
            out += [Identity(category, color, pattern, c) for c in COLORS if c != color]
    return out


@functools.lru_cache(maxsize=None)
def identities(split="train", cfg=WorldConfig()):
    """The identities of a split: "train", "heldout" or "all", in the vocabulary's order (a tuple)."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f'split is "train", "heldout" or "all", got {split!r}')
    everything = tuple(all_identities())
    if split == "all":
        return everything
    order = np.random.default_rng(cfg.split_seed).permutation(len(everything))
    held = set(order[:round(cfg.heldout_fraction * len(everything))].tolist())
    return tuple(ident for i, ident in enumerate(everything) if (i in held) == (split == "heldout"))


def caption(identity, context):
    words = ["a", identity.color, PATTERNS[identity.pattern], identity.category, context]
    return " ".join(w for w in words if w)


# ---------------------------------------------------------------------------------------------
# Subjects: signed distance functions in the subject's own frame (units of its half-extent, y down)
# ---------------------------------------------------------------------------------------------

def _length(x, y):
    return np.sqrt(x * x + y * y)


def sdf_box(x, y, hx, hy, radius=0.0):
    """Rounded rectangle centred at the origin with half-sizes (hx, hy)."""
    qx, qy = np.abs(x) - hx + radius, np.abs(y) - hy + radius
    return _length(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - radius


def sdf_star(x, y, r=1.0, rf=0.5):
    """Five-pointed star, one point up, points at radius r, inner radius r * rf (Quilez's sdStar5)."""
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    x, y = np.abs(x), -y  # Quilez's y points up
    d = np.maximum(k1x * x + k1y * y, 0)
    x, y = x - 2 * d * k1x, y - 2 * d * k1y
    d = np.maximum(k2x * x + k2y * y, 0)
    x, y = x - 2 * d * k2x, y - 2 * d * k2y
    x, y = np.abs(x), y - r
    bax, bay = rf * -k1y, rf * k1x - 1
    h = np.clip((x * bax + y * bay) / (bax * bax + bay * bay), 0, r)
    return _length(x - bax * h, y - bay * h) * np.sign(y * bax - x * bay)


def sdf_heart(x, y):
    """Heart, lobes up, filling about [-1, 1]^2 (Quilez's sdHeart, scaled and centred)."""
    s = 0.58  # sdHeart spans x in [-0.6, 0.6], y in [0, 1.1]: shrink our frame into it
    x, y = np.abs(x) * s, -y * s + 0.55
    lobe = _length(x - 0.25, y - 0.75) - math.sqrt(2) / 4
    t = 0.5 * np.maximum(x + y, 0)
    point = np.sqrt(np.minimum((x * x + (y - 1) ** 2), (x - t) ** 2 + (y - t) ** 2)) * np.sign(x - y)
    return np.where(x + y > 1, lobe, point) / s


def subject_sdf(category, x, y):
    if category == "ball":
        return _length(x, y) - 0.95
    if category == "box":
        return sdf_box(x, y, 0.8, 0.8, 0.08)
    if category == "star":
        return sdf_star(x, y + 0.08, 1.08, 0.5)  # nudged down: a star's points reach further up than down
    if category == "heart":
        return sdf_heart(x, y)
    if category == "ring":
        return np.abs(_length(x, y) - 0.68) - 0.3
    if category == "cup":  # a mug: body plus a handle, the half-annulus right of the body
        body = sdf_box(x + 0.2, y - 0.05, 0.6, 0.75, 0.12)
        handle = np.maximum(np.abs(_length(x - 0.42, y) - 0.34) - 0.11, 0.42 - x)
        return np.minimum(body, handle)
    raise ValueError(f"unknown category {category!r}; one of {', '.join(CATEGORIES)}")


def pattern_sdf(pattern, x, y, phase):
    """Signed distance to the pattern's marks (negative inside). Marks cover about a third of the
    surface or less, so the body colour is always the majority and the colour label unambiguous."""
    if pattern == "stripes":
        period = 0.42
        s = (y / period + phase[0]) % 1.0
        return (np.abs(s - 0.5) - 0.19) * period
    if pattern == "dots":
        period = 0.46
        sx, sy = (x / period + phase[0]) % 1.0 - 0.5, (y / period + phase[1]) % 1.0 - 0.5
        return _length(sx, sy) * period - 0.11
    if pattern == "checks":  # gingham: thin lines both ways
        period = 0.5
        sx, sy = (x / period + phase[0]) % 1.0, (y / period + phase[1]) % 1.0
        return np.minimum(np.abs(sx - 0.5) - 0.14, np.abs(sy - 0.5) - 0.14) * period
    if pattern == "band":
        return np.abs(y - 0.3 * (phase[0] - 0.5)) - 0.2
    if pattern == "plain":
        return np.full_like(x, np.inf)
    raise ValueError(f"unknown pattern {pattern!r}; one of {', '.join(PATTERNS)}")


def coverage(distance_px):
    """Fraction of a pixel inside a shape whose signed distance (in pixels) at its centre is given:
    a one-pixel linear ramp across the edge, exact for straight edges."""
    return np.clip(0.5 - distance_px, 0.0, 1.0)


def draw_subject(identity, rng, size, cfg=WorldConfig()):
    """-> (rgb (H, W, 3), alpha (H, W)) of the subject at a random place, scale and rotation."""
    px = size / 64  # pixel lengths below are given at 64 px
    radius = rng.uniform(*cfg.scale) * size
    margin = 1.15 * radius + 1  # a rotated box's corner reaches 1.13 half-extents out
    cx, cy = rng.uniform(margin, size - margin, 2)
    angle = rng.uniform(-cfg.max_rotation, cfg.max_rotation)
    phase = rng.uniform(0, 1, 2)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    c, s = math.cos(angle), math.sin(angle)
    x = (c * (xx - cx) + s * (yy - cy)) / radius  # (H, W) subject frame, in half-extents
    y = (-s * (xx - cx) + c * (yy - cy)) / radius
    d = subject_sdf(identity.category, x, y) * radius  # pixels
    body = np.array(COLORS[identity.color]) + rng.uniform(-0.03, 0.03, 3)
    fill = np.broadcast_to(body, (size, size, 3))
    if identity.pattern != "plain":
        marks = coverage(pattern_sdf(identity.pattern, x, y, phase) * radius)[..., None]
        mark_rgb = np.array(COLORS[identity.pattern_color]) + rng.uniform(-0.03, 0.03, 3)
        fill = fill + marks * (mark_rgb - fill)
    if identity.category == "ball":  # soft light from the upper left, so it reads as a sphere
        fill = fill * (1.12 - 0.3 * _length(x + 0.35, y + 0.35)[..., None] / 1.35)
    outline = 0.35 * fill  # a darker shade of the surface, so it shows on any background
    inner = coverage(d + 1.1 * px)[..., None]
    rgb = outline + inner * (fill - outline)
    return np.clip(rgb, 0, 1), coverage(d).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Contexts: procedural backgrounds, (H, W, 3) in [0, 1]
# ---------------------------------------------------------------------------------------------

def smooth_noise(rng, size, cells_y, cells_x=None):
    """Value noise in [0, 1]: a random (cells_y + 1, cells_x + 1) grid, bicubic-upsampled to size."""
    grid = rng.random((cells_y + 1, (cells_x or cells_y) + 1)).astype(np.float32)
    return np.clip(np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC)), 0, 1)


def vertical_gradient(size, top, bottom, start=0.0, stop=1.0):
    t = np.clip((np.arange(size) / (size - 1) - start) / max(stop - start, 1e-6), 0, 1)[:, None, None]
    return np.broadcast_to(np.array(top) + t * (np.array(bottom) - np.array(top)), (size, size, 3))


def jitter(rng, rgb, amount=0.06):
    return np.clip(np.array(rgb) + rng.uniform(-amount, amount, 3), 0, 1)


def specks(rng, size, count, radius_px):
    """Soft round specks at random places -> (H, W) in [0, 1]."""
    cy, cx, r = (rng.uniform(0, size, count), rng.uniform(0, size, count), rng.uniform(0.5, 1.0, count) * radius_px)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    d = _length(xx - cx[:, None, None], yy - cy[:, None, None]) - r[:, None, None]  # (count, H, W)
    return coverage(d.min(axis=0, initial=np.inf))


def mix(base, rgb, amount):
    return base + amount[..., None] * (np.array(rgb) - base)


def background(context, rng, size):
    px = size / 64
    v = (np.arange(size)[:, None] + 0.5) / size  # (H, 1) height, 0 at the top
    u = (np.arange(size)[None, :] + 0.5) / size  # (1, W)
    if context == "on the grass":  # green with vertical blades and a few flowers
        img = jitter(rng, (0.25, 0.58, 0.18)) * (0.75 + 0.35 * smooth_noise(rng, size, 4))[..., None]
        blades = smooth_noise(rng, size, 6, size // 2)
        img = img * (0.8 + 0.4 * blades)[..., None]
        return mix(img, jitter(rng, (1.0, 0.95, 0.4), 0.1), specks(rng, size, rng.integers(0, 6), 1.2 * px))
    if context == "in the snow":  # pale sky, white ground with blue shadows, falling flakes
        horizon = rng.uniform(0.2, 0.4)
        img = vertical_gradient(size, jitter(rng, (0.70, 0.78, 0.88)), (0.85, 0.88, 0.93), 0, horizon)
        ground = (0.93, 0.95, 0.98) * (0.9 + 0.12 * smooth_noise(rng, size, 5))[..., None]
        img = np.where((v > horizon)[..., None], ground, img)
        return mix(img, (1.0, 1.0, 1.0), specks(rng, size, rng.integers(15, 35), 0.9 * px))
    if context == "on the beach":  # sky, sea with a foam line, sand
        sea, sand = rng.uniform(0.15, 0.3), rng.uniform(0.38, 0.5)
        img = vertical_gradient(size, jitter(rng, (0.45, 0.72, 0.95)), (0.75, 0.88, 1.0), 0, sea)
        img = np.where((v > sea)[..., None], jitter(rng, (0.05, 0.42, 0.68)) * (0.9 + 0.15 * smooth_noise(rng, size, 8, 3))[..., None], img)
        img = np.where((v > sand)[..., None], jitter(rng, (0.92, 0.82, 0.58)) * (0.9 + 0.12 * smooth_noise(rng, size, 16))[..., None], img)
        return mix(img, (1.0, 1.0, 1.0), coverage(np.abs(v - sand) * size - 1.0 * px))
    if context == "at night":  # dark blue sky, stars and a moon
        img = vertical_gradient(size, (0.01, 0.01, 0.06), jitter(rng, (0.08, 0.08, 0.25), 0.04))
        img = mix(img, (1.0, 1.0, 0.85), specks(rng, size, rng.integers(15, 35), 0.6 * px))
        mx, my = rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.25)
        return mix(img, (0.98, 0.95, 0.75), coverage((_length(u - mx, v - my) - 0.07) * size))
    if context == "underwater":  # teal deepening downwards, wavy light, bubbles
        img = vertical_gradient(size, jitter(rng, (0.15, 0.65, 0.75)), (0.02, 0.20, 0.40))
        warp = smooth_noise(rng, size, 3)
        light = np.sin((u * 3 + v * 2 + warp) * rng.uniform(8, 14)) * np.sin((u * 2 - v * 3 + warp) * 11)
        img = img * (0.9 + 0.2 * np.clip(light, 0, 1))[..., None]
        return mix(img, (0.75, 0.95, 1.0), 0.6 * specks(rng, size, rng.integers(3, 9), 1.8 * px))
    if context == "in the desert":  # hot pale sky, a sun, orange dunes with ridges
        horizon = rng.uniform(0.2, 0.38)
        img = vertical_gradient(size, jitter(rng, (0.55, 0.78, 0.95)), (0.95, 0.90, 0.75), 0, horizon)
        img = mix(img, (1.0, 0.97, 0.75), coverage((_length(u - rng.uniform(0.1, 0.9), v - horizon / 2) - 0.06) * size))
        dunes = np.sin(u * rng.uniform(4, 9) + v * rng.uniform(14, 22) + 3 * smooth_noise(rng, size, 2))
        sand = jitter(rng, (0.90, 0.58, 0.25), 0.04) * (0.88 + 0.12 * dunes)[..., None]
        return np.where((v > horizon + 0.04 * np.sin(u * 6 + rng.uniform(0, 6)))[..., None], sand, img)
    if context == "on a wooden table":  # brown planks with grain, seen from above
        grain = np.sin(v * rng.uniform(60, 90) + 6 * smooth_noise(rng, size, 3, 1) + 2 * u)
        img = jitter(rng, (0.55, 0.33, 0.16), 0.05) * (0.85 + 0.1 * grain + 0.1 * smooth_noise(rng, size, 6))[..., None]
        plank = rng.uniform(0.22, 0.34)
        seams = coverage((np.abs((v + rng.uniform(0, 1)) % plank - plank / 2) - plank / 2 + 0.012) * -size)
        return img * (1 - 0.55 * seams)[..., None]
    if context == "in the city":  # sky, grey buildings with lit windows, a street
        img = vertical_gradient(size, jitter(rng, (0.50, 0.65, 0.85)), (0.85, 0.80, 0.75))
        street = rng.uniform(0.78, 0.88)
        x0 = 0.0
        while x0 < 1:
            w, top = rng.uniform(0.12, 0.3), rng.uniform(0.05, 0.5)
            grey = rng.uniform(0.3, 0.6) * np.array((1.0, 1.0, 1.05))
            inside = (u >= x0) & (u < x0 + w) & (v >= top)
            windows = ((u - x0) * size / px % 6 < 3) & ((v - top) * size / px % 7 < 3.5) & (rng.random((size, size)) < 0.85)
            building = np.where((windows & inside)[..., None], jitter(rng, (0.95, 0.85, 0.45), 0.05), grey)
            img = np.where(inside[..., None], building, img)
            x0 += w + rng.uniform(0, 0.04)
        return np.where((v > street)[..., None], jitter(rng, (0.25, 0.25, 0.27), 0.03), img)
    raise ValueError(f"unknown context {context!r}; one of {', '.join(CONTEXTS)}")


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------

def render(identity, context, rng, size=64, cfg=WorldConfig()):
    """One picture of `identity` in `context`; every random choice (place, scale, rotation, texture)
    comes from the numpy Generator `rng`, so a seed fixes the picture."""
    identity = Identity(*identity)
    back = background(context, rng, size)
    rgb, alpha = draw_subject(identity, rng, size, cfg)
    image = back + alpha[..., None] * (rgb - back)
    attributes = {"category": identity.category, "color": identity.color, "pattern": identity.pattern,
                  "pattern_color": identity.pattern_color, "context": context}
    return Sample(Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)), alpha,
                  caption(identity, context), identity.category, attributes)


def sample(rng, split="train", cfg=WorldConfig()):
    """A picture of a random identity of `split` in a random context."""
    pool = identities(split, cfg)
    identity = pool[rng.integers(len(pool))]
    return render(identity, CONTEXTS[rng.integers(len(CONTEXTS))], rng, cfg.size, cfg)


# ---------------------------------------------------------------------------------------------
# Labels: what the oracle (oracle.py) reads back, and fresh labelled batches
# ---------------------------------------------------------------------------------------------

def default_heads():
    return {"category": list(CATEGORIES), "color": list(COLORS), "pattern": list(PATTERNS),
            "context": list(CONTEXTS)}


def labels(attributes, heads=None):
    """{attribute: index} of one sample's attributes, in the oracle's label order."""
    heads = heads or default_heads()
    return {name: classes.index(attributes[name]) for name, classes in heads.items()}


def batch(rng, n, split="train", cfg=WorldConfig()):
    """n fresh samples -> ((n, 3, S, S) tensor in [0, 1], {attribute: (n,) labels}, the samples)."""
    samples = [sample(rng, split, cfg) for _ in range(n)]
    x = torch.from_numpy(np.stack([np.asarray(s.image) for s in samples])).permute(0, 3, 1, 2).float() / 255
    ys = [labels(s.attributes) for s in samples]
    return x, {name: torch.tensor([y[name] for y in ys]) for name in default_heads()}, samples


def paste_on_other_context(s, rng):
    """Stage 2's prompted-context input made with the world's true mask: the subject of sample `s`
    pasted on a fresh picture of another context (pairs.py does this with CLIPSeg and matting)."""
    other = CONTEXTS[(CONTEXTS.index(s.attributes["context"]) + rng.integers(1, len(CONTEXTS))) % len(CONTEXTS)]
    back = background(other, rng, s.image.height)
    composite = back + s.mask[..., None] * (np.asarray(s.image, np.float32) / 255 - back)
    return Image.fromarray(np.round(np.clip(composite, 0, 1) * 255).astype(np.uint8))


def write_data(args):
    """A training set on disk, in the manifests train.py and pairs.py read: N pictures of training
    identities with their true masks, and pictures of every context with no subject (the backgrounds
    stage 2 pastes subjects on). records.jsonl captions the whole picture (stages 0 and 1); pairs.jsonl
    gives pairs.py the context phrase as the caption, the prompt a user types for a subject. With
    --inputs, subject.jsonl holds stage 2's pairs made with the true mask (paste_on_other_context),
    drawn from a generator of their own, so the pictures are the same with or without them. With
    --shards the same data also as tar shards (shards.py's layout, --shard-size samples each) that
    train.py streams: shards/ (KEY.png, KEY.txt, KEY.json: stages 0 and 1) and, with --inputs,
    subject-shards/ (KEY.input.png, KEY.target.png, KEY.json: stage 2, as pairs.py --shards)."""
    rng, paste_rng = np.random.default_rng(args.seed), np.random.default_rng([args.seed, 1])

    def write(tmp):
        for sub in ("images", "masks", "backgrounds") + (("inputs",) if args.inputs else ()):
            os.makedirs(os.path.join(tmp, sub))
        stage2 = []
        with open(os.path.join(tmp, "records.jsonl"), "w") as records, open(os.path.join(tmp, "pairs.jsonl"), "w") as pairs:
            for i in tqdm(range(args.n), desc="pictures", unit="image"):
                s = sample(rng, "train")
                name = f"{i:06d}.png"
                s.image.save(os.path.join(tmp, "images", name))
                Image.fromarray(np.round(s.mask * 255).astype(np.uint8)).save(os.path.join(tmp, "masks", name))
                rec = {"image": f"images/{name}", "mask": f"masks/{name}", "subject": s.category}
                records.write(json.dumps({**rec, "caption": s.caption, "context": s.attributes["context"]}) + "\n")
                pairs.write(json.dumps({**rec, "caption": s.attributes["context"]}) + "\n")
                if args.inputs:
                    paste_on_other_context(s, paste_rng).save(os.path.join(tmp, "inputs", name))
                    stage2.append({"input": f"inputs/{name}", "target": f"images/{name}", "subject": s.category,
                                   "caption": s.caption})
        if args.inputs:
            with open(os.path.join(tmp, "subject.jsonl"), "w") as f:
                f.writelines(json.dumps(rec) + "\n" for rec in stage2)
        for i in range(args.backgrounds):
            back = background(CONTEXTS[i % len(CONTEXTS)], rng, WorldConfig.size)
            Image.fromarray(np.round(np.clip(back, 0, 1) * 255).astype(np.uint8)).save(
                os.path.join(tmp, "backgrounds", f"{i:05d}.png"))
        if args.shards:
            write_shards(tmp, args.shard_size, stage2 if args.inputs else None)

    write_folder_atomically(args.out, write)
    print(f"wrote {args.n} pictures with masks and {args.backgrounds} backgrounds to {args.out} "
          f"(records.jsonl for train.py, pairs.jsonl for pairs.py"
          + (", subject.jsonl for train.py --stage subject)" if args.inputs else ")")
          + (f"; the same as tar shards in {args.out}/shards/" + (" and subject-shards/" if args.inputs else "")
             if args.shards else ""))


def write_shards(folder, size, stage2):
    """The pictures of `folder`'s records.jsonl (and the `stage2` pairs) as tar shards in `folder`."""
    def read(name):
        with open(os.path.join(folder, name), "rb") as f:
            return f.read()
    with open(os.path.join(folder, "records.jsonl")) as f:
        records = [json.loads(line) for line in f]
    kinds = {"shards": [{"png": read(rec["image"]), "txt": rec["caption"].encode(),
                         "json": json.dumps({"subject": rec["subject"], "context": rec["context"]}).encode()}
                        for rec in records]}
    if stage2 is not None:
        kinds["subject-shards"] = [{"input.png": read(rec["input"]), "target.png": read(rec["target"]),
                                    "json": json.dumps({"subject": rec["subject"], "caption": rec["caption"]}).encode()}
                                   for rec in stage2]
    for sub, samples in kinds.items():
        os.makedirs(os.path.join(folder, sub))
        for k in range(0, len(samples), size):
            with ShardWriter(os.path.join(folder, sub, f"{k // size:05d}.tar")) as shard:
                for i in range(k, min(k + size, len(samples))):
                    shard.add(f"{i:06d}", samples[i])  # the name of its picture in images/


# The README's subjects: held-out identities (never in training), one of a kind each.
EXAMPLES = {"red-dotted-ball": (Identity("ball", "red", "dots", "purple"), "on the beach"),
            "blue-checked-box": (Identity("box", "blue", "checks", "orange"), "on a wooden table"),
            "yellow-striped-star": (Identity("star", "yellow", "stripes", "red"), "at night"),
            "pink-dotted-star": (Identity("star", "pink", "dots", "green"), "on the grass")}


def write_examples(args):
    """examples/NAME.png: each of EXAMPLES drawn once, seeded by its position."""
    os.makedirs(args.out, exist_ok=True)
    for k, (name, (identity, context)) in enumerate(EXAMPLES.items()):
        if identity not in identities("heldout"):
            raise ValueError(f"{name} is not a held-out identity")
        image = render(identity, context, np.random.default_rng(k), WorldConfig.size).image
        write_atomically(os.path.join(args.out, f"{name}.png"), lambda tmp: image.save(tmp, format="PNG"))
    print(f"wrote {len(EXAMPLES)} held-out subjects to {args.out}/ ({', '.join(EXAMPLES)})")


def show(args):
    """A contact sheet: one row per context; with --masks, each picture followed by its true mask
    and a degraded confidence map."""
    rng = np.random.default_rng(args.seed)
    pool = identities(args.split)
    size, per = args.size, args.columns
    tiles = 3 if args.masks else 1
    sheet = np.zeros((len(CONTEXTS) * size, per * tiles * size, 3), np.uint8)
    for row, context in enumerate(CONTEXTS):
        for col in range(per):
            s = render(pool[rng.integers(len(pool))], context, rng, size)
            pics = [np.asarray(s.image)]
            if args.masks:
                pics += [np.repeat(np.round(m * 255).astype(np.uint8)[..., None], 3, -1)
                         for m in (s.mask, confidence_from_mask(s.mask, rng))]
            for t, pic in enumerate(pics):
                x0 = (col * tiles + t) * size
                sheet[row * size:(row + 1) * size, x0:x0 + size] = pic
    image = Image.fromarray(sheet)
    if args.zoom > 1:
        image = image.resize((image.width * args.zoom, image.height * args.zoom), Image.NEAREST)
    write_atomically(args.out, lambda tmp: image.save(tmp, format="PNG"))
    print(f"wrote a contact sheet of {len(CONTEXTS) * per} pictures ({size} px, one row per context) to {args.out}")


if __name__ == "__main__":
    # The commands include the oracle's and the evaluation's, which are built on this file; so the
    # command line lives above them all, in toyeval.py, and this is only its entry point.
    from toyeval import main
    main()
