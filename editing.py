"""Subject-driven editing (BLIP-Diffusion sec. 3.3): prompt-to-prompt (Hertz et al. 2022) with the
subject embeddings in the target prompt, on a generated image or on a real one inverted with DDIM.

Two branches denoise from the same latent: the source "a {src} {prompt}" (plain CLIP, 77 tokens) and
the target "a [16 subject embeddings] {tgt} {prompt}". Controllers passed into the UNet
(`UNet.forward(..., controller=...)`) act on the target's conditional attention maps:
- cross-attention refinement (LAVIS' AttentionRefine), first 80% of the steps: for each token the
  target shares with the source (`token_alignment`) the target reads the source's map, so the layout
  of the words that stay is kept; new tokens (the subject embeddings, the new word) keep their own;
- self-attention injection, first 40%: at the low resolutions the target takes the source's
  self-attention maps, which carry the composition;
- local blend (LocalBlend), after every step: the source subject word's cross-attention, summed over
  the steps so far (AttentionStore), gives a mask; outside it the target latent is reset to the source's.

Must behave as LAVIS' `generate_then_edit` / `edit` (lavis/models/blip_diffusion_models/
blip_diffusion.py and ptp_utils.py), except where LAVIS is wrong, which the code says at each place:
the token alignment, the inversion prompt, the VAE latent, the DDIM path.

Letters in shape comments: B batch, h heads, N query positions, L text positions (77), C channels,
H x W the latent.
"""

from dataclasses import dataclass, fields, replace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from blipdiff import build_prompt, initial_latents, sampling_options
from clip import CTX_BEGIN_POS, MAX_LENGTH, NUM_QUERY_TOKENS
from data import center_crop, to_rgb
from diffusion import DDIM, ddim_invert, denoise, make_sampler

@dataclass
class Edit:
    """Prompt-to-prompt's settings; the defaults are LAVIS' (generate_then_edit / edit)."""
    threshold: float = 0.3  # keep the pixels whose normalised source-word attention is above it
    cross_replace: float = 0.8  # share of the steps whose cross-attention is refined from the source's
    self_replace: float = 0.4  # share of the steps whose low-resolution self-attention is the source's
    # Resolutions, as the factor by which a UNet level is smaller than the latent. LAVIS (at 512 px, a
    # 64x64 latent) takes the mask from the 16x16 maps and injects self-attention where the key length
    # is <= 256, i.e. 16x16 and 8x8. In SD-1.5 16x16 is the coarsest level of the cross-attention encoder
    # blocks (4 times below the latent); None means that rule, read from the UNet's config, so smaller
    # models (the tests', the toy world's) get their own equivalent.
    mask_downsample: Optional[int] = None
    self_downsample: Optional[int] = None


# The Sampling fields editing reads: one picture, from one copy of the prompt (as LAVIS' editing).
EDIT_SAMPLING = ("steps", "guidance", "seed", "height", "width", "scheduler", "negative_prompt")


def edit_options(sampling, edit, options):
    """(Sampling, Edit) from the ones given (or the defaults) with keyword `options` applied, each to
    the dataclass that has the field."""
    edit_fields = {f.name for f in fields(Edit)}
    unknown = set(options) - edit_fields - set(EDIT_SAMPLING)
    if unknown:
        raise TypeError(f"unknown editing option(s) {', '.join(sorted(unknown))}; the options are "
                        f"{', '.join(EDIT_SAMPLING + tuple(sorted(edit_fields)))}")
    sampling = sampling_options(sampling, **{k: v for k, v in options.items() if k not in edit_fields})
    if sampling.num_images != 1:
        raise ValueError("editing makes one picture: num_images must be 1")
    return sampling, replace(edit or Edit(), **{k: v for k, v in options.items() if k in edit_fields})


def coarsest_cross_attention_level(unet):
    """2**i for the last CrossAttnDownBlock2D i: 4 in SD-1.5 (16x16 at a 64x64 latent)."""
    levels = [i for i, kind in enumerate(unet.config.down_block_types) if kind.startswith("CrossAttn")]
    return 2 ** levels[-1]


# Stands for a subject embedding in the target's token list; equal to no token id.
SUBJECT_TOKEN = -1


# ---------------------------------------------------------------------------------------------
# Token alignment between the source and the target sequences
# ---------------------------------------------------------------------------------------------

def align_tokens(src, tgt):
    """Global alignment (Needleman-Wunsch; match +1, mismatch -1, gap 0, prompt-to-prompt's scores,
    which make it a longest common subsequence) of two token lists -> (mapper, alpha), one entry per
    target position j: alpha[j] = 1 and mapper[j] = i when target token j is matched with source
    token i; alpha[j] = 0 (mapper 0, unused) for a target token the source lacks."""
    m, n = len(src), len(tgt)
    score = np.zeros((m + 1, n + 1), dtype=np.int64)
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            diag = score[i - 1, j - 1] + (1 if src[i - 1] == tgt[j - 1] else -1)
            score[i, j] = max(diag, score[i - 1, j], score[i, j - 1])
    mapper, alpha = [0] * n, [0.0] * n
    i, j = m, n
    while i > 0 and j > 0:  # trace back, preferring a match wherever it lies on an optimal path
        if src[i - 1] == tgt[j - 1] and score[i, j] == score[i - 1, j - 1] + 1:
            mapper[j - 1], alpha[j - 1] = i - 1, 1.0
            i, j = i - 1, j - 1
        elif score[i, j] == score[i - 1, j]:
            i -= 1
        else:
            j -= 1
    return mapper, alpha


def token_alignment(tokenizer, src_text, tgt_text, num_ctx=NUM_QUERY_TOKENS, length=MAX_LENGTH):
    """(mapper, alpha), each of the text encoder's length (77), over the sequences it really reads:
    source [BOS, src ids (<= 75), EOS, pad...], target [BOS, a, subject x num_ctx, rest of the tgt ids
    (<= 59 in all), EOS, pad...]. A target token shared with the source therefore reads the source
    position 16 before it (for an unchanged word after the subject).

    LAVIS differs (a bug): it aligns the strings "a {src} ..." and "a sks x16 {tgt} ...", tokenized to
    77 and 61 ids, while the encoder reads the 16 subject embeddings at 2..17 instead of nothing, so
    every aligned map after position 17 is read 16 positions off. We align the real sequences."""
    src = [tokenizer.bos_id] + tokenizer.encode(src_text)[:length - 2] + [tokenizer.eos_id]
    tgt = [tokenizer.bos_id] + tokenizer.encode(tgt_text)[:length - num_ctx - 2] + [tokenizer.eos_id]
    tgt = tgt[:CTX_BEGIN_POS] + [SUBJECT_TOKEN] * num_ctx + tgt[CTX_BEGIN_POS:]
    mapper, alpha = align_tokens(src, tgt)
    # Padding: the k-th pad of the target reads the k-th pad of the source (prompt-to-prompt maps
    # the pads one to one too, with alpha 1).
    pads = length - len(tgt)
    mapper += [min(len(src) + k, length - 1) for k in range(pads)]
    alpha += [1.0] * pads
    return torch.tensor(mapper), torch.tensor(alpha)


def word_positions(tokenizer, before, word, length=MAX_LENGTH):
    """Positions of `word`'s tokens in the sequence "{before} {word} ..." ([BOS] comes first), of
    a text encoder reading `length` positions."""
    start = 1 + len(tokenizer.encode(before))
    return [p for p in range(start, start + len(tokenizer.encode(word))) if p < length - 1]


# ---------------------------------------------------------------------------------------------
# Attention controllers: controller(probs (B, h, N, M), place) -> probs
# ---------------------------------------------------------------------------------------------

def level_size(height, width, downsample):
    """Side of the UNet's maps `downsample` (1, 2, 4, ...) times below a height x width latent: each
    level halves it, rounding up (a stride-2 convolution with padding 1)."""
    while downsample > 1:
        height, width, downsample = (height + 1) // 2, (width + 1) // 2, downsample // 2
    return height, width


def chain(*controllers):
    """One controller that runs several in order."""
    def run(probs, place):
        for controller in controllers:
            probs = controller(probs, place)
        return probs
    return run


class AttentionStore:
    """Sums the conditional half's cross-attention maps with `num_queries` query positions over heads,
    layers and steps: maps (B/2, N, L). (LAVIS averages over heads and layers; the mask is divided by
    its maximum, so a sum gives the same mask.) It returns the maps unchanged."""

    def __init__(self, num_queries):
        self.num_queries, self.maps = num_queries, None

    def __call__(self, probs, place):
        if place.kind == "cross" and probs.shape[2] == self.num_queries:
            cond = probs[probs.shape[0] // 2:].float().sum(1)  # (B, h, N, L) -> (B/2, N, L)
            self.maps = cond if self.maps is None else self.maps + cond
        return probs


class AttentionRefine:
    """Prompt-to-prompt's refinement on the batch [uncond_src, uncond_tgt, src, tgt]: only the
    target's conditional maps A_tgt change, from the source's A_src. In UNet evaluation i:
    cross-attention, i < cross_steps:  A_tgt[..., j] <- α_j·A_src[..., mapper_j] + (1 − α_j)·A_tgt[..., j]
    self-attention with <= self_max_keys keys, i < self_steps:  A_tgt <- A_src."""

    def __init__(self, mapper, alpha, cross_steps, self_steps, self_max_keys):
        self.mapper, self.alpha = mapper, alpha
        self.cross_steps, self.self_steps, self.self_max_keys = cross_steps, self_steps, self_max_keys
        self.step = -1  # the UNet evaluation under way

    def __call__(self, probs, place):
        if place.index == 0:
            self.step += 1  # attention layer 0 runs first in every UNet evaluation
        src, tgt = probs[-2], probs[-1]  # (h, N, M) each
        if place.kind == "cross" and self.step < self.cross_steps:
            new = src[..., self.mapper] * self.alpha + tgt * (1 - self.alpha)
        elif place.kind == "self" and self.step < self.self_steps and probs.shape[-1] <= self.self_max_keys:
            new = src
        else:
            return probs
        probs = probs.clone()
        probs[-1] = new
        return probs


def edit_mask(maps, positions, map_size, latent_size, threshold=Edit.threshold):
    """LocalBlend's mask from one prompt's summed cross-attention maps (N, L), N = map height x width:
    m = Σ_{k in word} A[:, k], max-pooled 3x3 (stride 1, grows the region by a pixel), upsampled
    (nearest) to the latent, m <- m / max(m); mask = m > threshold, (1, 1, H, W) bool.
    threshold >= 1 gives an empty mask, a negative one a full mask."""
    m = maps[:, positions].sum(-1).reshape(1, 1, *map_size)
    m = F.interpolate(F.max_pool2d(m, 3, stride=1, padding=1), size=latent_size, mode="nearest")
    return m / m.max() > threshold


def blend(latents, mask):
    """x_tgt <- x_src + mask·(x_tgt − x_src) on the pair [x_src, x_tgt], written as a selection, so
    that outside the mask x_tgt is exactly x_src and inside it exactly x_tgt."""
    return torch.stack([latents[0], torch.where(mask[0], latents[1], latents[0])])


# ---------------------------------------------------------------------------------------------
# The two branches, denoised together
# ---------------------------------------------------------------------------------------------

def edit_latents(model, latents, prompt, words, ctx_embeddings, sampler, sampling, edit, guide_source=True,
                 callback=None, progress=False):
    """Source and target from one latent (1, C, H, W) -> their final latents (2, C, H, W), denoised by
    `sampler` as one batch. words: (source word, target word). From `sampling` it reads the steps,
    the guidance scale (None: the model's own) and the negative prompt; from `edit` the windows,
    the mask's threshold and the levels.

    Windows as prompt-to-prompt counts them, in UNet evaluations: cross-attention for the first
    int(cross_replace·(steps + 1)), self-attention for the first int(self_replace·steps) (40 and 20 at
    50 steps). guide_source=False gives the source its unguided conditional ε, as LAVIS does for a real
    image, so that it retraces the DDIM inversion. callback(i, latents, mask) sees every step."""
    (src_word, tgt_word), tok = words, model.tokenizer
    height, width, steps = latents.shape[-2], latents.shape[-1], sampling.steps
    guidance = model.guidance if sampling.guidance is None else sampling.guidance
    src_text, tgt_text = build_prompt(prompt, src_word, prompt_reps=1), build_prompt(prompt, tgt_word, prompt_reps=1)
    ctx = ctx_embeddings.to(model.device, model.dtype)
    cond = torch.cat([model.encode_text([src_text]), model.encode_text([tgt_text], ctx)])
    uncond = model.encode_text([sampling.negative_prompt] * 2)
    alignment = token_alignment(tok, src_text, tgt_text, ctx.shape[1], model.context_length)
    mapper, alpha = (x.to(model.device) for x in alignment)
    mask_downsample = edit.mask_downsample or coarsest_cross_attention_level(model.unet)
    self_downsample = edit.self_downsample or coarsest_cross_attention_level(model.unet)
    map_size = level_size(height, width, mask_downsample)
    self_size = level_size(height, width, self_downsample)
    store = AttentionStore(map_size[0] * map_size[1])
    refine = AttentionRefine(mapper, alpha.to(model.dtype), int(edit.cross_replace * (steps + 1)),
                             int(edit.self_replace * steps), self_size[0] * self_size[1])
    # The mask reads the source word's tokens in the source prompt only. Prompt-to-prompt would OR in
    # the target word's region; LAVIS passes only the source word, so its target mask is empty. As LAVIS.
    positions = word_positions(tok, "a", src_word, model.context_length)

    def local_blend(i, x):
        if store.maps is None:
            raise ValueError(f"no cross-attention layer at {map_size[0]}x{map_size[1]} (mask_downsample="
                             f"{mask_downsample} of a {height}x{width} latent): pick a level that has one")
        mask = edit_mask(store.maps[0], positions, map_size, (height, width), edit.threshold)
        x = blend(x, mask)
        if callback is not None:
            callback(i, x, mask)
        return x

    g = [guidance if guide_source else 1.0, guidance]
    return denoise(model.unet, latents.expand(2, -1, -1, -1), cond, sampler, uncond, g,
                   controller=chain(store, refine), after_step=local_blend, progress=progress)


# ---------------------------------------------------------------------------------------------
# Editing a generated image, editing a real one
# ---------------------------------------------------------------------------------------------

def subject_of(model, subject_images, subject_text, ctx_embeddings):
    """Subject embeddings (1, 16, D): given, from images and their category word, or the fine-tuned
    ones, as generate() resolves them; editing needs one (there is nothing to put in the target)."""
    ctx, _ = model.subject_and_word(subject_images, subject_text, ctx_embeddings=ctx_embeddings)
    if ctx is None:
        raise ValueError("give subject_images (and subject_text) or ctx_embeddings")
    return ctx


@torch.no_grad()
def edit_generated(model, prompt, src_word, tgt_word, subject_images=None, subject_text=None,
                   ctx_embeddings=None, sampling=None, edit=None, output="pil", callback=None, progress=True,
                   **options):
    """Generate "a {src_word} {prompt}" and, from the same noise, the subject as `tgt_word` in it,
    the edit confined to where the source word is. Returns (source, edited).

    The subject: `subject_images` with their category `subject_text` (default tgt_word), or
    `ctx_embeddings` (1, 16, D), or a fine-tuned model's own. sampling (blipdiff.Sampling; its
    guidance default the model's own, as generate()) and edit (Edit) take their fields as keyword
    `options` too (steps=, seed=, threshold=, ...). LAVIS' default is 250 steps; ours 50, as its
    notebooks. scheduler="ddim" works here (LAVIS' use_ddim path indexes a 2-sample batch at 2 and
    crashes); both branches are guided."""
    sampling, edit = edit_options(sampling, edit, options)
    ctx = subject_of(model, subject_images, subject_text or tgt_word, ctx_embeddings)
    sampler = make_sampler(sampling.scheduler, sampling.steps, model.scheduler_config)
    latents = initial_latents(1, model.latent_shape(sampling.height, sampling.width), sampling.seed)
    latents = edit_latents(model, latents.to(model.device, model.dtype), prompt, (src_word, tgt_word), ctx,
                           sampler, sampling=sampling, edit=edit, callback=callback, progress=progress)
    return tuple(model.decode(latents, output))  # (source or reconstruction, edited)


@torch.no_grad()
def image_to_latent(model, image, height, width):
    """PIL image -> z = 0.18215·mean of q(z|x), (1, 4, H/8, W/8): resized to cover height x width,
    centre-cropped, scaled to [-1, 1]. The posterior mean, not a sample: LAVIS samples (with the
    global RNG), which adds noise the inversion then carries; the mean is the image's latent."""
    # Bicubic (LAVIS: torchvision's default bilinear; PIL's filters both antialias when shrinking).
    x = np.asarray(center_crop(to_rgb(image), height, width), dtype=np.float32) / 255
    x = torch.from_numpy(x).permute(2, 0, 1)[None] * 2 - 1  # (H, W, 3) -> (1, 3, H, W)
    return model.vae.encode(x.to(model.device, model.dtype)).mean * model.vae.config.scaling_factor


@torch.no_grad()
def edit_real(model, image, prompt, src_word, tgt_word, subject_images=None, subject_text=None,
              ctx_embeddings=None, sampling=None, edit=None, inversion_steps=None, output="pil", callback=None,
              progress=True, **options):
    """Edit a photo where `src_word` is ("a {src_word} {prompt}" describes it) into the subject as
    `tgt_word`. Returns (reconstruction, edited).

    VAE latent -> DDIM inversion under the source prompt, no guidance -> the edit, with DDIM (η = 0).
    The source branch uses its unguided ε, the exact reverse of the inversion, so it reconstructs the
    photo; the target is guided. inversion_steps defaults to the sampling's steps: with another
    number the inversion ends at another noise level than the sampling starts from (LAVIS allows
    it, with 50 inversion steps whatever the sampling's). Options as edit_generated's (seed and
    scheduler play no part: the noise is the photo's, the sampler DDIM)."""
    sampling, edit = edit_options(sampling, edit, options)
    ctx = subject_of(model, subject_images, subject_text or tgt_word, ctx_embeddings)
    latents = image_to_latent(model, image, sampling.height, sampling.width)
    # The whole source word; LAVIS builds this prompt with the word's first character ("a c sit on a
    # sofa" for "cat"), since its prompt builder iterates over what it takes for a list of words.
    text = model.encode_text([build_prompt(prompt, src_word, prompt_reps=1)])
    latents = ddim_invert(model.unet, latents, text, inversion_steps or sampling.steps, progress)
    latents = edit_latents(model, latents, prompt, (src_word, tgt_word), ctx, DDIM(sampling.steps),
                           sampling=sampling, edit=edit, guide_source=False, callback=callback, progress=progress)
    return tuple(model.decode(latents, output))  # (source or reconstruction, edited)
