"""train.py on the tiny model: losses fall, processes agree, resume is exact, faults are handled."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import sample
import stages
import toyworld
import train
from checkpoint import read_tensors
from diffusion import alphas_cumprod, min_snr_weight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--data", "toy"]


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def weights(out, step):
    return read_tensors(os.path.join(out, "checkpoints", f"step-{step:07d}", "trainable.safetensors"))


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst}"


def assert_same_update(a, b, lr, steps):
    """Weights after the same steps computed in another process layout. Only the order of float sums
    differs; Adam turns a gradient of any size into a step of about ±lr, so the rare element whose
    gradient is float noise around zero may step the other way: at most 2 x lr x steps, and rare.
    A real difference (other data, a missed all-reduce) moves most elements."""
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.max().item() <= 2 * lr * steps + 1e-7, f"weights differ by {diffs.max().item()}"
    assert (diffs > 1e-7).float().mean().item() < 1e-3, "many weights differ"


def subject_pictures(folder, n=3):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    ball = toyworld.Identity("ball", "red", "stripes", "white")
    for i in range(n):
        toyworld.render(ball, "on the grass", rng).image.save(os.path.join(folder, f"{i}.png"))
    return str(folder)


def test_subject_stage_loss_falls(tmp_path):
    out = str(tmp_path / "run")
    assert train.main(["--stage", "subject", *TINY, "--steps", "40", "--batch-size", "4", "--lr", "1e-3",
                       "--out", out]) == 0
    got = losses(out)
    assert len(got) == 40 and np.mean(got[-8:]) < 0.8 * np.mean(got[:8])
    assert os.path.isfile(os.path.join(out, "samples", "step-0000040.png"))


def test_finetune_loss_falls_and_sample_generates_the_subject(tmp_path, capsys):
    base = str(tmp_path / "base")
    assert train.main(["--stage", "subject", *TINY, "--steps", "1", "--batch-size", "2", "--out", base]) == 0
    out = str(tmp_path / "tuned")
    assert train.main(["--stage", "finetune", "--weights", base, "--subject", subject_pictures(tmp_path / "dog"),
                       "--subject-text", "ball", "--steps", "30", "--lr", "1e-3", "--out", out]) == 0
    got = losses(out)
    assert np.mean(got[-6:]) < np.mean(got[:6])
    picture = str(tmp_path / "x.npy")
    assert sample.main(["--weights", out, "--prompt", "on the beach", "--steps", "2", "--height", "32",
                        "--width", "32", "--out", picture]) == 0
    assert np.load(picture).shape == (1, 32, 32, 3)


def test_min_snr_weights_are_diffusers_ones():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)
    t = torch.arange(0, 1000, 7)
    snr = compute_snr(scheduler, t)
    want = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr  # diffusers' train_text_to_image, ε-prediction
    got = min_snr_weight(t, alphas_cumprod(), 5.0)
    assert torch.allclose(got, want, rtol=1e-5, atol=0)
    assert got[0] < 0.01 and got[-1] == 1.0


def test_min_snr_and_cosine_schedule(tmp_path, capsys):
    args = ["--stage", "subject", *TINY, "--steps", "30", "--batch-size", "4", "--lr", "1e-3"]
    # A γ above every SNR weighs each sample 1: the plain mean, to float rounding.
    assert train.main(args + ["--steps", "3", "--out", str(tmp_path / "plain")]) == 0
    assert train.main(args + ["--steps", "3", "--min-snr", "1e9", "--out", str(tmp_path / "huge")]) == 0
    assert np.allclose(losses(tmp_path / "plain"), losses(tmp_path / "huge"), rtol=1e-6, atol=0)
    out = tmp_path / "snr"
    assert train.main(args + ["--min-snr", "5", "--schedule", "cosine", "--out", str(out)]) == 0
    got = losses(out)
    assert got[0] < losses(tmp_path / "plain")[0]  # the same first batch, its nearly clean samples turned down
    assert np.mean(got[-6:]) < np.mean(got[:6])
    with open(out / "log.jsonl") as f:
        lrs = [json.loads(line)["lr"] for line in f]
    assert lrs[-1] == pytest.approx(1e-4) and lrs[0] == pytest.approx(1e-3, rel=0.01)
    assert train.main(["--stage", "vae", "--model", "toy", "--data", "toy", "--min-snr", "5",
                       "--out", str(tmp_path / "vae")]) == 1
    assert "--min-snr weights the diffusion loss" in capsys.readouterr().err


def test_two_processes_equal_one_and_torchrun_resume(tmp_path):
    # The contract of the training issue, with two gloo processes on the CPU.
    out2 = str(tmp_path / "two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--stage", "subject", *TINY, "--steps", "20", "--batch-size", "4", "--out", out2]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("step ") >= 20 and "step 20/20 | loss" in first.stdout
    out1 = str(tmp_path / "one")
    assert train.main(["--stage", "subject", *TINY, "--steps", "20", "--batch-size", "4", "--out", out1]) == 0
    assert_same_update(weights(out2, 20), weights(out1, 20), lr=2e-6, steps=20)
    cmd[cmd.index("20")] = "30"
    resumed = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "step 21/30" in resumed.stdout and "step 1/30" not in resumed.stdout
    assert os.path.isdir(os.path.join(out2, "checkpoints", "step-0000030"))


def test_two_machines_equal_two_processes_on_one(tmp_path):
    """Several machines, as docs/training.md launches them (here both on localhost, one process each):
    the same weights as two processes on one machine."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["train.py", "--stage", "subject", *TINY, "--steps", "3", "--batch-size", "4"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(r), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               *args, "--out", str(tmp_path / "nodes")], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-2000:]
    one = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args, "--out", str(tmp_path / "one")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    assert_same_weights(weights(str(tmp_path / "nodes"), 3), weights(str(tmp_path / "one"), 3), atol=0)


def test_resume_is_exact(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    args = ["--stage", "subject", *TINY, "--batch-size", "2", "--lr", "1e-4", "--save-every", "5"]
    assert train.main(args + ["--steps", "10", "--out", straight]) == 0
    assert train.main(args + ["--steps", "5", "--out", split]) == 0
    assert train.main(args + ["--steps", "10", "--out", split, "--resume"]) == 0
    assert_same_weights(weights(straight, 10), weights(split, 10), atol=0)
    assert losses(straight) == losses(split)


def test_cache_trains_the_same_numbers(tmp_path):
    # 64 records in batches of 16: epochs 2 and 3 come from the cache. A record must get its own
    # latents and image-tower output back, whatever its place in the batch.
    args = ["--stage", "subject", *TINY, "--steps", "12", "--batch-size", "16", "--lr", "1e-3", "--save-every", "12"]
    assert train.main(args + ["--out", str(tmp_path / "plain")]) == 0
    assert train.main(args + ["--out", str(tmp_path / "cached"), "--cache"]) == 0
    assert np.allclose(losses(tmp_path / "plain"), losses(tmp_path / "cached"), rtol=1e-4, atol=0)
    assert_same_weights(weights(tmp_path / "plain", 12), weights(tmp_path / "cached", 12), atol=1e-5)


def test_bad_data_is_refused_before_any_work(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert train.main(["--stage", "subject", "--model", "tiny", "--data", str(tmp_path / "none.jsonl"),
                       "--out", out]) == 1
    assert "no such data file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert train.main(["--stage", "finetune", "--model", "tiny", "--subject", str(tmp_path / "empty"),
                       "--subject-text", "dog", "--out", out]) == 1
    assert "holds no images" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_corrupt_images_are_skipped_and_counted(tmp_path, capsys):
    data = tmp_path / "pairs"
    (data / "img").mkdir(parents=True)
    rng = np.random.default_rng(1)
    records = []
    for i in range(3):
        toyworld.sample(rng).image.save(data / "img" / f"{i}.png")
        records.append({"input": f"img/{i}.png", "target": f"img/{i}.png", "subject": "box", "caption": "a box"})
    (data / "img" / "1.png").write_bytes(b"not a png")
    (data / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = str(tmp_path / "out")
    assert train.main(["--stage", "subject", "--model", "tiny", "--data", str(data), "--steps", "3",
                       "--batch-size", "3", "--out", out]) == 0
    # each of the 3 steps holds all 3 records: 9 pictures served, and 3 reads of the bad one
    assert "skipped 3 of 12 samples" in capsys.readouterr().out


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "out")
    code = train.main(["--stage", "subject", *TINY, "--steps", "8", "--batch-size", "2", "--lr", "1e30",
                       "--save-every", "1", "--out", out])
    err = capsys.readouterr().err
    assert code == 1 and "the loss is nan" in err or "the loss is inf" in err
    step = int(err.split("step ")[1].split(":")[0])
    assert os.path.isdir(os.path.join(out, "checkpoints", f"step-{step - 1:07d}"))
    assert not os.path.exists(os.path.join(out, "checkpoints", f"step-{step:07d}"))


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    args = ["--stage", "subject", *TINY, "--batch-size", "2", "--save-every", "2", "--out", out]
    assert train.main(args + ["--steps", "2"]) == 0
    before = weights(out, 2)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError):
        train.main(args + ["--steps", "4", "--resume"])
    assert_same_weights(weights(out, 2), before, atol=0)
    assert not os.path.exists(os.path.join(out, "checkpoints", "step-0000004"))
    assert not [n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith(".")]


def test_resume_with_another_model_is_refused(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert train.main(["--stage", "subject", *TINY, "--steps", "1", "--batch-size", "2", "--out", out]) == 0
    shutil.copytree(out, tmp_path / "weights")
    code = train.main(["--stage", "finetune", "--weights", str(tmp_path / "weights"), "--subject",
                       subject_pictures(tmp_path / "s"), "--subject-text", "ball", "--steps", "2", "--out", out,
                       "--resume"])
    assert code == 1 and "different model or stage" in capsys.readouterr().err
    torch.manual_seed(0)


def test_multimodal_stage_loss_falls_and_feeds_stage_two(tmp_path):
    from safetensors.torch import save_file

    import unet as unet_module
    import vae as vae_module
    from clip import CLIPTextModel

    stage1 = str(tmp_path / "stage1")
    assert train.main(["--stage", "multimodal", *TINY, "--steps", "30", "--batch-size", "8", "--lr", "1e-3",
                       "--warmup", "0", "--out", stage1]) == 0
    got = losses(stage1)
    assert np.mean(got[-5:]) < 0.95 * np.mean(got[:5])
    # Stage 2 from "Stable Diffusion" (a tiny model written in the CompVis single-file layout) + stage 1.
    sd_model = stages.tiny_model(str(tmp_path / "sd"), seed=3)
    levels = len(sd_model.vae.config.block_out_channels)
    single = {unet_module.COMPVIS_PREFIX + unet_module.compvis_key(k, sd_model.unet.config): v
              for k, v in sd_model.unet.state_dict().items()}
    single |= {"first_stage_model." + vae_module.compvis_name(k, levels): v.reshape(*v.shape, 1, 1)
               if v.dim() == 2 else v for k, v in sd_model.vae.state_dict().items()}
    single |= {CLIPTextModel.COMPVIS_PREFIX + k: v for k, v in sd_model.text_encoder.state_dict().items()}
    save_file({k: v.contiguous() for k, v in single.items()}, str(tmp_path / "sd.safetensors"))
    model = stages.stage2_from_sd(str(tmp_path / "sd.safetensors"), stage1, str(tmp_path / "sd" / "tokenizer"),
                                 (sd_model.unet.config, sd_model.vae.config, sd_model.text_encoder.config))
    trained = read_tensors(os.path.join(stage1, "qformer", "model.safetensors"))
    assert all(torch.equal(model.qformer.state_dict()[k], v) for k, v in trained.items())
    assert all(torch.equal(model.unet.state_dict()[k], v) for k, v in sd_model.unet.state_dict().items())
    assert all(torch.equal(model.vae.state_dict()[k], v) for k, v in sd_model.vae.state_dict().items())


def test_multimodal_stage_on_two_processes(tmp_path):
    """Stage 1 under DDP: BLIP-Diffusion's projection layer, part of the Q-Former but unused by BLIP-2's
    losses, is frozen, so DDP does not stop at the second step waiting for its gradients. ITC and ITM
    take the pairs of both processes, so two processes train what one does on the whole batch."""
    args = ["train.py", "--stage", "multimodal", *TINY, "--steps", "3", "--batch-size", "8", "--lr", "1e-3",
            "--warmup", "0", "--schedule", "constant", "--save-every", "1"]
    out, alone = str(tmp_path / "two"), str(tmp_path / "one")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args, "--out", out], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "step 3/3 | loss" in run.stdout and np.isfinite(losses(out)).all()
    one = subprocess.run([sys.executable, *args, "--out", alone], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))  # as torchrun's processes
    assert one.returncode == 0, one.stderr[-2000:]
    # The same losses (the weights too, but for Adam's steps on gradients that are float noise at the
    # start: ITC's projections; test_blip2 compares the gradients themselves).
    assert np.allclose(losses(out), losses(alone), rtol=1e-5)
    first, last = weights(out, 1), weights(out, 3)
    frozen = [k for k in last if ".proj_layer." in k]
    assert frozen and all(torch.equal(first[k], last[k]) for k in frozen)
    assert not torch.equal(first["pretraining.qformer.encoder.layer.0.attention.attention.query.weight"],
                           last["pretraining.qformer.encoder.layer.0.attention.attention.query.weight"])
    assert os.path.isfile(os.path.join(out, "qformer", "model.safetensors"))


def test_zero_sharded_optimizer_and_ema_with_two_processes(tmp_path):
    args = ["--stage", "subject", *TINY, "--batch-size", "4", "--lr", "1e-4", "--ema", "0.5"]
    sharded = str(tmp_path / "zero")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           *args, "--zero", "--steps", "3", "--out", sharded]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    plain = str(tmp_path / "plain")
    assert train.main(args + ["--steps", "3", "--out", plain]) == 0
    assert_same_update(weights(sharded, 3), weights(plain, 3), lr=1e-4, steps=3)  # sharding changes nothing
    ema = read_tensors(os.path.join(plain, "checkpoints", "step-0000003", "ema.safetensors"))
    key = "unet.conv_out.weight"
    assert not torch.equal(ema[key], weights(plain, 3)[key])  # the EMA lags the weights
    cmd[cmd.index("3")] = "4"
    resumed = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step 4/4" in resumed.stdout
