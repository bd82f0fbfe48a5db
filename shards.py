"""Training data as tar shards, streamed: the layout img2dataset writes and webdataset reads.

LAION-scale data (BLIP-Diffusion's stages 1 and 2 were trained on hundreds of millions of pictures)
does not fit a manifest of file paths: it comes as a few thousand tar files ("shards") of ~10,000
samples each. In a shard, the files of one sample share a key, the file name up to its first dot:
`000123.jpg`, `000123.txt` (the caption), `000123.json` (metadata), in that order, one sample after
the other. The shards are read with the standard library's tarfile: their headers once, to know
each sample's place, then one sample at a time, so no more than a step's samples are in memory.
Stage 2's pairs (pairs.py --shards) keep the layout with two named pictures and the record in the
json: `000123.input.jpg`, `000123.target.jpg`, `000123.json` ({"subject": ..., "caption": ...}).
"""

import functools
import io
import itertools
import json
import os
import re
import tarfile
import tempfile

import numpy as np
import torch

from checkpoint import leftover_of, plain_mode
from data import DataError, load_image

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


def expand_braces(pattern):
    """Brace expansion as the shell does it: `{00000..00012}` (a numeric range, zero-padded to the
    width of its first number) and `{a,b,c}` (alternatives), several per pattern -> the names."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        first, last = r.groups()
        step = 1 if int(last) >= int(first) else -1
        parts = [str(i).zfill(len(first)) for i in range(int(first), int(last) + step, step)]
    else:
        parts = body.split(",")
    return [name for part in parts for name in expand_braces(head + part + tail)]


def is_shards(spec):
    """Whether --data names shards (a .tar, a brace pattern of them, a folder of them, or a
    comma-separated list of those) rather than a JSONL manifest."""
    if os.path.isdir(spec):
        return any(name.endswith(".tar") for name in os.listdir(spec))
    return any(part.strip().endswith(".tar") for part in spec.split(","))


def shard_paths(spec):
    """--data's shards -> their paths, in the order given (a folder's sorted by name). A pattern that
    matches no file, or a listed shard that does not exist, is a one-line DataError."""
    paths = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if os.path.isdir(part):
            found = sorted(os.path.join(part, n) for n in os.listdir(part) if n.endswith(".tar"))
            if not found:
                raise DataError(f"--data {part}: the folder holds no .tar shards")
            paths += found
            continue
        names = expand_braces(part)
        missing = [n for n in names if not os.path.isfile(n)]
        if len(missing) == len(names):
            raise DataError(f"--data {part}: no shard matches (give a .tar file, a folder of them, or a brace "
                            f"pattern such as data/{{00000..00099}}.tar)")
        if missing:
            raise DataError(f"--data {part}: {len(missing)} of {len(names)} shards are missing, the first "
                            f"{missing[0]}; list the ones that exist, or fetch the rest")
        paths += names
    if not paths:
        raise DataError(f"--data {spec!r}: names no shard")
    return paths


def split_key(name):
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'); the suffix is everything after the first dot of the
    file name, as webdataset has it ('000123.input.jpg' -> 'input.jpg')."""
    folder, base = os.path.split(name)
    key, _, suffix = base.partition(".")
    return os.path.join(folder, key), suffix.lower()


def picture_suffixes(name):
    """Where a sample's picture `name` is: "image" is img2dataset's one picture (KEY.jpg, .png, ...),
    another name a picture of its own (pairs.py's "input": KEY.input.jpg, ...)."""
    return IMAGE_SUFFIXES if name == "image" else tuple(f"{name}.{s}" for s in IMAGE_SUFFIXES)


def decode(parts, pictures=("image",), keys=("caption",)):
    """One sample's files -> (record, [picture per name in `pictures`]): the record is the `json`
    metadata's keys and the caption (`txt`, else the json's "caption"); the pictures are read as
    data.load_image reads a file. None where a picture or one of the record's `keys` is missing or
    unreadable: training replaces the sample and counts it."""
    record = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if isinstance(meta, dict):
            record.update(meta)
    if "txt" in parts:
        record["caption"] = parts["txt"].decode("utf-8", errors="replace").strip()
    if not all(isinstance(record.get(k), str) for k in keys):
        return None
    images = []
    for name in pictures:
        suffix = next((s for s in picture_suffixes(name) if s in parts), None)
        picture = None if suffix is None else load_image(io.BytesIO(parts[suffix]))
        if picture is None:
            return None
        images.append(picture)
    return record, images


class ShardWriter:
    """Writes one shard sample by sample (`add(key, {suffix: bytes})`), in the layout above, to a hidden
    temporary file beside `path` that takes its place when the block ends: a shard that exists is
    whole. The members carry no time stamp, so the same samples make the same bytes."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        folder, name = os.path.split(os.path.abspath(self.path))
        fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.tmp-")
        self.file = os.fdopen(fd, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        return self

    def add(self, key, files):
        for suffix, data in files.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mode = len(data), 0o644
            self.tar.addfile(info, io.BytesIO(data))

    def __exit__(self, kind, *_):
        try:
            self.tar.close()
            self.file.close()
            if kind is None:
                plain_mode(self.tmp)
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def remove_leftovers(folder, shards):
    """Remove what an interrupted ShardWriter left in `folder` of the shards named `shards` (only
    those: another machine may be writing others there)."""
    for name in os.listdir(folder):
        if leftover_of(name) in shards:
            os.remove(os.path.join(folder, name))


# ---------------------------------------------------------------------------------------------------
# The order: one stream per slot of the global batch, the same on any number of processes
# ---------------------------------------------------------------------------------------------------
# Slot j of the global batch (j < batch size) reads its own shards: those at positions j, j + B,
# j + 2B, ... of epoch e's shard permutation, a function of (seed, e). Each step takes one sample
# from every slot, so step s is raw sample s of each slot's stream. A process owns the slots its
# share of the batch is made of (j = rank, rank + world, ...): it reads only their shards, and the
# global batch of a step is the same whatever the number of processes, machines or data workers. With
# fewer shards than slots, the slots on one shard take every m-th of its samples. An unreadable sample
# is replaced by its slot's next readable one, and the slot still moves on by one: the position stays
# the step, so a resumed run finds its place by tar headers alone, without decoding what it skips.

@functools.lru_cache(maxsize=None)
def shard_keys(path):
    """The sample keys of a shard, in order (one pass over its headers)."""
    keys = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile():
                    key = split_key(member.name)[0]
                    if not keys or keys[-1] != key:
                        keys.append(key)
    except (tarfile.TarError, OSError, EOFError):
        pass
    return keys


def slot_plan(num_shards, slots, slot, seed, epoch):
    """Slot `slot`'s reading in `epoch`: [(shard index, take every m-th sample, starting at r)]."""
    order = np.random.default_rng([seed, epoch]).permutation(num_shards)
    if num_shards >= slots:
        return [(int(i), 1, 0) for i in order[slot::slots]]
    sharing = len(range(slot % num_shards, slots, num_shards))
    return [(int(order[slot % num_shards]), sharing, slot // num_shards)]


def slot_stream(paths, slots, slot, seed, start=0):
    """Slot `slot`'s raw samples from position `start` on, endlessly: (shard path, key). Positions
    before `start` are counted from the shards' headers, not read."""
    position, empty = 0, 0
    for epoch in itertools.count():
        before = position
        for shard, every, first in slot_plan(len(paths), slots, slot, seed, epoch):
            keys = shard_keys(paths[shard])[first::every]
            if position + len(keys) <= start:
                position += len(keys)
                continue
            for key in keys[max(0, start - position):]:
                yield paths[shard], key
            position += len(keys)
        empty = empty + 1 if position == before else 0
        if empty > 1:
            raise DataError(f"--data: batch slot {slot} of {slots} finds no samples in its shards "
                            f"({len(paths)} shards); give more shards or a smaller --batch-size")


class OpenShards:
    """Reads samples by key, keeping the last few shards open with their members indexed (a process's
    own: a DataLoader worker opens its own files)."""

    def __init__(self, keep=8):
        self.open, self.keep = {}, keep

    def read(self, path, key):
        """The files of one sample -> {suffix: bytes} (empty if the shard cannot be read there)."""
        if path not in self.open:
            if len(self.open) >= self.keep:
                oldest = next(iter(self.open))
                self.open.pop(oldest)[0].close()
            try:
                tar, index = tarfile.open(path, "r:*"), {}
            except (tarfile.TarError, OSError, EOFError):
                return {}
            try:
                for member in tar:
                    if member.isfile():
                        index.setdefault(split_key(member.name)[0], []).append(member)
            except (tarfile.TarError, OSError, EOFError):
                pass
            self.open[path] = tar, index
        tar, index = self.open[path]
        try:
            return {split_key(m.name)[1]: tar.extractfile(m).read() for m in index.get(key, [])}
        except (tarfile.TarError, OSError, EOFError):
            return {}


class ShardBatches(torch.utils.data.IterableDataset):
    """This process's share of each step's batch, step after step from `start`: a list of (slot,
    (shard path, key), record, pictures) for the slots in `owned`, with the count of samples replaced.
    With DataLoader workers, worker w makes the steps start + w, start + w + W, ... (the DataLoader
    hands them back in step order)."""

    def __init__(self, paths, slots, owned, seed, start, pictures=("image",), keys=("caption",)):
        super().__init__()
        self.paths, self.slots, self.owned, self.seed, self.start = paths, slots, owned, seed, start
        self.pictures, self.keys = pictures, keys

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, workers = (0, 1) if info is None else (info.id, info.num_workers)
        streams = {j: slot_stream(self.paths, self.slots, j, self.seed, self.start + w) for j in self.owned}
        shards = OpenShards(keep=2 * len(self.owned) + 2)
        for step in itertools.count(self.start + w, workers):
            items, replaced = [], 0
            for j, stream in streams.items():
                source = next(stream)
                sample = decode(shards.read(*source), self.pictures, self.keys)
                ahead, tries = slot_stream(self.paths, self.slots, j, self.seed, step + 1), 0
                while sample is None:  # the slot's next readable sample stands in
                    replaced, tries = replaced + 1, tries + 1
                    if tries > 1000:
                        raise DataError(f"--data: over 1000 unreadable samples in a row in slot {j}'s shards")
                    source = next(ahead)
                    sample = decode(shards.read(*source), self.pictures, self.keys)
                items.append((j, source, *sample))
                for _ in range(workers - 1):  # the other workers' steps
                    next(stream)
            yield step, items, replaced


def unbatched(item):
    return item


class ShardStream:
    """train.py's view of ShardBatches: the items of each step in turn, and the count of samples
    replaced so far (`skipped` of `read`, as data.Records counts them)."""

    def __init__(self, paths, slots, owned, seed, start, workers=0, pictures=("image",), keys=("caption",)):
        batches = ShardBatches(paths, slots, list(owned), seed, start, pictures, keys)
        if workers:  # the loader forks; a forked process cannot use tokenizers' threads (it would warn)
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers, collate_fn=unbatched,
                                             prefetch_factor=2 if workers else None)
        self.batches, self.skipped, self.read = iter(loader), 0, 0

    def step(self, step):
        """-> [(slot, ((shard path, key), record, pictures))] for this process's slots, as data.Records."""
        got, items, replaced = next(self.batches)
        assert got == step, f"the data stream is at step {got}, training at {step}"
        self.skipped, self.read = self.skipped + replaced, self.read + len(items) + replaced
        return [(j, (source, record, pictures)) for j, source, record, pictures in items]


def first_sample(paths, pictures, keys):
    """The first readable sample of the shards as one record, its pictures (PIL images) under their
    names: what training draws its progress samples from."""
    shards = OpenShards(keep=1)
    for path in paths[:8]:
        for key in shard_keys(path)[:1000]:
            sample = decode(shards.read(path, key), pictures, keys)
            if sample is not None:
                return {**sample[0], **dict(zip(pictures, sample[1]))}
    raise DataError(f"--data: no readable sample with {', '.join(pictures)} and {', '.join(keys)} in the first "
                    f"shards ({paths[0]}, ...)")
