"""The toy world (toyworld.py): a seed fixes every picture, held-out identities stay out of training,
captions and masks say what was drawn, and the shipped oracle (oracle.py) reads the pictures back."""

import os

import numpy as np
import pytest
import torch

import oracle as orc
import toyeval
import toyworld as tw
from matting import trimap_from_confidence
from pairs import confidence_from_mask

ORACLE = os.path.join(os.path.dirname(__file__), "..", "weights", "toy", "oracle.safetensors")


def test_a_seed_fixes_the_sample():
    a, b = tw.sample(np.random.default_rng(7)), tw.sample(np.random.default_rng(7))
    assert a.caption == b.caption and a.attributes == b.attributes
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.mask, b.mask)
    c = tw.sample(np.random.default_rng(8))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_heldout_identities_never_appear_in_training():
    train, held, everything = tw.identities("train"), tw.identities("heldout"), tw.identities("all")
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(everything)
    assert len(everything) == 6 * 8 * (1 + 4 * 7)
    assert abs(len(held) / len(everything) - 0.1) < 0.01
    # Every word of the vocabulary is still taught: only combinations are held out.
    for i, words in enumerate((tw.CATEGORIES, tw.COLORS, tw.PATTERNS)):
        assert {ident[i] for ident in train} == set(words)
    rng = np.random.default_rng(0)
    for _ in range(300):
        a = tw.sample(rng, "train").attributes
        assert tw.Identity(a["category"], a["color"], a["pattern"], a["pattern_color"]) not in held
    a = tw.sample(rng, "heldout").attributes
    assert tw.Identity(a["category"], a["color"], a["pattern"], a["pattern_color"]) in held


def test_captions_name_the_attributes():
    rng = np.random.default_rng(0)
    s = tw.render(tw.Identity("ball", "red", "stripes", "blue"), "on the grass", rng)
    assert s.caption == "a red striped ball on the grass" and s.category == "ball"
    assert tw.render(("cup", "white", "plain", None), "at night", rng).caption == "a white cup at night"
    for _ in range(50):
        s = tw.sample(rng, "all")
        a = s.attributes
        words = ["a", a["color"], tw.PATTERNS[a["pattern"]], a["category"], a["context"]]
        assert s.caption == " ".join(w for w in words if w) and s.category == a["category"]
        assert a["context"] in tw.CONTEXTS and (a["pattern_color"] is None) == (a["pattern"] == "plain")


@pytest.mark.parametrize("category", tw.CATEGORIES)
def test_the_mask_is_the_drawn_subject(category):
    size = 64
    for seed in range(3):
        s = tw.render((category, "red", "dots", "yellow"), "in the snow", np.random.default_rng(seed), size)
        back = tw.background("in the snow", np.random.default_rng(seed), size)  # render draws it first
        back = np.round(back * 255)
        image = np.asarray(s.image).astype(float)
        assert s.mask.shape == (size, size) and s.mask.dtype == np.float32
        assert s.mask.min() == 0 and s.mask.max() == 1
        assert ((s.mask > 0) & (s.mask < 1)).any(), "edges are antialiased"
        assert np.array_equal(image[s.mask == 0], back[s.mask == 0])
        # A red and yellow subject on snow differs from the snow everywhere the mask says it is.
        assert (np.abs(image - back).max(-1)[s.mask > 0.5] > 60).all()
        assert 0.05 < (s.mask > 0.5).mean() < 0.5


def test_confidence_is_close_to_the_mask_but_not_equal():
    rng = np.random.default_rng(0)
    for _ in range(10):
        m = tw.sample(rng).mask
        p = confidence_from_mask(m, rng)
        assert p.shape == m.shape and p.min() >= 0 and p.max() <= 1
        assert np.abs(p - m).mean() < 0.1 and np.abs(p - m).max() > 0.3
        inter, union = ((p >= 0.5) & (m > 0.5)).sum(), ((p >= 0.5) | (m > 0.5)).sum()
        assert inter / union > 0.75
        trimap = trimap_from_confidence(p)
        assert (m[trimap == 255] > 0.5).mean() > 0.85 and (m[trimap == 0] < 0.5).mean() > 0.98


def test_the_oracle_loads_strictly(tmp_path):
    with pytest.raises(orc.CheckpointError, match="not found"):
        orc.load_oracle(str(tmp_path / "none.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(orc.CheckpointError, match="junk.safetensors"):
        orc.load_oracle(str(tmp_path / "junk.safetensors"))
    oracle = orc.AttributeOracle()
    path = str(tmp_path / "o.safetensors")
    orc.save_oracle(oracle, path)
    assert torch.equal(orc.load_oracle(path).proj.weight, oracle.proj.weight)


@pytest.mark.skipif(not os.path.isfile(ORACLE), reason="weights/toy/oracle.safetensors not trained yet")
def test_the_shipped_oracle_reads_the_world():
    torch.set_num_threads(1)
    oracle = orc.load_oracle(ORACLE)
    assert sum(p.numel() for p in oracle.parameters()) < 1_000_000
    rng = np.random.default_rng(2024)  # not the training seed: fresh pictures
    for split in ("train", "heldout"):
        acc = orc.accuracy(oracle, rng, 200, split)
        assert all(v >= 0.98 for v in acc.values()), (split, acc)
    # Softened pictures (blurred, resampled, noisy: as soft as a generation) read as well, so a
    # faithful but soft generation is not scored as a miss.
    acc = orc.accuracy(oracle, rng, 200, "heldout", soften=True)
    assert all(v >= 0.96 for v in acc.values()), acc
    x, y, samples = tw.batch(rng, 8)
    images = [s.image for s in samples]
    assert all(torch.equal(a, b) for a, b in zip(oracle.predict(images).values(), oracle.predict(x).values()))
    f = oracle.features(images)
    assert f.shape == (8, oracle.config.feature_dim)
    assert torch.allclose(f, oracle.features(x), atol=1e-5)


def test_degrade_softens_but_keeps_the_picture():
    x, _, _ = tw.batch(np.random.default_rng(0), 16)
    soft = orc.degrade(x, torch.Generator().manual_seed(0))
    assert soft.shape == x.shape and 0 <= float(soft.min()) and float(soft.max()) <= 1
    assert torch.equal(soft, orc.degrade(x, torch.Generator().manual_seed(0)))  # seeded
    diff = (soft - x).abs().mean(dim=(1, 2, 3))
    assert float(diff.max()) > 0.005  # softened ...
    assert float((soft.mean(dim=(2, 3)) - x.mean(dim=(2, 3))).abs().max()) < 0.02  # ... but the colours stay
    # A blur keeps a flat picture flat and spreads a point over its neighbours, summing to one.
    flat = torch.full((1, 3, 9, 9), 0.3)
    assert torch.allclose(orc.gaussian_blur(flat, 1.0), flat, atol=1e-6)
    point = torch.zeros(1, 3, 15, 15)
    point[..., 7, 7] = 1
    blurred = orc.gaussian_blur(point, 1.0)
    assert abs(float(blurred.sum()) - 3) < 1e-5 and float(blurred[0, 0, 7, 7]) < 0.2


@pytest.mark.skipif(not os.path.isfile(ORACLE), reason="weights/toy/oracle.safetensors not trained yet")
def test_evaluate_runs_on_two_subjects(tmp_path, monkeypatch, capsys):
    import json
    import sys

    from PIL import Image

    import stages
    torch.set_num_threads(1)
    model = stages.tiny_model(str(tmp_path / "tiny_src"))
    model.save_pretrained(str(tmp_path / "model"))
    sheet, out = tmp_path / "sheet.png", tmp_path / "eval.json"
    monkeypatch.setattr(sys, "argv", [
        "toyworld.py", "evaluate", "--weights", str(tmp_path / "model"), "--oracle", ORACLE, "--subjects", "2",
        "--contexts", "2", "--refs", "2", "--steps", "2", "--finetune-steps", "2", "--threads", "1",
        "--sheet", str(sheet), "--sheet-subjects", "1", "--json", str(out)])
    toyeval.main()
    printed = capsys.readouterr().out
    assert "| method | subject fidelity | prompt fidelity | oracle-feature cosine |" in printed
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"text-only", "zero-shot", "fine-tuned"}
    for m, (low, high) in result["intervals_90"].items():
        assert low <= high and (m.endswith("zero-shot") or low <= result["rows"][m]["subject_fidelity"] <= high)
    for row in result["rows"].values():
        assert row["generations"] == 2 * 2  # subjects x contexts
        assert all(0 <= row[k] <= 1 for k in ("subject_fidelity", "prompt_fidelity", "category", "color", "pattern"))
        assert -1 <= row["feature_cosine"] <= 1
    # The layout: per drawn subject (the first --sheet-subjects) one row per method; each row the first
    # reference, then one picture per context.
    side = model.unet.config.sample_size * 2 ** (len(model.vae.config.block_out_channels) - 1)
    zoom = 2
    with Image.open(sheet) as im:
        assert im.size == (zoom * side * (1 + 2), zoom * side * 3 * 1)
    assert not list(tmp_path.glob(".*"))  # the atomic writes left no temporary file behind


def test_bootstrap_intervals_are_over_subjects():
    def gens(per_subject_hits, contexts=4):  # subject k: its first hits[k] generations keep the whole subject
        return [{"category": True, "color": i < h, "pattern": True} for h in per_subject_hits for i in range(contexts)]
    same = toyeval.bootstrap({"text-only": gens([0, 0]), "zero-shot": gens([2, 2]), "fine-tuned": gens([4, 4])}, 4)
    assert same["zero-shot"] == [0.5, 0.5] and same["fine-tuned - zero-shot"] == [0.5, 0.5]  # subjects alike: no spread
    apart = toyeval.bootstrap({"text-only": gens([0] * 20), "zero-shot": gens([0, 4] * 10),
                               "fine-tuned": gens([0, 4] * 10)}, 4)
    low, high = apart["zero-shot"]
    assert 0.25 < low < 0.5 < high < 0.75  # half the subjects kept, half lost: 20 subjects leave a wide interval
    assert apart["fine-tuned - zero-shot"] == [0.0, 0.0]  # paired: the same subjects drawn for both methods


def test_evaluate_says_what_is_missing(tmp_path, monkeypatch):
    import sys
    monkeypatch.setattr(sys, "argv", ["toyworld.py", "evaluate", "--weights", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="no BLIP-Diffusion model there"):
        toyeval.main()


def test_linear_probe_reads_what_the_features_hold():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (400,), generator=g)
    noise = torch.randn(400, 16, generator=g)
    held = torch.nn.functional.one_hot(y, 5).float() * 3 + 0.3 * noise[:, :5]  # the label, linearly
    blind = noise  # nothing of the label
    train, test = slice(0, 300), slice(300, 400)
    assert toyeval.linear_probe(held[train], y[train], held[test], y[test]) == 1.0
    assert toyeval.linear_probe(blind[train], y[train], blind[test], y[test]) < 0.45  # chance is 0.2


def test_probe_command_prints_a_row_per_feature(tmp_path, monkeypatch, capsys):
    import sys

    import stages
    torch.set_num_threads(1)
    stages.tiny_model(str(tmp_path / "tiny_src")).save_pretrained(str(tmp_path / "model"))
    monkeypatch.setattr(sys, "argv", ["toyworld.py", "probe", "--weights", str(tmp_path / "model"), "--n", "40",
                                      "--threads", "1"])
    toyeval.main()
    printed = capsys.readouterr().out
    assert "| features | category | colour | pattern |" in printed
    rows = [line for line in printed.splitlines() if line.startswith(("| image tower", "| subject embedding"))]
    assert len(rows) == 2
    assert all(0 <= float(v) <= 1 for line in rows for v in line.strip("| ").split(" | ")[1:])


def test_probe_says_what_is_wrong(tmp_path, monkeypatch):
    import sys
    monkeypatch.setattr(sys, "argv", ["toyworld.py", "probe", "--weights", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="no BLIP-Diffusion model there"):
        toyeval.main()
    monkeypatch.setattr(sys, "argv", ["toyworld.py", "probe", "--n", "4"])
    with pytest.raises(SystemExit, match="--n must be at least 8"):
        toyeval.main()


def test_the_shipped_toy_data_is_what_the_command_writes(tmp_path):
    """examples/toy-data (what train.py --data toy reads) is exactly the output of the command its
    README names, run as a user runs it (toyworld.py's entry point), pictures and manifests alike."""
    import json
    import subprocess
    import sys
    from PIL import Image
    root = os.path.join(os.path.dirname(__file__), "..")
    out = tmp_path / "toy-data"
    subprocess.run([sys.executable, "toyworld.py", "data", "--n", "64", "--backgrounds", "0", "--inputs",
                    "--out", str(out)], cwd=root, check=True, capture_output=True)
    shipped = os.path.join(root, "examples", "toy-data")
    for manifest in ("records.jsonl", "pairs.jsonl", "subject.jsonl"):
        with open(out / manifest) as ours, open(os.path.join(shipped, manifest)) as theirs:
            written, kept = [json.loads(line) for line in ours], [json.loads(line) for line in theirs]
        assert written == kept and len(written) == 64
    for rec in kept:  # subject.jsonl: every input and target picture
        for key in ("input", "target"):
            assert np.array_equal(np.asarray(Image.open(out / rec[key])),
                                  np.asarray(Image.open(os.path.join(shipped, rec[key]))))
    stage2 = kept[0]
    assert set(stage2) == {"input", "target", "subject", "caption"} and stage2["subject"] in tw.CATEGORIES
