"""train.py on tar shards: the same batches on one process or two, with or without workers, resumed."""

import os
import subprocess
import sys

import pytest

import train
from shards import ShardStream, shard_paths
from test_shards import toy_shards
from test_train import assert_same_weights, losses, weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shards_train_alike_on_one_or_two_processes_with_workers_and_resumed(tmp_path):
    pattern = toy_shards(str(tmp_path / "shards"))
    args = ["--stage", "multimodal", "--model", "tiny", "--data", pattern, "--batch-size", "4", "--lr", "1e-4",
            "--warmup", "0", "--schedule", "constant"]
    one = str(tmp_path / "one")
    assert train.main(args + ["--steps", "4", "--out", one]) == 0
    split = str(tmp_path / "split")
    assert train.main(args + ["--steps", "2", "--out", split, "--workers", "2"]) == 0
    assert train.main(args + ["--steps", "4", "--out", split, "--resume"]) == 0
    assert_same_weights(weights(one, 4), weights(split, 4), atol=0)
    assert losses(one) == losses(split)
    two = str(tmp_path / "two")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train.py", *args, "--steps", "4", "--workers", "1", "--out", two],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "step 4/4 | loss" in run.stdout and os.path.isfile(os.path.join(two, "qformer", "model.safetensors"))


def sources(stream, start, steps):
    return [[(j, item[0]) for j, item in stream.step(s)] for s in range(start, start + steps)]


def test_every_step_holds_the_same_samples_on_any_number_of_processes_and_workers(tmp_path):
    paths = shard_paths(toy_shards(str(tmp_path / "shards"), per_shard=5))  # 13 shards, the last of 4
    for slots in (4, 16):  # fewer slots than shards, and more (slots then share a shard)
        alone = sources(ShardStream(paths, slots, range(slots), 7, 0), 0, 6)
        ranks = [sources(ShardStream(paths, slots, range(r, slots, 2), 7, 0, workers=2), 0, 6) for r in range(2)]
        assert [sorted(a + b) for a, b in zip(*ranks)] == alone
        if slots == 4:  # within the first epoch of every slot: no sample twice in a step
            assert all(len({src for _, src in step}) == slots for step in alone)
        assert len({src for step in alone for _, src in step}) > 2 * slots  # the steps move on
        resumed = sources(ShardStream(paths, slots, range(slots), 7, 3), 3, 3)
        assert resumed == alone[3:]


def test_an_unreadable_sample_is_replaced_and_counted_and_no_match_is_one_line(tmp_path, capsys):
    from test_shards import write_shard
    folder = tmp_path / "shards"
    os.makedirs(folder)
    for s in range(2):
        write_shard(folder / f"{s:05d}.tar", [f"{s}{k:05d}" for k in range(6)], corrupt={"000002"} if s == 0 else ())
    args = ["--stage", "multimodal", "--model", "tiny", "--batch-size", "2", "--steps", "6"]
    assert train.main(args + ["--data", str(folder), "--out", str(tmp_path / "run")]) == 0
    assert "skipped 1 of 13 samples" in capsys.readouterr().out
    assert train.main(args + ["--data", str(tmp_path / "none-{0..3}.tar"), "--out", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no shard matches" in err
    with pytest.raises(SystemExit) as e:
        train.main(args + ["--data", str(folder), "--workers", "-1", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "argument --workers: -1: give 0 or more" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_two_processes_with_workers_resume_exactly(tmp_path):
    pattern = toy_shards(str(tmp_path / "shards"))
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
            "--stage", "multimodal", "--model", "tiny", "--data", pattern, "--batch-size", "4", "--lr", "1e-4",
            "--warmup", "0", "--schedule", "constant", "--workers", "1"]

    def run(out, steps, *extra):
        done = subprocess.run(base + ["--steps", str(steps), "--out", out, *extra], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run(straight, 4)
    run(split, 2)
    run(split, 4, "--resume")
    assert_same_weights(weights(straight, 4), weights(split, 4), atol=1e-6)
    assert losses(straight) == losses(split)


def test_stage_two_streams_the_pair_shards_the_toy_world_writes(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    import toyeval
    from data import read_manifest
    toy = tmp_path / "toy"
    monkeypatch.setattr(sys, "argv", ["toyworld.py", "data", "--n", "8", "--backgrounds", "0", "--inputs", "--shards",
                                      "--shard-size", "3", "--out", str(toy)])
    toyeval.main()
    for folder, manifest, pictures, fields in (("shards", "records.jsonl", ("image",), ("caption",)),
                                               ("subject-shards", "subject.jsonl", ("input", "target"),
                                                ("subject", "caption"))):
        records = read_manifest(str(toy / manifest), fields)
        stream = ShardStream(shard_paths(str(toy / folder)), 4, range(4), 0, 0, pictures=pictures, keys=fields)
        seen = set()
        for step in range(2):
            for _, ((_, key), record, images) in stream.step(step):
                rec, seen = records[int(key)], seen | {key}
                assert all(record[f] == rec[f] for f in fields)
                for image, name in zip(images, pictures):  # PNG in the shard: the same pixels
                    assert np.array_equal(np.asarray(image), np.asarray(Image.open(rec[name]).convert("RGB")))
        assert len(seen) > 4  # the steps move through the data
    out = tmp_path / "run"
    assert train.main(["--stage", "subject", "--model", "tiny", "--data", str(toy / "subject-shards"), "--steps", "2",
                       "--batch-size", "2", "--out", str(out)]) == 0
    assert os.path.isfile(out / "model_index.json") and os.listdir(out / "samples")
