"""Subject-driven editing (editing.py) on the tiny random model.

The tiny model's latent is 16x16 (32 px images) with attention at 16x16 (downsample 1) and 8x8 (2);
SD-1.5 at 512 px has 64x64 down to 8x8. The rules are stated relative to the latent, so the tests pick
the tiny model's own levels: the mask from the 16x16 maps, self-attention injection at 8x8.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from blipdiff import BlipDiffusion, build_prompt, initial_latents
from diffusion import DDIM, alphas_cumprod, ddim_invert, denoise, make_sampler
from editing import (AttentionRefine, AttentionStore, edit_generated, edit_mask, edit_real, image_to_latent,
                     token_alignment, word_positions)
from unet import AttentionPlace

SIZE = dict(height=32, width=32)
LEVELS = dict(mask_downsample=1, self_downsample=2)
PROMPT = "sitting on the sofa"


@pytest.fixture(scope="module")
def model(tiny_pipeline):
    return BlipDiffusion.from_pretrained(tiny_pipeline[1])


@pytest.fixture(scope="module")
def ctx():
    return torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def decode(model, latents):
    images = (model.vae.decode(latents / model.vae.config.scaling_factor) / 2 + 0.5).clamp(0, 1)
    return images.permute(0, 2, 3, 1).numpy()


def edit(model, ctx, **kw):
    args = dict(ctx_embeddings=ctx, steps=6, seed=4, output="np", progress=False, **SIZE, **LEVELS)
    return edit_generated(model, PROMPT, "cat", "dog", **{**args, **kw})


def test_identity_controller_equals_generate(model, ctx):
    calls = []

    def identity(probs, place):
        calls.append(place.index)
        return probs

    ref = model.generate(PROMPT, ctx_embeddings=ctx, target_text="dog", steps=4, seed=2, output="np",
                         progress=False, **SIZE)
    cond = model.encode_text([build_prompt(PROMPT, "dog")], ctx)
    latents = initial_latents(1, (4, 16, 16), 2)
    out = denoise(model.unet, latents, cond, make_sampler("pndm", 4), model.encode_text([""]), 7.5,
                  controller=identity)
    assert len(calls) == 8 * 5  # 8 attention layers, 4 PNDM steps = 5 UNet evaluations
    assert np.abs(decode(model, out) - ref).max() <= 1e-5  # explicit softmax vs SDPA: rounding only


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "dpm"])  # LAVIS' DDIM generation path crashes
def test_full_and_empty_masks(model, ctx, scheduler):
    # Full mask, no attention replacement: the edit is the plain target generation (one prompt copy,
    # as the editing target prompt has), and the source is the plain-CLIP source generation.
    source, edited = edit(model, ctx, scheduler=scheduler, threshold=-1.0, cross_replace=0.0, self_replace=0.0)
    target = model.generate(PROMPT, ctx_embeddings=ctx, target_text="dog", prompt_reps=1, steps=6, seed=4,
                            scheduler=scheduler, output="np", progress=False, **SIZE)[0]
    assert np.abs(edited - target).max() <= 1e-4
    cond = model.encode_text([build_prompt(PROMPT, "cat", prompt_reps=1)])
    plain = denoise(model.unet, initial_latents(1, (4, 16, 16), 4), cond,
                    make_sampler(scheduler, 6, model.scheduler_config), model.encode_text([""]), 7.5)
    assert np.abs(source - decode(model, plain)[0]).max() <= 1e-4
    # With the replacement on, the target is no longer its plain generation.
    _, replaced = edit(model, ctx, scheduler=scheduler, threshold=-1.0)
    assert np.abs(replaced - target).max() > 1e-3
    # Empty mask: nothing changes.
    source, edited = edit(model, ctx, scheduler=scheduler, threshold=1.0)
    assert np.array_equal(source, edited)


def test_latents_outside_the_mask_stay_the_source(model, ctx):
    seen = []
    edit(model, ctx, threshold=0.8, callback=lambda i, x, mask: seen.append((x.clone(), mask.clone())))
    assert len(seen) == 7  # 6 PNDM steps = 7 evaluations, blended after each
    for x, mask in seen:
        keep = ~mask[0, 0]
        assert torch.equal(x[1][:, keep], x[0][:, keep])
    masks = torch.stack([m for _, m in seen])
    assert masks.any() and not masks.all()  # a real partial mask, not a trivial one
    assert not torch.equal(seen[-1][0][0], seen[-1][0][1])  # and the target did change inside it


def test_token_alignment_follows_the_real_sequence(model):
    tok = model.tokenizer
    src_text, tgt_text = "a dog sitting on the sofa", "a dog sitting on the sofa"
    mapper, alpha = token_alignment(tok, src_text, tgt_text)
    assert mapper.shape == alpha.shape == (77,)
    src = [tok.bos_id] + tok.encode(src_text) + [tok.eos_id]
    tgt = [tok.bos_id] + tok.encode(tgt_text) + [tok.eos_id]
    tgt = tgt[:2] + [None] * 16 + tgt[2:]  # what the encoder reads: subject embeddings at 2..17
    assert alpha[2:18].eq(0).all()  # the subject embeddings are new: they keep their own maps
    assert mapper[:2].tolist() == [0, 1] and alpha[:2].eq(1).all()
    # Every later target token (the word "dog" included) reads the source position 16 before it:
    # no "sks" placeholders, no offset (LAVIS reads 16 positions off here).
    for j in range(18, len(tgt)):
        assert mapper[j] == j - 16 and alpha[j] == 1
    dog = word_positions(tok, "a", "dog")
    assert dog[0] == 2 and [mapper[p + 16].item() for p in dog] == dog
    # Different words: "cat" and "dog" are unmatched, the rest still pairs equal tokens.
    mapper, alpha = token_alignment(tok, "a cat sitting on the sofa", tgt_text)
    src = [tok.bos_id] + tok.encode("a cat sitting on the sofa") + [tok.eos_id] + [tok.eos_id] * 77
    for j in range(len(tgt)):
        if alpha[j] == 1:
            assert src[mapper[j]] == tgt[j]
    assert alpha[[p + 16 for p in dog]].eq(0).all()
    prompt_tokens = len(tok.encode("sitting on the sofa")) + 1  # and EOS
    assert alpha[len(tgt) - prompt_tokens:len(tgt)].eq(1).all()


def test_token_alignment_in_a_shorter_text_context(model):
    """A text encoder of 24 positions: both sequences are cut to fit it, and every mapped position
    is one the encoder has."""
    tok = model.tokenizer
    long_text = "a dog " + "sitting on the sofa " * 10
    mapper, alpha = token_alignment(tok, long_text, long_text, length=24)
    assert mapper.shape == alpha.shape == (24,) and int(mapper.max()) <= 23
    src = [tok.bos_id] + tok.encode(long_text)[:22] + [tok.eos_id]  # cut to 24
    tgt = [tok.bos_id] + tok.encode(long_text)[:6] + [tok.eos_id]  # cut to 24 - 16 subject embeddings
    tgt = tgt[:2] + [None] * 16 + tgt[2:]
    assert len(src) == len(tgt) == 24 and alpha[18:].eq(1).all()
    assert all(src[mapper[j]] == tgt[j] for j in range(18, 24))  # every later token reads an equal one
    assert word_positions(tok, "a " + "sitting " * 30, "dog", length=24) == []  # past the context: no position


def test_edit_mask_from_the_source_word():
    maps = torch.full((8 * 8, 77), 0.01)
    grid = maps.view(8, 8, 77)
    grid[2:4, 4:6, 2] = 1.0   # the source word (position 2) is attended at rows 2-3, columns 4-5
    grid[6:8, 0:2, 5] = 5.0   # another token elsewhere, stronger: it must not matter
    mask = edit_mask(maps, [2], (8, 8), (16, 16), threshold=0.3)
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[2:10, 6:14] = True  # rows 1-4, columns 3-6 after the 3x3 max-pool, x2 upsampled
    assert mask.shape == (1, 1, 16, 16) and torch.equal(mask[0, 0], expected)
    assert not edit_mask(maps, [2], (8, 8), (16, 16), threshold=1.0).any()


def test_store_and_refine_controllers():
    cross = AttentionPlace("up", "cross", 1, "x.attn2")
    probs = torch.rand(4, 2, 64, 77).softmax(-1)  # [uncond_src, uncond_tgt, src, tgt]
    store = AttentionStore(64)
    store(probs, cross)
    store(probs, AttentionPlace("up", "self", 0, "x.attn1"))  # self-attention: not stored
    store(torch.rand(4, 2, 16, 77), cross)  # another resolution: not stored
    store(probs, cross)
    assert torch.allclose(store.maps, 2 * probs[2:].sum(1))
    mapper, alpha = torch.arange(77).roll(1), torch.ones(77)
    alpha[5] = 0.0
    refine = AttentionRefine(mapper, alpha, cross_steps=1, self_steps=1, self_max_keys=64)
    first = AttentionPlace("down", "self", 0, "y.attn1")
    injected = refine(torch.rand(4, 2, 64, 64), first)
    assert torch.equal(injected[3], injected[2])  # self-attention at <= 64 keys: the source's
    big = torch.rand(4, 2, 256, 256)
    assert refine(big, AttentionPlace("down", "self", 2, "z.attn1")) is big  # too many keys
    out = refine(probs, cross)
    assert torch.equal(out[:3], probs[:3])  # only the target's conditional maps change
    assert torch.equal(out[3][..., 7], probs[2][..., 6]) and torch.equal(out[3][..., 5], probs[3][..., 5])
    refine(torch.rand(4, 2, 64, 64), first)  # the next UNet evaluation: outside both windows
    assert refine(probs, cross) is probs


class GaussianDenoiser:
    """The exact ε-predictor for data x₀ ~ N(μ, s²I): x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε gives
    E[ε | x_t] = √(1−ᾱ_t)·(x_t − √ᾱ_t·μ) / (ᾱ_t·s² + 1 − ᾱ_t). Along DDIM's ODE a sample keeps its
    standardised offset z = (x₀ − μ)/s: x_t = √ᾱ_t·μ + √(ᾱ_t·s² + 1 − ᾱ_t)·z, a closed form to check."""

    def __init__(self, mu, s):
        self.mu, self.s, self.alphas = mu, s, alphas_cumprod()

    def __call__(self, x, t, text, controller=None):
        a = self.alphas[t]
        return (1 - a) ** 0.5 * (x - a**0.5 * self.mu) / (a * self.s**2 + 1 - a)

    def along_ode(self, z, t):
        a = self.alphas[t]
        return a**0.5 * self.mu + (a * self.s**2 + 1 - a) ** 0.5 * z


def test_ddim_inversion_round_trip():
    # On a model whose ε is a real denoiser: the tiny random UNet is none (its ε barely depends on the
    # noise level), and there the round trip is off by more than the latent itself (about 140% at 50
    # steps), so it bounds nothing. Here the only error is DDIM's discretisation, first order in 1/N:
    # measured 14% (10 steps), 3.6% (50), 0.96% (200) for both the inverted latent and the round trip.
    g = torch.Generator().manual_seed(0)
    mu, z = 0.5 * torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    model = SimpleNamespace(unet=GaussianDenoiser(mu, 0.5))
    x0 = mu + 0.5 * z
    errors = []
    for steps in (10, 50):
        noise = ddim_invert(model.unet, x0, None, steps)
        exact = model.unet.along_ode(z, DDIM(steps).timesteps[0])
        back = denoise(model.unet, noise, None, DDIM(steps))
        errors.append(((noise - exact).norm() / exact.norm()).item())
        assert ((back - x0).norm() / x0.norm()).item() < {10: 0.2, 50: 0.05}[steps]
    assert errors[1] < 0.05 and errors[1] < errors[0] / 3  # converges as 1/N


def test_edit_real(model):
    rng = np.random.RandomState(1)
    photo = Image.fromarray(rng.randint(0, 256, (40, 30, 3), np.uint8))
    subject = Image.fromarray(rng.randint(0, 256, (28, 28, 3), np.uint8))
    args = dict(subject_images=[subject], subject_text="dog", steps=10, inversion_steps=10, output="np",
                progress=False, **SIZE, **LEVELS)
    recon, edited = edit_real(model, photo, PROMPT, "cat", "dog", threshold=1.0, **args)
    assert recon.shape == edited.shape == (32, 32, 3) and np.array_equal(recon, edited)
    # The source branch is DDIM sampling, unguided, from the inverted latent under the source prompt.
    text = model.encode_text([build_prompt(PROMPT, "cat", prompt_reps=1)])
    inverted = ddim_invert(model.unet, image_to_latent(model, photo, 32, 32), text, 10)
    assert np.abs(recon - decode(model, denoise(model.unet, inverted, text, DDIM(10)))[0]).max() <= 1e-4
    recon2, edited = edit_real(model, photo, PROMPT, "cat", "dog", threshold=0.3, **args)
    assert np.array_equal(recon, recon2) and not np.array_equal(recon, edited)


def test_default_levels_are_lavis_16x16_at_sd15_size():
    from editing import coarsest_cross_attention_level, level_size
    from unet import UNet, UNetConfig
    with torch.device("meta"):
        sd15 = UNet(UNetConfig())
    assert coarsest_cross_attention_level(sd15) == 4
    assert level_size(64, 64, 4) == (16, 16)  # LAVIS' mask maps and self-injection limit (key length 256)
