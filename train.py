"""Training BLIP-Diffusion: the two pre-training stages and subject fine-tuning (paper §3.1-3.3).

The authors never released this code; this file is our reading of the paper and of the released
fine-tuning recipe (../shared/reference/blip-diffusion.md §5.4, §5.7).

  --stage multimodal  stage 1, BLIP-2 representation learning: frozen image encoder, Q-Former trained
                      with image-text contrastive, image-grounded generation and matching losses.
  --stage subject     stage 2, subject representation learning on prompted-context pairs (pairs.py):
                      the Q-Former reads the subject pasted on a new background, the diffusion model
                      must render the original picture. Q-Former, projection, text encoder and UNet
                      train; image encoder and VAE are frozen; the subject prompt is dropped 15% of steps.
  --stage finetune    subject-specific fine-tuning: the subject's embeddings are averaged once and
                      trained as a parameter together with the UNet (LAVIS' released recipe).

    python train.py --stage subject --model tiny --data synthetic --steps 20 --out runs/tiny
    torchrun --standalone --nproc_per_node 2 train.py --stage subject --model tiny --data synthetic --out runs/tiny
    python train.py --stage finetune --weights weights/blipdiffusion --subject dog/ --subject-text dog --out runs/dog

Distributed the nanoGPT way: RANK in the environment means torchrun started us; only rank 0 prints
and writes. Only the trainable modules are wrapped in DDP; frozen ones run outside it, in eval mode,
under no_grad. `--batch-size` is the global batch of one optimizer step (over ranks and accumulation).
Every random draw of a sample (timestep, noise, subject-prompt drop) is seeded by (seed, step, the
sample's index in the global batch), so 1 process and N processes compute the same update, and a
resumed run continues exactly.
"""

import argparse
import glob
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from blipdiff import BlipDiffusion, alphas_cumprod, preprocess_subject, q_sample
from checkpoint import CheckpointError, read_tensors, write_folder_atomically
from clip import CTX_BEGIN_POS, MAX_LENGTH, CLIPTextConfig, CLIPTextModel, VisionConfig
from qformer import Blip2Config, QFormer, QFormerConfig
from unet import UNet, UNetConfig
from vae import AutoencoderKL, AutoencoderKLConfig

# Paper §3.2: "we randomly drop the subject prompt 15% of the time", leaving text-only conditioning.
SUBJECT_DROP = 0.15
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class TrainError(Exception):
    """A user-facing problem (bad data path, mismatched resume, non-finite loss): one line, exit 1."""


# ---------------------------------------------------------------------------------------------
# The tiny model: every part at a size a CPU trains in seconds, tokenizers written on the spot
# ---------------------------------------------------------------------------------------------

def write_tiny_tokenizers(folder):
    """CLIP BPE with no merges (every word spelt out in byte characters) and a character-level
    BERT WordPiece vocabulary: valid files in the published formats, nothing downloaded."""
    from tokenizers.pre_tokenizers import ByteLevel
    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    with open(os.path.join(folder, "tokenizer", "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "tokenizer", "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-&")
    bert = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters]
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(bert) + "\n")
    return os.path.join(folder, "tokenizer"), os.path.join(folder, "vocab.txt"), len(vocab), len(bert) + 1


def tiny_model(folder, seed=0):
    """A randomly initialised BLIP-Diffusion with the published structure and toy widths.
    Dropout is off so runs are bit-for-bit reproducible across process counts."""
    tok, vocab, clip_vocab, bert_vocab = write_tiny_tokenizers(folder)
    torch.manual_seed(seed)
    width = 32
    qformer = QFormer(Blip2Config(
        qformer_config=QFormerConfig(vocab_size=bert_vocab, hidden_size=width, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, encoder_hidden_size=32,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        vision_config=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, image_size=32, patch_size=8)))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=clip_vocab, hidden_size=width, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4))
    unet = UNet(UNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=width,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
                           norm_num_groups=8, sample_size=16))
    vae = AutoencoderKL(AutoencoderKLConfig(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                            norm_num_groups=8, sample_size=32))
    model = BlipDiffusion(qformer, text, unet, vae, tok, vocab, image_size=(32, 32))
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


# ---------------------------------------------------------------------------------------------
# Data: JSONL manifests, subject folders, and a small synthetic world for laptops and tests
# ---------------------------------------------------------------------------------------------

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("ball", "box")
BACKGROUNDS = {"on the grass": (60, 140, 50), "in the snow": (235, 240, 245), "at night": (20, 20, 50),
               "on the beach": (225, 200, 140)}


def synthetic_picture(rng, shape, color, background, size=64):
    """A coloured ball (disc) or box (square) on a textured plain background."""
    y, x = np.mgrid[0:size, 0:size]
    img = np.array(BACKGROUNDS[background], np.float32) + rng.normal(0, 12, (size, size, 1))
    r, cy, cx = rng.uniform(0.2, 0.3) * size, rng.uniform(0.35, 0.65) * size, rng.uniform(0.35, 0.65) * size
    inside = (np.hypot(y - cy, x - cx) < r) if shape == "ball" else (np.maximum(abs(y - cy), abs(x - cx)) < r)
    img[inside] = COLORS[color]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), inside


def synthetic_records(stage, n=64, seed=0):
    """In-memory records in the same form the manifests give: PIL images instead of paths."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        bg, other = rng.choice(list(BACKGROUNDS), 2, replace=False)
        target, mask = synthetic_picture(rng, shape, color, bg)
        caption = f"a {color} {shape} {bg}"
        if stage == "multimodal":
            records.append({"image": target, "caption": caption})
        else:  # prompted context: the subject cut out (its true mask) and pasted on another background
            backdrop, _ = synthetic_picture(rng, shape, color, other)
            composite = np.where(mask[..., None], np.asarray(target), np.array(BACKGROUNDS[other], np.uint8))
            records.append({"input": Image.fromarray(composite.astype(np.uint8)), "target": target,
                            "subject": str(shape), "caption": caption})
    return records


def read_manifest(path, keys):
    """A JSONL file (or a folder holding records.jsonl) -> records with image paths made absolute."""
    if os.path.isdir(path):
        path = os.path.join(path, "records.jsonl")
    if not os.path.isfile(path):
        raise TrainError(f"{path}: no such data file; give a JSONL manifest (or 'synthetic')")
    base, records = os.path.dirname(os.path.abspath(path)), []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise TrainError(f"{path}:{n}: not valid JSON") from None
            if not all(k in rec for k in keys):
                raise TrainError(f"{path}:{n}: a record needs the keys {', '.join(keys)}")
            records.append({k: os.path.join(base, v) if k in ("image", "input", "target") else v
                            for k, v in rec.items()})
    if not records:
        raise TrainError(f"{path}: the manifest holds no records")
    return records


def subject_folder(folder):
    if not os.path.isdir(folder):
        raise TrainError(f"--subject {folder}: no such folder of subject images")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise TrainError(f"--subject {folder}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def load_image(value):
    """A path or a PIL image -> RGB PIL image, or None if it cannot be read (the caller counts it)."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    try:
        with Image.open(value) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError):
        return None


def to_target(image, size):
    """Diffusion target: short side resized (bicubic) to `size`, centre crop, scaled to [-1, 1]
    (LAVIS' fine-tuning transform: Resize + CenterCrop + Normalize(0.5, 0.5))."""
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    x = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 127.5 - 1
    return torch.from_numpy(x).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def step_indices(num_records, batch_size, step, seed):
    """The global batch of optimizer step `step`: consecutive slices of a per-epoch permutation, so
    the data position is a function of the step alone (exact resume, no sampler state)."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(k, num_records)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(num_records)[i]))
    return out


def sample_generator(seed, step, index):
    """The generator for one sample's random draws, the same on whichever rank draws it."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0]))


# ---------------------------------------------------------------------------------------------
# The trainable parts of each stage, as one module (what DDP wraps) whose forward is the loss
# ---------------------------------------------------------------------------------------------

class SubjectStage(nn.Module):
    """Stage 2: ε-prediction loss of the UNet conditioned on the text with the subject inserted."""

    def __init__(self, model):
        super().__init__()
        self.qformer, self.text_encoder, self.unet = model.qformer, model.text_encoder, model.unet

    def forward(self, image_embeds, qf_ids, qf_mask, ids_ctx, ids_plain, drop, noisy, t, noise):
        hidden = self.qformer.encode(image_embeds, qf_ids, qf_mask)
        ctx = self.qformer.proj_layer(hidden[:, :self.qformer.config.num_query_tokens])
        with_subject = self.text_encoder(ids_ctx, ctx_embeddings=ctx)
        text_only = self.text_encoder(ids_plain)
        text = torch.where(drop[:, None, None], text_only, with_subject)
        return F.mse_loss(self.unet(noisy, t, text).float(), noise.float())


class FinetuneStage(nn.Module):
    """Subject fine-tuning: the cached subject embeddings and the UNet train; the text encoder is
    frozen but must stay differentiable so gradients reach the embeddings through it."""

    def __init__(self, model, ctx):
        super().__init__()
        self.ctx_embeddings = nn.Parameter(ctx)
        self.unet = model.unet
        self.text_encoder = [model.text_encoder]  # in a list: frozen, so not a DDP-managed submodule

    def forward(self, ids, noisy, t, noise):
        text = self.text_encoder[0](ids, ctx_embeddings=self.ctx_embeddings.expand(ids.shape[0], -1, -1))
        return F.mse_loss(self.unet(noisy, t, text).float(), noise.float())


def encode_latents(vae, images, gens):
    """Frozen VAE: z = (mean + std·n) · scaling_factor, n drawn per sample from its generator."""
    post = vae.encode(images)
    n = torch.stack([torch.randn(post.mean.shape[1:], generator=g) for g in gens]).to(post.mean)
    return (post.mean + post.std * n) * vae.config.scaling_factor


def noise_and_timesteps(latents, gens):
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(latents)
    t = torch.tensor([int(torch.randint(0, 1000, (1,), generator=g)) for g in gens], device=latents.device)
    return noise, t


# ---------------------------------------------------------------------------------------------
# Checkpoints: trainable weights + optimizer + step + RNG, each in its own atomically written folder
# ---------------------------------------------------------------------------------------------

def save_checkpoint(out, step, trainable, optimizer, schedule, ema, fingerprint, keep):
    def write(tmp):
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.state_dict().items()},
                  os.path.join(tmp, "trainable.safetensors"))
        if ema is not None:
            save_file({k: v.contiguous().cpu() for k, v in ema.items()}, os.path.join(tmp, "ema.safetensors"))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "fingerprint": fingerprint, "torch_rng": torch.get_rng_state()},
                   os.path.join(tmp, "state.pt"))

    write_folder_atomically(os.path.join(out, "checkpoints", f"step-{step:07d}"), write)
    for old in sorted(glob.glob(os.path.join(out, "checkpoints", "step-*")))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out):
    found = sorted(glob.glob(os.path.join(out, "checkpoints", "step-*")))
    return found[-1] if found else None


def load_checkpoint(path, trainable, optimizer, schedule, fingerprint):
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    if state["fingerprint"] != fingerprint:
        raise TrainError(f"{path}: saved with a different model or stage ({state['fingerprint']['stage']}, "
                         f"configs differ); resume with the same --stage/--model/--weights or use a new --out")
    trainable.load_state_dict(read_tensors(os.path.join(path, "trainable.safetensors")))
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    ema_path = os.path.join(path, "ema.safetensors")
    return state["step"], (load_file(ema_path) if os.path.isfile(ema_path) else None)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Train BLIP-Diffusion: stage 1, stage 2, or subject fine-tuning.")
    p.add_argument("--stage", choices=("multimodal", "subject", "finetune"), required=True)
    p.add_argument("--model", choices=("published", "tiny"), default="published",
                   help="published: start from --weights; tiny: a small random model (CPU, seconds)")
    p.add_argument("--weights", default=None, help="a BLIP-Diffusion folder in the published layout to start from")
    p.add_argument("--data", default=None, help="JSONL manifest (pairs.py's records.jsonl for --stage subject), or 'synthetic'")
    p.add_argument("--subject", default=None, help="finetune: a folder of images of the subject")
    p.add_argument("--subject-text", default=None, help="finetune: the subject's category word")
    p.add_argument("--out", required=True, help="output folder: the model in the published layout, checkpoints/, log.jsonl")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: subject 500000, finetune 40)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch per step (default: paper 16; finetune 3)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step on each rank")
    p.add_argument("--lr", type=float, default=None, help="default: stage 2 2e-6 (paper), finetune 5e-6 (LAVIS)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW decay; default 0.01 for finetune (LAVIS), else 0")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps, then constant (the paper: constant)")
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the trained weights (0: off); the export uses EMA")
    p.add_argument("--zero", action="store_true", help="shard the optimizer state over ranks (ZeRO-1)")
    p.add_argument("--compile", action="store_true", help="torch.compile the trainable module")
    p.add_argument("--image-size", type=int, default=None, help="diffusion target size (default: the model's, 512 for SD-1.5)")
    p.add_argument("--seed", type=int, default=42, help="LAVIS' seed")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--save-every", type=int, default=1000, help="also saved at the last step")
    p.add_argument("--sample-every", type=int, default=0, help="write a sample image every N steps (0: only at the end)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    args = p.parse_args(argv)
    try:
        return train(args)
    except (TrainError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def train(args):
    finetune = args.stage == "finetune"
    steps = args.steps or (40 if finetune else 500_000)
    batch_size = args.batch_size or (3 if finetune else 16)
    lr = args.lr or (5e-6 if finetune else 2e-6)
    decay = 0.01 if args.weight_decay is None and finetune else (args.weight_decay or 0.0)
    if args.stage == "multimodal":
        raise TrainError("--stage multimodal is not implemented yet")

    # Check the data and the start before any work.
    if finetune:
        if not args.subject or not args.subject_text:
            raise TrainError("--stage finetune needs --subject FOLDER and --subject-text WORD")
        records = [{"image": f} for f in subject_folder(args.subject)]
    elif args.data == "synthetic":
        records = synthetic_records(args.stage, seed=args.seed)
    elif args.data:
        records = read_manifest(args.data, ("input", "target", "subject", "caption"))
    else:
        raise TrainError("give --data (a manifest from pairs.py, or 'synthetic')")
    if args.model == "published" and not args.weights:
        raise TrainError("give --weights DIR (a published-layout folder), or --model tiny")

    # Distributed set-up, the nanoGPT way.
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
        if device != "cpu":
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = "cuda" if torch.cuda.is_available() else "cpu"
    master = rank == 0
    if batch_size % (world * args.grad_accum):
        raise TrainError(f"--batch-size {batch_size} must divide by processes x --grad-accum = {world * args.grad_accum}")
    micro = batch_size // (world * args.grad_accum)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)

    # The model: identical initial weights on every rank (seeded build, or the same files).
    if args.model == "tiny":
        model = tiny_model(os.path.join(args.out, ".tiny"), seed=args.seed)
    else:
        model = BlipDiffusion.from_pretrained(args.weights)
    model.to(device)
    # The resolution the model was trained at: the UNet's latent size x the VAE's downsampling (SD-1.5: 512).
    size = args.image_size or model.unet.config.sample_size * 2 ** (len(model.vae.config.block_out_channels) - 1)
    for m in (model.vae, model.qformer.visual_encoder):
        m.eval().requires_grad_(False)

    alphas = alphas_cumprod().to(device)
    if finetune:
        # LAVIS before_training: the embeddings of all subject images, averaged once, become a
        # trainable parameter; the Q-Former is not run again. Caption: "a {subject}", not padded.
        images = [im for im in (load_image(r["image"]) for r in records) if im is not None]
        if not images:
            raise TrainError(f"--subject {args.subject}: no readable images")
        ctx = model.subject_embeddings(images, args.subject_text).float()
        model.text_encoder.eval().requires_grad_(False)
        model.qformer.eval().requires_grad_(False)
        trainable = FinetuneStage(model, ctx).to(device)
        tok = model.tokenizer
        caption_ids = torch.tensor([[tok.bos_id] + tok.encode(f"a {args.subject_text}") + [tok.eos_id]], device=device)
    else:
        trainable = SubjectStage(model)
    trainable.train()
    for m in (model.vae, model.qformer.visual_encoder, *([model.text_encoder, model.qformer] if finetune else [])):
        m.eval()  # frozen parts stay in eval mode
    params = [q for q in trainable.parameters() if q.requires_grad]
    fingerprint = {"stage": args.stage, "configs": json.dumps(
        {name: asdict(getattr(model, name).config) for name in ("qformer", "text_encoder", "unet", "vae")},
        sort_keys=True, default=str)}

    if args.zero and ddp:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        optimizer = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=lr, weight_decay=decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))

    start, ema = 0, None
    if args.resume:
        path = latest_checkpoint(args.out)
        if path is None:
            raise TrainError(f"--resume: no checkpoint in {args.out}/checkpoints")
        start, ema = load_checkpoint(path, trainable, optimizer, schedule, fingerprint)
        if master:
            print(f"resumed from {path} at step {start}")
    if args.ema and ema is None:
        ema = {k: v.detach().clone() for k, v in trainable.state_dict().items()}

    net = DDP(trainable) if ddp else trainable
    net = torch.compile(net) if args.compile else net
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "log.jsonl"), "a") if master else None
    skipped = 0

    def batch_for(step, indices):
        """Tensors for this rank's micro-batch; unreadable images are replaced by the next readable
        record (counted), so a corrupt file never stops training."""
        nonlocal skipped
        items = []
        for i in indices:
            for j in range(len(records)):
                rec = records[(i + j) % len(records)]
                pics = [load_image(rec[k]) for k in (("image",) if finetune else ("input", "target"))]
                if all(pic is not None for pic in pics):
                    items.append((rec, pics))
                    break
                skipped += 1
            else:
                raise TrainError("no readable image in the data")
        gens = [sample_generator(args.seed, step, i) for i in indices]
        targets = torch.stack([to_target(pics[-1], size) for _, pics in items]).to(device)
        with torch.no_grad(), autocast:
            latents = encode_latents(model.vae, targets, gens)
        noise, t = noise_and_timesteps(latents, gens)
        noisy = q_sample(latents, noise, t, alphas)
        if finetune:
            return (caption_ids.expand(len(items), -1), noisy, t, noise)
        inputs = preprocess_subject([pics[0] for _, pics in items], model.image_size, model.mean, model.std)
        with torch.no_grad(), autocast:
            image_embeds = model.qformer.visual_encoder(inputs.to(device))
        qf_ids, qf_mask = model.qformer_tokenizer([rec["subject"] for rec, _ in items])
        prompts = [f"a {rec['subject']} {rec['caption']}" for rec, _ in items]
        num_queries = model.qformer.config.num_query_tokens
        ids_ctx = model.tokenizer(prompts, max_length=MAX_LENGTH - num_queries)
        ids_plain = model.tokenizer([rec["caption"] for rec, _ in items], max_length=MAX_LENGTH)
        drop = torch.tensor([float(torch.rand(1, generator=g)) < SUBJECT_DROP for g in gens])
        return (image_embeds, qf_ids.to(device), qf_mask.to(device), ids_ctx.to(device), ids_plain.to(device),
                drop.to(device), noisy, t, noise)

    for step in range(start, steps):
        t0 = time.time()
        indices = step_indices(len(records), batch_size, step, args.seed)
        total = 0.0
        for a in range(args.grad_accum):
            # This rank's share of the global batch: every world-th sample of each micro-slice.
            chunk = indices[a * micro * world:(a + 1) * micro * world][rank::world]
            sync = a == args.grad_accum - 1 or not ddp
            with (nullcontext() if sync else net.no_sync()), autocast:
                loss = net(*batch_for(step, chunk)) / args.grad_accum
            loss.backward()
            total += loss.item()
        if ddp:
            loss_t = torch.tensor(total, device=device)
            dist.all_reduce(loss_t)
            total = loss_t.item() / world
        if not math.isfinite(total):
            raise TrainError(f"step {step + 1}: the loss is {total}; stopping, the last good checkpoint is "
                             f"{latest_checkpoint(args.out) or 'none'} (try a lower --lr)")
        norm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad if args.clip_grad > 0 else float("inf"))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for k, v in trainable.state_dict().items():
                    ema[k].mul_(args.ema).add_(v.detach(), alpha=1 - args.ema) if v.is_floating_point() else ema[k].copy_(v)
        done = step + 1
        dt = time.time() - t0
        if master and (done % args.log_every == 0 or done == steps):
            row = {"step": done, "loss": total, "lr": schedule.get_last_lr()[0], "grad_norm": float(norm),
                   "images_per_s": batch_size / dt, "step_ms": 1000 * dt, "skipped": skipped}
            print(f"step {done}/{steps} | loss {total:.4f} | lr {row['lr']:.2e} | grad {row['grad_norm']:.3f} | "
                  f"{row['images_per_s']:.1f} img/s | {row['step_ms']:.0f} ms", flush=True)
            log.write(json.dumps(row) + "\n")
            log.flush()
        if args.zero and ddp and (done % args.save_every == 0 or done == steps):
            optimizer.consolidate_state_dict(to=0)
        if master and (done % args.save_every == 0 or done == steps):
            save_checkpoint(args.out, done, trainable, optimizer, schedule, ema, fingerprint, args.keep)
        if master and (done == steps or (args.sample_every and done % args.sample_every == 0)):
            export(model, trainable, ema, finetune, args)
            write_sample(model, records, finetune, args, done, size)
    if master:
        print(f"trained {args.stage} for {steps} steps; the model is in {args.out} (load it with sample.py --weights "
              f"{args.out}), checkpoints in {args.out}/checkpoints, log in {args.out}/log.jsonl"
              + (f"; {skipped} unreadable images skipped" if skipped else ""))
    if ddp:
        dist.destroy_process_group()
    return 0


def export(model, trainable, ema, finetune, args):
    """The trained model, in the published layout, into --out (EMA weights when kept)."""
    if ema is not None:
        saved = {k: v.clone() for k, v in trainable.state_dict().items()}
        trainable.load_state_dict(ema)
    if finetune:
        model.ctx_embeddings = nn.Parameter(trainable.ctx_embeddings.detach().clone(), requires_grad=False)
        model.subject_text = args.subject_text
    model.save_pretrained(args.out)
    if ema is not None:
        trainable.load_state_dict(saved)


def write_sample(model, records, finetune, args, step, size):
    """A picture of what the model makes now, so a person can watch training work."""
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    kw = dict(steps=25, seed=0, height=size, width=size, progress=False)
    if finetune:
        image = model.generate("on the beach", **kw)[0]
    else:
        rec = records[0]
        image = model.generate(rec["caption"], [load_image(rec["input"])], rec["subject"], **kw)[0]
    image.save(os.path.join(args.out, "samples", f"step-{step:07d}.png"))
    for m, mode in modes.items():
        m.train(mode)


if __name__ == "__main__":
    sys.exit(main())
