"""Prompted context generation: the (input, target) pairs of BLIP-Diffusion's stage-2 pre-training.

BLIP-Diffusion (Li et al. 2023, sec. 3.2) teaches the model to render a subject in a new context by
showing it the subject cut out and pasted onto a random background (the input, seen by the multimodal
encoder) and asking it to generate the original image (the target). Per image and subject category:

  1. segment the subject with CLIPSeg, prompted with the category text        -> confidence p
  2. p >= --high is foreground, p >= --low (or within --band px of its edge) unknown, else background
                                                                                -> trimap
  3. closed-form matting (Levin et al. 2008) over the unknown pixels             -> alpha
  4. estimate the subject's foreground colours and alpha-blend them onto a random background image
  5. write both images and a record line

The paper publishes neither this code nor its thresholds, resolution or CLIPSeg variant (the authors
say in LAVIS issue #447 that the pre-training code will not be released); the defaults below are this
project's choices.

Data (--data), one of:
  - a JSONL manifest, one line per image: {"image": "photos/1.jpg", "subject": "dog",
    "caption": "a dog on a sofa"}; `image` is relative to the manifest's folder, `caption` defaults to
    "a {subject}";
  - a folder of images (.png .jpg .jpeg .webp .bmp, not recursive, sorted by name), all of the one
    category given by --subject, each with the caption "a {subject}".

Output (--out; stage 2 of train.py reads it):
  records.jsonl   {"input": "inputs/NAME.png", "target": "targets/NAME.png", "subject": ..., "caption": ...}
                  paths relative to --out; input = the composite, target = the original image, both the
                  same --size x --size crop (short side resized to --size, then the centre square).
  skipped.jsonl   {"image": ..., "name": NAME, "reason": ...} for unreadable images and unusable masks.
NAME is the item's position in --data and its file name (000012_dog). An interrupted run resumes: items
named in either file are not redone, so rerun with the same --data. Each image is written to a temporary
file and renamed, and its record line appended only after both exist. The background of item i is drawn
from (--seed, i), so the output does not depend on --workers.

With --shards (for LAION-scale data), OUT instead holds tar shards in shards.py's layout: 00000.tar
holds items 0 to --shard-size - 1 as NAME.input.jpg, NAME.target.jpg and NAME.json ({"subject",
"caption", "image"}), 00000_stats.json what was skipped and why. A shard is written whole or not at
all, so a rerun makes the missing ones; `--part I/N` makes shards I, I + N, ... only, for N machines
writing into one folder (or folders joined afterwards): the shards are the same however the work is
split.
"""

import functools
import io
import json
import math
import multiprocessing
import os
import re
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import matting
from checkpoint import write_text
from cli import Parser, add_threads, check_writable, real, use_threads, whole
from clipseg import CLIPSeg
from data import IMAGE_EXTENSIONS, ImageError, center_crop, image_files, read_image, read_manifest
from shards import ShardWriter, remove_leftovers



@dataclass
class Settings:
    size: int = 512  # SD-1.5's training resolution, which stage 2 trains at
    high: float = 0.6  # CLIPSeg probability from which a pixel is fixed as subject
    low: float = 0.1  # below this, fixed as background; in between the matting decides
    band: int = 8  # px either side of the subject's edge left to the matting (at 512 px): CLIPSeg
    #                predicts from a 22 x 22 token grid, so its edges are only approximate
    max_unknown: float = 0.4  # skip images whose unknown region exceeds this fraction: the matte would be
    #                           a guess, and the solve's cost grows with the unknown pixels


class Skip(Exception):
    """An item that cannot make a pair; the message is the reason written to skipped.jsonl."""


# ---------------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------------

def load_rgb(path, size, mode="RGB"):
    """The image at `path` as a (size, size, 3) uint8 array (mode "L": (size, size)): short side resized
    to `size`, centre crop."""
    try:
        image = read_image(path, mode)
    except ImageError as e:
        raise Skip(f"unreadable image: {e}") from None
    return np.asarray(center_crop(image, size, size))


class CLIPSegSegmenter:
    """CLIPSeg prompted with the category text: (image (H, W, 3) uint8, item) -> subject probability
    (H, W). The text goes in as it is ("dog"), as the paper says; no "a photo of a {}." template."""

    def __init__(self, folder):
        self.model = CLIPSeg.from_pretrained(folder)

    def __call__(self, image, item):
        p = self.model.segment([Image.fromarray(image)], [item["subject"]])  # (1, 352, 352)
        p = F.interpolate(p[None], size=image.shape[:2], mode="bilinear", align_corners=False)
        return p[0, 0].numpy()


def confidence_from_mask(mask, rng):
    """A CLIPSeg-like confidence map in [0, 1] from a true mask: what a segmenter that saw the
    picture through a coarse token grid would say. Shifted by up to 1 px, blurred (edges lose
    their place), dented by low-frequency noise (parts of the subject judged less sure) and pushed
    through a soft threshold. Its p >= 0.6 region is the subject's core, give or take an edge, so
    matting.trimap_from_confidence turns it into a sensible trimap. Sizes are relative to 64 px."""
    size = mask.shape[0]
    px = size / 64
    p = ndi.shift(mask.astype(np.float64), rng.uniform(-1.0, 1.0, 2) * px, order=1, mode="constant")
    p = ndi.gaussian_filter(p, rng.uniform(0.8, 1.6) * px)
    dents = np.asarray(Image.fromarray(rng.random((5, 5)).astype(np.float32)).resize((size, size), Image.BICUBIC))
    p = p + 0.25 * (np.clip(dents, 0, 1) - 0.5)  # value noise: a random 5 x 5 grid, upsampled
    p = 1 / (1 + np.exp(-rng.uniform(8, 12) * (p - rng.uniform(0.4, 0.55))))
    return (p * rng.uniform(0.9, 1.0)).astype(np.float32)


class MaskSegmenter:
    """For data with true masks (the toy world's): the item's mask degraded as CLIPSeg's confidence
    would be (confidence_from_mask), seeded per item, so the matting has the same work to do as on a
    photograph."""

    def __call__(self, image, item):
        mask = load_rgb(item["mask"], image.shape[0], mode="L") / 255.0
        return confidence_from_mask(mask, np.random.default_rng(item["seed"]))


def make_trimap(p, settings):
    """matting.py's rule (0 background, 128 unknown, 255 subject); Skip if it leaves nothing to matte."""
    trimap = matting.trimap_from_confidence(p, settings.high, settings.low, settings.band)
    unknown = np.mean(trimap == 128)
    if not (trimap == 255).any():
        raise Skip(f"empty mask: no pixel reaches --high {settings.high} outside the --band")
    if not (trimap == 0).any():
        raise Skip(f"no background: every pixel reaches --low {settings.low} or lies in the band")
    if unknown > settings.max_unknown:
        raise Skip(f"unknown region {unknown:.0%} of the image > --max-unknown {settings.max_unknown:.0%}")
    return trimap


def matte(image, trimap):
    """Alpha (H, W) and foreground colours (H, W, 3) in [0, 1] of an image (H, W, 3) in [0, 1]."""
    try:
        alpha = matting.estimate_alpha(image, trimap)
    except RuntimeError as e:  # splu on a singular system: not seen, but one image must not stop a run
        raise Skip(f"matting failed: {e}") from None
    fg = matting.estimate_foreground(image, alpha)
    # Where alpha is 1 the pixel is all subject, so its colour is the subject's: keep it exactly rather
    # than the smoothed estimate (the subject's own pixels reach the composite unchanged).
    fg[alpha == 1] = image[alpha == 1]
    return alpha, fg


def make_input(image, background, p, settings):
    """The composite (H, W, 3) uint8: the subject of `image` matted onto `background`; and its alpha."""
    trimap = make_trimap(p, settings)
    alpha, fg = matte(image / 255.0, trimap)
    blended = matting.composite(fg, background / 255.0, alpha)
    return np.round(blended * 255).astype(np.uint8), alpha


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------

def read_data(data, subject=None):
    """Items {"image", "path", "subject", "caption"} of a JSONL manifest or a folder (see the docstring)."""
    if os.path.isdir(data):
        if not subject:
            raise ValueError(f"{data} is a folder: give its subject category with --subject WORD")
        files = image_files(data)
        if not files:
            raise ValueError(f"{data} holds no images ({' '.join(IMAGE_EXTENSIONS)})")
        return [dict(image=os.path.basename(f), path=f, subject=subject, caption=f"a {subject}") for f in files]
    base = os.path.dirname(os.path.abspath(data))
    items = read_manifest(data, ("image", "subject"))
    for item in items:
        item["path"], item["image"] = item["image"], os.path.relpath(item["image"], base)
        item.setdefault("caption", f"a {item['subject']}")
    return items


def list_backgrounds(folder):
    if not os.path.isdir(folder):
        raise ValueError(f"--backgrounds {folder} is not a folder")
    files = image_files(folder)
    if not files:
        raise ValueError(f"--backgrounds {folder} holds no images ({' '.join(IMAGE_EXTENSIONS)})")
    return files


def item_name(index, image):
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", os.path.splitext(os.path.basename(image))[0])[:64]
    return f"{index:06d}_{stem}"


def read_done(path):
    """Names already in records.jsonl or skipped.jsonl. A last line cut short by a crash is dropped, and
    cut from the file so that the next line appended starts on a line of its own."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    if complete != data:
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    try:
        lines = [json.loads(line) for line in complete.decode().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} has a damaged line ({e}); delete it to resume") from None
    return {d["name"] if "name" in d else os.path.splitext(os.path.basename(d["input"]))[0] for d in lines}


# Worker state: each process makes its own segmenter (loads CLIPSeg) once, on its first item.
_worker = {}


def init_worker(make_segmenter, settings, out, shards, threads=None):
    _worker.update(make_segmenter=make_segmenter, segmenter=None, settings=settings, out=out, shards=shards)
    if threads:  # a pool's process: Ctrl-C is the parent's to answer
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        torch.set_num_threads(threads)


def jpeg(image, quality=95):
    """An image (H, W, 3) uint8 as JPEG bytes: img2dataset's default quality, colour at full resolution
    (4:4:4; the usual 4:2:0 halves it, blurring the colour edges of the subject)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def process(task):
    """One item -> ("skipped", line), or ("records", line) after writing its two images; with shards
    ("records", (name, the sample's files)), written by the main process into the shard."""
    settings, out = _worker["settings"], _worker["out"]
    try:
        image = load_rgb(task["path"], settings.size)
        background = load_rgb(task["background"], settings.size)
        if _worker["segmenter"] is None:
            _worker["segmenter"] = _worker["make_segmenter"]()
        p = _worker["segmenter"](image, task)
        pair, _ = make_input(image, background, p, settings)
    except Skip as e:
        return "skipped", dict(image=task["image"], name=task["name"], reason=str(e))
    if _worker["shards"]:
        meta = dict(subject=task["subject"], caption=task["caption"], image=task["image"])
        return "records", (task["name"], {"input.jpg": jpeg(pair), "target.jpg": jpeg(image),
                                          "json": json.dumps(meta).encode()})
    record = dict(input=f"inputs/{task['name']}.png", target=f"targets/{task['name']}.png",
                  subject=task["subject"], caption=task["caption"])
    matting.write_png(pair, os.path.join(out, record["input"]))
    matting.write_png(image, os.path.join(out, record["target"]))
    return "records", record


def make_task(index, item, backgrounds, seed):
    """Item `index` as process() takes it: its name, a background and a seed of its own, drawn from
    (seed, index), so independent of --workers, --part and resumes."""
    rng = np.random.default_rng([seed, index])
    return dict(item, name=item_name(index, item["image"]), background=backgrounds[rng.integers(len(backgrounds))],
                seed=int(rng.integers(2 ** 31)))


@contextmanager
def processed(tasks, make_segmenter, settings, out, workers, shards=False):
    """The results of process() over `tasks`, in their order, with a progress bar."""
    if workers == 1:
        init_worker(make_segmenter, settings, out, shards)
        yield tqdm(map(process, tasks), total=len(tasks), desc="pairs", unit="image")
        return
    # spawn, not fork: a forked copy of a process that has run torch can hang in its thread pool
    pool = multiprocessing.get_context("spawn").Pool(
        workers, init_worker, (make_segmenter, settings, out, shards, max(1, torch.get_num_threads() // workers)))
    try:  # imap: in order, so the output does not depend on timing
        yield tqdm(pool.imap(process, tasks), total=len(tasks), desc="pairs", unit="image")
    finally:
        pool.terminate()


def build(items, backgrounds, out, make_segmenter, settings=None, workers=1, seed=0):
    """Write the pairs of `items` not yet done under `out`; returns {"records": n, "skipped": n} new.

    `make_segmenter()` -> a function (image (H, W, 3) uint8, item) -> probability (H, W), called once
    per process; it must pickle for workers > 1 (a class or functools.partial, as CLIPSegSegmenter).
    An item is its manifest entry plus "name" and "seed" (its own, for random draws)."""
    settings = settings or Settings()
    os.makedirs(os.path.join(out, "inputs"), exist_ok=True)
    os.makedirs(os.path.join(out, "targets"), exist_ok=True)
    paths = {kind: os.path.join(out, f"{kind}.jsonl") for kind in ("records", "skipped")}
    done = read_done(paths["records"]) | read_done(paths["skipped"])
    tasks = [make_task(i, item, backgrounds, seed) for i, item in enumerate(items)
             if item_name(i, item["image"]) not in done]
    counts = {"records": 0, "skipped": 0}
    files = {kind: open(path, "a") for kind, path in paths.items()}
    try:
        with processed(tasks, make_segmenter, settings, out, workers) as results:
            for kind, line in results:
                files[kind].write(json.dumps(line) + "\n")
                files[kind].flush()
                counts[kind] += 1
    finally:
        for f in files.values():
            f.close()
    return counts


def build_shards(items, backgrounds, out, make_segmenter, settings=None, workers=1, seed=0, shard_size=10000,
                 part=(0, 1)):
    """The pairs as tar shards (shards.py's layout): shard k holds items k * shard_size onwards, as
    OUT/{k:05d}.tar, with OUT/{k:05d}_stats.json saying what was skipped and why. Part (i, n) makes the
    shards k = i, i + n, ... that do not exist yet, so n machines share the work and a rerun resumes
    (a shard is written whole or not at all). Returns {"records", "skipped", "shards"} new."""
    settings = settings or Settings()
    os.makedirs(out, exist_ok=True)
    first, parts = part
    mine = [k for k in range(first, math.ceil(len(items) / shard_size), parts)
            if not os.path.exists(os.path.join(out, f"{k:05d}.tar"))]
    remove_leftovers(out, {f"{k:05d}.tar" for k in mine})
    spans = {k: range(k * shard_size, min((k + 1) * shard_size, len(items))) for k in mine}
    tasks = [make_task(i, items[i], backgrounds, seed) for k in mine for i in spans[k]]
    counts = {"records": 0, "skipped": 0, "shards": 0}
    with processed(tasks, make_segmenter, settings, out, workers, shards=True) as bar:
        results = iter(bar)
        for k in mine:
            skipped = []
            with ShardWriter(os.path.join(out, f"{k:05d}.tar")) as shard:
                for _ in spans[k]:
                    kind, line = next(results)
                    if kind == "records":
                        shard.add(*line)
                    else:
                        skipped.append(line)
                    counts[kind] += 1
                stats = dict(count=len(spans[k]), written=len(spans[k]) - len(skipped), skipped=skipped)
                write_text(os.path.join(out, f"{k:05d}_stats.json"), json.dumps(stats, indent=1) + "\n")
            counts["shards"] += 1
    return counts


def parse_part(text):
    """--part I/N -> (I, N), 0 <= I < N."""
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--part {text}: give I/N with 0 <= I < N (machine I of N, counted from 0)")
    return int(m.group(1)), int(m.group(2))


def main():
    defaults = Settings()
    parser = Parser(
        prog="pairs.py",
        description="BLIP-Diffusion's prompted context generation (paper sec. 3.2): subject matted onto a "
                    "random background (input) paired with the original image (target).",
        epilog="DATA is a JSONL manifest of {\"image\": path relative to the manifest, \"subject\": \"dog\", "
               "\"caption\": \"a dog on a sofa\"} lines (caption optional, default \"a {subject}\"), or a "
               "folder of images of one category given by --subject. Writes OUT/records.jsonl, "
               "OUT/skipped.jsonl, OUT/inputs/, OUT/targets/; rerunning resumes.")
    parser.add_argument("--data", required=True, help="JSONL manifest or folder of images")
    parser.add_argument("--subject", default=None, help="the category of every image when --data is a folder")
    parser.add_argument("--backgrounds", required=True, help="folder of background images, one drawn per image")
    parser.add_argument("--clipseg", default=None, help="CLIPSeg folder (CIDAS/clipseg-rd64-refined layout)")
    parser.add_argument("--from-masks", action="store_true",
                        help="instead of CLIPSeg, degrade each record's true \"mask\" as CLIPSeg would (the toy world)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size", type=whole(1), default=defaults.size,
                        help="side of the square crops (default %(default)s, SD-1.5's)")
    parser.add_argument("--high", type=real(low=0, high=1), default=defaults.high,
                        help="CLIPSeg probability fixed as subject (default %(default)s)")
    parser.add_argument("--low", type=real(low=0, high=1), default=defaults.low,
                        help="below it, fixed as background (default %(default)s)")
    parser.add_argument("--band", type=whole(0), default=defaults.band,
                        help="px around the subject's edge left to the matting (default %(default)s)")
    parser.add_argument("--max-unknown", type=real(low=0, high=1), default=defaults.max_unknown,
                        help="skip an image whose unknown region is a larger fraction (default %(default)s)")
    parser.add_argument("--workers", type=whole(1), default=1, help="processes, each with its own CLIPSeg")
    parser.add_argument("--seed", type=whole(0), default=0,
                        help="seeds the background drawn for each image (default %(default)s)")
    parser.add_argument("--shards", action="store_true",
                        help="write tar shards OUT/00000.tar, ... (KEY.input.jpg, KEY.target.jpg, KEY.json) instead "
                             "of records.jsonl and PNG folders: LAION-scale data, streamed by train.py")
    parser.add_argument("--shard-size", type=whole(1), default=10000,
                        help="pairs per shard, with --shards (default %(default)s, img2dataset's)")
    parser.add_argument("--part", default="0/1", metavar="I/N",
                        help="with --shards: make only shards I, I+N, I+2N, ... (machine I of N, from 0; default "
                             "%(default)s, all of them)")
    add_threads(parser)
    args = parser.parse_args()
    use_threads(args.threads)  # with --workers N, each process takes its share

    try:
        if not 0 <= args.low <= args.high <= 1:
            raise ValueError(f"need 0 <= --low <= --high <= 1, got --low {args.low} --high {args.high}")
        part = parse_part(args.part)
        check_writable(args.out, folder=True)
        if part != (0, 1) and not args.shards:
            raise ValueError(f"--part {args.part} splits the work by shards: add --shards")
        items = read_data(args.data, args.subject)
        backgrounds = list_backgrounds(args.backgrounds)
        if args.from_masks:
            if not all("mask" in item for item in items):
                raise ValueError(f"--from-masks: every record of {args.data} needs a \"mask\" (a true mask PNG)")
            make_segmenter = MaskSegmenter
        elif not args.clipseg:
            raise ValueError("give --clipseg DIR (a CLIPSeg folder, see weights/README.md) or --from-masks")
        elif not os.path.isfile(os.path.join(args.clipseg, "config.json")):
            raise ValueError(f"--clipseg {args.clipseg} holds no config.json; see weights/README.md")
        elif not os.path.isfile(os.path.join(args.clipseg, "vocab.json")):
            raise ValueError(f"--clipseg {args.clipseg} holds no tokenizer (vocab.json, merges.txt)")
        else:
            make_segmenter = functools.partial(CLIPSegSegmenter, args.clipseg)
        settings = Settings(args.size, args.high, args.low, args.band, args.max_unknown)
        if args.shards:
            counts = build_shards(items, backgrounds, args.out, make_segmenter, settings, args.workers, args.seed,
                                  args.shard_size, part)
        else:
            counts = build(items, backgrounds, args.out, make_segmenter, settings, args.workers, args.seed)
    except ValueError as e:  # CheckpointError (a bad --clipseg folder) is one too
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"\ninterrupted: what is written in {args.out} is whole; run the same command again to go on")
    if args.shards:
        total = sum(name.endswith(".tar") for name in os.listdir(args.out))
        print(f"wrote {counts['records']} pairs into {counts['shards']} new shards in {args.out} ({total} of "
              f"{math.ceil(len(items) / args.shard_size)} there), skipped {counts['skipped']} (reasons in "
              f"{os.path.join(args.out, 'NNNNN_stats.json')})")
        return
    records = os.path.join(args.out, "records.jsonl")
    print(f"wrote {counts['records']} new records to {records} ({len(read_done(records))} in all), skipped "
          f"{counts['skipped']} (reasons in {os.path.join(args.out, 'skipped.jsonl')})")


if __name__ == "__main__":
    main()
