"""Bad input to the command lines: one line that says what was wrong and what to do, a non-zero exit,
and nothing written; an interrupted sample.py writes nothing; --help shows the defaults."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import matting
import sample
import toymodel
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BALL = os.path.join(ROOT, "examples", "red-dotted-ball.png")
TINY = ["--stage", "subject", "--model", "tiny", "--data", "toy", "--steps", "2", "--batch-size", "2"]


def one_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in text, text
    return lines[0]


@pytest.mark.parametrize("flag,value", [
    ("--steps", "0"), ("--steps", "-5"), ("--batch-size", "0"), ("--save-every", "0"), ("--lr", "-1"),
    ("--lr", "nan"), ("--grad-accum", "0"), ("--keep", "0"), ("--ema", "1"), ("--caption-drop", "1.5"),
    ("--warmup", "-1"), ("--seed", "-1"), ("--workers", "-1"), ("--threads", "0"), ("--steps", "ten"),
])
def test_train_checks_every_number_before_any_work(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(TINY + [flag, value, "--out", str(out)])
    assert e.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert flag in line and value in line
    assert not out.exists()


def test_train_checks_its_output_place_and_image_size_first(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert train.main(TINY + ["--out", str(tmp_path / "file")]) == 2
    assert "is a file" in one_line(capsys.readouterr().err)
    assert train.main(TINY + ["--image-size", "100", "--out", str(tmp_path / "run")]) == 2
    assert "multiple of 8" in one_line(capsys.readouterr().err) and not (tmp_path / "run").exists()


def run_sample(capsys, *extra):
    code = sample.main(["--subject", BALL, "--subject-text", "ball", "--prompt", "on the grass", *extra])
    return code, capsys.readouterr().err


def test_sample_answers_bad_input_in_one_line(tmp_path, capsys):
    out = str(tmp_path / "out.png")
    code, err = run_sample(capsys, "--height", "100", "--out", out)
    assert code == 2 and "--height 100" in one_line(err) and "None" not in err
    os.makedirs(tmp_path / "folder.png")
    code, err = run_sample(capsys, "--out", str(tmp_path / "folder.png"))
    assert code == 2 and "is a folder" in one_line(err)
    if not torch.cuda.is_available():
        code, err = run_sample(capsys, "--device", "cuda", "--out", out)
        assert code == 2 and "--device cuda" in one_line(err)
    big = tmp_path / "big.png"  # 196 megapixels, a few kilobytes: PIL refuses it as a decompression bomb
    Image.new("1", (14000, 14000)).save(big)
    code, err = sample.main(["--subject", str(big), "--subject-text", "ball", "--prompt", "x", "--out", out]), \
        capsys.readouterr().err
    assert code == 2 and "too large" in one_line(err)
    run = tmp_path / "run"  # a training run stopped before its export
    os.makedirs(run / "checkpoints" / "step-0000004")
    code, err = run_sample(capsys, "--weights", str(run), "--out", out)
    line = one_line(err)
    assert code == 2 and "training run without an exported model" in line and "--resume" in line
    assert "step-0000004" in line
    os.makedirs(run / "qformer")  # a finished stage-1 run: parts of a model, never a whole one
    code, err = run_sample(capsys, "--weights", str(run), "--out", out)
    assert code == 2 and "makes parts of the model (qformer)" in one_line(err)
    assert not os.path.exists(out)


def test_sample_interrupted_writes_nothing_and_says_so_in_one_line(tmp_path):
    out = tmp_path / "out.png"
    proc = subprocess.Popen([sys.executable, "sample.py", "--subject", BALL, "--subject-text", "ball", "--prompt", "x",
                             "--steps", "2000", "--out", str(out)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    seen, deadline = "", time.time() + 120
    while "denoising:" not in seen:  # the progress bar: the model is loaded and generating
        char = proc.stderr.read(1)
        if not char or time.time() > deadline:
            proc.kill()
            pytest.fail(f"sample.py ended or hung before generating: {seen[-2000:]}")
        seen += char
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert rest.strip().splitlines()[-1].startswith("interrupted: nothing written") and "Traceback" not in rest
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_matting_writes_png_only(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["matting.py", "--image", BALL, "--trimap", BALL, "--out", str(tmp_path / "a.xyz")])
    with pytest.raises(SystemExit) as e:
        matting.main()
    assert str(e.value).startswith("error: --out") and ".png" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_toymodel_will_not_replace_an_installed_model_unasked(tmp_path, capsys):
    installed = tmp_path / "toy"
    os.makedirs(installed)
    (installed / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        toymodel.main(["--out", str(tmp_path / "run"), "--install", str(installed)])
    assert e.value.code == 2 and "--force" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_help_shows_the_defaults():
    def help_of(script):
        return " ".join(subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True,
                                       text=True, check=True).stdout.split())
    text = help_of("sample.py")
    for default in ("(default: 50)", "(default: out.png)", "(default: pndm)", "(default: auto)"):
        assert default in text, default
    text = help_of("train.py")
    for default in ("published (the default)", "(default: 1000)", "(default: 3)", "(default: 42)", "--threads"):
        assert default in text, default


def test_threads_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        from cli import use_threads
        use_threads(2)
        assert torch.get_num_threads() == 2
        use_threads(None)  # the default leaves torch's choice
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
