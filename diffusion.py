"""Diffusion: the noise schedule, the training loss, the samplers and the one denoising loop.

BLIP-Diffusion keeps Stable Diffusion v1.5's latent diffusion unchanged (paper §3.2): DDPM's forward
process over 1000 "scaled_linear" timesteps (Ho et al. 2020), trained by ε-prediction, sampled with
PNDM in its PLMS form (Liu et al. 2022; the published scheduler), DDIM (Song et al. 2021) or
DPM-Solver++(2M) (Lu et al. 2022b, the sampler of choice for SD-1.5 at 20-25 steps). Every sampler
here equals diffusers 0.33.1's scheduler of the same settings (`PNDMScheduler`, `DDIMScheduler`,
`DPMSolverMultistepScheduler`), step for step.

`denoise` is the sampling loop of the whole project: generation, ControlNet structure control and
prompt-to-prompt editing all run through it; `ddim_invert` runs DDIM backwards for real-image editing.
"""

import math

import numpy as np
import torch
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------
# The schedule and the training objective
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Samplers: each step a short function of the paper's equation, each sampler a class with timesteps and step()
# ---------------------------------------------------------------------------------------------

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


def vp(sigma):
    """A noise level σ = √((1−ᾱ)/ᾱ) -> (α, σ_VP) = (√ᾱ, √(1−ᾱ)) = (1/√(σ²+1), σ/√(σ²+1))."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def dpm_first_order(x, x0, s, t):
    """DPM-Solver++ (Lu et al. 2022b, eq. 8), one step with the data prediction x0 from noise level s
    to t (levels √((1−ᾱ)/ᾱ); α, σ below are vp()'s): x_t = (σ_t/σ_s)·x − α_t·(e^{−h} − 1)·x0,
    h = λ_t − λ_s, λ = log(α/σ) (the DDIM step, written in λ). To t = 0 (the last step) it is x0."""
    if t == 0:
        return x0
    (alpha_s, sigma_s), (alpha_t, sigma_t) = vp(s), vp(t)
    h = math.log(alpha_t / sigma_t) - math.log(alpha_s / sigma_s)
    return (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * x0


def dpm_second_order(x, x0, x0_prev, s_prev, s, t):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2, diffusers' "midpoint" form): with the previous
    step's x0_prev at s_prev, D1 = (x0 − x0_prev)/r, r = h_prev/h, the first-order step with x0 + D1/2:
    x_t = (σ_t/σ_s)·x − α_t·(e^{−h} − 1)·x0 − ½·α_t·(e^{−h} − 1)·D1 (in diffusers' order of terms)."""
    lam = [math.log(a / b) for a, b in (vp(s_prev), vp(s), vp(t))]
    h, h_prev = lam[2] - lam[1], lam[1] - lam[0]
    sigma_s, (alpha_t, sigma_t) = vp(s)[1], vp(t)
    c, d1 = alpha_t * math.expm1(-h), (h / h_prev) * (x0 - x0_prev)
    return (sigma_t / sigma_s) * x - c * x0 - (0.5 * c) * d1


class DPMSolver:
    """DPM-Solver++(2M), multistep, second order, as diffusers' DPMSolverMultistepScheduler built with
    `from_config` from a folder's (PNDM) scheduler config: the first step first order (no history yet),
    the last first order too (to σ = 0 it is the data prediction itself), σ_N = 0; N steps take N UNet
    calls. The timesteps: "leading" (t_i = (N − i)·⌊T/(N+1)⌋ + steps_offset) where the config names its
    timestep_spacing, as every config diffusers >= 0.17 writes; otherwise DPM's own default, "linspace"
    (t_i = round((T − 1)·(N − i)/N)), since from_config does not carry over a field the file left to its
    default (BLIP-Diffusion's published config, a diffusers 0.16 file, has none). The data prediction
    is in the latents' dtype, the update in float32, as diffusers computes them; in float32 the two
    agree to rounding, in fp16 or bf16 they round differently, by about as much as either differs
    from float32."""

    def __init__(self, num_steps, steps_offset=0, spacing="leading", alphas=None):
        alphas = alphas_cumprod() if alphas is None else alphas
        T, N = len(alphas), num_steps
        if T // (N + 1) < 1:  # the timesteps would repeat (diffusers then divides by zero or reads past the end)
            raise ValueError(f"the dpm sampler takes at most {T - 1} steps, got {N}")
        if spacing == "leading":  # the only spacing a BLIP-Diffusion (PNDM) config may name; else DPM's default
            self.timesteps = [i * (T // (N + 1)) + steps_offset for i in range(N, 0, -1)]
        else:  # numpy's round, half to even, as the reference
            self.timesteps = [int(t) for t in np.linspace(0, T - 1, N + 1).round()[::-1][:-1]]
        self.sigmas = [float(((1 - alphas[t]) / alphas[t]) ** 0.5) for t in self.timesteps] + [0.0]
        self.index, self.x0_prev = 0, None

    def step(self, eps, t, x):
        """The step from the i-th timestep (t) to the next: x0 = (x − σ·ε)/α, then first or second order.
        As diffusers: the data prediction in the latents' dtype, the update in float32."""
        i, dtype = self.index, x.dtype
        alpha_s, sigma_s = vp(self.sigmas[i])
        x0 = (x - sigma_s * eps) / alpha_s  # the data prediction of ε-prediction
        if self.x0_prev is None or i == len(self.timesteps) - 1:
            out = dpm_first_order(x.float(), x0, self.sigmas[i], self.sigmas[i + 1])
        else:
            out = dpm_second_order(x.float(), x0, self.x0_prev, self.sigmas[i - 1], self.sigmas[i], self.sigmas[i + 1])
        self.index, self.x0_prev = i + 1, x0
        return out.to(dtype)


def make_sampler(name, num_steps, config=None):
    """The sampler `name` for num_steps steps, from a folder's scheduler config (BlipDiffusion's
    `scheduler_config`): `pndm`, BLIP-Diffusion's published scheduler, its steps_offset from the config
    (0); `ddim`, Stable Diffusion v1.5's DDIM settings (steps_offset 1) whatever that config says;
    `dpm`, DPM-Solver++(2M) as diffusers' `DPMSolverMultistepScheduler.from_config` of that config."""
    config = config or {}
    if num_steps < 1:
        raise ValueError(f"steps must be positive, got {num_steps}")
    if name == "pndm":
        return PNDM(num_steps, config.get("steps_offset") or 0)
    if name == "ddim":
        return DDIM(num_steps, steps_offset=1)
    if name == "dpm":
        return DPMSolver(num_steps, config.get("steps_offset") or 0, config.get("timestep_spacing", "linspace"))
    raise ValueError(f"unknown scheduler {name!r}: use pndm, ddim or dpm")


# ---------------------------------------------------------------------------------------------
# The sampling loop, and its inverse
# ---------------------------------------------------------------------------------------------

def control_residuals(control, x, t, text):
    """The ControlNets' residuals for the UNet's skip connections and middle block: each ControlNet
    sees the UNet's input, timestep and text states, and its conditioning image on every row (the
    unconditional rows too, as diffusers), scaled by its own scale; several are summed (diffusers'
    MultiControlNetModel)."""
    down = mid = None
    for net, image, scale in control:
        d, m = net(x, t, text, image.expand(len(x), -1, -1, -1), scale)
        down = d if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else mid + m
    return dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)


@torch.no_grad()
def denoise(unet, latents, text, sampler, uncond=None, guidance=None, control=(), controller=None,
            after_step=None, progress=False):
    """x_T -> x_0: at each of the sampler's timesteps, ε from the UNet, then a sampler step.

    text: the conditional text states (B, L, D). With `uncond` (B, L, D), classifier-free guidance
    (Ho & Salimans 2022) on the batch [uncond, cond]: ε = ε_u + g·(ε_c − ε_u), `guidance` g one
    number or one per sample; without it, ε = ε_c. control: controlnet.Control triples (ControlNet,
    its conditioning image as a (1, 3, 8H, 8W) tensor, scale). controller(probs, place) -> probs sees
    every attention map (unet.Attention). after_step(i, latents) -> latents runs after step i
    (editing's local blend)."""
    if uncond is not None and guidance is None:
        raise ValueError("classifier-free guidance (uncond given) needs a guidance scale")
    # One scale stays a Python number, as diffusers applies it (a cast to fp16 or bf16 would round it).
    g = guidance if uncond is None or isinstance(guidance, (int, float)) else torch.as_tensor(
        guidance, dtype=latents.dtype, device=latents.device).reshape(-1, 1, 1, 1)
    states = text if uncond is None else torch.cat([uncond, text])
    # The UNet gets each timestep as a tensor, not an int: a compiled UNet (BlipDiffusion.compile_unet) then
    # sees one input that changes value, not a new constant to compile for at each step.
    times = torch.tensor(sampler.timesteps, device=latents.device)
    for i, t in enumerate(tqdm(sampler.timesteps, desc="denoising", disable=not progress)):
        x = latents if uncond is None else torch.cat([latents] * 2)
        residuals = control_residuals(control, x, times[i], states) if control else {}
        eps = unet(x, times[i], states, **residuals, controller=controller)
        if uncond is not None:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + g * (eps_cond - eps_uncond)
        latents = sampler.step(eps, t, latents)
        if after_step is not None:
            latents = after_step(i, latents)
    return latents


@torch.no_grad()
def ddim_invert(unet, latents, text, steps=50, progress=False):
    """x_0 -> x_T: DDIM (η = 0) run backwards, with the noise predicted at the point already reached,
    for t = 1, 1 + T/N, ..., the DDIM timesteps (steps_offset 1) in increasing order, t' = t − T/N:
        ε = ε_θ(x_t', t),  x̂₀ = (x_t' − √(1−ᾱ_t')·ε) / √ᾱ_t',  x_t = √ᾱ_t·x̂₀ + √(1−ᾱ_t)·ε,
    with ᾱ_t' = ᾱ_0 for t' < 0. Exact if ε(x_t) = ε(x_t'); the error is DDIM's discretisation.
    No guidance: `text` (B, L, D) is the conditional prompt alone."""
    sampler = DDIM(steps)
    for t in tqdm(sampler.timesteps[::-1], desc="inverting", disable=not progress):
        eps = unet(latents, t, text)
        latents = ddim_step(latents, eps, sampler.alpha(t - sampler.ratio), sampler.alpha(t))
    return latents
