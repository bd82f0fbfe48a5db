"""BLIP-Diffusion: zero-shot subject-driven generation (Li, Li & Hoi 2023, Sections 3.1-3.3).

The pieces: a BLIP-2 Q-Former reads the subject image and its category word (`qformer.py`, with the
CLIP ViT in `clip.py`); its 16 query outputs, projected, become "subject prompt" embeddings inserted
into the CLIP text encoder's input at position 2 (`clip.py`); Stable Diffusion v1.5's UNet (`unet.py`)
denoises VAE latents (`vae.py`) under classifier-free guidance (`diffusion.py`); the VAE decodes.

This file ties the parts into one model: loading and saving the published folder, the subject
embeddings, the prompt, and generation. Given the same weights it must equal diffusers 0.33.1's
`BlipDiffusionPipeline` (pipelines/blip_diffusion/pipeline_blip_diffusion.py) and, with a ControlNet,
its `BlipDiffusionControlNetPipeline` (pipelines/controlnet/pipeline_controlnet_blip_diffusion.py).
"""

import ctypes
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from checkpoint import (WEIGHTS_HELP, CheckpointError, find_weights, read_json, write_folder_atomically, write_json,
                        write_part)
from clip import CLIP_MEAN, CLIP_STD, CTX_BEGIN_POS, CLIPTextModel, CLIPTokenizer
from controlnet import Control, control_pixels
import data
from diffusion import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, denoise, make_sampler
from qformer import QFormer, QFormerTokenizer
from unet import UNet
from vae import AutoencoderKL

# The released code repeats the prompt 20 times (prompt_reps), an amplification the paper does not
# mention; diffusers and LAVIS both default to it.
PROMPT_REPS = 20
# The guidance scale generate() uses unless told: diffusers' default for the published model. A model
# folder may name its own in model_index.json ("guidance", a key of ours; diffusers' pipeline takes
# the scale per call), as the toy model does (5).
GUIDANCE = 7.5
# The precisions the command lines offer (--dtype), by name.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def keep_freed_memory():
    """Let the process keep the memory it frees and use it again, where the C library is glibc.

    By default glibc returns every freed block over 128 kB-32 MB to the kernel, and the next
    allocation of it is zero-filled by the kernel page by page: on the CPU a UNet call at 256 px then
    takes ~0.5 M page faults, a fifth of its time. Raising both thresholds (allocations served by their
    own mapping, and free memory at the top of the heap given back) keeps the memory in the process;
    its peak is unchanged, and it is given back at exit. Process-wide, so the command-line tools call
    it, not the library. Returns whether it took effect (False without glibc's mallopt)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, LIMIT = -1, -3, 2**31 - 1  # glibc's malloc.h; the largest int
    return bool(mallopt(M_MMAP_THRESHOLD, LIMIT) and mallopt(M_TRIM_THRESHOLD, LIMIT))


@dataclass
class Sampling:
    """How an image is sampled; the defaults are diffusers' BlipDiffusionPipeline's."""
    steps: int = 50  # denoising steps; PNDM takes steps + 1 UNet evaluations
    guidance: Optional[float] = None  # classifier-free guidance scale; None: the model's own; <= 1: off
    seed: int = 0  # image k of a batch starts from noise seeded seed + k
    height: int = 512
    width: int = 512
    scheduler: str = "pndm"  # "pndm", the published scheduler, or "ddim", SD-1.5's
    num_images: int = 1
    negative_prompt: str = ""  # what guidance pushes away from
    prompt_strength: float = 1.0  # with prompt_reps: the prompt is repeated int(strength x reps) times
    prompt_reps: int = PROMPT_REPS


def sampling_options(sampling=None, **overrides):
    """A Sampling from `sampling` (or the defaults) with `overrides` (its field names) applied."""
    if sampling is not None and not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a blipdiff.Sampling, got {sampling!r}; pass other arguments by name "
                        f"(target_text=..., subject_weights=...)")
    unknown = set(overrides) - {f.name for f in fields(Sampling)}
    if unknown & {"controlnet", "control_image", "control_scale"}:
        raise TypeError("structure control is control=controlnet.Control(net, image, scale)")
    if unknown:
        raise TypeError(f"unknown sampling option(s) {', '.join(sorted(unknown))}; "
                        f"the options are {', '.join(f.name for f in fields(Sampling))}")
    return replace(sampling or Sampling(), **overrides)


def check_size(height, width):
    """Pictures are made at multiples of 8 (the VAE's downsampling at the published size)."""
    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")

# ---------------------------------------------------------------------------------------------
# Subject images and prompts
# ---------------------------------------------------------------------------------------------

def preprocess_subject(images, size=(224, 224), mean=CLIP_MEAN, std=CLIP_STD, center_crop=False):
    """PIL images -> (N, 3, H, W) float32, normalised with CLIP's mean and std.

    Default as diffusers' BlipImageProcessor: squash-resize to `size` with bicubic (the aspect ratio
    is not kept). center_crop=True does as LAVIS: resize the short side, then crop the centre."""
    h, w = size
    out = []
    for image in images:
        image = data.to_rgb(image)
        image = data.center_crop(image, h, w) if center_crop else image.resize((w, h), Image.BICUBIC)
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
            # timestep_spacing only where the config read named it: diffusers' DPM-Solver takes the
            # spacing from the file or its own default (diffusion.DPMSolver), so writing it would change
            # what --scheduler dpm samples the saved model with.
            spacing = {k: v for k, v in self.scheduler_config.items() if k == "timestep_spacing"}
            write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), {
                "_class_name": "PNDMScheduler", "beta_start": BETA_START, "beta_end": BETA_END,
                "beta_schedule": "scaled_linear", "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
                "skip_prk_steps": True, "set_alpha_to_one": False, "prediction_type": "epsilon",
                **spacing, "steps_offset": self.scheduler_config.get("steps_offset") or 0})
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

    def compile_unet(self):
        """torch.compile the UNet, where generation spends nearly all its time; for inference only.

        Its forward method is compiled, so hooks on the module still run around it. On the CPU with
        inductor's freezing: the weights become constants, laid out once for oneDNN (the compiled UNet
        is no faster there without it), so they must not change afterwards. The first call compiles:
        about a minute for SD-1.5 on a 2-core CPU; the timestep is a tensor input (diffusion.denoise),
        so later steps do not compile again. Returns the model."""
        if self.device.type == "cpu":
            import torch._inductor.config
            torch._inductor.config.freezing = True
        self.unet.forward = torch.compile(self.unet.forward)
        return self

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

    def subject_and_word(self, subject_images=None, subject_text=None, target_text=None, subject_weights=None,
                        ctx_embeddings=None, center_crop=False):
        """-> (subject embeddings (1, 16, D) or None for text only, the word written into the prompt).
        The subject comes from `ctx_embeddings`, else from images and their words, else from a
        fine-tuned model's own; with none, the prompt is plain text-to-image and needs a word."""
        if ctx_embeddings is None and subject_images is None and self.ctx_embeddings is not None:
            ctx_embeddings, subject_text = self.ctx_embeddings, self.subject_text  # a fine-tuned subject
        text_only = ctx_embeddings is None and subject_images is None
        if text_only and not (target_text or subject_text):
            raise ValueError("give subject_images and subject_text, ctx_embeddings, or for text only a subject_text")
        if not text_only and ctx_embeddings is None:
            ctx_embeddings, subject_text = self.mixed_subject(subject_images, subject_text, subject_weights, center_crop)
        return ctx_embeddings, target_text or (subject_text[0] if isinstance(subject_text, list) else subject_text)

    @torch.no_grad()
    def generate(self, prompt, subject_images=None, subject_text=None, sampling=None, *, target_text=None,
                 subject_weights=None, ctx_embeddings=None, center_crop=False, control=None, controller=None,
                 output="pil", progress=True, **options):
        """Render the subject in the context the prompt describes.

        subject_images: PIL images of one subject (their embeddings are averaged), or a list of such
        lists for several subjects mixed by `subject_weights`. subject_text: the category word (one per
        subject). target_text: the word written into the prompt (default: the first subject's).
        ctx_embeddings: precomputed (1, 16, D) subject embeddings instead of images.
        With no subject at all (no images, no ctx_embeddings, not a fine-tuned model) the prompt is
        plain text-to-image: the same "a {target_text} {prompt}" text, without subject embeddings.
        sampling: a Sampling; keyword `options` override its fields (steps=25, seed=3, guidance=5, ...).
        control: structure control (controlnet.py), a controlnet.Control (a ControlNet, its control
        image, its scale) or a list of them, whose residuals are summed.
        controller: `controller(probs, place) -> probs` on every UNet attention map (unet.Attention).
        Returns PIL images (output="pil"), or a float32 array (N, H, W, 3) in [0, 1] (output="np").
        """
        opt = sampling_options(sampling, **options)
        guidance = self.guidance if opt.guidance is None else opt.guidance
        check_size(opt.height, opt.width)
        sampler = make_sampler(opt.scheduler, opt.steps, self.scheduler_config)
        ctx, target_text = self.subject_and_word(subject_images, subject_text, target_text, subject_weights,
                                                ctx_embeddings, center_crop)
        n = opt.num_images
        if ctx is not None:
            ctx = ctx.to(self.device, self.dtype).expand(n, -1, -1)
        self.warn_if_truncated(f"a {target_text} {prompt.strip()}",
                               self.context_length - (0 if ctx is None else ctx.shape[1]), "prompt")
        text = self.encode_text([build_prompt(prompt, target_text, opt.prompt_strength, opt.prompt_reps)] * n, ctx)
        uncond = None
        if guidance > 1.0:
            self.warn_if_truncated(opt.negative_prompt, self.context_length, "negative prompt")
            uncond = self.encode_text([opt.negative_prompt] * n)
        controls = [] if control is None else [control] if isinstance(control, Control) else list(control)
        if any(c.image is None for c in controls):
            raise ValueError("structure control needs a control image for each ControlNet (Control(net, image, scale))")
        # As the reference: each ControlNet sees the UNet's latents, timestep and the (subject-augmented)
        # text states, and its control image, resized to the output, on every row.
        terms = [c._replace(image=control_pixels(c.image, opt.height, opt.width).to(self.device, self.dtype))
                 for c in controls]
        latents = initial_latents(n, self.latent_shape(opt.height, opt.width), opt.seed).to(self.device, self.dtype)
        latents = denoise(self.unet, latents, text, sampler, uncond, guidance, control=terms, controller=controller,
                          progress=progress)
        return self.decode(latents, output)

    def latent_shape(self, height, width):
        """(C, H, W) of the latent of a height x width image."""
        check_size(height, width)
        factor = self.vae.downsampling
        return self.unet.config.in_channels, height // factor, width // factor

    @torch.no_grad()
    def decode(self, latents, output="pil"):
        """Latents -> images: VAE decode of latents / 0.18215, then (x / 2 + 0.5) clamped to [0, 1].
        PIL images (output="pil"), or a float32 array (N, H, W, 3) in [0, 1] (output="np")."""
        images = (self.vae.decode(latents / self.vae.config.scaling_factor) / 2 + 0.5).clamp(0, 1)
        images = images.float().permute(0, 2, 3, 1).cpu().numpy()  # (N, 3, H, W) -> (N, H, W, 3)
        if output == "np":
            return images
        return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]
