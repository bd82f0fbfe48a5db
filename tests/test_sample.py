"""sample.py, the command line: parity with the reference pipeline, its outputs, and bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    rng = np.random.RandomState(0)
    path = tmp_path_factory.mktemp("subject") / "dog.png"
    Image.fromarray((rng.rand(48, 40, 3) * 255).astype(np.uint8)).save(path)
    return str(path)


def run(folder, subject, out, *extra):
    argv = ["--weights", folder, "--subject", subject, "--subject-text", "dog", "--prompt", "swimming underwater",
            "--steps", "3", "--height", "32", "--width", "32", "--seed", "5", "--out", str(out), *extra]
    return sample.main(argv)


@pytest.mark.parametrize("extra,guidance,negative,scheduler", [
    ((), 7.5, "", "pndm"),
    (("--negative-prompt", "blurry, lowres"), 7.5, "blurry, lowres", "pndm"),
    (("--guidance", "1"), 1.0, "", "pndm"),
    (("--scheduler", "ddim", "--negative-prompt", "ugly"), 7.5, "ugly", "ddim"),
    (("--scheduler", "dpm"), 7.5, "", "dpm"),
])
def test_output_equals_reference_pipeline(tiny_pipeline, subject, tmp_path, extra, guidance, negative, scheduler):
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler
    pipe, folder = tiny_pipeline
    assert run(folder, subject, tmp_path / "x.npy", *extra) == 0
    out = np.load(tmp_path / "x.npy")
    saved = pipe.scheduler
    if scheduler == "ddim":  # what --scheduler ddim promises: Stable Diffusion v1.5's DDIM settings
        pipe.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if scheduler == "dpm":  # DPM-Solver++ from the folder's own scheduler config, as diffusers builds it
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            PNDMScheduler.from_pretrained(folder, subfolder="scheduler").config)
    try:
        ref = pipe(prompt=["swimming underwater"], reference_image=Image.open(subject), source_subject_category=["dog"],
                   target_subject_category=["dog"], guidance_scale=guidance, neg_prompt=negative, height=32, width=32,
                   num_inference_steps=3, generator=torch.Generator().manual_seed(5), output_type="np").images
    finally:
        pipe.scheduler = saved
    assert out.dtype == np.float32 and out.shape == (1, 32, 32, 3)
    assert np.abs(out - ref).max() <= 1e-4


def test_a_model_folder_names_its_own_guidance(tiny_pipeline, subject, tmp_path):
    """model_index.json's "guidance" (the toy model's) is the default scale, diffusers' reference
    reading the folder as before; an explicit --guidance still wins, and saving keeps it."""
    import json
    import shutil
    from blipdiff import BlipDiffusion
    pipe, folder = tiny_pipeline
    own = tmp_path / "own"
    shutil.copytree(folder, own)
    index = json.loads((own / "model_index.json").read_text())
    (own / "model_index.json").write_text(json.dumps({**index, "guidance": 1.0}))
    assert run(str(own), subject, tmp_path / "own.npy") == 0
    assert run(folder, subject, tmp_path / "one.npy", "--guidance", "1") == 0
    assert run(folder, subject, tmp_path / "default.npy") == 0
    assert run(str(own), subject, tmp_path / "told.npy", "--guidance", "7.5") == 0
    own_default, one, default, told = (np.load(tmp_path / f"{n}.npy") for n in ("own", "one", "default", "told"))
    assert np.array_equal(own_default, one) and np.array_equal(told, default)
    assert np.abs(own_default - default).max() > 1e-3  # the scale matters at all
    model = BlipDiffusion.from_pretrained(str(own))
    model.save_pretrained(str(tmp_path / "saved"))
    assert BlipDiffusion.from_pretrained(str(tmp_path / "saved")).guidance == 1.0
    assert BlipDiffusion.from_pretrained(folder).guidance == 7.5


def test_command_line_writes_a_grid_and_each_image(tiny_pipeline, subject, tmp_path):
    _, folder = tiny_pipeline
    out = tmp_path / "out.png"
    cmd = [sys.executable, "sample.py", "--weights", folder, "--subject", os.path.dirname(subject),
           "--subject-text", "dog", "--prompt", "on the beach", "--steps", "2", "--height", "32", "--width", "48",
           "--num-images", "3", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (2 * 48, 2 * 32)  # 3 images in a 2x2 grid
    for k in range(3):
        assert Image.open(tmp_path / f"out-{k}.png").size == (48, 32)
    assert f"wrote {out}" in result.stdout.strip().splitlines()[-1]
    assert "denoising" in result.stderr  # the progress bar
    assert sorted(os.listdir(tmp_path)) == ["out-0.png", "out-1.png", "out-2.png", "out.png"]  # no temp files left


def test_compile_gives_the_same_image(tiny_pipeline, subject, tmp_path):
    """--compile (torch.compile of the UNet, with weight freezing on the CPU) changes the speed, not the
    picture. In its own process: freezing is a process-wide setting of torch's compiler."""
    _, folder = tiny_pipeline
    argv = [sys.executable, "sample.py", "--weights", folder, "--subject", subject, "--subject-text", "dog",
            "--prompt", "on the beach", "--steps", "3", "--height", "32", "--width", "32"]
    cache = tmp_path / "inductor"  # where the compiler writes its kernels: files there prove that it ran
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        result = subprocess.run(argv + ["--out", str(tmp_path / f"{name}.npy"), *extra], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        assert any(f.is_file() for f in cache.rglob("*")) == (name == "compiled")
    eager, compiled = np.load(tmp_path / "eager.npy"), np.load(tmp_path / "compiled.npy")
    assert eager.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(compiled, eager, atol=1e-4)


def bad(capsys, tmp_path, argv):
    try:
        code = sample.main(argv)
    except SystemExit as e:  # a flag's own check (argparse)
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not [f for f in os.listdir(tmp_path) if f != "in"]  # nothing written
    return err


def test_bad_input(tiny_pipeline, subject, tmp_path, capsys):
    _, folder = tiny_pipeline
    out = str(tmp_path / "x.png")
    base = ["--weights", folder, "--subject", subject, "--subject-text", "dog", "--prompt", "p", "--out", out]
    (tmp_path / "in").mkdir()
    empty, text = tmp_path / "in" / "empty", tmp_path / "in" / "notes.png"
    empty.mkdir()
    text.write_text("not an image")
    assert "--height 100: use a multiple of 8" in bad(capsys, tmp_path, base + ["--height", "100"])
    assert "--steps: 0: give 1 or more" in bad(capsys, tmp_path, base + ["--steps", "0"])
    assert "one word per subject" in bad(capsys, tmp_path, base + ["--subject", subject])
    assert "holds no images" in bad(capsys, tmp_path, base[:2] + ["--subject", str(empty)] + base[4:])
    assert f"{text}: not an image" in bad(capsys, tmp_path, base[:2] + ["--subject", str(text)] + base[4:])
    assert "no such file" in bad(capsys, tmp_path, base[:2] + ["--subject", str(tmp_path / "nope.png")] + base[4:])
    assert "there is no folder" in bad(capsys, tmp_path, base[:-1] + [str(tmp_path / "missing" / "x.png")])
    assert "use one of" in bad(capsys, tmp_path, base[:-1] + [str(tmp_path / "x.gif")])
    msg = bad(capsys, tmp_path, ["--weights", str(tmp_path / "nowhere")] + base[2:])
    assert "weights/README.md" in msg


def test_incomplete_weights_folder_names_the_file(tiny_pipeline, subject, tmp_path, capsys):
    import shutil
    _, folder = tiny_pipeline
    copy = tmp_path / "in"
    shutil.copytree(folder, copy)
    os.remove(copy / "unet" / "diffusion_pytorch_model.bin")
    err = bad(capsys, tmp_path, ["--weights", str(copy), "--subject", subject, "--subject-text", "dog",
                                 "--prompt", "p", "--steps", "1", "--out", str(tmp_path / "x.png")])
    assert "unet: no weight file" in err and "weights/README.md" in err


def test_odd_mode_subjects_are_accepted(tiny_pipeline, tmp_path):
    _, folder = tiny_pipeline
    rng = np.random.RandomState(1)
    rgb = Image.fromarray((rng.rand(24, 24, 3) * 255).astype(np.uint8))
    (tmp_path / "subject").mkdir()
    for mode in ("RGBA", "L", "P", "CMYK"):
        rgb.convert(mode).save(tmp_path / "subject" / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
    Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).save(tmp_path / "subject" / "16bit.png")
    code = sample.main(["--weights", folder, "--subject", str(tmp_path / "subject"), "--subject-text", "dog",
                        "--prompt", "p", "--steps", "1", "--height", "16", "--width", "16",
                        "--out", str(tmp_path / "x.npy")])
    assert code == 0 and np.isfinite(np.load(tmp_path / "x.npy")).all()


@pytest.fixture(scope="module")
def with_controlnet(tiny_pipeline, tmp_path_factory):
    """The tiny weights folder with a tiny ControlNet in controlnet/ (the blipdiffusion-controlnet layout)."""
    import shutil

    from test_controlnet import reference as tiny_controlnet
    _, folder = tiny_pipeline
    copy = tmp_path_factory.mktemp("with_controlnet") / "w"
    shutil.copytree(folder, copy)
    tiny_controlnet().save_pretrained(copy / "controlnet")
    return str(copy)


def photo(path, size=(32, 32)):
    a = np.zeros((*size, 3), np.uint8)
    a[8:24, 10:22] = (200, 180, 40)  # a box to find the edges of
    Image.fromarray(a).save(path)
    return str(path)


def test_canny_control_equals_the_api(with_controlnet, subject, tmp_path):
    from blipdiff import BlipDiffusion
    from controlnet import Control, ControlNet, canny_control_image
    assert run(with_controlnet, subject, tmp_path / "x.npy", "--control", "canny", "--control-image",
               photo(tmp_path / "photo.png"), "--canny-low", "50", "--canny-high", "100") == 0
    model = BlipDiffusion.from_pretrained(with_controlnet)
    controlnet = ControlNet.from_pretrained(os.path.join(with_controlnet, "controlnet"))
    edges = canny_control_image(Image.open(tmp_path / "photo.png"), 50, 100)
    ref = model.generate("swimming underwater", [Image.open(subject)], "dog", steps=3, seed=5, height=32, width=32,
                         control=Control(controlnet, edges), output="np", progress=False)
    assert np.abs(np.load(tmp_path / "x.npy") - ref).max() <= 1e-5
    plain = np.load(tmp_path / "x.npy")
    assert run(with_controlnet, subject, tmp_path / "y.npy", "--control", "image", "--control-image",
               str(tmp_path / "photo.png"), "--control-scale", "0") == 0
    assert run(with_controlnet, subject, tmp_path / "z.npy") == 0
    assert np.abs(np.load(tmp_path / "y.npy") - np.load(tmp_path / "z.npy")).max() <= 1e-6  # scale 0 = no control
    assert np.abs(plain - np.load(tmp_path / "z.npy")).max() > 1e-4  # the control did something


def test_canny_control_at_the_models_own_size(with_controlnet, subject, tmp_path):
    """Without --height/--width the edges are taken at the model's resolution, known only once it is read."""
    from blipdiff import BlipDiffusion
    side = BlipDiffusion.from_pretrained(with_controlnet).resolution
    argv = ["--weights", with_controlnet, "--subject", subject, "--subject-text", "dog", "--prompt", "at night",
            "--steps", "2", "--control", "canny", "--control-image", photo(tmp_path / "photo.png"),
            "--out", str(tmp_path / "x.npy")]
    assert sample.main(argv) == 0
    assert np.load(tmp_path / "x.npy").shape == (1, side, side, 3)


def test_two_controlnets_equal_the_api(with_controlnet, subject, tmp_path):
    """--control twice: each ControlNet on its own image, matched by order, residuals summed. One
    --controlnet for two controls goes to the first, the second takes the weights folder's controlnet/;
    one --control-scale goes to both."""
    from blipdiff import BlipDiffusion
    from controlnet import Control, ControlNet, canny_control_image
    from test_controlnet import reference as tiny_controlnet
    tiny_controlnet(seed=7).save_pretrained(tmp_path / "other")
    edges_photo, depth_map = photo(tmp_path / "photo.png"), str(tmp_path / "map.png")
    Image.fromarray((np.indices((32, 32)).sum(0) * 4).astype(np.uint8)).convert("RGB").save(depth_map)
    two = ["--control", "canny", "--control-image", edges_photo, "--controlnet", str(tmp_path / "other"),
           "--control", "image", "--control-image", depth_map, "--control-scale", "0.6"]
    assert run(with_controlnet, subject, tmp_path / "two.npy", *two) == 0
    model = BlipDiffusion.from_pretrained(with_controlnet)
    other = ControlNet.from_pretrained(str(tmp_path / "other"))
    default = ControlNet.from_pretrained(os.path.join(with_controlnet, "controlnet"))
    control = [Control(other, canny_control_image(Image.open(edges_photo)), 0.6),
               Control(default, Image.open(depth_map), 0.6)]
    ref = model.generate("swimming underwater", [Image.open(subject)], "dog", steps=3, seed=5, height=32, width=32,
                         control=control, output="np", progress=False)
    assert np.abs(np.load(tmp_path / "two.npy") - ref).max() <= 1e-5
    swapped = [control[0]._replace(net=default), control[1]._replace(net=other)]
    assert np.abs(ref - model.generate("swimming underwater", [Image.open(subject)], "dog", steps=3, seed=5,
                                       height=32, width=32, control=swapped, output="np", progress=False)).max() > 1e-4


def test_edit_generated_and_real_equal_the_api(tiny_pipeline, subject, tmp_path):
    import editing
    from blipdiff import BlipDiffusion
    _, folder = tiny_pipeline
    model = BlipDiffusion.from_pretrained(folder)
    assert run(folder, subject, tmp_path / "e.npy", "--edit-word", "cat", "--edit-threshold", "0.5") == 0
    source, edited = editing.edit_generated(model, "swimming underwater", "cat", "dog", [Image.open(subject)], "dog",
                                            steps=3, seed=5, height=32, width=32, threshold=0.5, output="np",
                                            progress=False)
    assert np.abs(np.load(tmp_path / "e.npy")[0] - edited).max() <= 1e-5
    assert np.abs(np.load(tmp_path / "e-source.npy")[0] - source).max() <= 1e-5
    real = photo(tmp_path / "cat.png")
    assert run(folder, subject, tmp_path / "r.png", "--edit", real, "--edit-word", "cat") == 0
    assert Image.open(tmp_path / "r.png").size == (32, 32) and os.path.isfile(tmp_path / "r-source.png")


def test_bad_control_and_edit_flags(tiny_pipeline, subject, tmp_path, capsys):
    _, folder = tiny_pipeline
    (tmp_path / "in").mkdir()
    base = ["--weights", folder, "--subject", subject, "--subject-text", "dog", "--prompt", "p",
            "--out", str(tmp_path / "x.png")]
    assert "needs --control-image" in bad(capsys, tmp_path, base + ["--control", "canny"])
    assert "needs --control canny" in bad(capsys, tmp_path, base + ["--control-image", subject])
    assert "--controlnet needs --control" in bad(capsys, tmp_path, base + ["--controlnet", folder])
    assert "--control-scale needs --control" in bad(capsys, tmp_path, base + ["--control-scale", "0.5"])
    assert "no ControlNet there" in bad(capsys, tmp_path, base + ["--control", "canny", "--control-image", subject])
    # Several ControlNets are matched by order: the counts must agree (a repeated --control used to keep
    # only the last one, silently).
    two = ["--control", "canny", "--control", "image"]
    assert "2 --control but 1 --control-image" in bad(capsys, tmp_path, base + two + ["--control-image", subject])
    assert "2 --control but 3 --control-scale" in bad(capsys, tmp_path, base + two + ["--control-image", subject] * 2
                                                      + ["--control-scale", "1"] * 3)
    assert "1 --control but 2 --controlnet" in bad(capsys, tmp_path, base + ["--control", "canny", "--control-image",
                                                                              subject, "--controlnet", folder] * 1
                                                   + ["--controlnet", folder])
    assert "needs --edit-word" in bad(capsys, tmp_path, base + ["--edit", subject])
    assert "one subject and one image" in bad(capsys, tmp_path, base + ["--edit-word", "cat", "--num-images", "2"])


def test_the_quick_start_runs_on_the_shipped_toy_model(tmp_path, monkeypatch, capsys):
    """The README's first command: no --weights, so the shipped toy model, at its own 64 x 64; the
    held-out ball is rendered, and the oracle sees the prompted snow in the picture."""
    import oracle as attribute_oracle
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out.png"
    assert sample.main(["--subject", "examples/red-dotted-ball.png", "--subject-text", "ball",
                        "--prompt", "in the snow", "--out", str(out)]) == 0
    assert "64x64" in capsys.readouterr().out
    picture = Image.open(out)
    assert picture.size == (64, 64)
    oracle = attribute_oracle.load_oracle(os.path.join(ROOT, "weights", "toy", "oracle.safetensors"))
    context = oracle.config.heads["context"][int(oracle.predict([picture])["context"][0])]
    assert context == "in the snow"


def test_the_shipped_toy_model_is_found_from_any_folder(tmp_path, monkeypatch):
    """Without --weights, sample.py finds weights/toy beside itself, not in the working folder."""
    monkeypatch.chdir(tmp_path)
    assert sample.main(["--subject", os.path.join(ROOT, "examples", "red-dotted-ball.png"), "--subject-text", "ball",
                        "--prompt", "at night", "--steps", "2", "--out", "out.png"]) == 0
    assert Image.open(tmp_path / "out.png").size == (64, 64)
