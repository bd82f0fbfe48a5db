"""The samplers against diffusers' schedulers: the timesteps, and the output of every step."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from diffusion import DDIM, PNDM, alphas_cumprod, make_sampler

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def reference_pndm(steps_offset):
    # BLIP-Diffusion's published scheduler_config.json (a PNDMScheduler).
    return PNDMScheduler(**SD15, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=steps_offset)


def reference_ddim():
    # Stable Diffusion v1.5's DDIM settings.
    return DDIMScheduler(**SD15, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def test_schedule_equals_reference():
    ref = DDPMScheduler(**SD15).alphas_cumprod
    assert torch.allclose(alphas_cumprod(), ref, rtol=1e-6, atol=0)
    assert abs(alphas_cumprod()[0].item() - 0.99915) < 1e-6


@pytest.mark.parametrize("steps,offset", [(50, 0), (50, 1), (25, 0), (7, 0), (1, 0)])
def test_pndm_timesteps(steps, offset):
    ref = reference_pndm(offset)
    ref.set_timesteps(steps)
    ours = PNDM(steps, offset)
    assert ours.timesteps == ref.timesteps.tolist()
    if steps > 1:
        assert len(ours.timesteps) == steps + 1  # 50 steps = 51 UNet evaluations
    if (steps, offset) == (50, 0):
        assert ours.timesteps[:4] == [980, 960, 960, 940] and ours.timesteps[-1] == 0


@pytest.mark.parametrize("steps", [50, 30, 1])
def test_ddim_timesteps(steps):
    ref = reference_ddim()
    ref.set_timesteps(steps)
    assert DDIM(steps).timesteps == ref.timesteps.tolist()


def run(ours, ref, steps):
    """Drive both samplers with the same fake ε's (a smooth function of x and t) from the same
    start, checking every step's output."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    x_ref = x.clone()
    for t in ours.timesteps:
        eps = torch.tanh(x * 0.7 + t / 500.0)
        eps_ref = torch.tanh(x_ref * 0.7 + t / 500.0)
        x = ours.step(eps, t, x)
        x_ref = ref.step(eps_ref, t, x_ref).prev_sample
        assert torch.allclose(x, x_ref, rtol=1e-5, atol=1e-5), f"step at t={t}"
    return x


@pytest.mark.parametrize("steps,offset", [(50, 0), (10, 1), (3, 0), (1, 0)])
def test_pndm_steps_equal_reference(steps, offset):
    ref = reference_pndm(offset)
    ref.set_timesteps(steps)
    run(PNDM(steps, offset), ref, steps)


@pytest.mark.parametrize("steps", [50, 10])
def test_ddim_steps_equal_reference(steps):
    ref = reference_ddim()
    ref.set_timesteps(steps)
    run(DDIM(steps), ref, steps)


def reference_dpm(tmp_path, steps, offset, explicit_spacing):
    """diffusers' DPMSolverMultistepScheduler as `from_config` builds it from a folder's PNDM config:
    the file as diffusers writes it (timestep_spacing named), or as BLIP-Diffusion's published one
    (a diffusers 0.16 file, without it). -> (the reference, the config dict our sampler reads)."""
    import json
    from diffusers import DPMSolverMultistepScheduler
    reference_pndm(offset).save_pretrained(tmp_path)
    path = tmp_path / "scheduler_config.json"
    config = json.loads(path.read_text())
    if not explicit_spacing:
        del config["timestep_spacing"]
        path.write_text(json.dumps(config))
    ref = DPMSolverMultistepScheduler.from_config(PNDMScheduler.from_pretrained(tmp_path).config)
    ref.set_timesteps(steps)
    return ref, config


@pytest.mark.parametrize("steps,offset,explicit", [(20, 0, True), (8, 0, True), (25, 1, True), (1, 0, True),
                                                   (20, 0, False), (8, 0, False), (3, 0, False)])
def test_dpm_solver_equals_reference(tmp_path, steps, offset, explicit):
    ref, config = reference_dpm(tmp_path, steps, offset, explicit)
    ours = make_sampler("dpm", steps, config)
    assert ours.timesteps == ref.timesteps.tolist() and len(ours.timesteps) == steps  # N steps, N UNet calls
    if (steps, offset, explicit) == (20, 0, True):
        assert ours.timesteps[:3] == [940, 893, 846]  # leading: (N - i)·⌊1000/21⌋
    if (steps, explicit) == (20, False):
        assert ours.timesteps[:3] == [999, 949, 899]  # linspace over 0..999
    run(ours, ref, steps)


def test_make_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        make_sampler("pndm", 0)
    assert len(set(make_sampler("dpm", 999).timesteps)) == 999
    with pytest.raises(ValueError, match="at most 999 steps"):  # its timesteps would repeat
        make_sampler("dpm", 1000)
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_sampler("euler", 10)
