"""evaluate.py dreambench end to end on the shipped toy model: a DreamBench-shaped data set of toy-world
pictures (the DreamBooth layout and prompts file), small random DINO and CLIP folders; the run writes
every output, resumes without making an image again, fine-tunes per subject, and refuses bad input."""

import json
import os

import numpy as np
import pytest

import evaluate
import toyworld

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TOY = os.path.join(ROOT, "weights", "toy")

# google/dreambooth's dataset/prompts_and_classes.txt, cut to two subjects and three prompts a list
# (the first two and the "a red ..." one, whose adjective joins the target text).
PROMPTS_FILE = """Classes

subject_name,class
red_ball,ball
blue_star,star
pet,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]
"""


def write_dataset(folder):
    """dataset/<subject>/NN.jpg and dataset/prompts_and_classes.txt, as google/dreambooth lays it out."""
    root = folder / "dataset"
    identities = {"red_ball": toyworld.Identity("ball", "red", "dots", "purple"),
                  "blue_star": toyworld.Identity("star", "blue", "stripes", "white"),
                  "pet": toyworld.Identity("heart", "green", "plain", None)}
    rng = np.random.default_rng(0)
    for name, identity in identities.items():
        (root / name).mkdir(parents=True)
        for i, context in enumerate(toyworld.CONTEXTS[:3]):
            toyworld.render(identity, context, rng).image.save(root / name / f"{i:02d}.jpg", quality=95)
    (root / "prompts_and_classes.txt").write_text(PROMPTS_FILE)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from reference import tiny_reference_clip, tiny_reference_dino
    folder = tmp_path_factory.mktemp("bench")
    tiny_reference_dino(str(folder / "dino"))
    tiny_reference_clip(str(folder / "clip"))
    write_dataset(folder / "dreambooth")
    return folder


def run(setup, out, *extra):
    argv = ["dreambench", "--data", str(setup / "dreambooth"), "--weights", TOY, "--out", str(out),
            "--dino", str(setup / "dino"), "--clip", str(setup / "clip"), "--device", "cpu",
            "--images-per-prompt", "2", "--steps", "2", *extra]
    return evaluate.main(argv)


def test_dreambench_on_the_toy_model_writes_everything_and_resumes(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run(setup, out, "--subjects", "red_ball", "pet", "--prompts", "1", "3") == 0
    manifest = [json.loads(line) for line in open(out / "manifest.jsonl")]
    assert len(manifest) == 2 * 2 * 2  # subjects x prompts x images
    assert {r["prompt"] for r in manifest} == {"a ball in the jungle", "a red ball", "a dog in the jungle",
                                               "a red dog"}
    for r in manifest:
        assert os.path.isfile(out / r["image"])
        assert all(os.path.isfile(out / ref) for ref in r["references"]) and len(r["references"]) == 3
    scores = json.load(open(out / "scores.json"))
    assert [s["image"] for s in scores["images"]] == [r["image"] for r in manifest]
    for key in ("dino", "clip_i", "clip_t"):
        assert -1 <= scores["mean"][key] <= 1
        assert abs(scores["mean"][key] - np.mean([s[key] for s in scores["images"]])) < 1e-9
    # The scores are evaluate.py score's on the manifest the run wrote.
    assert evaluate.main(["score", str(out / "manifest.jsonl"), "--dino", str(setup / "dino"), "--clip",
                          str(setup / "clip"), "--device", "cpu", "--out", str(tmp_path / "again.json")]) == 0
    assert json.load(open(tmp_path / "again.json")) == scores
    table = open(out / "results.md").read()
    assert "0.594" in table and "0.779" in table and "| red_ball |" in table and "| pet |" in table
    assert {f for f in os.listdir(out / "sheets")} == {"red_ball.png", "pet.png"}

    # A rerun makes no image again; one lost image is made again, the same picture (to one level of 255:
    # it is made alone, where the first run made it in a batch of two, which rounds differently).
    lost = out / manifest[1]["image"]
    before = np.asarray(evaluate.read_image(lost)).astype(int)
    os.remove(lost)
    calls = []
    from blipdiff import BlipDiffusion
    generate = BlipDiffusion.generate
    monkeypatch.setattr(BlipDiffusion, "generate", lambda self, *a, **kw: calls.append(kw) or generate(self, *a, **kw))
    assert run(setup, out, "--subjects", "red_ball", "pet", "--prompts", "1", "3") == 0
    again = np.asarray(evaluate.read_image(lost)).astype(int)
    assert len(calls) == 1 and np.abs(again - before).max() <= 1
    # Other settings in the same folder would mix two runs.
    assert run(setup, out, "--subjects", "red_ball", "--prompts", "1", "--steps", "3") == 2


def test_dreambench_fine_tuned(setup, tmp_path):
    out = tmp_path / "ft"
    assert run(setup, out, "--subjects", "blue_star", "--prompts", "2", "--images-per-prompt", "1",
               "--finetune-steps", "2", "--finetune-lr", "1e-4") == 0
    assert len(os.listdir(out / "images" / "blue_star")) == 1
    assert not os.path.exists(out / "finetuned" / "blue_star")  # removed once its images are written
    assert "fine-tuned 2 steps" in open(out / "results.md").read()


@pytest.mark.parametrize("case,message", [
    ("no data", "prompts_and_classes.txt"),
    ("no pictures", "has no pictures"),
    ("bad weights", "model_index.json"),
    ("unknown subject", "no subject nobody"),
    ("bad prompt number", "--prompts"),
])
def test_dreambench_bad_input_is_one_line_and_writes_nothing(setup, tmp_path, capsys, case, message):
    data, weights, extra = setup / "dreambooth", TOY, []
    if case == "no data":
        data = tmp_path / "nothing"
    elif case == "no pictures":
        data = write_dataset(tmp_path / "copy")
        for f in os.listdir(data / "dataset" / "pet"):
            os.remove(data / "dataset" / "pet" / f)
    elif case == "bad weights":
        weights = str(tmp_path)
    elif case == "unknown subject":
        extra = ["--subjects", "nobody"]
    else:
        extra = ["--prompts", "26"]
    out = tmp_path / "out"
    argv = ["dreambench", "--data", str(data), "--weights", weights, "--out", str(out), "--dino", str(setup / "dino"),
            "--clip", str(setup / "clip"), "--device", "cpu", *extra]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err
    assert not out.exists()
