"""Pictures in, tensors out: the one image reader and the one centre crop of the project, and the
training records that train.py reads.

Every command reads images the same way (`read_image`: any file PIL opens, in any mode, as 8-bit
RGB, or a one-line error) and crops them the same way (`center_crop`: the short side resized to cover
the target, then the centre cut out, LAVIS' and torchvision's Resize + CenterCrop; its `rounding`
picks torchvision's or transformers' exact pixel rounding where a metric must equal theirs).

Training reads JSONL manifests (`read_manifest`; `TOY_DATA` is the small toy-world set behind
`--data toy`) or a folder of subject pictures (`subject_folder`), visits the records in an order that
is a function of the step alone (`step_indices`), and draws each sample's randomness from a generator
of its own (`sample_generator`), so any number of processes, and a resumed run, compute the same.
"""

import functools
import json
import os

import numpy as np
import torch
from PIL import Image

# The files taken as images when a folder is given (sample.py, train.py, pairs.py).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageError(ValueError):
    """A file that is not a readable image; the message is one line that names it."""


def image_files(folder):
    """The images in `folder` (not its subfolders), as paths sorted by name."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def to_rgb(image):
    """Any PIL image -> 8-bit RGB. Palette, grayscale, CMYK and RGBA images convert as PIL does
    (alpha dropped, as the reference's `convert("RGB")`); 16- and 32-bit images are rescaled to
    8 bits first, which PIL's own conversion would clip."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(a / peak * 255.0), 0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def read_image(source, mode="RGB"):
    """A path (or a PIL image) -> a PIL image in `mode`, loaded into memory: RGB by `to_rgb`, other
    modes ("L" for a mask) by PIL's conversion. Raises ImageError for a file that cannot be read,
    including one too large to be a picture (PIL's decompression-bomb limit, about 179 megapixels)."""
    if isinstance(source, Image.Image):
        return to_rgb(source) if mode == "RGB" else source.convert(mode)
    try:
        with Image.open(source) as im:
            im.load()
            return to_rgb(im) if mode == "RGB" else im.convert(mode)
    except Image.DecompressionBombError:
        raise ImageError(f"{source}: too large to read safely (over {2 * Image.MAX_IMAGE_PIXELS:,} pixels); "
                         f"give a smaller picture") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{source}: not an image that can be read ({type(e).__name__}: {e}); "
                         f"give a PNG, JPEG or WebP") from None


def center_crop(image, height, width, resample=Image.BICUBIC, rounding="nearest", short_side=None):
    """Resize (bicubic) so the image covers height x width with its aspect ratio kept, then cut out
    the centre: what LAVIS' Resize(short side) + CenterCrop does, for any target shape.

    `rounding` says how the resized size and the crop's corner are rounded, where references differ
    by a pixel (metrics.py must equal them exactly):
    - "nearest" (the default): the resized sides rounded to the nearest pixel, the corner floored;
    - "torchvision": Resize(short_side) + CenterCrop, as torchvision computes them: the long side
      int(short_side * long / short), the corner int(round((H - height) / 2.0)), Python's round
      (half to even); DINO's evaluation transform (facebookresearch/dino, eval_linear.py);
    - "transformers": the same size, the corner (H - height) // 2: transformers' CLIPImageProcessor
      (image_transforms.py, get_resize_output_image_size and center_crop).
    `short_side` (those two only) is the resized short side, by default the crop's larger side.
    """
    if rounding == "nearest":
        if short_side is not None:
            raise ValueError("short_side is for rounding='torchvision' or 'transformers'")
        scale = max(height / image.height, width / image.width)
        image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                             resample)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        return image.crop((left, top, left + width, top + height))
    if rounding not in ("torchvision", "transformers"):
        raise ValueError(f"rounding {rounding!r}: use 'nearest', 'torchvision' or 'transformers'")
    s = short_side or max(height, width)
    short, long = min(image.size), max(image.size)
    long = int(s * long / short)  # not (s / short) * long, which can land a hair below a whole number
    image = image.resize((s, long) if image.width <= image.height else (long, s), resample)
    if image.width < width or image.height < height:
        raise ValueError(f"a {image.width}x{image.height} resize cannot hold a {width}x{height} crop; "
                         f"give a larger short_side")
    if rounding == "torchvision":
        left, top = int(round((image.width - width) / 2.0)), int(round((image.height - height) / 2.0))
    else:
        left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


# ---------------------------------------------------------------------------------------------------
# Training records (train.py): JSONL manifests, subject folders, the sample order, per-sample draws
# ---------------------------------------------------------------------------------------------------

# `train.py --data toy`: 64 pictures of the toy world shipped with the project, written by
# `python toyworld.py data --n 64 --backgrounds 0 --inputs --out examples/toy-data`.
TOY_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "toy-data")


class DataError(ValueError):
    """Training data that cannot be used (a missing manifest, a bad record); one line that names it."""


# The record keys that name files, relative to the manifest's folder.
PATH_KEYS = ("image", "input", "target", "mask")


def read_manifest(path, keys):
    """A JSONL file (or a folder holding records.jsonl), one record a line, each with `keys` -> the
    records, their file paths (PATH_KEYS) made absolute. Used by train.py and pairs.py."""
    if os.path.isdir(path):
        path = os.path.join(path, "records.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file; give a JSONL manifest, one record a line")
    base, records = os.path.dirname(os.path.abspath(path)), []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path} line {n}: not valid JSON") from None
            if not isinstance(rec, dict) or not all(k in rec for k in keys):
                raise DataError(f"{path} line {n}: a record needs the keys {', '.join(keys)}")
            records.append({k: os.path.join(base, v) if k in PATH_KEYS else v for k, v in rec.items()})
    if not records:
        raise DataError(f"{path}: the manifest holds no records")
    return records


def subject_folder(folder):
    """--subject: one picture of the subject, or a folder of them -> their paths."""
    if os.path.isfile(folder) and folder.lower().endswith(IMAGE_EXTENSIONS):
        return [folder]
    if not os.path.isdir(folder):
        raise DataError(f"--subject {folder}: no such image or folder of subject images")
    files = image_files(folder)
    if not files:
        raise DataError(f"--subject {folder}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def read_records(stage, data, subject=None):
    """A train.py stage's records, checked before any work: fine-tuning's --subject pictures, else
    --data's manifest ('toy': TOY_DATA's subject.jsonl for stage 2, its records.jsonl for the others)."""
    if stage == "finetune":
        return [{"image": f} for f in subject_folder(subject)]
    if not data:
        raise DataError("give --data (a JSONL manifest; pairs.py's records.jsonl for --stage subject) or 'toy'")
    pairs = stage == "subject"
    if data == "toy":
        data = os.path.join(TOY_DATA, "subject.jsonl" if pairs else "records.jsonl")
    return read_manifest(data, ("input", "target", "subject", "caption") if pairs else ("image", "caption"))


def load_image(source):
    """`read_image`, or None for a file that cannot be read: training skips it and counts it."""
    try:
        return read_image(source)
    except ImageError:
        return None


class Records:
    """A manifest's records, a step's share at a time: the global batch of a step is `step_indices`,
    this process takes its positions `owned` in it (rank, rank + world, ...). Pictures (the `keys` of
    each record) are read on demand; an unreadable picture is replaced by the next readable record and
    counted (`skipped` of `read`), never a crash. shards.ShardStream serves tar shards the same way."""

    def __init__(self, records, keys, batch_size, owned, seed):
        self.records, self.keys, self.skipped, self.read = records, keys, 0, 0
        self.batch_size, self.owned, self.seed = batch_size, list(owned), seed

    def step(self, step):
        """-> [(record index, (the index read, the record, its pictures))] for this process's positions."""
        indices = step_indices(len(self.records), self.batch_size, step, self.seed)
        return [(indices[j], self[indices[j]]) for j in self.owned]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        """-> (the index read, the record, its pictures)."""
        for j in range(len(self.records)):
            rec = self.records[(index + j) % len(self.records)]
            pics = [load_image(rec[k]) for k in self.keys]
            self.read += 1
            if all(pic is not None for pic in pics):
                return (index + j) % len(self.records), rec, pics
            self.skipped += 1
        raise DataError("no readable image in the data")


def to_target(image, size):
    """Diffusion target: `center_crop` to size x size, scaled to [-1, 1], (3, size, size)
    (LAVIS' fine-tuning transform: Resize + CenterCrop + Normalize(0.5, 0.5))."""
    x = np.asarray(center_crop(image, size, size), np.float32) / 127.5 - 1
    return torch.from_numpy(x).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


@functools.lru_cache(maxsize=2)
def epoch_order(num_records, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def step_indices(num_records, batch_size, step, seed):
    """The global batch of optimizer step `step`: consecutive slices of a per-epoch permutation, so
    the data position is a function of the step alone (exact resume, no sampler state)."""
    positions = (divmod(k, num_records) for k in range(step * batch_size, (step + 1) * batch_size))
    return [int(epoch_order(num_records, seed, epoch)[i]) for epoch, i in positions]


def sample_generator(seed, step, index):
    """The generator for one sample's random draws (timestep, noise, prompt drop), seeded by (seed,
    step, the record's index), so it is the same on whichever rank draws it."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0]))
