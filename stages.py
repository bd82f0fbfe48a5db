"""The training stages of BLIP-Diffusion, one module each: what trains, what is frozen, how a batch
is made, what is exported. train.py runs them (its loop, DDP, checkpoints, EMA and logging are the same
for all); a stage's parameters are what trains, its forward is the loss.

  multimodal  stage 1 (paper §3.1; BLIP-2 §3.2, blip2.py): the Q-Former learns ITC, ITG and ITM on
              image-text pairs; the image tower frozen but for its `ln_vision`.
  subject     stage 2 (§3.2) on prompted-context pairs (pairs.py): the Q-Former reads the subject pasted
              on a new background, the UNet must render the original picture; Q-Former, projection,
              text encoder and UNet train; the subject prompt is dropped 15% of the time.
  finetune    subject fine-tuning (§3.3): the subject's embeddings, averaged once, and the UNet train
              (LAVIS lavis/models/blip_diffusion_models/blip_diffusion.py, `before_training`).
  vae, clip, t2i  what the paper takes from Stable Diffusion and CLIP, trained here for a small model
              (--model toy or a folder of sizes; toymodel.py runs the curriculum): the autoencoder by
              LDM's loss, the tokenizers and a CLIP pair by its contrastive loss, the text-to-image UNet
              by SD's ε-loss.

Where a stage starts: --weights (a published-layout folder), Stable Diffusion and stage 1's Q-Former
(`stage2_from_sd`), OpenAI CLIP and BERT (blip2.pretraining_model), the tiny model (`tiny_model`, CPU
seconds), or the sizes of --model's folder (`sizes`) for what is built fresh.
"""

import dataclasses
import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import asdict

import torch
from safetensors.torch import save_file
from torch import nn

from blip2 import Blip2Pretraining, pretraining_model
from blipdiff import BlipDiffusion, build_prompt, preprocess_subject
from checkpoint import config_from_dict, read_json, read_tensors, write_atomically, write_folder_atomically, write_part
from clip import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, VisionConfig, VisionTransformer, contrastive_loss,
                  train_clip_tokenizer)
from data import load_image, sample_generator, to_target
from diffusion import NUM_TRAIN_TIMESTEPS, alphas_cumprod, epsilon_loss, min_snr_weight, q_sample
from qformer import Blip2Config, QFormer, QFormerConfig, QFormerTokenizer, write_bert_vocab
from unet import UNet, UNetConfig
from vae import AutoencoderKL, AutoencoderKLConfig, autoencoder_loss, measure_scaling_factor

# Paper §3.2: "we randomly drop the subject prompt 15% of the time", leaving text-only conditioning.
SUBJECT_DROP = 0.15
# BLIP-2 stage 1 (LAVIS blip2_qformer): captions cut to 32 tokens.
MAX_CAPTION_TOKENS = 32
# --model toy: the sizes of the toy model shipped in weights/toy (toymodel.py defines and trains it).
TOY_SIZES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "toy")


class TrainError(Exception):
    """A user-facing problem (bad data path, mismatched resume, non-finite loss): one line, exit 1."""


# ---------------------------------------------------------------------------------------------
# Where a stage starts: the tiny model, Stable Diffusion + stage 1, or the sizes of --model DIR
# ---------------------------------------------------------------------------------------------

def write_tiny_tokenizers(folder):
    """A CLIP BPE with no merges (every word spelt out in byte characters) and a character-level
    BERT WordPiece vocabulary: valid files in the published formats, nothing downloaded."""
    clip_vocab = train_clip_tokenizer([], os.path.join(folder, "tokenizer"))
    bert_vocab = write_bert_vocab([], os.path.join(folder, "vocab.txt"))
    return os.path.join(folder, "tokenizer"), os.path.join(folder, "vocab.txt"), clip_vocab, bert_vocab


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


def sizes(args, part, cls, **learnt):
    """--model toy or DIR: `part`'s config from DIR/part/config.json (toy: weights/toy's), the fields
    learnt or measured here replaced by `learnt`. None for --model published or tiny."""
    if args.model in ("published", "tiny"):
        return None
    folder = TOY_SIZES if args.model == "toy" else args.model
    return dataclasses.replace(config_from_dict(cls, read_json(os.path.join(folder, part, "config.json"))), **learnt)


# ---------------------------------------------------------------------------------------------
# The stages: each one module whose parameters train and whose forward is the loss
# ---------------------------------------------------------------------------------------------

class Stage(nn.Module):
    """What one --stage trains: this module (what DDP wraps, what a checkpoint holds). `frozen`: the
    modules it runs in eval mode under no_grad; `configs`: what a checkpoint must match to resume;
    `pictures`: the keys of a record's pictures; `fields`: the text a record must have; `size`: the
    diffusion target's side; `model`: the BlipDiffusion it trains (None: nothing to sample).
    batch(step, indices, items, positions) turns this rank's share of a step, items (record index,
    record, pictures) at `positions` of the global batch, into forward's arguments; export(out) writes
    the trained parts."""
    pictures, fields, model, size = ("image",), ("caption",), None, None

    def __init__(self, args, device):
        super().__init__()
        self.frozen, self.configs, self.seed, self.device = [], {}, args.seed, device
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
        self.caption_drop = (0.1 if args.stage == "t2i" else 0.0) if args.caption_drop is None else args.caption_drop
        self.min_snr, self.alphas, self.cache = args.min_snr, alphas_cumprod().to(device), {} if args.cache else None

    def refer(self, **modules):
        """Modules used but not owned (a frozen encoder, the whole pipeline): kept outside this module's
        tree, so outside DDP, train() and the checkpoint."""
        for name, module in modules.items():
            object.__setattr__(self, name, module)

    def cached(self, name, keys, encode):
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

    def noised(self, vae, step, indices, items, picture):
        """The ε-loss's inputs for the items' `picture`-th pictures -> (generators, noisy latents, t,
        noise, weight): the frozen VAE's z = (mean + std·n) · scaling_factor (its posterior cached with
        --cache), then noise and a timestep, each sample from its own generator; weight is min-SNR-γ's
        with --min-snr, else None (the plain mean)."""
        gens, keys = [sample_generator(self.seed, step, i) for i in indices], [k for k, _, _ in items]

        def encode(rows):
            post = vae.encode(torch.stack([to_target(items[i][2][picture], self.size) for i in rows]).to(self.device))
            return post.mean, post.std
        with torch.no_grad(), self.autocast:
            mean, std = self.cached("vae", keys, encode)
        n = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(mean)
        z = (mean + std * n) * vae.config.scaling_factor
        noise = torch.stack([torch.randn(z.shape[1:], generator=g) for g in gens]).to(z)
        t = torch.tensor([int(torch.randint(0, NUM_TRAIN_TIMESTEPS, (1,), generator=g)) for g in gens], device=z.device)
        weight = min_snr_weight(t, self.alphas, self.min_snr) if self.min_snr else None
        return gens, q_sample(z, noise, t, self.alphas), t, noise, weight


class MultimodalStage(Stage):
    """Stage 1: BLIP-2's ITC + ITG + ITM (blip2.Blip2Pretraining), summed; the ViT frozen but for its
    `ln_vision` (our post_layernorm), as BLIP-2. Published: from OpenAI CLIP and BERT; --model toy or
    DIR: a Q-Former of those sizes, fresh, on the image tower of --stage clip."""

    def __init__(self, args, records, device):
        super().__init__(args, device)
        if args.model == "tiny":
            _, self.vocab, _, bert_vocab = write_tiny_tokenizers(os.path.join(args.out, ".tiny"))
            torch.manual_seed(args.seed)
            pre = no_dropout(Blip2Pretraining(tiny_blip2_config(bert_vocab)))
        elif not args.bert or not args.clip_vision:
            raise TrainError("--stage multimodal needs --bert DIR (bert-base-uncased) and --clip-vision DIR "
                             "(openai/clip-vit-large-patch14), or --model tiny")
        else:
            config = sizes(args, "qformer", Blip2Config)
            torch.manual_seed(args.seed)
            pre, self.vocab, report = pretraining_model(args.bert, args.clip_vision, config)
            if report:
                print(report)
        self.pretraining, vit = pre.to(device), pre.qformer.visual_encoder
        # BLIP-Diffusion's projection to subject embeddings is not used by BLIP-2's losses (stage 2 trains
        # it): frozen, so that DDP does not wait for gradients that never come.
        self.frozen = [m for m in vit.children() if m is not vit.post_layernorm] + [pre.qformer.proj_layer]
        self.tokenizer, self.configs = QFormerTokenizer.from_file(self.vocab), {"qformer": asdict(pre.qformer.config)}

    def forward(self, pixel_values, ids, mask, generators, positions):
        return self.pretraining(ids, mask, pixel_values=pixel_values, generator=generators, positions=positions)["loss"]

    def batch(self, step, indices, items, positions):
        size = self.pretraining.qformer.config.vision_config.image_size
        pixels = preprocess_subject([pics[0] for _, _, pics in items], (size, size))
        ids, mask = self.tokenizer([rec["caption"] for _, rec, _ in items])
        # ITC and ITM take the pairs of every process (blip2.gather); each pair draws its ITM negatives
        # from a generator of its own, so 1 and N processes draw the same.
        gens = [sample_generator(self.seed, step, i) for i in indices]
        return (pixels.to(self.device), ids[:, :MAX_CAPTION_TOKENS].to(self.device),
                mask[:, :MAX_CAPTION_TOKENS].to(self.device), gens, torch.tensor(positions, device=self.device))

    def export(self, out):
        """The Q-Former in the published `qformer/` layout and its vocab.txt (stage 2's start), and the
        pre-training heads (to continue stage 1)."""
        pre = self.pretraining

        def write(tmp):
            write_part(tmp, "qformer", asdict(pre.qformer.config), pre.qformer, "model.safetensors")
            os.makedirs(os.path.join(tmp, "bert_tokenizer"))
            shutil.copyfile(self.vocab, os.path.join(tmp, "bert_tokenizer", "vocab.txt"))
            save_file({k: v.detach().contiguous().cpu() for k, v in pre.state_dict().items()
                       if not k.startswith("qformer.")}, os.path.join(tmp, "blip2_heads.safetensors"))
        write_folder_atomically(out, write, merge=True)


class PipelineStage(Stage):
    """Stage 2 and fine-tuning train a whole BLIP-Diffusion (--weights, --sd with --qformer, or --model
    tiny): VAE and image tower frozen, exported in the published layout, sampled as it trains."""

    def __init__(self, args, device):
        super().__init__(args, device)
        if args.model == "tiny":
            model = tiny_model(os.path.join(args.out, ".tiny"), args.seed)
        elif args.model != "published" and not (args.weights or args.sd):
            raise TrainError(f"--stage {args.stage} --model {args.model} starts from --sd DIR (stage 0's --out) "
                             f"and --qformer DIR (stage 1's), or from --weights DIR")
        else:
            model = BlipDiffusion.from_pretrained(args.weights) if args.weights else stage2_from_sd(
                args.sd, args.qformer, args.tokenizer)
        self.refer(model=model.to(device))
        model.unet.gradient_checkpointing = args.grad_checkpoint
        self.frozen, self.size = [model.vae, model.qformer.visual_encoder], args.image_size or model.resolution
        self.configs = {name: asdict(getattr(model, name).config) for name in ("qformer", "text_encoder", "unet", "vae")}

    def export(self, out):
        self.model.save_pretrained(out)

    @torch.no_grad()
    def sample(self, out, step, records):
        """A picture of what the model makes now, so a person can watch training work."""
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        image = self.model.generate(*self.sample_inputs(records), steps=25, seed=0, height=self.size,
                                    width=self.size, progress=False)[0]
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        write_atomically(os.path.join(out, "samples", f"step-{step:07d}.png"),
                         lambda tmp: image.save(tmp, format="PNG"))
        for m, mode in modes.items():
            m.train(mode)


class SubjectStage(PipelineStage):
    """Stage 2: the UNet's ε-loss under the text with the subject embeddings inserted (Q-Former,
    projection, text encoder and UNet train)."""
    pictures, fields = ("input", "target"), ("subject", "caption")

    def __init__(self, args, records, device):
        super().__init__(args, device)
        self.qformer, self.text_encoder, self.unet = self.model.qformer, self.model.text_encoder, self.model.unet
        channels_last(self)

    def sample_inputs(self, records):  # the first record's subject in its caption's context
        return records[0]["caption"], [load_image(records[0]["input"])], records[0]["subject"]

    def forward(self, image_embeds, qf_ids, qf_mask, ids_ctx, ids_plain, drop, noisy, t, noise, weight=None):
        hidden = self.qformer.encode(image_embeds, qf_ids, qf_mask)
        ctx = self.qformer.proj_layer(hidden[:, :self.qformer.config.num_query_tokens])
        text = self.text_encoder(ids_ctx, ctx_embeddings=ctx)
        if drop.any():  # the dropped rows alone are encoded again, without the subject
            text = text.index_put((drop,), self.text_encoder(ids_plain[drop]))
        return epsilon_loss(self.unet(noisy, t, text), noise, weight)

    def batch(self, step, indices, items, positions):
        model = self.model
        gens, *diffusion = self.noised(model.vae, step, indices, items, picture=1)  # the target

        def encode(rows):  # the frozen image tower on the prompted-context inputs
            inputs = preprocess_subject([items[i][2][0] for i in rows], model.image_size, model.mean, model.std)
            return (model.qformer.visual_encoder(inputs.to(self.device)),)
        with torch.no_grad(), self.autocast:
            image_embeds, = self.cached("vision", [k for k, _, _ in items], encode)
        qf_ids, qf_mask = model.qformer_tokenizer([rec["subject"] for _, rec, _ in items])
        # Our choice (the paper does not say where the subject prompt goes in pre-training): the text
        # exactly as inference builds it (blipdiff.build_prompt, "a {subject} {caption}" repeated) with
        # the subject embeddings after its "a". Dropped: the same text alone, or with --caption-drop
        # the empty prompt that guidance contrasts with.
        prompts = [build_prompt(rec["caption"], rec["subject"]) for _, rec, _ in items]
        ids_ctx = model.tokenizer(prompts, max_length=model.context_length - model.qformer.config.num_query_tokens)
        u = [float(torch.rand(1, generator=g)) for g in gens]
        drop = torch.tensor([x < SUBJECT_DROP + self.caption_drop for x in u])
        ids_plain = model.tokenizer([p if x < SUBJECT_DROP else "" for p, x in zip(prompts, u)], model.context_length)
        return (image_embeds, *(x.to(self.device) for x in (qf_ids, qf_mask, ids_ctx, ids_plain, drop)), *diffusion)


class FinetuneStage(PipelineStage):
    """Subject fine-tuning: the subject embeddings and the UNet train; the text encoder is frozen but
    stays differentiable so gradients reach the embeddings through it."""

    def __init__(self, args, records, device):
        super().__init__(args, device)
        model, self.subject_text = self.model, args.subject_text
        # LAVIS before_training: the embeddings of all subject images, averaged once, become a
        # trainable parameter; the Q-Former is not run again. Caption "a {subject}", not padded.
        images = [im for im in (load_image(r["image"]) for r in records) if im is not None]
        if not images:
            raise TrainError(f"--subject {args.subject}: no readable images")
        ctx = model.subject_embeddings(images, args.subject_text).float()
        self.frozen += [model.text_encoder, model.qformer]
        self.ctx_embeddings, self.unet = nn.Parameter(ctx.to(device)), model.unet
        self.refer(text_encoder=model.text_encoder)
        words = model.tokenizer.encode(f"a {args.subject_text}")[:model.context_length - ctx.shape[1] - 2]  # as LAVIS
        self.caption_ids = torch.tensor([[model.tokenizer.bos_id] + words + [model.tokenizer.eos_id]], device=device)
        channels_last(self)

    def sample_inputs(self, records):  # the subject the model now carries, in a new context
        return ("on the beach",)

    def forward(self, ids, noisy, t, noise, weight=None):
        text = self.text_encoder(ids, ctx_embeddings=self.ctx_embeddings.expand(ids.shape[0], -1, -1))
        return epsilon_loss(self.unet(noisy, t, text), noise, weight)

    def batch(self, step, indices, items, positions):
        return (self.caption_ids.expand(len(items), -1), *self.noised(self.model.vae, step, indices, items, 0)[1:])

    def export(self, out):
        self.model.ctx_embeddings = nn.Parameter(self.ctx_embeddings.detach().clone(), requires_grad=False)
        self.model.subject_text = self.subject_text
        super().export(out)


def base_stage(args):
    """The base stages train, fresh, what the paper takes from SD and CLIP, at --model's sizes."""
    if args.model in ("published", "tiny"):
        raise TrainError(f"--stage {args.stage} trains what the paper takes from Stable Diffusion: only with "
                         f"--model toy (or a folder of sizes)")
    torch.manual_seed(args.seed)


class VAEStage(Stage):
    """The autoencoder by LDM's objective (vae.autoencoder_loss) on random crops of half the side;
    exported with its scaling factor measured on the training pictures."""

    def __init__(self, args, records, device):
        super().__init__(args, device)
        base_stage(args)
        # The scaling factor is measured at export: until then the latents are unscaled.
        self.vae = vae = AutoencoderKL(sizes(args, "vae", AutoencoderKLConfig, scaling_factor=1.0))
        self.size = args.image_size or vae.config.sample_size
        self.latent_shape = (vae.config.latent_channels,) + (self.size // 2 // vae.downsampling,) * 2
        pictures = [im for im in (load_image(rec["image"]) for rec in records[:256]) if im is not None]
        self.scale_images = torch.stack([to_target(im, self.size) for im in pictures])
        self.configs = {"vae": asdict(vae.config)}
        channels_last(self.to(device))

    def forward(self, images, noise):
        return autoencoder_loss(self.vae, images, noise)

    def batch(self, step, indices, items, positions):
        gens = [sample_generator(self.seed, step, i) for i in indices]
        images = torch.stack([to_target(pics[0], self.size) for _, _, pics in items]).to(self.device)
        # Random crops of half the side, as LDM trains its autoencoder on crops: the network is
        # convolutional (but for one attention layer), and a quarter of the pixels is a quarter of the time.
        c = self.size // 2
        corners = [torch.randint(0, c + 1, (2,), generator=g).tolist() for g in gens]
        images = torch.stack([im[:, y:y + c, x:x + c] for im, (y, x) in zip(images, corners)])
        return images, torch.stack([torch.randn(self.latent_shape, generator=g) for g in gens]).to(self.device)

    def export(self, out):
        config = dataclasses.replace(self.vae.config, scaling_factor=measure_scaling_factor(self.vae, self.scale_images))
        write_folder_atomically(out, lambda tmp: write_part(tmp, "vae", asdict(config), self.vae,
                                                            "diffusion_pytorch_model.safetensors"), merge=True)


class CLIPStage(Stage):
    """The tokenizers, learnt from the captions (CLIP's BPE, BERT's WordPiece list), then a CLIP
    image/text pair by its contrastive loss (clip.contrastive_loss): the image embedding is the class
    token of the tower BLIP-2 freezes (sized as the Q-Former's vision_config), the text one the EOS."""

    def __init__(self, args, records, device):
        super().__init__(args, device)
        base_stage(args)
        # The tokenizers come first and once: a resumed run finds them in --out and keeps them.
        captions, folder = [rec["caption"] for rec in records], os.path.join(args.out, "tokenizer")
        if not os.path.isfile(os.path.join(folder, "vocab.json")):
            write_folder_atomically(folder, lambda tmp: train_clip_tokenizer(captions, tmp))
            write_folder_atomically(os.path.join(args.out, "bert_tokenizer"),
                                    lambda tmp: write_bert_vocab(captions, os.path.join(tmp, "vocab.txt")))
        self.tokenizer = CLIPTokenizer.from_folder(folder)
        text = CLIPTextModel(sizes(args, "text_encoder", CLIPTextConfig, vocab_size=self.tokenizer.tokenizer.get_vocab_size()))
        self.vision, self.text = VisionTransformer(sizes(args, "qformer", Blip2Config).vision_config), text
        width = text.config.hidden_size  # the embeddings' (OpenAI's ViT-L/14 pair projects to 768)
        self.visual_projection = nn.Linear(self.vision.config.hidden_size, width, bias=False)
        self.text_projection = nn.Linear(width, width, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.configs = {"text": asdict(text.config), "vision": asdict(self.vision.config)}
        self.to(device)

    def forward(self, pixel_values, ids):
        image = self.vision(pixel_values)[:, 0]
        eos = (ids == self.tokenizer.eos_id).int().argmax(dim=1)  # the first EOS (CLIP pads with EOS too)
        text = self.text(ids)[torch.arange(len(ids), device=ids.device), eos]
        return contrastive_loss(self.visual_projection(image), self.text_projection(text), self.logit_scale)

    def batch(self, step, indices, items, positions):
        pixels = preprocess_subject([pics[0] for _, _, pics in items], (self.vision.config.image_size,) * 2)
        ids = self.tokenizer([rec["caption"] for _, rec, _ in items], self.text.config.max_position_embeddings)
        # The mask is causal, so what the EOS position sees ends there: the padding after the
        # longest caption changes nothing and is cut (a 77-token batch costs ~7x more).
        ids = ids[:, :int((ids == self.tokenizer.eos_id).int().argmax(dim=1).max()) + 1]
        return pixels.to(self.device), ids.to(self.device)

    def export(self, out):
        def write(tmp):
            write_part(tmp, "text_encoder", asdict(self.text.config), self.text, "model.safetensors")
            write_part(tmp, "vision_model", asdict(self.vision.config), self.vision, "model.safetensors")
        write_folder_atomically(out, write, merge=True)


class T2IStage(Stage):
    """SD's text-to-image training: a UNet by the ε-loss under --sd's frozen VAE and text encoder (each
    caption's encoding kept with --cache; the empty caption at --caption-drop)."""

    def __init__(self, args, records, device):
        super().__init__(args, device)
        base_stage(args)
        if not args.sd or not all(os.path.isdir(os.path.join(args.sd, d)) for d in ("vae", "text_encoder", "tokenizer")):
            raise TrainError("--stage t2i needs --sd DIR holding vae/, text_encoder/ and tokenizer/ "
                             "(the --out of --stage vae and --stage clip)")
        vae = AutoencoderKL.from_pretrained(os.path.join(args.sd, "vae")).to(device)
        text = CLIPTextModel.from_pretrained(os.path.join(args.sd, "text_encoder")).to(device)
        self.refer(vae=vae, text_encoder=text)
        self.frozen, self.size = [vae, text], args.image_size or vae.config.sample_size
        self.tokenizer = CLIPTokenizer.from_folder(os.path.join(args.sd, "tokenizer"))
        self.unet = UNet(sizes(args, "unet", UNetConfig))
        self.configs = {"unet": asdict(self.unet.config), "vae": asdict(vae.config)}
        channels_last(self.to(device))

    def forward(self, text, noisy, t, noise, weight=None):
        return epsilon_loss(self.unet(noisy, t, text), noise, weight)

    def batch(self, step, indices, items, positions):
        gens, *diffusion = self.noised(self.vae, step, indices, items, picture=0)
        captions = ["" if float(torch.rand(1, generator=g)) < self.caption_drop else rec["caption"]
                    for g, (_, rec, _) in zip(gens, items)]

        def encode(rows):  # the frozen text encoder; with --cache a caption's output is kept, keyed by the caption
            ids = self.tokenizer([captions[i] for i in rows], self.text_encoder.config.max_position_embeddings)
            return (self.text_encoder(ids.to(self.device)),)
        with torch.no_grad(), self.autocast:
            hidden, = self.cached("text", captions, encode)
        return (hidden, *diffusion)

    def export(self, out):
        write_folder_atomically(out, lambda tmp: write_part(tmp, "unet", asdict(self.unet.config), self.unet,
                                                            "diffusion_pytorch_model.safetensors"), merge=True)


def channels_last(module):
    """The convolutions of a UNet or VAE run faster on a CPU with channels last (bench_train.py); it
    moves only the 4-D weights, and the saves are contiguous."""
    return module.to(memory_format=torch.channels_last)


STAGES = {"multimodal": MultimodalStage, "subject": SubjectStage, "finetune": FinetuneStage,
          "vae": VAEStage, "clip": CLIPStage, "t2i": T2IStage}


def build_stage(args, records, device):
    """The --stage's module on `device`, from identical initial weights on every rank (a seeded build,
    or the same files), in train mode but for its frozen modules (eval, no gradients)."""
    stage = STAGES[args.stage](args, records, device)
    stage.train()
    for m in stage.frozen:
        m.eval().requires_grad_(False)
    return stage
