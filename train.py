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

What the paper takes from Stable Diffusion and CLIP is trained here too, for the toy model
(--model toy, toymodel.py runs the whole curriculum): --stage vae (the autoencoder), --stage clip
(tokenizers learnt from the captions, then a CLIP image/text pair, contrastive) and --stage t2i (the
text-to-image UNet under the frozen text encoder), each writing its part into --out.

    python train.py --stage subject --model tiny --data toy --steps 20 --out runs/tiny
    torchrun --standalone --nproc_per_node 2 train.py --stage subject --model tiny --data toy --out runs/tiny
    python train.py --stage finetune --weights weights/blipdiffusion --subject dog/ --subject-text dog --out runs/dog

Distributed the nanoGPT way: RANK in the environment means torchrun started us; only rank 0 prints
and writes. Only the trainable modules are wrapped in DDP; frozen ones run outside it, in eval mode,
under no_grad. `--batch-size` is the global batch of one optimizer step (over ranks and accumulation).
Every random draw of a sample (timestep, noise, subject-prompt drop) is seeded by (seed, step, the
sample's index in the global batch), so 1 process and N processes compute the same update, and a
resumed run continues exactly.
"""

import argparse
import functools
import glob
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import toymodel
import toyworld
from blipdiff import BlipDiffusion, build_prompt, preprocess_subject
from data import IMAGE_EXTENSIONS, image_files
from diffusion import NUM_TRAIN_TIMESTEPS, alphas_cumprod, epsilon_loss, min_snr_weight, q_sample
from checkpoint import CheckpointError, read_tensors, write_folder_atomically, write_part
from clip import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, VisionConfig, VisionTransformer
from qformer import Blip2Config, Blip2Pretraining, QFormer, QFormerConfig, QFormerTokenizer, init_from_bert
from unet import UNet, UNetConfig
from vae import AutoencoderKL, AutoencoderKLConfig

# Paper §3.2: "we randomly drop the subject prompt 15% of the time", leaving text-only conditioning.
SUBJECT_DROP = 0.15
# BLIP-2 stage 1 (LAVIS blip2_qformer): captions cut to 32 tokens.
MAX_CAPTION_TOKENS = 32
# The stages that train what the paper takes from Stable Diffusion (toy model only).
BASE_STAGES = ("vae", "clip", "t2i")
# LDM's autoencoder: the KL term weighs 1e-6 against the per-pixel reconstruction loss.
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


def tiny_blip2_config(bert_vocab, width=32):
    return Blip2Config(
        qformer_config=QFormerConfig(vocab_size=bert_vocab, hidden_size=width, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, encoder_hidden_size=32,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        vision_config=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, image_size=32, patch_size=8))


def no_dropout(module):
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return module


def tiny_model(folder, seed=0):
    """A randomly initialised BLIP-Diffusion with the published structure and toy widths.
    Dropout is off so runs are bit-for-bit reproducible across process counts."""
    tok, vocab, clip_vocab, bert_vocab = write_tiny_tokenizers(folder)
    torch.manual_seed(seed)
    width = 32
    qformer = QFormer(tiny_blip2_config(bert_vocab, width))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=clip_vocab, hidden_size=width, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4))
    unet = UNet(UNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=width,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
                           norm_num_groups=8, sample_size=16))
    vae = AutoencoderKL(AutoencoderKLConfig(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                            norm_num_groups=8, sample_size=32))
    return no_dropout(BlipDiffusion(qformer, text, unet, vae, tok, vocab, image_size=(32, 32)))


def stage2_from_sd(sd, qformer_dir, tokenizer_dir=None, configs=None):
    """Stage 2's start as the paper describes it: Stable Diffusion v1.5 and the Q-Former of stage 1
    (train.py --stage multimodal --out DIR). `sd` is SD's single-file checkpoint (UNet, VAE, text
    encoder; `configs` (unet, vae, text_encoder) default to SD-1.5's) or a folder in the diffusers
    layout (unet/, vae/, text_encoder/, tokenizer/), as the toy's stage 0 writes."""
    tokenizer_dir = tokenizer_dir or os.path.join(sd, "tokenizer")
    for path in (sd, os.path.join(qformer_dir, "qformer"), os.path.join(tokenizer_dir, "vocab.json")):
        if not os.path.exists(path):
            raise TrainError(f"{path}: missing; stage 2 from scratch needs --sd, --qformer (a stage-1 output) "
                             f"and --tokenizer (a CLIP tokenizer folder)")
    qformer = QFormer.from_pretrained(os.path.join(qformer_dir, "qformer"))
    if os.path.isdir(sd):
        parts = (CLIPTextModel.from_pretrained(os.path.join(sd, "text_encoder")),
                 UNet.from_pretrained(os.path.join(sd, "unet")), AutoencoderKL.from_pretrained(os.path.join(sd, "vae")))
    else:
        state, (unet_cfg, vae_cfg, text_cfg) = read_tensors(sd), configs or (None, None, None)
        parts = (CLIPTextModel.from_compvis(state, text_cfg), UNet.from_compvis(state, unet_cfg),
                 AutoencoderKL.from_compvis(state, vae_cfg))
    return BlipDiffusion(qformer, *parts, tokenizer_dir, os.path.join(qformer_dir, "bert_tokenizer", "vocab.txt"),
                         image_size=(qformer.config.vision_config.image_size,) * 2)


def stage1_model(args):
    """Stage 1's starting point -> (Blip2Pretraining, path of the Q-Former's vocab.txt).
    Published: the image encoder from OpenAI CLIP ViT-L/14, the Q-Former from BERT-base (BLIP-2 §3)."""
    if args.model == "tiny":
        _, vocab, _, bert_vocab = write_tiny_tokenizers(os.path.join(args.out, ".tiny"))
        torch.manual_seed(args.seed)
        return no_dropout(Blip2Pretraining(tiny_blip2_config(bert_vocab))), vocab
    if not args.bert or not args.clip_vision:
        raise TrainError("--stage multimodal needs --bert DIR (bert-base-uncased) and --clip-vision DIR "
                         "(openai/clip-vit-large-patch14), or --model tiny")
    if args.model == "toy":
        # The toy's image tower from --stage clip (DIR/vision_model) and its WordPiece vocabulary
        # (DIR/bert_tokenizer); the Q-Former starts from scratch, there being no toy BERT.
        vocab = os.path.join(args.bert, "vocab.txt")
        if not os.path.isfile(vocab):
            raise TrainError(f"{vocab}: missing; for --model toy give --bert DIR/bert_tokenizer of --stage clip")
        vit = VisionTransformer.from_pretrained(args.clip_vision)
        torch.manual_seed(args.seed)
        model = Blip2Pretraining(toymodel.blip2_config(sum(1 for _ in open(vocab)) + 1, vit.config))
        model.qformer.visual_encoder = vit
        return model, vocab
    vocab = os.path.join(args.bert, "vocab.txt")
    if not os.path.isfile(vocab):
        raise TrainError(f"{vocab}: missing; the BERT folder must hold its vocab.txt")
    torch.manual_seed(args.seed)
    vit = VisionTransformer.from_clip(args.clip_vision)
    tokens = sum(1 for _ in open(vocab)) + 1  # + [DEC]
    model = Blip2Pretraining(Blip2Config(qformer_config=QFormerConfig(vocab_size=tokens), vision_config=vit.config))
    model.qformer.visual_encoder = vit
    unused, fresh = init_from_bert(model, args.bert)
    print(f"initialised from BERT; not used: {', '.join(unused) or 'nothing'}; "
          f"newly initialised: {', '.join(fresh) or 'nothing'}")
    return model, vocab


# ---------------------------------------------------------------------------------------------
# Data: JSONL manifests, subject folders, and the toy world (toyworld.py) for laptops and tests
# ---------------------------------------------------------------------------------------------

def toy_records(stage, n=64, seed=0):
    """Records from the toy world's training identities, in the form the manifests give (PIL images
    instead of paths). For stage 2 the prompted context is made from the world's true mask: the
    subject pasted on a picture of another context (pairs.py does it with CLIPSeg and matting)."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        s = toyworld.sample(rng, "train")
        if stage != "subject":
            records.append({"image": s.image, "caption": s.caption})
            continue
        contexts = toyworld.CONTEXTS
        other = contexts[(contexts.index(s.attributes["context"]) + rng.integers(1, len(contexts))) % len(contexts)]
        back = toyworld.background(other, rng, s.image.height)
        composite = back + s.mask[..., None] * (np.asarray(s.image, np.float32) / 255 - back)
        records.append({"input": Image.fromarray(np.round(np.clip(composite, 0, 1) * 255).astype(np.uint8)),
                        "target": s.image, "subject": s.category, "caption": s.caption})
    return records


def read_manifest(path, keys):
    """A JSONL file (or a folder holding records.jsonl) -> records with image paths made absolute."""
    if os.path.isdir(path):
        path = os.path.join(path, "records.jsonl")
    if not os.path.isfile(path):
        raise TrainError(f"{path}: no such data file; give a JSONL manifest (or 'toy')")
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
    if os.path.isfile(folder) and folder.lower().endswith(IMAGE_EXTENSIONS):
        return [folder]  # one picture of the subject
    if not os.path.isdir(folder):
        raise TrainError(f"--subject {folder}: no such image or folder of subject images")
    files = image_files(folder)
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


@functools.lru_cache(maxsize=2)
def epoch_order(num_records, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def step_indices(num_records, batch_size, step, seed):
    """The global batch of optimizer step `step`: consecutive slices of a per-epoch permutation, so
    the data position is a function of the step alone (exact resume, no sampler state)."""
    positions = (divmod(k, num_records) for k in range(step * batch_size, (step + 1) * batch_size))
    return [int(epoch_order(num_records, seed, epoch)[i]) for epoch, i in positions]


def sample_generator(seed, step, index):
    """The generator for one sample's random draws, the same on whichever rank draws it."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0]))


# ---------------------------------------------------------------------------------------------
# The trainable parts of each stage, as one module (what DDP wraps) whose forward is the loss
# ---------------------------------------------------------------------------------------------

class MultimodalStage(nn.Module):
    """Stage 1: BLIP-2's three losses, ITC + ITG + ITM (qformer.Blip2Pretraining), summed."""

    def __init__(self, pretraining):
        super().__init__()
        self.pretraining = pretraining

    def forward(self, pixel_values, ids, mask, generator):
        return self.pretraining(ids, mask, pixel_values=pixel_values, generator=generator)["loss"]


class SubjectStage(nn.Module):
    """Stage 2: ε-prediction loss of the UNet conditioned on the text with the subject inserted."""

    def __init__(self, model):
        super().__init__()
        self.qformer, self.text_encoder, self.unet = model.qformer, model.text_encoder, model.unet

    def forward(self, image_embeds, qf_ids, qf_mask, ids_ctx, ids_plain, drop, noisy, t, noise, weight=None):
        hidden = self.qformer.encode(image_embeds, qf_ids, qf_mask)
        ctx = self.qformer.proj_layer(hidden[:, :self.qformer.config.num_query_tokens])
        text = self.text_encoder(ids_ctx, ctx_embeddings=ctx)
        if drop.any():  # the dropped rows alone are encoded again, without the subject
            text = text.index_put((drop,), self.text_encoder(ids_plain[drop]))
        return epsilon_loss(self.unet(noisy, t, text), noise, weight)


class FinetuneStage(nn.Module):
    """Subject fine-tuning: the cached subject embeddings and the UNet train; the text encoder is
    frozen but must stay differentiable so gradients reach the embeddings through it."""

    def __init__(self, model, ctx):
        super().__init__()
        self.ctx_embeddings = nn.Parameter(ctx)
        self.unet = model.unet
        self.text_encoder = [model.text_encoder]  # in a list: frozen, so not a DDP-managed submodule

    def forward(self, ids, noisy, t, noise, weight=None):
        text = self.text_encoder[0](ids, ctx_embeddings=self.ctx_embeddings.expand(ids.shape[0], -1, -1))
        return epsilon_loss(self.unet(noisy, t, text), noise, weight)


def base_stage(args, records, extra):
    """The toy's stage 0 -> (trainable module, frozen modules, configs): a fresh VAE; tokenizers
    learnt from the captions, then a fresh CLIP pair; or a fresh UNet on --sd's VAE and text encoder."""
    if args.model != "toy":
        raise TrainError(f"--stage {args.stage} trains what the paper takes from Stable Diffusion: only with --model toy")
    torch.manual_seed(args.seed)
    extra["size"] = args.image_size or toymodel.IMAGE_SIZE
    if args.stage == "vae":
        vae = AutoencoderKL(toymodel.vae_config())
        extra["latent_shape"] = (vae.config.latent_channels,) + (extra["size"] // 2 // vae.downsampling,) * 2  # a half-side crop
        scale_set = [im for im in (load_image(rec["image"]) for rec in records[:256]) if im is not None]
        extra["scale_images"] = torch.stack([to_target(im, extra["size"]) for im in scale_set])
        return toymodel.VAEStage(vae), [], {"vae": asdict(vae.config)}
    if args.stage == "clip":
        # The tokenizers come first and once: a resumed run finds them in --out and keeps them.
        captions = [rec["caption"] for rec in records]
        folder = os.path.join(args.out, "tokenizer")
        if not os.path.isfile(os.path.join(folder, "vocab.json")):
            write_folder_atomically(folder, lambda tmp: toymodel.train_clip_tokenizer(captions, tmp))
            bert = os.path.join(args.out, "bert_tokenizer")
            write_folder_atomically(bert, lambda tmp: toymodel.write_bert_vocab(captions, os.path.join(tmp, "vocab.txt")))
        tokenizer = extra["tokenizer"] = CLIPTokenizer.from_folder(folder)
        text = CLIPTextModel(toymodel.text_config(tokenizer.tokenizer.get_vocab_size()))
        vision = VisionTransformer(toymodel.vision_config())
        return toymodel.CLIPStage(vision, text, tokenizer.eos_id), [], {"text": asdict(text.config), "vision": asdict(vision.config)}
    if not args.sd or not all(os.path.isdir(os.path.join(args.sd, d)) for d in ("vae", "text_encoder", "tokenizer")):
        raise TrainError("--stage t2i needs --sd DIR holding vae/, text_encoder/ and tokenizer/ "
                         "(the --out of --stage vae and --stage clip)")
    vae = AutoencoderKL.from_pretrained(os.path.join(args.sd, "vae"))
    text = CLIPTextModel.from_pretrained(os.path.join(args.sd, "text_encoder"))
    extra.update(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_folder(os.path.join(args.sd, "tokenizer")))
    unet = UNet(toymodel.unet_config())
    return toymodel.T2IStage(unet), [vae, text], {"unet": asdict(unet.config), "vae": asdict(vae.config)}


def sample_latents(vae, mean, std, gens):
    """The frozen VAE's posterior -> z = (mean + std·n) · scaling_factor, n drawn per sample from its generator."""
    n = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(mean)
    return (mean + std * n) * vae.config.scaling_factor


def noise_and_timesteps(latents, gens):
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(latents)
    t = torch.tensor([int(torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=g)) for g in gens],
                     device=latents.device)
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
    p.add_argument("--stage", choices=("multimodal", "subject", "finetune") + BASE_STAGES, required=True,
                   help="vae, clip, t2i: the toy's stage 0 (what the paper takes from SD and CLIP)")
    p.add_argument("--model", choices=("published", "tiny", "toy"), default="published",
                   help="published: start from --weights; tiny: a small random model (CPU, seconds); "
                        "toy: toymodel.py's sizes (stage 0, and stage 1 from the toy's image tower)")
    p.add_argument("--weights", default=None, help="a BLIP-Diffusion folder in the published layout to start from")
    p.add_argument("--data", default=None, help="JSONL manifest (pairs.py's records.jsonl for --stage subject), or "
                                                 "'toy' (64 pictures of the toy world, made on the spot)")
    p.add_argument("--sd", default=None, help="subject, t2i: SD v1.5's single file (v1-5-pruned-emaonly.safetensors) "
                                               "or a diffusers-layout folder (the toy's stage-0 --out) to start from")
    p.add_argument("--qformer", default=None, help="subject: a stage-1 output folder (its qformer/ and bert_tokenizer/)")
    p.add_argument("--tokenizer", default=None, help="subject: SD v1.5's CLIP tokenizer folder (vocab.json, merges.txt)")
    p.add_argument("--bert", default=None, help="multimodal: a bert-base-uncased folder (config, weights, vocab.txt)")
    p.add_argument("--clip-vision", default=None, help="multimodal: an openai/clip-vit-large-patch14 folder")
    p.add_argument("--subject", default=None, help="finetune: an image, or a folder of images, of the subject")
    p.add_argument("--subject-text", default=None, help="finetune: the subject's category word")
    p.add_argument("--out", required=True, help="output folder: the model in the published layout, checkpoints/, log.jsonl")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: 250000 / 500000 / 40)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch per step (default: 2320 / 16 / 3)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step on each rank")
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: 1e-4 BLIP-2 / 2e-6 paper / 5e-6 LAVIS)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW decay (default: 0.05 / 0 / 0.01)")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: stage 1 5000, else 0)")
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--caption-drop", type=float, default=None,
                   help="share of steps trained on the empty prompt, for classifier-free guidance "
                        "(default: t2i 0.1 as SD; else 0, the paper's stage 2 has only the subject drop)")
    p.add_argument("--min-snr", type=float, default=0.0, metavar="GAMMA",
                   help="t2i, subject, finetune: min-SNR-γ loss weighting (Hang et al. 2023; 5 is theirs; 0: off, "
                        "the plain mean as SD and the paper)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default=None,
                   help="lr after the warm-up: constant, or cosine down to 10%% at the last step "
                        "(default: cosine for stage 1 as BLIP-2, constant elsewhere as published)")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the trained weights (0: off); the export uses EMA")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute UNet activations in the backward pass (less memory)")
    p.add_argument("--zero", action="store_true", help="shard the optimizer state over ranks (ZeRO-1)")
    p.add_argument("--compile", action="store_true", help="torch.compile the trainable module")
    p.add_argument("--cache", action="store_true",
                   help="t2i, subject, finetune: keep each picture's frozen-encoder outputs (VAE posterior, image "
                        "tower; t2i: each caption's text encoding too) in memory, so later epochs skip those "
                        "encoders (small datasets: the toy's)")
    p.add_argument("--image-size", type=int, default=None, help="diffusion target size (default: the model's, 512 for SD-1.5)")
    p.add_argument("--seed", type=int, default=42, help="LAVIS' seed")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--save-every", type=int, default=1000, help="also saved at the last step")
    p.add_argument("--sample-every", type=int, default=0, help="write a sample image every N steps (0: only at the end)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    args = p.parse_args(argv)
    try:
        with toymodel.every_core_on_sigusr1():
            return train(args)
    except (TrainError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


# Defaults per stage: (steps, global batch, lr, weight decay, warm-up). Stage 1 as BLIP-2 (250k steps,
# lr 1e-4, decay 0.05, LAVIS' 5000 warm-up steps; its batch of 2320 is over 16 A100s); stage 2 as the
# paper (constant lr 2e-6, batch 16; 500k steps is our reading, unverified); fine-tuning as LAVIS.
# The toy's stage 0 as toymodel.py runs it. The CLIP pair's batch is 256, not 64: 64 captions are told
# apart by colour and context alone, and the image tower then learnt little of the pattern that a
# subject is (a linear probe on held-out subjects, `python toyworld.py probe`: 0.53 against 0.77);
# and 600 steps of it (with toymodel.py's cosine lr), not 300: pattern 0.90, colour 0.93 against 0.77, 0.89.
STAGE_DEFAULTS = {"multimodal": (250_000, 2320, 1e-4, 0.05, 5000), "subject": (500_000, 16, 2e-6, 0.0, 0),
                  "finetune": (40, 3, 5e-6, 0.01, 0), "vae": (2500, 32, 2e-3, 0.0, 50),
                  "clip": (600, 256, 1e-3, 0.1, 50), "t2i": (2500, 32, 1e-3, 0.0, 50)}


def setup_distributed():
    """torchrun sets RANK: then one process per device (NCCL on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ:
        return False, 0, 1, "cuda" if torch.cuda.is_available() else "cpu"
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def read_records(args):
    """The stage's data, checked before any work."""
    if args.stage == "finetune":
        if not args.subject or not args.subject_text:
            raise TrainError("--stage finetune needs --subject FOLDER and --subject-text WORD")
        return [{"image": f} for f in subject_folder(args.subject)]
    if args.data == "toy":
        return toy_records(args.stage, seed=args.seed)
    if args.data:
        keys = ("input", "target", "subject", "caption") if args.stage == "subject" else ("image", "caption")
        return read_manifest(args.data, keys)
    raise TrainError("give --data (a JSONL manifest; pairs.py's records.jsonl for --stage subject) or 'toy'")


def train(args):
    stage = args.stage
    default_steps, default_batch, default_lr, default_decay, default_warmup = STAGE_DEFAULTS[stage]
    steps, batch_size = args.steps or default_steps, args.batch_size or default_batch
    lr = args.lr or default_lr
    decay = default_decay if args.weight_decay is None else args.weight_decay
    warmup = default_warmup if args.warmup is None else args.warmup
    records = read_records(args)
    if stage in ("subject", "finetune") and args.model == "published" and not args.weights and not (
            stage == "subject" and args.sd and args.qformer and (args.tokenizer or os.path.isdir(args.sd))):
        raise TrainError("give --weights DIR (a published-layout folder), --model tiny, or for stage 2 "
                         "--sd FILE --qformer DIR --tokenizer DIR (or --sd FOLDER --qformer DIR)")

    ddp, rank, world, device = setup_distributed()
    master = rank == 0
    if batch_size % (world * args.grad_accum):
        raise TrainError(f"--batch-size {batch_size} must divide by processes x --grad-accum = {world * args.grad_accum}")
    micro = batch_size // (world * args.grad_accum)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    torch.manual_seed(args.seed + rank)

    # The model: identical initial weights on every rank (a seeded build, or the same files), and the
    # module of its trainable parts that DDP wraps. Frozen parts: eval mode, no gradients.
    model, frozen, extra = None, [], {}
    extra["caption_drop"] = (0.1 if stage == "t2i" else 0.0) if args.caption_drop is None else args.caption_drop
    if args.min_snr and stage not in ("t2i", "subject", "finetune"):
        raise TrainError("--min-snr weights the diffusion loss: only with --stage t2i, subject or finetune")
    extra["min_snr"] = args.min_snr
    if stage in BASE_STAGES:
        trainable, frozen, configs = base_stage(args, records, extra)
        trainable.to(device)
        for m in frozen:
            m.to(device)
    elif stage == "multimodal":
        pre, vocab = stage1_model(args)
        trainable = MultimodalStage(pre.to(device))
        frozen = [m for m in pre.qformer.visual_encoder.children() if m is not pre.qformer.visual_encoder.post_layernorm]
        extra["tokenizer"], extra["vocab"] = QFormerTokenizer.from_file(vocab), vocab
        configs = {"qformer": asdict(pre.qformer.config)}
    else:
        if args.model == "tiny":
            model = tiny_model(os.path.join(args.out, ".tiny"), args.seed)
        elif args.model == "toy" and not (args.weights or args.sd):
            raise TrainError(f"--stage {stage} --model toy starts from --sd DIR (stage 0's --out) and --qformer "
                             f"DIR (stage 1's), or from --weights DIR")
        elif args.weights:
            model = BlipDiffusion.from_pretrained(args.weights)
        else:
            model = stage2_from_sd(args.sd, args.qformer, args.tokenizer)
        model.to(device)
        frozen = [model.vae, model.qformer.visual_encoder]
        if stage == "finetune":
            # LAVIS before_training: the embeddings of all subject images, averaged once, become a
            # trainable parameter; the Q-Former is not run again. Caption "a {subject}", not padded.
            images = [im for im in (load_image(r["image"]) for r in records) if im is not None]
            if not images:
                raise TrainError(f"--subject {args.subject}: no readable images")
            ctx = model.subject_embeddings(images, args.subject_text).float()
            frozen += [model.text_encoder, model.qformer]
            trainable = FinetuneStage(model, ctx).to(device)
            tok = model.tokenizer
            words = tok.encode(f"a {args.subject_text}")[:model.context_length - ctx.shape[1] - 2]  # LAVIS truncates too
            extra["caption_ids"] = torch.tensor([[tok.bos_id] + words + [tok.eos_id]], device=device)
        else:
            trainable = SubjectStage(model)
        model.unet.gradient_checkpointing = args.grad_checkpoint
        extra["size"] = args.image_size or model.resolution  # the size it was trained at (SD-1.5: 512)
        configs = {name: asdict(getattr(model, name).config) for name in ("qformer", "text_encoder", "unet", "vae")}
    if stage not in ("clip", "multimodal"):
        # The convolutions of a UNet or VAE run faster on a CPU with channels last (bench_train.py); it
        # moves only the 4-D weights, and the saves are contiguous.
        trainable.to(memory_format=torch.channels_last)
    trainable.train()
    for m in frozen:
        m.eval().requires_grad_(False)
    named = [(n, q) for n, q in trainable.named_parameters() if q.requires_grad]
    params = [q for _, q in named]
    # As LAVIS: weight decay on matrices (and the subject embeddings), not on biases and norm scales.
    groups = [{"params": [q for _, q in named if q.dim() >= 2], "weight_decay": decay},
              {"params": [q for _, q in named if q.dim() < 2], "weight_decay": 0.0}]
    fingerprint = {"stage": stage, "configs": json.dumps(configs, sort_keys=True, default=str)}

    if args.zero and ddp:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        optimizer = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=lr)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr)
    # Linear warm-up, then constant (stage 2 and fine-tuning, as published) or cosine to 10% (stage 1,
    # as BLIP-2; any stage with --schedule cosine).
    cosine = (args.schedule or ("cosine" if stage == "multimodal" else "constant")) == "cosine"
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps))) if cosine else 1.0))

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
    data = Batches(stage, records, model, trainable, extra, args.seed, device, autocast, args.cache)

    for step in range(start, steps):
        t0 = time.time()
        indices = step_indices(len(records), batch_size, step, args.seed)
        total = 0.0
        for a in range(args.grad_accum):
            # This rank's share of the global batch: every world-th sample of each micro-slice.
            chunk = indices[a * micro * world:(a + 1) * micro * world][rank::world]
            sync = a == args.grad_accum - 1 or not ddp
            with (nullcontext() if sync else net.no_sync()), autocast:
                loss = net(*data(step, chunk, rank)) / args.grad_accum
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
                    if v.is_floating_point():
                        ema[k].mul_(args.ema).add_(v.detach(), alpha=1 - args.ema)
        done = step + 1
        dt = time.time() - t0
        if master and (done % args.log_every == 0 or done == steps):
            row = {"step": done, "loss": total, "lr": schedule.get_last_lr()[0], "grad_norm": float(norm),
                   "images_per_s": batch_size / dt, "step_ms": 1000 * dt, "skipped": data.skipped}
            print(f"step {done}/{steps} | loss {total:.4f} | lr {row['lr']:.2e} | grad {row['grad_norm']:.3f} | "
                  f"{row['images_per_s']:.1f} img/s | {row['step_ms']:.0f} ms", flush=True)
            log.write(json.dumps(row) + "\n")
            log.flush()
        saving = done % args.save_every == 0 or done == steps
        if args.zero and ddp and saving:
            optimizer.consolidate_state_dict(to=0)
        if master and saving:
            save_checkpoint(args.out, done, trainable, optimizer, schedule, ema, fingerprint, args.keep)
        if master and (done == steps or (args.sample_every and done % args.sample_every == 0)):
            with ema_weights(trainable, ema):
                export(stage, model, trainable, extra, args)
                if model is not None:
                    write_sample(model, records, args, done, extra["size"])
    if master:
        print(f"trained {stage} for {steps} steps: the model is in {args.out}"
              + ("" if stage in ("multimodal",) + BASE_STAGES else f" (sample.py --weights {args.out})")
              + f", checkpoints in {args.out}/checkpoints, log in {args.out}/log.jsonl"
              + (f"; {data.skipped} unreadable images skipped" if data.skipped else ""))
    if ddp:
        dist.destroy_process_group()
    return 0


class Batches:
    """Turns the indices of this rank's share of a step into the tensors its stage's forward takes.
    An unreadable image is replaced by the next readable record and counted, never a crash."""

    def __init__(self, stage, records, model, trainable, extra, seed, device, autocast, cache=False):
        self.stage, self.records, self.model, self.trainable, self.extra = stage, records, model, trainable, extra
        self.seed, self.device, self.autocast = seed, device, autocast
        self.alphas = alphas_cumprod().to(device)
        self.skipped = 0
        self.cache = {} if cache else None

    def readable(self, index):
        keys = ("input", "target") if self.stage == "subject" else ("image",)
        for j in range(len(self.records)):
            rec = self.records[(index + j) % len(self.records)]
            pics = [load_image(rec[k]) for k in keys]
            if all(pic is not None for pic in pics):
                return (index + j) % len(self.records), rec, pics
            self.skipped += 1
        raise TrainError("no readable image in the data")

    def frozen(self, name, keys, encode):
        """encode(rows) -> a tuple of tensors for those rows of the batch, by a frozen encoder. With
        --cache each record's result is kept, so a record is encoded once in the whole run (the same
        numbers: a frozen encoder gives the same output every epoch; only the noise is drawn anew)."""
        if self.cache is None:
            return encode(list(range(len(keys))))
        new = [i for i, k in enumerate(keys) if (name, k) not in self.cache]
        if new:
            for i, *parts in zip(new, *encode(new)):
                self.cache[name, keys[i]] = parts
        return tuple(torch.stack(p) for p in zip(*(self.cache[name, k] for k in keys)))

    def latents(self, vae, keys, pictures, gens):
        """The frozen VAE's noisy latents of the diffusion targets (the posterior cached with --cache)."""
        def encode(rows):
            post = vae.encode(torch.stack([to_target(pictures[i], self.extra["size"]) for i in rows]).to(self.device))
            return post.mean, post.std
        with torch.no_grad(), self.autocast:
            mean, std = self.frozen("vae", keys, encode)
        return sample_latents(vae, mean, std, gens)

    def __call__(self, step, indices, rank):
        resolved = [self.readable(i) for i in indices]
        keys, items = [k for k, _, _ in resolved], [(rec, pics) for _, rec, pics in resolved]
        if self.stage in BASE_STAGES:
            return self.base(step, indices, keys, items)
        if self.stage == "multimodal":
            pre = self.trainable.pretraining
            pixels = preprocess_subject([pics[0] for _, pics in items], (pre.qformer.config.vision_config.image_size,) * 2)
            ids, mask = self.extra["tokenizer"]([rec["caption"] for rec, _ in items])
            # ITM's hard negatives come from this rank's batch: one generator per (step, rank).
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, step, rank]).generate_state(1)[0]))
            return (pixels.to(self.device), ids[:, :MAX_CAPTION_TOKENS].to(self.device),
                    mask[:, :MAX_CAPTION_TOKENS].to(self.device), gen)
        model = self.model
        gens = [sample_generator(self.seed, step, i) for i in indices]
        latents = self.latents(model.vae, keys, [pics[-1] for _, pics in items], gens)
        noise, t = noise_and_timesteps(latents, gens)
        noisy = q_sample(latents, noise, t, self.alphas)
        if self.stage == "finetune":
            return (self.extra["caption_ids"].expand(len(items), -1), noisy, t, noise, self.weight(t))
        def encode(rows):  # the frozen image tower on the prompted-context inputs
            inputs = preprocess_subject([items[i][1][0] for i in rows], model.image_size, model.mean, model.std)
            return (model.qformer.visual_encoder(inputs.to(self.device)),)
        with torch.no_grad(), self.autocast:
            image_embeds, = self.frozen("vision", keys, encode)
        qf_ids, qf_mask = model.qformer_tokenizer([rec["subject"] for rec, _ in items])
        # Our choice (the paper does not say where the subject prompt goes in pre-training): the text
        # exactly as inference builds it (blipdiff.build_prompt, "a {subject} {caption}" repeated) with
        # the subject embeddings after its "a". Dropped: the same text alone, or with --caption-drop
        # the empty prompt that guidance contrasts with.
        prompts = [build_prompt(rec["caption"], rec["subject"]) for rec, _ in items]
        ids_ctx = model.tokenizer(prompts, max_length=model.context_length - model.qformer.config.num_query_tokens)
        u = [float(torch.rand(1, generator=g)) for g in gens]
        drop = torch.tensor([x < SUBJECT_DROP + self.extra["caption_drop"] for x in u])
        plain = [p if x < SUBJECT_DROP else "" for p, x in zip(prompts, u)]
        ids_plain = model.tokenizer(plain, max_length=model.context_length)
        return (image_embeds, qf_ids.to(self.device), qf_mask.to(self.device), ids_ctx.to(self.device),
                ids_plain.to(self.device), drop.to(self.device), noisy, t, noise, self.weight(t))


    def base(self, step, indices, keys, items):
        """The toy's stage 0: pictures (and noise) for the VAE, pictures and captions for the CLIP pair,
        for the UNet the frozen VAE's latents and the frozen text encoder's output of the captions
        (the empty one at --caption-drop)."""
        gens = [sample_generator(self.seed, step, i) for i in indices]
        if self.stage == "clip":
            vision = self.trainable.vision.config
            pixels = preprocess_subject([pics[0] for _, pics in items], (vision.image_size,) * 2)
            ids = self.extra["tokenizer"]([rec["caption"] for rec, _ in items],
                                          max_length=self.trainable.text.config.max_position_embeddings)
            # The mask is causal, so what the EOS position sees ends there: the padding after the
            # longest caption changes nothing and is cut (a 77-token batch costs ~7x more).
            ids = ids[:, :int((ids == self.trainable.eos_id).int().argmax(dim=1).max()) + 1]
            return pixels.to(self.device), ids.to(self.device)
        if self.stage == "vae":
            images = torch.stack([to_target(pics[0], self.extra["size"]) for _, pics in items]).to(self.device)
            # Random crops of half the side, as LDM trains its autoencoder on crops: the network is
            # convolutional (but for one attention layer), and a quarter of the pixels is a quarter of the time.
            c = self.extra["size"] // 2
            corners = [torch.randint(0, c + 1, (2,), generator=g).tolist() for g in gens]
            images = torch.stack([im[:, y:y + c, x:x + c] for im, (y, x) in zip(images, corners)])
            noise = torch.stack([torch.randn(self.extra["latent_shape"], generator=g) for g in gens])
            return images, noise.to(self.device)
        latents = self.latents(self.extra["vae"], keys, [pics[0] for _, pics in items], gens)
        noise, t = noise_and_timesteps(latents, gens)
        captions = ["" if float(torch.rand(1, generator=g)) < self.extra["caption_drop"] else rec["caption"]
                    for g, (rec, _) in zip(gens, items)]
        text = self.extra["text_encoder"]
        def encode(rows):  # the frozen text encoder; with --cache a caption's output is kept, keyed by the caption
            ids = self.extra["tokenizer"]([captions[i] for i in rows], max_length=text.config.max_position_embeddings)
            return (text(ids.to(self.device)),)
        with torch.no_grad(), self.autocast:
            hidden, = self.frozen("text", captions, encode)
        return hidden, q_sample(latents, noise, t, self.alphas), t, noise, self.weight(t)

    def weight(self, t):
        """Each sample's weight in the diffusion loss: min-SNR-γ with --min-snr, else None (plain mean)."""
        gamma = self.extra["min_snr"]
        return min_snr_weight(t, self.alphas, gamma) if gamma else None


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


def export(stage, model, trainable, extra, args):
    """The trained model into --out: the published BLIP-Diffusion layout (stages 2 and fine-tuning),
    or stage 1's Q-Former in the layout of the published `qformer/` folder plus BERT's vocab.txt
    (the start of stage 2) and the pre-training heads (to continue stage 1)."""
    if stage in BASE_STAGES:
        def write(tmp):
            if stage == "vae":
                write_part(tmp, "vae", asdict(toymodel.vae_with_scale(trainable.vae, extra["scale_images"])), trainable.vae,
                           "diffusion_pytorch_model.safetensors")
            elif stage == "clip":
                write_part(tmp, "text_encoder", asdict(trainable.text.config), trainable.text, "model.safetensors")
                write_part(tmp, "vision_model", asdict(trainable.vision.config), trainable.vision, "model.safetensors")
            else:
                write_part(tmp, "unet", asdict(trainable.unet.config), trainable.unet,
                           "diffusion_pytorch_model.safetensors")

        write_folder_atomically(args.out, write, merge=True)
        return
    if stage == "multimodal":
        pre = trainable.pretraining

        def write(tmp):
            write_part(tmp, "qformer", asdict(pre.qformer.config), pre.qformer, "model.safetensors")
            os.makedirs(os.path.join(tmp, "bert_tokenizer"))
            shutil.copyfile(extra["vocab"], os.path.join(tmp, "bert_tokenizer", "vocab.txt"))
            save_file({k: v.detach().contiguous().cpu() for k, v in pre.state_dict().items()
                       if not k.startswith("qformer.")}, os.path.join(tmp, "blip2_heads.safetensors"))

        write_folder_atomically(args.out, write, merge=True)
        return
    if stage == "finetune":
        model.ctx_embeddings = nn.Parameter(trainable.ctx_embeddings.detach().clone(), requires_grad=False)
        model.subject_text = args.subject_text
    model.save_pretrained(args.out)


@torch.no_grad()
def write_sample(model, records, args, step, size):
    """A picture of what the model makes now, so a person can watch training work."""
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    kw = dict(steps=25, seed=0, height=size, width=size, progress=False)
    if args.stage == "finetune":
        image = model.generate("on the beach", **kw)[0]
    else:
        rec = records[0]
        image = model.generate(rec["caption"], [load_image(rec["input"])], rec["subject"], **kw)[0]
    image.save(os.path.join(args.out, "samples", f"step-{step:07d}.png"))
    for m, mode in modes.items():
        m.train(mode)


if __name__ == "__main__":
    sys.exit(main())
