"""train.py stopped at any point: killed (SIGKILL, as a lost machine), interrupted (Ctrl-C), or killed
while exporting. A run resumed with --resume ends with the weights, log and model of a run never stopped;
what the killed run left half-written is removed."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import train
from checkpoint import latest_training, read_tensors
from test_shards import toy_shards
from test_train import assert_same_weights, losses, weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO_RANKS = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def args(data, out, steps=6):
    return ["--stage", "multimodal", "--model", "tiny", "--data", data, "--batch-size", "4", "--lr", "1e-4",
            "--warmup", "0", "--schedule", "constant", "--ema", "0.9", "--save-every", "2", "--workers", "1",
            "--steps", str(steps), "--out", out]


def killed_and_resumed(launch, out, kill_after, seed):
    """Start `launch` (a command line; a process of its own, as the killed one, so the same threads compute
    alike), SIGKILL its whole process group a random moment (0-50 ms, a step or so) after it prints
    step k, for each k of `kill_after`; restart it each time, with --resume once there is a
    checkpoint (as a person would); then let it finish. -> the last run's output."""
    rng = random.Random(seed)
    for k in [*kill_after, None]:
        resume = ["--resume"] if latest_training(out) else []
        proc = subprocess.Popen(launch + resume, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if k is not None and line.startswith(f"step {k}/"):
                time.sleep(rng.uniform(0, 0.05))
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.stdout.close()
        code = proc.wait(timeout=300)  # a kill after the last step may come when the run has ended
        assert code == 0 or (k is not None and code == -signal.SIGKILL), "".join(lines)[-3000:]
    return "".join(lines)


def assert_same_run(a, b, steps=6):
    """Runs a and b end alike: trained weights, EMA, exported model, and the log (b's: each step once)."""
    assert_same_weights(weights(a, steps), weights(b, steps), atol=1e-6)
    for path in (os.path.join("checkpoints", f"step-{steps:07d}", "ema.safetensors"),
                 os.path.join("qformer", "model.safetensors")):
        assert_same_weights(read_tensors(os.path.join(a, path)), read_tensors(os.path.join(b, path)), atol=1e-6)
    with open(os.path.join(b, "log.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, steps + 1))  # each step once
    assert losses(a) == losses(b)


def test_killed_at_any_point_and_resumed_ends_as_a_run_never_stopped(tmp_path):
    data = toy_shards(str(tmp_path / "shards"))
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    killed_and_resumed([sys.executable, "train.py", *args(data, straight)], straight, [], seed=0)  # never stopped
    output = killed_and_resumed([sys.executable, "train.py", *args(data, killed)], killed, [1, 3, 4, 6], seed=0)
    assert "the model is in" in output
    assert_same_run(straight, killed)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # nothing half-written left beside it


def test_two_ranks_with_workers_killed_and_resumed(tmp_path):
    data = toy_shards(str(tmp_path / "shards"))
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    killed_and_resumed(TWO_RANKS + ["train.py", *args(data, straight)], straight, [], seed=1)  # never stopped
    killed_and_resumed(TWO_RANKS + ["train.py", *args(data, killed)], killed, [2, 5], seed=1)
    assert_same_run(straight, killed)


def test_killed_while_exporting_resume_exports_and_cleans_up(tmp_path, capsys):
    data = toy_shards(str(tmp_path / "shards"))
    out = str(tmp_path / "run")
    assert train.main(args(data, out, steps=2)) == 0
    model = open(os.path.join(out, "qformer", "model.safetensors"), "rb").read()
    # What a kill in the middle of the export leaves: the model half replaced, the temporary folders of
    # the export, of a checkpoint and of a sample (write_folder_atomically's and write_atomically's names).
    os.remove(os.path.join(out, "qformer", "model.safetensors"))
    half = [tmp_path / ".run.tmp-k2j3h4g5", tmp_path / "run" / "checkpoints" / ".step-0000004.tmp-a1b2c3d4"]
    for folder in half:
        os.makedirs(folder / "qformer")
    (tmp_path / "run" / ".log.jsonl.a1b2c3d4.jsonl").write_text("{}")
    (tmp_path / "run" / "notes.txt").write_text("mine")  # a user's file stays, and so does another
    os.makedirs(tmp_path / ".run.b.tmp-abcd1234")  # run's export in progress beside it (--out run.b)
    capsys.readouterr()
    assert train.main(args(data, out, steps=2) + ["--resume"]) == 0
    printed = capsys.readouterr().out
    assert "removed what an interrupted run left half-written" in printed and "the model is in" in printed
    assert open(os.path.join(out, "qformer", "model.safetensors"), "rb").read() == model
    assert not any(os.path.exists(p) for p in half) and (tmp_path / "run" / "notes.txt").exists()
    assert (tmp_path / ".run.b.tmp-abcd1234").exists()
    assert sorted(n for n in os.listdir(out) if n.startswith(".")) == [".tiny"]
    assert [row["step"] for row in map(json.loads, open(os.path.join(out, "log.jsonl")))] == [1, 2]
    assert train.main(args(data, out, steps=1) + ["--resume"]) == 1  # fewer steps than done: said, not run
    assert "past --steps 1" in capsys.readouterr().err


def test_ctrl_c_stops_with_one_line_and_whole_checkpoints(tmp_path):
    data = toy_shards(str(tmp_path / "shards"))
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "train.py", *args(data, out, steps=400)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1].startswith("interrupted: ") and "Traceback" not in err
    latest = latest_training(out)
    assert latest and latest in err and "--resume" in err
    assert train.main(args(data, out, steps=6) + ["--resume"]) == 0  # the checkpoint loads and the run goes on
