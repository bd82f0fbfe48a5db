"""The toy BLIP-Diffusion: the published architecture at sizes a laptop CPU trains, the training
objectives of its stage 0 (VAE, CLIP pair, text-to-image UNet), its tokenizers
learnt from the toy world's captions, and the curriculum that trains weights/toy/ from nothing.

Every module is the project's own (clip.py, qformer.py, unet.py, vae.py) with small widths; only the
sizes differ from the published model, so every command of the project runs on the toy model as it
is. The curriculum is the paper's, with the part the paper takes from Stable Diffusion trained here
too (stage 0):

  0. data       toyworld.py data: pictures of training identities, their true masks, backgrounds
     vae        the autoencoder (reconstruction + a small KL, as LDM without its GAN)
     clip       tokenizers learnt from the captions; a CLIP image/text pair, contrastive
     t2i        the text-to-image UNet under the frozen CLIP text encoder, as SD
  1. multimodal BLIP-2 stage 1 on the frozen image tower (ITC, ITG, ITM)
  2. pairs      pairs.py --from-masks: degraded true masks, trimap, closed-form matting, new context
     subject    stage 2, subject representation learning on those pairs
  (fine-tuning on a held-out subject is measured by `python toyworld.py evaluate`)

    python toymodel.py            # every stage into runs/toy (rerun to resume), then weights/toy

Each stage prints the exact command it runs, so any one can be rerun or changed by hand.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from diffusion import epsilon_loss
from clip import CLIP_PATTERN, CLIPTextConfig, VisionConfig
from qformer import Blip2Config, QFormerConfig
from unet import UNetConfig
from vae import AutoencoderKLConfig

IMAGE_SIZE = 64  # the toy world's pictures (toyworld.WorldConfig.size)
LATENT_CHANNELS = 8
WIDTH = 128  # text encoder, image tower and Q-Former width; the subject embeddings are (1, 16, WIDTH)
# The guidance scale the installed model samples at by default (model_index.json's "guidance", read by
# blipdiff.BlipDiffusion). Chosen on 32 held-out subjects the evaluation does not use
# (toyeval.eval_subjects(16, seed) for seeds 1 and 2): at the published 7.5 the toy model's colours
# drift to a neighbouring hue (orange to red or yellow, pink to white); see the README's evaluation.
GUIDANCE = 5.0


def vae_config():
    # Three levels: 64 px pictures -> 16 x 16 x 8 latents (SD-1.5: 512 -> 64 x 64 x 4, four levels).
    # Eight channels, not SD's four: with four, a 16 x 16 grid loses the dots and checks of the
    # patterns (measured: blurred away after 800 steps), and the patterns are what a subject is.
    # The scaling factor is measured on the trained encoder (LDM's 1 / std of the latents) and stored.
    return AutoencoderKLConfig(block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                               up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8,
                               latent_channels=LATENT_CHANNELS, sample_size=IMAGE_SIZE, scaling_factor=1.0)


def text_config(vocab_size):
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                          num_hidden_layers=4, num_attention_heads=4)


def vision_config():
    # 8 px patches: an 8 x 8 grid plus the class token. CLIP's LayerNorm eps.
    return VisionConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=4, num_attention_heads=4,
                        image_size=IMAGE_SIZE, patch_size=8, layer_norm_eps=1e-5)


def blip2_config(vocab_size, vision=None):
    # No dropout: the toy runs are short and must be bit-for-bit reproducible across process counts.
    return Blip2Config(qformer_config=QFormerConfig(
        vocab_size=vocab_size, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=4 * WIDTH, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=64), vision_config=vision or vision_config())


def unet_config():
    # Attention (self and cross, where the text and the subject come in) at 8 x 8 and 4 x 4 only:
    # at 16 x 16 it cost 60% of a training step on a CPU (measured: 1.77 s -> 0.74 s a step of 32
    # on one core without it), and the ResBlocks there render what the coarser levels decided.
    # Those ResBlocks are 64 channels wide, as the levels below: at 32, even 300 steps of fine-tuning
    # on one subject's own pictures did not draw its checks (they came out as stripes) or keep a
    # striped body's colour; the UNet's time per step goes from 0.35 to 0.62 s (32 pictures, one core).
    return UNetConfig(sample_size=IMAGE_SIZE // 4, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                      block_out_channels=(64, 64, 64), layers_per_block=1,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      attention_head_dim=4, cross_attention_dim=WIDTH, norm_num_groups=8)


# ---------------------------------------------------------------------------------------------
# Stage 0's training objectives (train.py --stage vae / clip / t2i): what the paper takes from SD and CLIP
# ---------------------------------------------------------------------------------------------

KL_WEIGHT = 1e-6


class VAEStage(nn.Module):
    """Stage 0, the autoencoder: per-pixel L1 reconstruction of z = mean + std·n, plus KL_WEIGHT times
    the KL divergence to N(0, I) (per pixel, LDM's balance; its perceptual and GAN losses are left out:
    the toy world's flat colours need neither)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images, noise):
        post = self.vae.encode(images)
        recon = self.vae.decode(post.mean + post.std * noise)
        kl = 0.5 * (post.mean ** 2 + post.std ** 2 - 1 - post.logvar).sum(dim=(1, 2, 3)).mean()
        return (recon.float() - images.float()).abs().mean() + KL_WEIGHT * kl / images[0].numel()


class CLIPStage(nn.Module):
    """Stage 0, a CLIP pair (Radford et al. 2021): image and text embeddings, each projected and
    L2-normalised, matched by a symmetric cross-entropy over the batch at a learnt temperature. The
    image embedding is the class token of the tower BLIP-2 freezes; the text one the EOS position."""

    def __init__(self, vision, text, eos_id, embed_dim=WIDTH):
        super().__init__()
        self.vision, self.text, self.eos_id = vision, text, eos_id
        self.visual_projection = nn.Linear(vision.config.hidden_size, embed_dim, bias=False)
        self.text_projection = nn.Linear(text.config.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def forward(self, pixel_values, ids):
        image = F.normalize(self.visual_projection(self.vision(pixel_values)[:, 0]), dim=-1)
        eos = (ids == self.eos_id).int().argmax(dim=1)  # the first EOS (CLIP pads with EOS too)
        text = self.text(ids)[torch.arange(len(ids), device=ids.device), eos]
        text = F.normalize(self.text_projection(text), dim=-1)
        logits = self.logit_scale.exp().clamp(max=100) * image @ text.T  # (B, B): image i vs caption j
        labels = torch.arange(len(ids), device=ids.device)
        return (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.T.float(), labels)) / 2


class T2IStage(nn.Module):
    """Stage 0, Stable Diffusion's text-to-image training: ε-prediction of the UNet under the frozen
    text encoder, whose output for each caption the batches bring (train.py encodes it; with --cache
    once per caption in the whole run)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, text, noisy, t, noise, weight=None):
        return epsilon_loss(self.unet(noisy, t, text), noise, weight)


@torch.no_grad()
def vae_with_scale(vae, images):
    """The VAE's config with LDM's scaling factor measured: 1 / std of the latents of `images`, so
    the diffusion model sees latents of unit variance (SD-1.5's 0.18215 was found the same way)."""
    post = vae.encode(images.to(next(vae.parameters()).device))
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(0)).to(post.mean)
    return dataclasses.replace(vae.config, scaling_factor=round(1 / float(z.float().std()), 5))



# ---------------------------------------------------------------------------------------------
# Tokenizers, learnt from the captions
# ---------------------------------------------------------------------------------------------

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def train_clip_tokenizer(captions, folder, vocab_size=700):
    """A byte-level BPE in CLIP's format (vocab.json, merges.txt), learnt from `captions` with the
    `tokenizers` library: CLIP's pre-tokenizer and end-of-word suffix, every byte in the base
    vocabulary (with and without "</w>", as CLIP's), the learnt merges, then the two special tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True), byte_level])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator([c.lower() for c in captions], trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars]
    seen = set(tokens)
    for m in merges:
        merged = m.replace(" ", "")
        if merged not in seen:
            seen.add(merged)
            tokens.append(merged)
    tokens += [BOS, EOS]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return len(tokens)


def write_bert_vocab(captions, path):
    """The Q-Former's WordPiece vocabulary: BERT's special tokens, every word of the captions whole,
    and the letters (alone and as "##" continuations) so an unseen word is still spelt out."""
    words = sorted({w for c in captions for w in c.lower().split()})
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-&")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters]
    tokens += [w for w in words if w not in tokens]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(tokens) + "\n")
    return len(tokens) + 1  # + [DEC], which the Q-Former adds as the last id


# ---------------------------------------------------------------------------------------------
# The curriculum: every stage, in order, by the project's own commands
# ---------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))


def curriculum(out, data_size, override=()):
    """The commands that train the toy model from nothing -> phases, run in order; a phase is lanes
    that run side by side (independent stages, one process per core: small models use one core
    better than two), a lane is steps run in turn, a step (name, its output that marks it done,
    argv; None = gather the base folder). Hyper-parameters are the toy's (stage 0 as train.py's
    defaults); each stage has its own --out, so its log and checkpoints are its own and an
    interrupted stage resumes. `override`: train.py flags for every stage (a smoke test's --steps 2)."""
    d = lambda *p: os.path.join(out, *p)
    stage = lambda name, *rest, to=None: ["train.py", "--stage", name, "--out", to or d(name), "--log-every", "50",
                                          *rest, *override]
    records = d("data", "records.jsonl")
    return [
        [[("data", records, ["toyworld.py", "data", "--n", str(data_size), "--out", d("data")])]],
        [[("vae", d("vae", "vae"), stage("vae", "--model", "toy", "--data", records))],
         [("clip", d("clip", "text_encoder"), stage("clip", "--model", "toy", "--data", records, "--schedule", "cosine"))]],
        # The base folder is the toy's Stable Diffusion: stage 0's VAE, text encoder and tokenizer,
        # joined by the UNet that --stage t2i trains into it.
        [[("base", d("base", "tokenizer"), None),
          ("t2i", d("base", "unet"), stage("t2i", "--model", "toy", "--data", records, "--sd", d("base"), "--ema", "0.995",
                                             "--cache", to=d("base")))],
         [("multimodal", d("multimodal", "qformer"),
           stage("multimodal", "--model", "toy", "--data", records, "--clip-vision", d("clip", "vision_model"),
                 "--bert", d("clip", "bert_tokenizer"), "--steps", "600", "--batch-size", "64", "--lr", "1e-3",
                 "--warmup", "50", "--weight-decay", "0.05")),
          # The pairs need only the data; after stage 1 the lane takes about as long as the UNet's, and
          # the CLIP pair gets both cores once the VAE is done.
          ("pairs", None,  # pairs.py resumes by itself: items already written are not redone
           ["pairs.py", "--data", d("data", "pairs.jsonl"), "--from-masks", "--backgrounds", d("data", "backgrounds"),
            "--out", d("pairs"), "--size", str(IMAGE_SIZE), "--band", "2"])]],
        [[("subject", d("subject", "model_index.json"),
           stage("subject", "--data", d("pairs", "records.jsonl"), "--sd", d("base"), "--qformer", d("multimodal"),
                 "--steps", "3000", "--batch-size", "32", "--lr", "5e-4", "--warmup", "50", "--caption-drop", "0.05",
                 "--ema", "0.995", "--cache", "--min-snr", "5", "--schedule", "cosine"))]],
    ]


def gather_base(out):
    from checkpoint import write_folder_atomically

    def write(tmp):
        shutil.copytree(os.path.join(out, "vae", "vae"), os.path.join(tmp, "vae"))
        for part in ("text_encoder", "tokenizer"):
            shutil.copytree(os.path.join(out, "clip", part), os.path.join(tmp, part))

    write_folder_atomically(os.path.join(out, "base"), write, merge=True)


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
    """train.py's run inside: SIGUSR1 means compute on every core from now on (Phase sends it when
    the stage beside has ended). Phase starts the stage with SIGUSR1 ignored and that comes back on
    the way out, so a signal as the run ends is ignored too (the interpreter's exit would reset the
    handler to the default, which ends the process)."""
    return sigusr1(lambda *_: torch.set_num_threads(os.cpu_count() or 1))


class Phase:
    """The lanes of one phase side by side, each its own processes, the cores shared among the lanes
    still running. A lane that ends leaves its cores idle, as the two lanes seldom take equally long
    (measured: the CLIP pair 23 min beside the VAE's 17; the UNet 33 beside stage 1 and the pairs' 24), so
    when one lane is left, its running stage is told with SIGUSR1 to take every core (train.py
    listens, every_core_on_sigusr1; a toy UNet step of 32: 0.50 s on one core, 0.34 s on two), and its next stages start on all."""

    def __init__(self, lanes, out, cores, times):
        self.lanes, self.out, self.cores, self.times = lanes, out, cores, times
        self.lock, self.left, self.running = threading.Lock(), len(lanes), {}

    def run(self):
        """-> the names of the stages that failed (one at most per lane)."""
        with sigusr1(signal.SIG_IGN), ThreadPoolExecutor(len(self.lanes)) as pool:  # stages inherit it
            return [f for f in pool.map(self.run_lane, range(len(self.lanes))) if f]

    def run_lane(self, i):
        """The steps of lane i in turn; the first failure ends the lane and is returned."""
        try:
            for name, done, command in self.lanes[i]:
                if done and os.path.exists(done):
                    print(f"[{name}] done already ({done})", flush=True)
                    continue
                t0 = time.time()
                if command is None:
                    gather_base(self.out)
                else:
                    print(f"[{name}] python {' '.join(command)}", flush=True)
                    with self.lock:  # started and known together, so a lane ending now cannot miss it
                        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, self.cores // self.left)))
                        self.running[i] = subprocess.Popen([sys.executable, *command], cwd=HERE, env=env)
                    if self.running[i].wait():
                        return name
                self.times[name] = round(time.time() - t0, 1)
            return None
        finally:
            with self.lock:
                self.running.pop(i, None)
                self.left -= 1
                if self.left == 1 and hasattr(signal, "SIGUSR1"):
                    for process in self.running.values():
                        if process.poll() is None:
                            process.send_signal(signal.SIGUSR1)


def install(model, folder):
    """The trained model's published-layout parts (not its checkpoints, samples or log) into `folder`,
    its model_index.json naming the toy's guidance scale; other files there (the oracle) stay."""
    from checkpoint import write_folder_atomically
    keep = [n for n in os.listdir(model) if n not in ("checkpoints", "samples", "log.jsonl") and not n.startswith(".")]

    def write(tmp):
        for n in keep:
            (shutil.copytree if os.path.isdir(os.path.join(model, n)) else shutil.copyfile)(
                os.path.join(model, n), os.path.join(tmp, n))
        with open(os.path.join(tmp, "model_index.json")) as f:
            index = json.load(f)
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            f.write(json.dumps({**index, "guidance": GUIDANCE}, indent=2) + "\n")

    write_folder_atomically(folder, write, merge=True)


def main(argv=None):
    p = argparse.ArgumentParser(description="Train the toy BLIP-Diffusion from nothing: the toy world's data, "
                                            "stage 0 (VAE, CLIP pair, text-to-image UNet), stage 1, pairs, stage 2.")
    p.add_argument("--out", default="runs/toy", help="working folder: one sub-folder per stage; rerun to resume")
    p.add_argument("--install", default="weights/toy", help="where the trained model is copied at the end ('' : not)")
    p.add_argument("--data-size", type=int, default=20000, help="pictures of training identities")
    p.add_argument("--steps", type=int, default=None, help="every stage this many steps (a smoke test)")
    p.add_argument("--batch-size", type=int, default=None, help="every stage this batch (a smoke test)")
    args = p.parse_args(argv)
    override = (["--steps", str(args.steps)] if args.steps else []) + (
        ["--batch-size", str(args.batch_size)] if args.batch_size else [])
    cores = os.cpu_count() or 1
    times, start = {}, time.time()
    for phase in curriculum(args.out, args.data_size, override):
        failed = Phase(phase, args.out, cores, times).run()
        if failed:
            sys.exit(f"error: the {', '.join(failed)} stage failed (its message is above); "
                     f"fix it and rerun to resume")
    total = round(time.time() - start, 1)
    with open(os.path.join(args.out, "times.json"), "w") as f:
        json.dump({"stages_s": times, "total_s": total, "cores": cores}, f, indent=1)
    if args.install:
        install(os.path.join(args.out, "subject"), args.install)
    print(f"trained the toy model in {total / 60:.1f} min (per stage: {args.out}/times.json); "
          + (f"installed in {args.install} (python sample.py uses it by default)" if args.install
             else f"the model is in {args.out}/subject"))


if __name__ == "__main__":
    main()
