"""BLIP-Diffusion: zero-shot subject-driven generation (Li, Li & Hoi 2023, Sections 3.1-3.3).

The pieces: a BLIP-2 Q-Former reads the subject image and its category word (`qformer.py`, with the
CLIP ViT in `clip.py`); its 16 query outputs, projected, become "subject prompt" embeddings inserted
into the CLIP text encoder's input at position 2 (`clip.py`); Stable Diffusion v1.5's UNet (`unet.py`)
denoises VAE latents (`vae.py`) under classifier-free guidance; the VAE decodes.

This file holds the diffusion schedule and the samplers, and ties the parts into one model.
It must equal diffusers 0.33.1's `BlipDiffusionPipeline` given the same weights (see
../shared/reference/blip-diffusion.md, sections 4 and 4.1).
"""

import torch

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


def make_sampler(name, num_steps, steps_offset=None):
    """`pndm` (BLIP-Diffusion's published scheduler) or `ddim` (SD-1.5's DDIM settings)."""
    if num_steps < 1:
        raise ValueError(f"steps must be positive, got {num_steps}")
    if name == "pndm":
        return PNDM(num_steps, 0 if steps_offset is None else steps_offset)
    if name == "ddim":
        return DDIM(num_steps, 1 if steps_offset is None else steps_offset)
    raise ValueError(f"unknown scheduler {name!r}: use pndm or ddim")


