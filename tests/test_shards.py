"""shards.py: finding tar shards, reading them front to back, and what a bad sample does."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from data import DataError
from shards import OpenShards, decode, expand_braces, shard_keys, shard_paths


def jpeg(seed, size=16):
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_shard(path, keys, corrupt=()):
    """img2dataset's layout: KEY.jpg, KEY.txt, KEY.json per sample, in that order."""
    with tarfile.open(path, "w") as tar:
        for key in keys:
            files = {"jpg": b"not a jpeg" if key in corrupt else jpeg(int(key)), "txt": f"caption {key}".encode(),
                     "json": json.dumps({"key": key, "width": 16}).encode()}
            for suffix, data in files.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_brace_patterns_expand_as_the_shell_does():
    assert expand_braces("d/{00008..00011}.tar") == [f"d/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_shards_are_found_by_pattern_folder_or_list(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"{i:05d}.tar", [f"{i}{j}" for j in range(2)])
    names = [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert shard_paths(str(tmp_path / "{00000..00002}.tar")) == names
    assert shard_paths(str(tmp_path)) == names
    assert shard_paths(f"{names[2]},{names[0]}") == [names[2], names[0]]
    with pytest.raises(DataError, match="no shard matches"):
        shard_paths(str(tmp_path / "{00010..00012}.tar"))
    with pytest.raises(DataError, match="1 of 4 shards are missing"):
        shard_paths(str(tmp_path / "{00000..00003}.tar"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="holds no .tar shards"):
        shard_paths(str(tmp_path / "empty"))


def test_a_shard_is_read_sample_by_sample_and_a_truncated_one_ends_early(tmp_path):
    keys = [f"{k:06d}" for k in range(5)]
    write_shard(tmp_path / "a.tar", keys, corrupt={"000002"})
    path = str(tmp_path / "a.tar")
    assert shard_keys(path) == keys
    reader = OpenShards()
    parts = reader.read(path, keys[0])
    assert sorted(parts) == ["jpg", "json", "txt"]
    records = [decode(reader.read(path, k)) for k in keys]
    assert records[2] is None  # the bad picture: replaced in training, not a crash
    rec, pictures = records[0]
    assert rec["caption"] == "caption 000000" and rec["key"] == "000000" and pictures[0].size == (16, 16)
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2])
    cut = shard_keys(str(tmp_path / "cut.tar"))
    assert 0 < len(cut) < len(keys) and cut == keys[:len(cut)]
    assert decode(OpenShards().read(str(tmp_path / "cut.tar"), keys[-1])) is None


def toy_shards(folder, per_shard=8):
    """The shipped toy pictures and captions as img2dataset shards of `per_shard` samples."""
    from data import TOY_DATA, read_manifest
    records = read_manifest(os.path.join(TOY_DATA, "records.jsonl"), ("image", "caption"))
    os.makedirs(folder, exist_ok=True)
    for s in range(0, len(records), per_shard):
        with tarfile.open(os.path.join(folder, f"{s // per_shard:05d}.tar"), "w") as tar:
            for k, rec in enumerate(records[s:s + per_shard], s):
                for suffix, data in (("jpg", open(rec["image"], "rb").read()), ("txt", rec["caption"].encode())):
                    info = tarfile.TarInfo(f"{k:09d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, "{00000..%05d}.tar" % ((len(records) - 1) // per_shard))
