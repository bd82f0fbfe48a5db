"""Training BLIP-Diffusion: the two pre-training stages and subject fine-tuning (paper §3.1-3.3), and
what the paper takes from Stable Diffusion and CLIP for a small model. What each --stage trains,
freezes, feeds and exports is its module in stages.py; this file is the loop they share: DDP,
gradient accumulation, the lr schedule, EMA, checkpoints, logging, and the command line.

The authors released no pre-training code; this is our reading of the paper and of LAVIS' fine-tuning
recipe (lavis/projects/blip_diffusion/finetune-db-*.yaml: 40 steps of batch 3 at a constant lr 5e-6,
weight decay 0.01, seed 42).

    python train.py --stage subject --model tiny --data toy --steps 20 --out runs/tiny
    torchrun --standalone --nproc_per_node 2 train.py --stage subject --model tiny --data toy --out runs/tiny
    python train.py --stage finetune --weights weights/blipdiffusion --subject dog/ --subject-text dog --out runs/dog
    python train.py --stage vae --model toy --data toy --out runs/vae      # stage 0 of the toy (toymodel.py)

Distributed the nanoGPT way: RANK in the environment means torchrun started us; only rank 0 prints
and writes; DDP wraps the stage module, frozen modules run outside it in eval mode under no_grad.
`--batch-size` is the global batch of one step (over ranks and accumulation). Every random draw of a
sample (timestep, noise, prompt drop) is seeded by (seed, step, its record's index), so 1 process and
N processes compute the same update, and a resumed run continues exactly.
"""

import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from cli import Parser, add_threads, check_writable, real, use_threads, whole
from checkpoint import (CheckpointError, latest_training, load_training, remove_leftovers, save_training,
                        write_text)
from data import DataError, Records, read_records
from shards import ShardStream, first_sample, is_shards, shard_paths
from stages import STAGES, TrainError, build_stage


@contextmanager
def sigusr1(handler):
    """Inside: `handler` for SIGUSR1 (no-op where there is none, Windows); the one before after."""
    if not hasattr(signal, "SIGUSR1"):
        yield
        return
    before = signal.signal(signal.SIGUSR1, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, before)


def every_core_on_sigusr1():
    """A run inside: SIGUSR1 means compute on every core from now on (toymodel.py sends it when the
    stage beside has ended). The curriculum starts the run with SIGUSR1 ignored and that comes back on
    the way out, so a signal as the run ends is ignored too (the interpreter's exit would reset the
    handler to the default, which ends the process)."""
    return sigusr1(lambda *_: torch.set_num_threads(os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

# Defaults per stage: (steps, global batch, lr, weight decay, warm-up). Stage 1 as BLIP-2 (250k steps,
# lr 1e-4, decay 0.05, LAVIS' 5000 warm-up steps; its batch of 2320 is over 16 A100s); stage 2 as the
# paper (constant lr 2e-6, batch 16; 500k steps is our reading, unverified); fine-tuning as LAVIS.
# The toy's stage 0 as toymodel.py runs it. The CLIP pair's batch is 256, not 64: 64 captions are told
# apart by colour and context alone, and the image tower then learns little of the pattern that a
# subject is (what `python toyworld.py probe` reads off it).
STAGE_DEFAULTS = {"multimodal": (250_000, 2320, 1e-4, 0.05, 5000), "subject": (500_000, 16, 2e-6, 0.0, 0),
                  "finetune": (40, 3, 5e-6, 0.01, 0), "vae": (2500, 32, 2e-3, 0.0, 50),
                  "clip": (600, 256, 1e-3, 0.1, 50), "t2i": (2500, 32, 1e-3, 0.0, 50)}


def main(argv=None):
    p = Parser(prog="train.py", description="Train BLIP-Diffusion: stage 1, stage 2, or subject fine-tuning.")
    p.add_argument("--stage", choices=tuple(STAGES), required=True,
                   help="vae, clip, t2i: the toy's stage 0 (what the paper takes from SD and CLIP)")
    p.add_argument("--model", default="published", metavar="{published,tiny,toy,DIR}",
                   help="published (the default): start from --weights; tiny: a small random model (CPU, seconds); toy: "
                        "weights/toy's sizes; DIR: the sizes of its vae/, unet/, text_encoder/, qformer/ config.json "
                        "(toy and DIR: stage 0, and stage 1 from the toy's image tower)")
    p.add_argument("--weights", default=None, help="a BLIP-Diffusion folder in the published layout to start from")
    p.add_argument("--data", default=None, help="JSONL manifest (pairs.py's records.jsonl for --stage subject), "
                                                 "tar shards (multimodal, t2i, subject: 'data/{00000..01023}.tar', "
                                                 "a folder, a list), or 'toy' (examples/toy-data: 64 pictures of "
                                                 "the toy world)")
    p.add_argument("--sd", default=None, help="subject, t2i: SD v1.5's single file (v1-5-pruned-emaonly.safetensors) "
                                               "or a diffusers-layout folder (the toy's stage-0 --out) to start from")
    p.add_argument("--qformer", default=None, help="subject: a stage-1 output folder (its qformer/ and bert_tokenizer/)")
    p.add_argument("--tokenizer", default=None, help="subject: SD v1.5's CLIP tokenizer folder (vocab.json, merges.txt)")
    p.add_argument("--bert", default=None, help="multimodal: a bert-base-uncased folder (config, weights, vocab.txt)")
    p.add_argument("--clip-vision", default=None, help="multimodal: an openai/clip-vit-large-patch14 folder")
    p.add_argument("--subject", default=None, help="finetune: an image, or a folder of images, of the subject")
    p.add_argument("--subject-text", default=None, help="finetune: the subject's category word")
    p.add_argument("--out", required=True, help="output folder: the model in the published layout, checkpoints/, log.jsonl")
    p.add_argument("--steps", type=whole(1), default=None, help="total optimizer steps (default: 250000 / 500000 / 40)")
    p.add_argument("--batch-size", type=whole(1), default=None, help="global batch per step (default: 2320 / 16 / 3)")
    p.add_argument("--grad-accum", type=whole(1), default=1, help="micro-batches per step on each rank")
    p.add_argument("--lr", type=real(above=0), default=None, help="peak lr (default: 1e-4 BLIP-2 / 2e-6 paper / 5e-6 LAVIS)")
    p.add_argument("--weight-decay", type=real(low=0), default=None, help="AdamW decay (default: 0.05 / 0 / 0.01)")
    p.add_argument("--warmup", type=whole(0), default=None, help="linear warm-up steps (default: stage 1 5000, else 0)")
    p.add_argument("--clip-grad", type=real(low=0), default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--caption-drop", type=real(low=0, high=1), default=None,
                   help="share of steps trained on the empty prompt, for classifier-free guidance "
                        "(default: t2i 0.1 as SD; else 0, the paper's stage 2 has only the subject drop)")
    p.add_argument("--min-snr", type=real(low=0), default=0.0, metavar="GAMMA",
                   help="t2i, subject, finetune: min-SNR-γ loss weighting (Hang et al. 2023; 5 is theirs; 0: off, "
                        "the plain mean as SD and the paper)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default=None,
                   help="lr after the warm-up: constant, or cosine down to 10%% at the last step "
                        "(default: cosine for stage 1 as BLIP-2, constant elsewhere as published)")
    p.add_argument("--ema", type=real(low=0, below=1), default=0.0,
                   help="EMA decay of the trained weights (0: off); the export uses EMA")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute UNet activations in the backward pass (less memory)")
    p.add_argument("--zero", action="store_true", help="shard the optimizer state over ranks (ZeRO-1)")
    p.add_argument("--compile", action="store_true", help="torch.compile the trainable module")
    p.add_argument("--workers", type=whole(0), default=0,
                   help="data-loader processes per rank reading tar shards (0: read in the training process)")
    p.add_argument("--cache", action="store_true",
                   help="t2i, subject, finetune: keep each picture's frozen-encoder outputs (VAE posterior, image "
                        "tower; t2i: each caption's text encoding too) in memory, so later epochs skip those "
                        "encoders (small datasets: the toy's)")
    p.add_argument("--image-size", type=whole(8), default=None,
                   help="diffusion target size (default: the model's, 512 for SD-1.5)")
    p.add_argument("--seed", type=whole(0), default=42, help="LAVIS' seed")
    p.add_argument("--log-every", type=whole(1), default=1, help="steps between log lines")
    p.add_argument("--save-every", type=whole(1), default=1000, help="steps between checkpoints; also saved at the last step")
    p.add_argument("--sample-every", type=whole(0), default=0, help="write a sample image every N steps (0: only at the end)")
    p.add_argument("--keep", type=whole(1), default=3, help="checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    add_threads(p)
    args = p.parse_args(argv)
    try:  # bad input answered before any work, as the flags' own checks are
        if args.image_size is not None and args.image_size % 8:
            raise ValueError(f"--image-size {args.image_size}: give a multiple of 8 (the VAE's factor)")
        check_writable(args.out, folder=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    use_threads(args.threads)
    try:
        with every_core_on_sigusr1():
            return train(args)
    except (TrainError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            latest = latest_training(args.out)
            print("\ninterrupted: " + (f"{latest} is the latest checkpoint, whole; continue with the same command "
                                         f"and --resume" if latest else "no checkpoint was saved yet"), file=sys.stderr)
        return 130


def open_log(out, start):
    """out/log.jsonl for appending, holding the rows of steps 1..start only: a resumed run logs the steps
    after its checkpoint once (a killed run may have logged some past it, or half a line)."""
    path, rows = os.path.join(out, "log.jsonl"), []
    if start and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step", 0) <= start:
                    rows.append(line if line.endswith("\n") else line + "\n")
    write_text(path, "".join(rows))
    return open(path, "a")


def setup_distributed():
    """torchrun sets RANK: then one process per device (NCCL on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ:
        return False, 0, 1, "cuda" if torch.cuda.is_available() else "cpu"
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


class ema_weights:
    """Within the block the trainable module holds its EMA weights (when kept)."""

    def __init__(self, trainable, ema):
        self.trainable, self.ema, self.saved = trainable, ema, None

    def __enter__(self):
        if self.ema is not None:
            self.saved = {k: v.clone() for k, v in self.trainable.state_dict().items()}
            self.trainable.load_state_dict(self.ema)

    def __exit__(self, *exc):
        if self.saved is not None:
            self.trainable.load_state_dict(self.saved)


def train(args):
    default_steps, default_batch, default_lr, default_decay, default_warmup = STAGE_DEFAULTS[args.stage]
    steps, batch_size, lr = (default if value is None else value for value, default in
                             ((args.steps, default_steps), (args.batch_size, default_batch), (args.lr, default_lr)))
    decay = default_decay if args.weight_decay is None else args.weight_decay
    warmup = default_warmup if args.warmup is None else args.warmup
    if args.stage == "finetune" and (not args.subject or not args.subject_text):
        raise TrainError("--stage finetune needs --subject FOLDER and --subject-text WORD")
    paths, records = None, None  # tar shards (streamed), or the records of a manifest
    if args.data and args.data != "toy" and is_shards(args.data):
        if args.stage not in ("multimodal", "t2i", "subject"):
            raise TrainError(f"--stage {args.stage} reads a JSONL manifest; tar shards are read by --stage "
                             "multimodal and t2i (image + caption) and subject (pairs.py --shards)")
        paths = shard_paths(args.data)  # checked before any work
    else:
        records = read_records(args.stage, args.data, args.subject)  # checked before any work
    if args.stage in ("subject", "finetune") and args.model == "published" and not args.weights and not (
            args.stage == "subject" and args.sd and args.qformer and (args.tokenizer or os.path.isdir(args.sd))):
        raise TrainError("give --weights DIR (a published-layout folder), --model tiny, or for stage 2 "
                         "--sd FILE --qformer DIR --tokenizer DIR (or --sd FOLDER --qformer DIR)")
    if args.model not in ("published", "tiny", "toy") and not os.path.isdir(args.model):
        raise TrainError(f"--model {args.model}: not published, tiny, toy or a folder of sizes (its vae/, unet/, "
                         f"text_encoder/ and qformer/ config.json)")
    if args.min_snr and args.stage not in ("t2i", "subject", "finetune"):
        raise TrainError("--min-snr weights the diffusion loss: only with --stage t2i, subject or finetune")

    ddp, rank, world, device = setup_distributed()
    master = rank == 0
    if batch_size % (world * args.grad_accum):
        raise TrainError(f"--batch-size {batch_size} must divide by processes x --grad-accum = {world * args.grad_accum}")
    micro = batch_size // (world * args.grad_accum)
    torch.manual_seed(args.seed + rank)
    stage = build_stage(args, records, device)
    named = [(n, q) for n, q in stage.named_parameters() if q.requires_grad]
    params = [q for _, q in named]
    # As LAVIS: weight decay on matrices (and the subject embeddings), not on biases and norm scales.
    groups = [{"params": [q for _, q in named if q.dim() >= 2], "weight_decay": decay},
              {"params": [q for _, q in named if q.dim() < 2], "weight_decay": 0.0}]
    fingerprint = {"stage": args.stage, "configs": json.dumps(stage.configs, sort_keys=True, default=str)}
    if args.zero and ddp:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        optimizer = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=lr)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr)
    # Linear warm-up, then constant (stage 2 and fine-tuning, as published) or cosine to 10% (stage 1,
    # as BLIP-2; any stage with --schedule cosine).
    cosine = (args.schedule or ("cosine" if args.stage == "multimodal" else "constant")) == "cosine"
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps))) if cosine else 1.0))

    start, ema = 0, None
    if args.resume:
        path = latest_training(args.out)
        if path is None:
            raise TrainError(f"--resume: no checkpoint in {args.out}/checkpoints")
        start, ema = load_training(path, stage, optimizer, schedule, fingerprint)
        if master:
            print(f"resumed from {path} at step {start}")
        if start > steps:
            raise TrainError(f"--resume: {path} is at step {start}, past --steps {steps}; give --steps {start} or more")
    if args.ema and ema is None:
        ema = {k: v.detach().clone() for k, v in stage.state_dict().items()}
    net = DDP(stage) if ddp else stage
    net = torch.compile(net) if args.compile else net
    os.makedirs(args.out, exist_ok=True)
    log = open_log(args.out, start) if master else None
    if master and remove_leftovers(args.out):
        print(f"removed what an interrupted run left half-written in {args.out}")
    # This rank's share of each global batch: its positions rank, rank + world, ..., so micro-slice a
    # holds every world-th sample of the batch's a-th slice.
    owned = range(rank, batch_size, world)
    if paths is None:
        data, examples = Records(records, stage.pictures, batch_size, owned, args.seed), records
    else:
        data = ShardStream(paths, batch_size, owned, args.seed, start, args.workers, stage.pictures, stage.fields)
        examples = None if stage.model is None else [first_sample(paths, stage.pictures, stage.fields)]

    skipped, read = 0, 0
    for step in range(start, steps):
        t0 = time.time()
        share = data.step(step)
        waited = time.time() - t0  # reading and decoding the step's pictures, or waiting for the loader
        total = 0.0
        for a in range(args.grad_accum):
            chunk, items = zip(*share[a * micro:(a + 1) * micro])
            sync = a == args.grad_accum - 1 or not ddp
            with (nullcontext() if sync else net.no_sync()), stage.autocast:
                inputs = stage.batch(step, list(chunk), list(items), list(owned[a * micro:(a + 1) * micro]))
                loss = net(*inputs) / args.grad_accum
            loss.backward()
            total += loss.item()
        skipped, read = data.skipped, data.read  # this process's, so far
        if ddp:  # the loss averaged, the counts summed over processes
            sums = torch.tensor([total, skipped, read], dtype=torch.float64, device=device)
            dist.all_reduce(sums)
            total, skipped, read = sums[0].item() / world, int(sums[1]), int(sums[2])
        if not math.isfinite(total):
            raise TrainError(f"step {step + 1}: the loss is {total}; stopping, the last good checkpoint is "
                             f"{latest_training(args.out) or 'none'} (try a lower --lr)")
        norm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad if args.clip_grad > 0 else float("inf"))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for k, v in stage.state_dict().items():
                    if v.is_floating_point():
                        ema[k].mul_(args.ema).add_(v.detach(), alpha=1 - args.ema)
        done, dt = step + 1, time.time() - t0
        if master and (done % args.log_every == 0 or done == steps):
            row = {"step": done, "loss": total, "lr": schedule.get_last_lr()[0], "grad_norm": float(norm),
                   "images_per_s": batch_size / dt, "step_ms": 1000 * dt, "data_ms": 1000 * waited,
                   "skipped": skipped}
            print(f"step {done}/{steps} | loss {total:.4f} | lr {row['lr']:.2e} | grad {row['grad_norm']:.3f} | "
                  f"{row['images_per_s']:.1f} img/s | {row['step_ms']:.0f} ms", flush=True)
            log.write(json.dumps(row) + "\n")
            log.flush()
        saving = done % args.save_every == 0 or done == steps
        if args.zero and ddp and saving:
            optimizer.consolidate_state_dict(to=0)
        if master and saving:
            save_training(args.out, done, stage, optimizer, schedule, ema, fingerprint, args.keep)
        if master and stage.model is not None and args.sample_every and done % args.sample_every == 0 and done < steps:
            with ema_weights(stage, ema):
                stage.export(args.out)
                stage.sample(args.out, done, examples)
    if master:  # also when resumed at the last step: a run killed while exporting ends here
        with ema_weights(stage, ema):
            stage.export(args.out)
            if stage.model is not None:
                stage.sample(args.out, steps, examples)
        print(f"trained {args.stage} for {steps} steps: the model is in {args.out}"
              + ("" if stage.model is None else f" (sample.py --weights {args.out})")
              + f", checkpoints in {args.out}/checkpoints, log in {args.out}/log.jsonl"
              + (f"; skipped {skipped} of {read} samples (unreadable, each replaced by the next)" if skipped else ""))
    if ddp:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
