"""pairs.py, the prompted-context pair builder: the composite keeps the subject and replaces the background,
the records and files are as train.py reads them, bad items are skipped, runs resume, and the output does
not depend on the number of workers. Segmentation is injected as a known confidence map (a random CLIPSeg
segments nothing meaningful); one test runs the command line end to end with a tiny random CLIPSeg."""

import json
import os
import sys

import numpy as np
import scipy.ndimage as ndi
import pytest
import torch
from PIL import Image

import pairs

SIZE = 48
SETTINGS = pairs.Settings(size=SIZE, high=0.6, low=0.1, band=3, max_unknown=0.6)


def confidence(size):
    """A disc of radius size/4 at the centre with a soft 4 px rim: 1 inside, falling to 0 outside."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    return np.clip((size / 4 + 2 - np.hypot(x, y)) / 4, 0, 1)


class KnownMask:
    """A segmenter whose answer is known: the centred disc, where the test images draw their subject;
    nothing at all for the subject "nothing"."""

    def __call__(self, image, item):
        p = confidence(image.shape[0])
        return p * 0 if item["subject"] == "nothing" else p


def textured(width, height, seed):
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 120, width)[None, :, None] * rng.uniform(0.3, 1, 3)
    return np.clip(ramp + rng.integers(0, 100, (height, width, 3)), 0, 255).astype(np.uint8)


def shape_image(width, height, seed):
    """A coloured disc (the subject) on a textured background, the disc where KnownMask puts it after the
    centre crop."""
    image = textured(width, height, seed)
    y, x = np.mgrid[:height, :width]
    r = min(width, height) / 4
    inside = np.hypot(x - (width - 1) / 2, y - (height - 1) / 2) < r
    image[inside] = np.array([200, 40 * seed % 256, 60], np.uint8)
    return Image.fromarray(image)


@pytest.fixture
def data(tmp_path):
    """A manifest of four shapes (one landscape, one portrait), a corrupt file and an image whose subject
    is "nothing"; and a folder of three backgrounds."""
    (tmp_path / "images").mkdir()
    (tmp_path / "bg").mkdir()
    lines = []
    for i, (w, h) in enumerate([(64, 48), (48, 72), (50, 50), (96, 60)]):
        shape_image(w, h, i).save(tmp_path / "images" / f"shape{i}.png")
        lines.append(dict(image=f"images/shape{i}.png", subject="ball", caption=f"a ball, number {i}"))
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines.insert(2, dict(image="images/corrupt.png", subject="ball"))
    shape_image(60, 60, 9).save(tmp_path / "images" / "empty.png")
    lines.append(dict(image="images/empty.png", subject="nothing"))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines))
    for i in range(3):
        Image.fromarray(textured(70 + 10 * i, 64, 100 + i)).save(tmp_path / "bg" / f"bg{i}.jpg")
    return tmp_path


def run(data, out, workers=1):
    items = pairs.read_data(str(data / "data.jsonl"))
    backgrounds = pairs.list_backgrounds(str(data / "bg"))
    return pairs.build(items, backgrounds, str(out), KnownMask, SETTINGS, workers=workers, seed=3)


def read_lines(path):
    return [json.loads(line) for line in open(path)]


def test_composite_keeps_subject_and_replaces_background():
    image = np.asarray(shape_image(SIZE, SIZE, 1))
    background = textured(SIZE, SIZE, 7)
    p = confidence(SIZE)
    pair, alpha = pairs.make_input(image, background, p, SETTINGS)
    trimap = pairs.make_trimap(p, SETTINGS)
    assert pair.shape == image.shape and pair.dtype == np.uint8
    # Known pixels keep their trimap value; the band and the rim are solved for.
    assert (alpha[trimap == 255] == 1).all() and (alpha[trimap == 0] == 0).all()
    assert (trimap == 128).sum() > 0 and ((alpha > 0) & (alpha < 1)).any()
    assert (pair[alpha == 1] == image[alpha == 1]).all()
    assert (pair[alpha == 0] == background[alpha == 0]).all()
    # The subject's own colours are kept exactly, not the smoothed foreground estimate.
    fg = pairs.matte(image / 255.0, trimap)[1]
    assert (fg[alpha == 1] == image[alpha == 1] / 255.0).all()
    # In between, a blend, not the background.
    mixed = (alpha > 0.2) & (alpha < 0.8)
    assert (pair[mixed] != background[mixed]).any(axis=-1).all()


def test_trimap_rules_skip_unusable_masks():
    p = confidence(SIZE)
    with pytest.raises(pairs.Skip, match="empty mask"):
        pairs.make_trimap(p * 0.5, SETTINGS)
    with pytest.raises(pairs.Skip, match="no background"):
        pairs.make_trimap(np.maximum(p, 0.2), SETTINGS)
    with pytest.raises(pairs.Skip, match="unknown region"):
        pairs.make_trimap(p, pairs.Settings(size=SIZE, band=6, max_unknown=0.3))


def test_build_writes_records_and_skips(data):
    out = data / "out"
    assert run(data, out) == {"records": 4, "skipped": 2}
    records = read_lines(out / "records.jsonl")
    names = ["000000_shape0", "000001_shape1", "000003_shape2", "000004_shape3"]
    assert records == [dict(input=f"inputs/{n}.png", target=f"targets/{n}.png", subject="ball",
                            caption=f"a ball, number {i}") for i, n in enumerate(names)]
    background_crops = [pairs.load_rgb(str(data / "bg" / f"bg{i}.jpg"), SIZE) for i in range(3)]
    trimap = pairs.make_trimap(confidence(SIZE), SETTINGS)
    inside, outside = trimap == 255, trimap == 0  # known subject and known background
    for i, record in enumerate(records):
        target = np.asarray(Image.open(out / record["target"]))
        pair = np.asarray(Image.open(out / record["input"]))
        assert target.shape == pair.shape == (SIZE, SIZE, 3)
        assert (target == pairs.load_rgb(str(data / "images" / f"shape{i}.png"), SIZE)).all()
        assert (pair[inside] == target[inside]).all()  # the subject, unchanged
        assert not (pair[outside] == target[outside]).all()  # the background, replaced ...
        assert any((pair[outside] == bg[outside]).all() for bg in background_crops)  # ... by one of these
    skipped = read_lines(out / "skipped.jsonl")
    assert [(s["image"], s["name"]) for s in skipped] == [("images/corrupt.png", "000002_corrupt"),
                                                          ("images/empty.png", "000005_empty")]
    assert "unreadable image" in skipped[0]["reason"] and "empty mask" in skipped[1]["reason"]
    assert sorted(os.listdir(out / "inputs")) == [n + ".png" for n in names]  # no temporary files left


def test_resume(data):
    out = data / "out"
    run(data, out)
    stamps = {p: os.stat(out / "inputs" / p).st_mtime_ns for p in os.listdir(out / "inputs")}
    full = (out / "records.jsonl").read_text()
    assert run(data, out) == {"records": 0, "skipped": 0}
    assert (out / "records.jsonl").read_text() == full

    # A lost line (the process died between writing the files and the line): only that item is redone.
    lines = full.splitlines(keepends=True)
    (out / "records.jsonl").write_text("".join(lines[:1] + lines[2:]))
    assert run(data, out) == {"records": 1, "skipped": 0}
    assert sorted((out / "records.jsonl").read_text().splitlines()) == sorted(full.splitlines())
    changed = [p for p in stamps if os.stat(out / "inputs" / p).st_mtime_ns != stamps[p]]
    assert changed == ["000001_shape1.png"]

    # A last line cut short by a crash mid-append: tolerated, and its item redone.
    lines = (out / "records.jsonl").read_text().splitlines(keepends=True)
    (out / "records.jsonl").write_text("".join(lines[:-1]) + lines[-1][:25])
    assert run(data, out) == {"records": 1, "skipped": 0}
    assert sorted(read_lines(out / "records.jsonl"), key=str) == sorted(map(json.loads, lines), key=str)


def test_workers_do_not_change_the_output(data):
    run(data, data / "one", workers=1)
    assert run(data, data / "two", workers=2) == {"records": 4, "skipped": 2}
    for name in ("records.jsonl", "skipped.jsonl"):
        assert (data / "one" / name).read_text() == (data / "two" / name).read_text()
    for folder in ("inputs", "targets"):
        files = sorted(os.listdir(data / "one" / folder))
        assert files == sorted(os.listdir(data / "two" / folder)) and len(files) == 4
        for f in files:
            assert (data / "one" / folder / f).read_bytes() == (data / "two" / folder / f).read_bytes()


def run_shards(data, out, workers=1, part=(0, 1)):
    items = pairs.read_data(str(data / "data.jsonl"))
    backgrounds = pairs.list_backgrounds(str(data / "bg"))
    return pairs.build_shards(items, backgrounds, str(out), KnownMask, SETTINGS, workers, 3, shard_size=2, part=part)


def test_shards_hold_the_pairs_however_the_work_is_split_and_resume(data):
    from shards import OpenShards, decode, shard_keys, shard_paths
    out = data / "shards"
    assert run_shards(data, out) == {"records": 4, "skipped": 2, "shards": 3}  # items 0-1, 2-3, 4-5
    run(data, data / "png")  # the same pairs as PNG files and a manifest
    records = read_lines(data / "png" / "records.jsonl")
    paths = shard_paths(str(out))
    keys = [(path, key) for path in paths for key in shard_keys(path)]
    assert [key for _, key in keys] == [os.path.basename(r["input"])[:-4] for r in records]
    reader = OpenShards()
    for (path, key), rec in zip(keys, records):
        meta, pictures = decode(reader.read(path, key), ("input", "target"), ("subject", "caption"))
        assert (meta["subject"], meta["caption"]) == (rec["subject"], rec["caption"])
        for picture, name in zip(pictures, (rec["input"], rec["target"])):  # JPEG at quality 95: close
            assert np.abs(np.asarray(picture, float) - np.asarray(Image.open(data / "png" / name), float)).mean() < 3
    stats = json.loads((out / "00001_stats.json").read_text())
    assert (stats["count"], stats["written"]) == (2, 1) and "unreadable image" in stats["skipped"][0]["reason"]

    split = data / "split"  # two machines, one with two workers: the same shards, byte for byte
    assert run_shards(data, split, part=(1, 2), workers=2) == {"records": 1, "skipped": 1, "shards": 1}
    assert run_shards(data, split, part=(0, 2))["shards"] == 2
    assert sorted(os.listdir(split)) == sorted(os.listdir(out))
    assert all((split / f).read_bytes() == (out / f).read_bytes() for f in os.listdir(out))

    # Resumed: the missing shard is made again and its half-written copy removed; the others are kept,
    # and so is a shard another machine is writing into the same folder.
    stamps = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    before = (out / "00002.tar").read_bytes()
    os.remove(out / "00002.tar")
    (out / ".00002.tar.tmp-abcd1234").write_bytes(b"half a shard")  # ShardWriter's temporary names
    (out / ".00007.tar.tmp-wxyz5678").write_bytes(b"another machine's")
    assert run_shards(data, out) == {"records": 1, "skipped": 1, "shards": 1}
    assert sorted(os.listdir(out)) == sorted([*stamps, ".00007.tar.tmp-wxyz5678"])
    assert (out / "00002.tar").read_bytes() == before
    assert all(os.stat(out / f).st_mtime_ns == stamps[f] for f in stamps if not f.startswith("00002"))


def test_shards_command_line_and_its_errors(data, monkeypatch, capsys):
    argv = ["pairs.py", "--data", str(data / "data.jsonl"), "--backgrounds", str(data / "bg"), "--from-masks",
            "--out", str(data / "out")]
    for extra, message in ((["--part", "2/2", "--shards"], "0 <= I < N"), (["--part", "0/2"], "add --shards"),
                           (["--shards", "--shard-size", "0"], "--shard-size: 0: give 1 or more"),
                           (["--size", "0"], "--size: 0: give 1 or more"), (["--band", "-2"], "--band: -2"),
                           (["--out", str(data / "data.jsonl")], "is a file")):
        monkeypatch.setattr(sys, "argv", argv + extra)
        with pytest.raises(SystemExit) as e:
            pairs.main()
        said = str(e.value) if e.value.code != 2 else capsys.readouterr().err.strip()  # the flag's own check: exit 2
        assert said.startswith("error: ") and message in said and "\n" not in said
        assert not (data / "out").exists()


def test_command_line_with_clipseg(data, tmp_path, monkeypatch, capsys):
    from test_clipseg import saved_reference  # here, so that worker processes need not import transformers

    clipseg = tmp_path / "clipseg"
    clipseg.mkdir()
    saved_reference(clipseg, "legacy")
    segmenter = pairs.CLIPSegSegmenter(str(clipseg))
    image = pairs.load_rgb(str(data / "images" / "shape0.png"), SIZE)
    p = segmenter(image, {"subject": "ball"})
    assert p.shape == (SIZE, SIZE) and 0 <= p.min() <= p.max() <= 1
    with torch.no_grad():  # the upsampled map agrees with CLIPSeg's own 352 x 352 output
        small = segmenter.model.segment([Image.fromarray(image)], ["ball"])[0].numpy()
    assert abs(p.mean() - small.mean()) < 0.02
    # The random model's map is meaningless, so take thresholds from it that leave something to matte.
    high, low = np.quantile(p, 0.7), np.quantile(p, 0.4)
    (data / "folder").mkdir()
    os.replace(data / "images" / "shape0.png", data / "folder" / "shape0.png")
    out = tmp_path / "out"
    argv = ["pairs.py", "--data", str(data / "folder"), "--subject", "ball", "--backgrounds", str(data / "bg"),
            "--clipseg", str(clipseg), "--out", str(out), "--size", str(SIZE), "--high", str(high),
            "--low", str(low), "--band", "0", "--max-unknown", "0.5"]
    monkeypatch.setattr(sys, "argv", argv)
    pairs.main()
    assert read_lines(out / "records.jsonl") == [dict(input="inputs/000000_shape0.png",
                                                      target="targets/000000_shape0.png",
                                                      subject="ball", caption="a ball")]
    assert capsys.readouterr().out.startswith(f"wrote 1 new records to {out / 'records.jsonl'} (1 in all), skipped 0")
    pairs.main()  # a rerun resumes: nothing left to do, and the manifest says what is there
    assert capsys.readouterr().out.startswith(f"wrote 0 new records to {out / 'records.jsonl'} (1 in all), skipped 0")
    assert len(read_lines(out / "records.jsonl")) == 1


PATH_FLAGS = ("--data", "--backgrounds", "--clipseg", "--out")


@pytest.mark.parametrize("change,message", [
    ({"--data": "missing.jsonl"}, "no such data file"),
    ({"--data": "emptydir", "--subject": "dog"}, "holds no images"),
    ({"--data": "images"}, "--subject"),
    ({"--data": "bad.jsonl"}, "line 1"),
    ({"--backgrounds": "missing"}, "is not a folder"),
    ({"--backgrounds": "emptydir"}, "holds no images"),
    ({"--clipseg": "emptydir"}, "config.json"),
    ({"--high": "0.05"}, "--low"),
])
def test_bad_input_fails_before_any_work(data, monkeypatch, change, message):
    (data / "emptydir").mkdir()
    args = {"--data": "data.jsonl", "--backgrounds": "bg", "--clipseg": "no-clipseg-needed", "--out": "out"}
    args.update(change)
    (data / "bad.jsonl").write_text('{"image": "images/shape0.png"}\n')
    argv = ["pairs.py"]
    for flag, value in args.items():
        argv += [flag, str(data / value) if flag in PATH_FLAGS else value]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        pairs.main()
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)
    assert not (data / "out").exists()


def test_toy_world_pairs_from_degraded_masks(tmp_path, monkeypatch):
    """--from-masks: the toy world's true masks, degraded as CLIPSeg's confidence would be, then
    trimap and matting as for photographs; the matted subject lands on the new background."""
    import toyeval
    import toyworld
    monkeypatch.setattr(sys, "argv", ["toyworld.py", "data", "--n", "6", "--backgrounds", "4",
                                      "--out", str(tmp_path / "toy")])
    toyeval.main()
    out = tmp_path / "pairs"
    monkeypatch.setattr(sys, "argv", ["pairs.py", "--data", str(tmp_path / "toy" / "pairs.jsonl"), "--from-masks",
                                      "--backgrounds", str(tmp_path / "toy" / "backgrounds"), "--out", str(out),
                                      "--size", "64", "--band", "2"])
    pairs.main()
    records = read_lines(out / "records.jsonl")
    manifest = read_lines(tmp_path / "toy" / "pairs.jsonl")
    assert len(records) + len(read_lines(out / "skipped.jsonl")) == 6 and len(records) >= 4
    for rec in records:
        src = manifest[int(rec["input"].split("/")[1][:6])]
        assert rec["caption"] in toyworld.CONTEXTS and rec["subject"] == src["subject"]
        target = np.asarray(Image.open(out / rec["target"]), np.float64)
        pair = np.asarray(Image.open(out / rec["input"]), np.float64)
        mask = np.asarray(Image.open(tmp_path / "toy" / src["mask"])) / 255.0
        assert np.array_equal(target, np.asarray(Image.open(tmp_path / "toy" / src["image"]), np.float64))
        core, away = mask == 1, ndi.binary_dilation(mask > 0, iterations=4) == 0
        assert np.abs(pair[core] - target[core]).mean() < 20  # the subject is kept...
        assert np.abs(pair[away] - target[away]).mean() > 10  # ...and the old context is gone
