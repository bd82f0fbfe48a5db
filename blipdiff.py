"""BLIP-Diffusion: zero-shot subject-driven generation (Li, Li & Hoi 2023, Sections 3.1-3.3).

The pieces: a BLIP-2 Q-Former reads the subject image and its category word (`qformer.py`, with the
CLIP ViT in `clip.py`); its 16 query outputs, projected, become "subject prompt" embeddings inserted
into the CLIP text encoder's input at position 2 (`clip.py`); Stable Diffusion v1.5's UNet (`unet.py`)
denoises VAE latents (`vae.py`) under classifier-free guidance; the VAE decodes.

This file holds the diffusion schedule and the samplers, and ties the parts into one model.
It must equal diffusers 0.33.1's `BlipDiffusionPipeline` given the same weights (see
../shared/reference/blip-diffusion.md, sections 4 and 4.1).
"""

import os
import shutil
import warnings
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from checkpoint import (WEIGHTS_HELP, CheckpointError, find_weights, read_json, write_folder_atomically, write_json,
                        write_part)
from clip import CLIP_MEAN, CLIP_STD, CTX_BEGIN_POS, CLIPTextModel, CLIPTokenizer
from controlnet import control_pixels
from qformer import QFormer, QFormerTokenizer
from unet import UNet
from vae import AutoencoderKL

# The released code repeats the prompt 20 times (prompt_reps), an amplification the paper does not
# mention; diffusers and LAVIS both default to it.
PROMPT_REPS = 20
# The guidance scale generate() uses unless told: diffusers' default for the published model. A model
# folder may name its own in model_index.json ("guidance", a key of ours; diffusers' pipeline takes
# the scale per call), as the toy model does (toymodel.GUIDANCE).
GUIDANCE = 7.5

# Stable Diffusion v1.5's training schedule (its scheduler_config.json): "scaled_linear" betas,
# 1000 steps. BLIP-Diffusion keeps it unchanged.
NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012


def alphas_cumprod(beta_start=BETA_START, beta_end=BETA_END, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """ᾱ_t = Π_{s<=t} (1 - β_s), with √β linear from √β_start to √β_end ("scaled_linear").

    Computed in float64 and stored in float32 (the reference computes in float32; the two agree
    to about 1e-7, far inside the parity tolerance)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def leading_timesteps(num_steps, steps_offset, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """diffusers' "leading" spacing: 0, r, 2r, ... with r = T // N, shifted by steps_offset."""
    ratio = num_train_timesteps // num_steps
    return [i * ratio + steps_offset for i in range(num_steps)]


def ddim_step(x_t, eps, a_t, a_prev):
    """DDIM with η = 0 (Song et al. 2021, eq. 12):
    x̂₀ = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t,   x_prev = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev)·ε."""
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


def pndm_transfer(x_t, eps, a_t, a_prev):
    """PNDM's transfer φ (Liu et al. 2022, eq. 9), the update every PLMS step ends with:
    x_prev = √(ᾱ_prev/ᾱ_t)·x_t − (ᾱ_prev − ᾱ_t)·ε / (ᾱ_t·√(1−ᾱ_prev) + √(ᾱ_t(1−ᾱ_t)ᾱ_prev))."""
    denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * x_t - (a_prev - a_t) * eps / denom


def plms_eps(ets):
    """Linear multistep combination of the newest ε's (newest last), orders 1 to 4
    (Adams–Bashforth coefficients, PNDM's "PLMS" with the Runge–Kutta warm-up skipped)."""
    if len(ets) == 1:
        return ets[-1]
    if len(ets) == 2:
        return (3 * ets[-1] - ets[-2]) / 2
    if len(ets) == 3:
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    return (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24


class DDIM:
    """Deterministic DDIM sampling (η = 0) with SD-1.5's settings: "leading" spacing,
    steps_offset 1, no sample clipping, ᾱ_prev = ᾱ_0 past the end (set_alpha_to_one off)."""

    def __init__(self, num_steps, steps_offset=1, alphas=None):
        self.alphas = alphas_cumprod() if alphas is None else alphas
        self.ratio = len(self.alphas) // num_steps
        self.timesteps = leading_timesteps(num_steps, steps_offset, len(self.alphas))[::-1]

    def alpha(self, t):
        return self.alphas[t] if t >= 0 else self.alphas[0]

    def step(self, eps, t, x):
        return ddim_step(x, eps, self.alpha(t), self.alpha(t - self.ratio))


class PNDM:
    """PNDM in its PLMS form, as BLIP-Diffusion's published scheduler config sets it
    (skip_prk_steps, set_alpha_to_one off, steps_offset from the config, 0 for BLIP-Diffusion).

    N steps take N + 1 model evaluations: the first step is taken twice (Heun-like, averaging
    the ε at both ends), so the timestep list repeats its second entry: [980, 960, 960, 940, ...]."""

    def __init__(self, num_steps, steps_offset=0, alphas=None):
        self.alphas = alphas_cumprod() if alphas is None else alphas
        self.ratio = len(self.alphas) // num_steps
        ts = leading_timesteps(num_steps, steps_offset, len(self.alphas))
        self.timesteps = (ts[:-1] + ts[-2:-1] + ts[-1:])[::-1]
        self.ets, self.counter, self.x_first = [], 0, None

    def alpha(self, t):
        return self.alphas[t] if t >= 0 else self.alphas[0]

    def step(self, eps, t, x):
        t_prev = t - self.ratio
        if self.counter == 1:
            # Second evaluation at the same timestep: redo the first step from its start,
            # with the mean of the ε's at t and t - ratio.
            t_prev, t = t, t + self.ratio
            eps, x = (eps + self.ets[-1]) / 2, self.x_first
        else:
            self.ets = self.ets[-3:] + [eps]
            if self.counter == 0:
                self.x_first = x
            eps = plms_eps(self.ets)
        self.counter += 1
        return pndm_transfer(x, eps, self.alpha(t), self.alpha(t_prev))


def q_sample(x0, eps, t, alphas):
    """The forward (noising) process of DDPM (Ho et al. 2020, eq. 4), used in training:
    x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, with t a (B,) tensor of integer timesteps."""
    a = alphas.to(x0.device)[t].to(x0.dtype)[:, None, None, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def epsilon_loss(pred, noise, weight=None):
    """The diffusion loss: mean squared error of the predicted noise, each sample scaled by `weight`
    (B,) when given (--min-snr)."""
    err = (pred.float() - noise.float()).pow(2)
    return err.mean() if weight is None else (err.flatten(1).mean(1) * weight).mean()


def min_snr_weight(t, alphas, gamma):
    """Min-SNR-γ (Hang et al. 2023) for ε-prediction: min(SNR(t), γ) / SNR(t), SNR = ᾱ / (1 - ᾱ).
    The nearly clean timesteps, whose noise is hardest to predict and least decides the picture, are
    turned down; from SNR ≤ γ on the weight is 1."""
    a = alphas[t].float()
    snr = a / (1 - a)
    return snr.clamp(max=gamma) / snr


def make_sampler(name, num_steps, pndm_steps_offset=None):
    """`pndm`: BLIP-Diffusion's published scheduler, its steps_offset read from the config (0);
    `ddim`: Stable Diffusion v1.5's DDIM settings (steps_offset 1) whatever that config says."""
    if num_steps < 1:
        raise ValueError(f"steps must be positive, got {num_steps}")
    if name == "pndm":
        return PNDM(num_steps, pndm_steps_offset or 0)
    if name == "ddim":
        return DDIM(num_steps, steps_offset=1)
    raise ValueError(f"unknown scheduler {name!r}: use pndm or ddim")




# ---------------------------------------------------------------------------------------------
# Subject images and prompts
# ---------------------------------------------------------------------------------------------

# The files taken as images when a folder is given (sample.py, train.py, pairs.py).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_files(folder):
    """The images in `folder` (not its subfolders), as paths sorted by name."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def to_rgb(image):
    """Any PIL image -> 8-bit RGB. Palette, grayscale, CMYK and RGBA images convert as PIL does
    (alpha dropped, as the reference's `convert("RGB")`); 16- and 32-bit images are rescaled to
    8 bits first, which PIL's own conversion would clip."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(a / peak * 255.0), 0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def preprocess_subject(images, size=(224, 224), mean=CLIP_MEAN, std=CLIP_STD, center_crop=False):
    """PIL images -> (N, 3, H, W) float32, normalised with CLIP's mean and std.

    Default as diffusers' BlipImageProcessor: squash-resize to `size` with bicubic (the aspect ratio
    is not kept). center_crop=True does as LAVIS: resize the short side, then crop the centre."""
    h, w = size
    out = []
    for image in images:
        image = to_rgb(image)
        if center_crop:
            scale = max(h / image.height, w / image.width)
            image = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))),
                                 Image.BICUBIC)
            left, top = (image.width - w) // 2, (image.height - h) // 2
            image = image.crop((left, top, left + w, top + h))
        else:
            image = image.resize((w, h), Image.BICUBIC)
        x = (np.asarray(image, dtype=np.float64) * (1 / 255)).astype(np.float32)
        x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
        out.append(torch.from_numpy(x).permute(2, 0, 1))  # (H, W, 3) -> (3, H, W)
    return torch.stack(out)


def build_prompt(prompt, target_text, prompt_strength=1.0, prompt_reps=PROMPT_REPS):
    """"a {target} {prompt}", repeated int(strength x reps) times and joined with ", " (the
    released code's amplification; the subject embeddings are inserted after its "a")."""
    one = f"a {target_text} {prompt.strip()}"
    return ", ".join([one] * int(prompt_strength * prompt_reps))


def initial_latents(num_images, shape, seed):
    """Image k starts from randn(shape) drawn on the CPU with seed + k, so one seed gives the same
    picture on every device, and the same as diffusers with Generator().manual_seed(seed)."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(seed + k))
                      for k in range(num_images)])


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

# A fine-tuned model's subject (train.py --stage finetune): embeddings (1, 16, 768) + its word.
CTX_FILE = "ctx_embeddings.safetensors"

# What from_pretrained reads besides the weight files (which checkpoint.find_weights looks for).
REQUIRED_FILES = ("model_index.json", "qformer/config.json", "text_encoder/config.json", "unet/config.json",
                  "vae/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                  "scheduler/scheduler_config.json", "image_processor/preprocessor_config.json")


def check_folder(folder):
    """Fail early, naming the first missing file, before gigabytes are read."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such weights folder; {WEIGHTS_HELP}")
    for name in REQUIRED_FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            raise CheckpointError(f"{os.path.join(folder, name)}: missing; {WEIGHTS_HELP}")
    for part in ("qformer", "text_encoder", "unet", "vae"):
        find_weights(os.path.join(folder, part))


def find_qformer_vocab(folder, qformer_config):
    """The Q-Former's WordPiece vocab.txt, which the published folder lacks (the reference fetches
    bert-base-uncased's from the hub): the config's "tokenizer" entry if it names a folder inside
    the weights folder, else bert_tokenizer/vocab.txt, else an error saying what to download."""
    candidates = []
    named = qformer_config.get("tokenizer")
    if isinstance(named, str) and named:
        candidates.append(os.path.join(folder, named, "vocab.txt"))
    candidates.append(os.path.join(folder, "bert_tokenizer", "vocab.txt"))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"{candidates[-1]}: missing; download bert-base-uncased's vocab.txt and put it "
                          f"there (see weights/README.md)")


def read_scheduler_config(folder):
    """The published scheduler_config.json, checked for settings our samplers implement."""
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    cfg = read_json(path)
    expected = {"beta_schedule": "scaled_linear", "beta_start": BETA_START, "beta_end": BETA_END,
                "prediction_type": "epsilon", "set_alpha_to_one": False,
                "timestep_spacing": "leading", "num_train_timesteps": NUM_TRAIN_TIMESTEPS, "skip_prk_steps": True}
    for key, value in expected.items():
        if cfg.get(key, value) != value:
            raise CheckpointError(f"{path}: {key}={cfg[key]!r} is not supported (only {value!r}, "
                                  f"as BLIP-Diffusion publishes)")
    return cfg


class BlipDiffusion(nn.Module):
    """Subject image + category word + prompt -> images (the zero-shot generation of §3.2)."""

    def __init__(self, qformer, text_encoder, unet, vae, tokenizer_folder, qformer_vocab,
                 scheduler_config=None, image_size=(224, 224), mean=CLIP_MEAN, std=CLIP_STD,
                 ctx_embeddings=None, subject_text=None, guidance=GUIDANCE):
        super().__init__()
        self.qformer, self.text_encoder, self.unet, self.vae = qformer, text_encoder, unet, vae
        # The tokenizers are kept with the files they came from, which save_pretrained copies.
        self.tokenizer_folder, self.qformer_vocab = tokenizer_folder, qformer_vocab
        self.tokenizer = CLIPTokenizer.from_folder(tokenizer_folder)
        self.qformer_tokenizer = QFormerTokenizer.from_file(qformer_vocab)
        self.scheduler_config = scheduler_config or {}
        self.image_size, self.mean, self.std = image_size, mean, std
        # A fine-tuned model (train.py --stage finetune) carries its subject: the averaged subject
        # embeddings, trained further, and the subject's word. The Q-Former is then not needed.
        self.ctx_embeddings = None if ctx_embeddings is None else nn.Parameter(ctx_embeddings, requires_grad=False)
        self.subject_text = subject_text
        self.guidance = guidance  # generate()'s default scale

    @classmethod
    def from_pretrained(cls, folder):
        """The published `Salesforce/blipdiffusion` folder (see weights/README.md)."""
        check_folder(folder)
        index = read_json(os.path.join(folder, "model_index.json"))
        size = read_json(os.path.join(folder, "image_processor", "preprocessor_config.json")).get("size", {})
        vocab = find_qformer_vocab(folder, read_json(os.path.join(folder, "qformer", "config.json")))
        ctx, subject_text = None, None
        if os.path.isfile(os.path.join(folder, CTX_FILE)):
            with safe_open(os.path.join(folder, CTX_FILE), "pt") as f:
                ctx, subject_text = f.get_tensor("ctx_embeddings"), f.metadata().get("subject_text")
        return cls(
            qformer=QFormer.from_pretrained(os.path.join(folder, "qformer")),
            text_encoder=CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")),
            unet=UNet.from_pretrained(os.path.join(folder, "unet")),
            vae=AutoencoderKL.from_pretrained(os.path.join(folder, "vae")),
            tokenizer_folder=os.path.join(folder, "tokenizer"), qformer_vocab=vocab,
            scheduler_config=read_scheduler_config(folder),
            image_size=(size.get("height", 224), size.get("width", 224)),
            mean=tuple(index.get("mean") or CLIP_MEAN), std=tuple(index.get("std") or CLIP_STD),
            ctx_embeddings=ctx, subject_text=subject_text, guidance=float(index.get("guidance", GUIDANCE)),
        ).eval()

    def save_pretrained(self, folder):
        """Write the published folder layout (safetensors weights); from_pretrained reads it back.
        Everything is written to a temporary folder first, so a crash or a full disk leaves the
        previous contents of `folder` as they were; other files in `folder` are kept."""
        def write(tmp):
            write_json(os.path.join(tmp, "model_index.json"),
                       {"_class_name": "BlipDiffusionPipeline", "ctx_begin_pos": CTX_BEGIN_POS,
                        "mean": list(self.mean), "std": list(self.std),
                        **({} if self.guidance == GUIDANCE else {"guidance": self.guidance})})
            write_part(tmp, "qformer", asdict(self.qformer.config), self.qformer, "model.safetensors")
            write_part(tmp, "text_encoder", asdict(self.text_encoder.config), self.text_encoder, "model.safetensors")
            write_part(tmp, "unet", asdict(self.unet.config), self.unet, "diffusion_pytorch_model.safetensors")
            write_part(tmp, "vae", asdict(self.vae.config), self.vae, "diffusion_pytorch_model.safetensors")
            shutil.copytree(self.tokenizer_folder, os.path.join(tmp, "tokenizer"))
            os.makedirs(os.path.join(tmp, "bert_tokenizer"))
            shutil.copyfile(self.qformer_vocab, os.path.join(tmp, "bert_tokenizer", "vocab.txt"))
            os.makedirs(os.path.join(tmp, "scheduler"))
            write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), {
                "_class_name": "PNDMScheduler", "beta_start": BETA_START, "beta_end": BETA_END,
                "beta_schedule": "scaled_linear", "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
                "skip_prk_steps": True, "set_alpha_to_one": False, "prediction_type": "epsilon",
                "timestep_spacing": "leading", "steps_offset": self.scheduler_config.get("steps_offset", 0)})
            os.makedirs(os.path.join(tmp, "image_processor"))
            h, w = self.image_size
            write_json(os.path.join(tmp, "image_processor", "preprocessor_config.json"),
                       {"size": {"height": h, "width": w}, "image_mean": list(self.mean),
                        "image_std": list(self.std), "resample": 3})
            if self.ctx_embeddings is not None:
                save_file({"ctx_embeddings": self.ctx_embeddings.detach().float().cpu().contiguous()},
                          os.path.join(tmp, CTX_FILE), metadata={"subject_text": self.subject_text or ""})

        write_folder_atomically(folder, write, merge=True)

    @property
    def device(self):
        return self.unet.conv_in.weight.device

    @property
    def context_length(self):
        """Text positions the text encoder reads: CLIP's 77 for the published model (diffusers reads it
        from the text encoder's config too); a model may be built with fewer."""
        return self.text_encoder.config.max_position_embeddings

    @property
    def dtype(self):
        return self.unet.conv_in.weight.dtype

    @property
    def resolution(self):
        """The side the model was trained at: the UNet's latent side x the VAE's downsampling
        (SD-1.5: 64 x 8 = 512; the toy: 16 x 4 = 64)."""
        return self.unet.config.sample_size * self.vae.downsampling

    @torch.no_grad()
    def subject_embeddings(self, images, subject_text, center_crop=False):
        """Several pictures of one subject -> their mean subject embedding, (1, 16, 768)."""
        pixels = preprocess_subject(images, self.image_size, self.mean, self.std, center_crop)
        ids, mask = self.qformer_tokenizer([subject_text] * len(images))
        emb = self.qformer(pixels.to(self.device, self.dtype), ids.to(self.device), mask.to(self.device))
        return emb.mean(dim=0, keepdim=True)

    def mixed_subject(self, subject_images, subject_text, weights=None, center_crop=False):
        """One subject (a list of images and a word) or several (a list of lists, a list of words,
        optional weights) -> one (1, 16, 768) embedding: per subject the mean over its images, then
        Σ w_k·e_k, the paper's subject interpolation (Figure 9; equal weights by default)."""
        if isinstance(subject_images, Image.Image):
            subject_images = [subject_images]
        if not subject_images or subject_text is None:
            raise ValueError("give subject_images and subject_text (or ctx_embeddings)")
        if isinstance(subject_images[0], Image.Image):
            subject_images = [subject_images]
        texts = [subject_text] if isinstance(subject_text, str) else list(subject_text)
        if len(texts) != len(subject_images):
            raise ValueError(f"{len(subject_images)} subjects but {len(texts)} subject texts: give one text each")
        weights = [1.0 / len(texts)] * len(texts) if weights is None else list(weights)
        if len(weights) != len(texts):
            raise ValueError(f"{len(texts)} subjects but {len(weights)} weights: give one weight each")
        return sum(w * self.subject_embeddings(imgs, t, center_crop)
                   for w, imgs, t in zip(weights, subject_images, texts)), texts

    @torch.no_grad()
    def encode_text(self, texts, ctx_embeddings=None):
        """Prompts -> CLIP text states (B, 77, 768), 77 the context length. With subject embeddings
        the prompt takes 77 - 16 tokens and the embeddings are inserted at position 2; without, plain
        CLIP over 77. Longer prompts are truncated (diffusers crashes on a negative prompt over 77 tokens)."""
        length = self.context_length - (0 if ctx_embeddings is None else ctx_embeddings.shape[1])
        ids = self.tokenizer(texts, max_length=length).to(self.device)
        return self.text_encoder(ids, ctx_embeddings=ctx_embeddings)

    def warn_if_truncated(self, text, length, what):
        n = self.tokenizer.count(text)
        if n > length:
            warnings.warn(f"the {what} is {n} tokens; the model reads {length}, so it was truncated")

    @torch.no_grad()
    def generate(self, prompt, subject_images=None, subject_text=None, target_text=None, subject_weights=None,
                 negative_prompt="", steps=50, guidance=None, seed=0, height=512, width=512, scheduler="pndm",
                 num_images=1, prompt_strength=1.0, prompt_reps=PROMPT_REPS, center_crop=False,
                 ctx_embeddings=None, controlnet=None, control_image=None, control_scale=1.0, controller=None,
                 output="pil", progress=True):
        """Render the subject in the context the prompt describes.

        subject_images: PIL images of one subject (their embeddings are averaged), or a list of such
        lists for several subjects mixed by `subject_weights`. subject_text: the category word (one per
        subject). target_text: the word written into the prompt (default: the first subject's).
        ctx_embeddings: precomputed (1, 16, 768) subject embeddings instead of images.
        With no subject at all (no images, no ctx_embeddings, not a fine-tuned model) the prompt is
        plain text-to-image: the same "a {target_text} {prompt}" text, without subject embeddings.
        controlnet, control_image (PIL), control_scale: structure control (controlnet.py), e.g. a canny
        ControlNet and `controlnet.canny_control_image(picture)`; the residuals are scaled by control_scale.
        controller: `controller(probs, place) -> probs` on every UNet attention map (unet.Attention).
        guidance: the classifier-free guidance scale, default the model's own (`self.guidance`).
        Returns PIL images (output="pil"), or a float32 array (N, H, W, 3) in [0, 1] (output="np").
        """
        guidance = self.guidance if guidance is None else guidance
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")
        sampler = make_sampler(scheduler, steps, self.scheduler_config.get("steps_offset"))
        if ctx_embeddings is None and subject_images is None and self.ctx_embeddings is not None:
            ctx_embeddings, subject_text = self.ctx_embeddings, self.subject_text  # a fine-tuned subject
        text_only = ctx_embeddings is None and subject_images is None
        if text_only and not (target_text or subject_text):
            raise ValueError("give subject_images and subject_text, ctx_embeddings, or for text only a subject_text")
        if not text_only and ctx_embeddings is None:
            ctx_embeddings, subject_text = self.mixed_subject(subject_images, subject_text, subject_weights,
                                                              center_crop)
        target_text = target_text or (subject_text[0] if isinstance(subject_text, list) else subject_text)
        ctx = None if text_only else ctx_embeddings.to(self.device, self.dtype).expand(num_images, -1, -1)
        self.warn_if_truncated(f"a {target_text} {prompt.strip()}",
                               self.context_length - (0 if text_only else ctx.shape[1]), "prompt")
        text = self.encode_text([build_prompt(prompt, target_text, prompt_strength, prompt_reps)] * num_images, ctx)
        if guidance > 1.0:
            self.warn_if_truncated(negative_prompt, self.context_length, "negative prompt")
            text = torch.cat([self.encode_text([negative_prompt] * num_images), text])  # [uncond, cond]

        factor = self.vae.downsampling
        shape = (self.unet.config.in_channels, height // factor, width // factor)
        latents = initial_latents(num_images, shape, seed).to(self.device, self.dtype)
        if (controlnet is None) != (control_image is None):
            raise ValueError("structure control needs both a controlnet and a control_image")
        if controlnet is not None:
            cond = control_pixels(control_image, height, width).to(self.device, self.dtype)
        for t in tqdm(sampler.timesteps, desc="denoising", disable=not progress):
            x_in = torch.cat([latents] * 2) if guidance > 1.0 else latents
            residuals = {}
            if controlnet is not None:
                # As the reference: the ControlNet sees the UNet's latents, timestep and text states
                # (the subject-augmented ones), and the control image on every row, unconditional too.
                down, mid = controlnet(x_in, t, text, cond.expand(len(x_in), -1, -1, -1), control_scale)
                residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            eps = self.unet(x_in, t, text, **residuals, controller=controller)
            if guidance > 1.0:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)  # classifier-free guidance
            latents = sampler.step(eps, t, latents)
        return self.decode(latents, output)

    @torch.no_grad()
    def decode(self, latents, output="pil"):
        """Latents -> images: VAE decode of latents / 0.18215, then (x / 2 + 0.5) clamped to [0, 1].
        PIL images (output="pil"), or a float32 array (N, H, W, 3) in [0, 1] (output="np")."""
        images = (self.vae.decode(latents / self.vae.config.scaling_factor) / 2 + 0.5).clamp(0, 1)
        images = images.float().permute(0, 2, 3, 1).cpu().numpy()  # (N, 3, H, W) -> (N, H, W, 3)
        if output == "np":
            return images
        return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]
