"""The toy model (toymodel.py): its tokenizer is a valid CLIP tokenizer learnt from the world's
captions, and every stage of the curriculum runs through train.py and pairs.py, ending in a model
that loads and generates at its own size."""

import dataclasses
import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import toymodel
import toyworld
import train
from blipdiff import BlipDiffusion, preprocess_subject
from clip import CLIPTokenizer, train_clip_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def world_captions(n=400, seed=0):
    rng = np.random.default_rng(seed)
    pool = toyworld.identities("train")
    return [toyworld.caption(pool[rng.integers(len(pool))], c)
            for c in rng.choice(toyworld.CONTEXTS, n)]


def test_learnt_tokenizer_is_clip_format_and_equals_the_reference(tmp_path):
    from transformers import CLIPTokenizer as Reference
    captions = world_captions()
    train_clip_tokenizer(captions, str(tmp_path))
    ours = CLIPTokenizer.from_folder(str(tmp_path))
    ref = Reference(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    texts = captions[:20] + ["a ball in the snow, a ball in the snow", "A Zebra-striped tuba!", "naïve 123"]
    for text in texts:
        assert [ours.bos_id] + ours.encode(text) + [ours.eos_id] == ref(text).input_ids, text
    # Learnt from the captions: every word of the world is one token (the start of a BPE that still
    # spells out anything else, byte by byte).
    for word in list(toyworld.CATEGORIES) + list(toyworld.COLORS) + ["striped", "grass", "snow"]:
        assert len(ours.encode(word)) == 1, word
    assert len(ours.encode("zebra")) > 1


def test_every_stage_runs_and_the_model_generates(tmp_path, capfd):
    out, installed = tmp_path / "run", tmp_path / "installed"
    before = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    toymodel.main(["--out", str(out), "--install", str(installed), "--data-size", "8", "--steps", "2",
                   "--batch-size", "4"])
    if before is not None:  # the curriculum ignores the lanes' signal only while it runs
        assert signal.getsignal(signal.SIGUSR1) == before
    for folder in ("vae", "clip", "base", "multimodal", "subject"):  # base: the t2i stage's
        with open(out / folder / "log.jsonl") as f:
            assert [json.loads(line)["step"] for line in f] == [2], folder
    assert len(open(out / "pairs" / "records.jsonl").readlines()) == 8
    times = json.load(open(out / "times.json"))
    assert set(times["stages_s"]) == {"data", "pairs", "vae", "clip", "base", "t2i", "multimodal", "subject"}

    # The VAE's scaling factor makes the training pictures' latents unit-variance, as LDM's 0.18215.
    model = BlipDiffusion.from_pretrained(str(installed))
    images = [Image.open(out / "data" / "images" / f"{i:06d}.png") for i in range(8)]
    with torch.no_grad():
        post = model.vae.encode(preprocess_subject(images, (64, 64), (0.5,) * 3, (0.5,) * 3))
        z = (post.mean + post.std * torch.randn_like(post.mean)) * model.vae.config.scaling_factor
    assert 0.6 < float(z.std()) < 1.6 and model.vae.config.scaling_factor != 1.0

    # Installed in the published layout: it loads as a whole and renders a subject at 64 x 64.
    assert os.path.isfile(installed / "model_index.json")
    assert model.guidance == toymodel.GUIDANCE  # the toy's own default scale, named in model_index.json
    picture = model.generate("in the snow", images[:1], "ball", steps=2, height=64, width=64, progress=False)[0]
    assert picture.size == (64, 64)
    # A rerun finds every stage done and redoes nothing.
    mtime = os.path.getmtime(out / "subject" / "unet" / "diffusion_pytorch_model.safetensors")
    toymodel.main(["--out", str(out), "--install", "", "--data-size", "8", "--steps", "2", "--batch-size", "4"])
    assert os.path.getmtime(out / "subject" / "unet" / "diffusion_pytorch_model.safetensors") == mtime
    # A stage stopped before its end goes on from its checkpoint (here: at its last step, so it only exports).
    os.remove(out / "subject" / "model_index.json")
    capfd.readouterr()
    toymodel.main(["--out", str(out), "--install", "", "--data-size", "8", "--steps", "2", "--batch-size", "4"])
    printed = capfd.readouterr().out
    assert "--resume" in printed and "resumed from" in printed and (out / "subject" / "model_index.json").exists()
    assert [json.loads(line)["step"] for line in open(out / "subject" / "log.jsonl")] == [2]

    # The text-to-image stage with --cache: from the third step every latent and caption encoding
    # comes from memory (8 pictures, batches of 4), and the losses are those of encoding them anew.
    logged = {}
    for cache in ([], ["--cache"]):
        to = tmp_path / f"t2i{len(cache)}"
        assert train.main(["--stage", "t2i", "--model", "toy", "--data", str(out / "data" / "records.jsonl"),
                           "--sd", str(out / "base"), "--out", str(to), "--steps", "6", "--batch-size", "4",
                           "--lr", "1e-3", *cache]) == 0
        with open(to / "log.jsonl") as f:
            logged[len(cache)] = [json.loads(line)["loss"] for line in f]
    assert len(logged[0]) == 6 and np.allclose(logged[0], logged[1], rtol=1e-4, atol=0)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_the_last_lane_of_a_phase_takes_the_idle_cores(tmp_path):
    # Two lanes on four cores: each stage starts on two; when the short lane ends, the long lane's
    # running stage is signalled and its next stage starts on all four.
    ready, signalled, threads = tmp_path / "ready", tmp_path / "signalled", tmp_path / "threads"
    long_stage = (f"import os, signal, time\n"
                  f"open({str(threads)!r}, 'a').write(os.environ['OMP_NUM_THREADS'] + ' ')\n"
                  f"signal.signal(signal.SIGUSR1, lambda *_: open({str(signalled)!r}, 'w').close())\n"
                  f"open({str(ready)!r}, 'w').close()\n"
                  f"for _ in range(600):\n"
                  f"    if os.path.exists({str(signalled)!r}): break\n"
                  f"    time.sleep(0.05)\n")
    short_stage = f"import os, time\nwhile not os.path.exists({str(ready)!r}): time.sleep(0.05)\n"
    record = f"import os\nopen({str(threads)!r}, 'a').write(os.environ['OMP_NUM_THREADS'])\n"
    times = {}
    phase = toymodel.Phase([[("short", None, ["-c", short_stage])],
                            [("long", None, ["-c", long_stage]), ("next", None, ["-c", record])]],
                           str(tmp_path), 4, times)
    assert phase.run() == []
    assert signalled.exists() and threads.read_text() == "2 4"
    assert set(times) == {"short", "long", "next"}


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1") or (os.cpu_count() or 1) < 2, reason="POSIX, two cores")
def test_a_stage_takes_every_core_when_signalled():
    before, handler = torch.get_num_threads(), signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with train.every_core_on_sigusr1():
            torch.set_num_threads(1)
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(100):  # the handler runs at the interpreter's next check
                if torch.get_num_threads() != 1:
                    break
            assert torch.get_num_threads() == os.cpu_count()
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN  # as it was, for the run's end
    finally:
        signal.signal(signal.SIGUSR1, handler)
        torch.set_num_threads(before)


@pytest.mark.parametrize("stage", ["vae", "clip", "t2i"])
def test_stage_zero_is_toy_only(tmp_path, stage, capsys):
    assert train.main(["--stage", stage, "--model", "tiny", "--data", "toy", "--out", str(tmp_path)]) == 1
    assert "only with --model toy" in capsys.readouterr().err


def test_the_toy_sizes_are_the_shipped_toy_models():
    # The curriculum trains at toymodel.sizes() (written to OUT/sizes for --model); train.py --model toy
    # reads weights/toy's config.json files. They must agree but for what training learns or measures.
    learnt = {"text_encoder": ["vocab_size"], "vae": ["scaling_factor"], "unet": [], "qformer": []}
    for part, config in toymodel.sizes().items():
        ours = json.loads(json.dumps(dataclasses.asdict(config)))
        with open(os.path.join(ROOT, "weights", "toy", part, "config.json")) as f:
            shipped = json.load(f)
        if part == "qformer":  # the WordPiece vocabulary, learnt from the captions
            ours["qformer_config"].pop("vocab_size"), shipped["qformer_config"].pop("vocab_size")
        for key in learnt[part]:
            ours.pop(key), shipped.pop(key)
        assert ours == shipped, part
