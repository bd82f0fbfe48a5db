"""Parity of vae.py with diffusers' AutoencoderKL, in every published weight layout, and its training
objective (train.py --stage vae) against the KL of diffusers' posterior."""

import json
import os

import pytest
import torch
from diffusers import AutoencoderKL as RefAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import save_file

import vae
from checkpoint import CheckpointError, config_from_dict
from reference import assert_close, perturb
from vae import (KL_WEIGHT, SCALING_FACTOR, AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian, autoencoder_loss,
                 compvis_name, measure_scaling_factor)

# SD-1.5's vae/config.json as published (BLIP-Diffusion's vae/ carries the same values).
SD15_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.16.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}
# Two levels, so both a downsampler and an upsampler exist and the decoder order flip is visible.
TINY_CONFIG = dict(SD15_CONFIG, block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                   up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8, sample_size=16)
LEGACY_NAMES = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    model = RefAutoencoderKL(**{k: v for k, v in TINY_CONFIG.items() if not k.startswith("_")})
    return perturb(model, seed=1).eval()


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def assert_matches_reference(ours, ref, image):
    with torch.no_grad():
        post, ref_post = ours.encode(image), ref.encode(image).latent_dist
        assert_close(post.mean, ref_post.mean)
        assert_close(post.logvar, ref_post.logvar)
        assert_close(post.mode(), ref_post.mode())
        z = post.sample(torch.Generator().manual_seed(3))
        assert_close(z, ref_post.sample(torch.Generator().manual_seed(3)))
        assert_close(ours.decode(z), ref.decode(z).sample)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_from_pretrained_matches_reference(ref, image, tmp_path, safe):
    ref.save_pretrained(tmp_path, safe_serialization=safe)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    assert ours.config == config_from_dict(AutoencoderKLConfig, TINY_CONFIG)
    assert_matches_reference(ours, ref, image)


def write_legacy_folder(ref, folder):
    """A folder as diffusers <= 0.16 wrote it: the attention projections named query/key/value/proj_attn."""
    sd = {}
    for k, v in ref.state_dict().items():
        for new, old in LEGACY_NAMES.items():
            k = k.replace(".attentions.0." + new, ".attentions.0." + old)
        sd[k] = v.contiguous()
    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(TINY_CONFIG, f)
    return sd


def test_legacy_attention_names_load(ref, image, tmp_path):
    sd = write_legacy_folder(ref, tmp_path)
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in sd
    # diffusers itself puts every tensor back in place, so these are the older names it knows.
    loaded = RefAutoencoderKL.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ref.state_dict().items())
    assert_matches_reference(AutoencoderKL.from_pretrained(tmp_path), ref, image)


def test_missing_tensor_is_refused(ref, tmp_path):
    sd = write_legacy_folder(ref, tmp_path)
    del sd["decoder.mid_block.attentions.0.query.bias"]
    save_file(sd, os.path.join(tmp_path, "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"decoder\.mid_block\.attentions\.0\.to_q\.bias"):
        AutoencoderKL.from_pretrained(tmp_path)


def to_compvis(sd, num_levels):
    """A diffusers VAE state dict in the single-file layout, attention as 1x1 convs, with a UNet key beside it."""
    out = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    for k, v in sd.items():
        if ".attentions.0." in k and k.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out["first_stage_model." + compvis_name(k, num_levels)] = v
    return out


@pytest.mark.parametrize("config", [TINY_CONFIG, SD15_CONFIG], ids=["tiny", "sd15-meta"])
def test_compvis_names_invert_diffusers_converter(ref, config):
    """diffusers' own single-file converter, run over our CompVis names, gives back the diffusers dict."""
    if config is TINY_CONFIG:
        sd = ref.state_dict()
    else:
        with torch.device("meta"):
            sd = RefAutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")}).state_dict()
    back = convert_ldm_vae_checkpoint(to_compvis(sd, len(config["block_out_channels"])), config)
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        assert back[k].shape == v.shape, k
        if not v.is_meta:
            assert torch.equal(back[k], v), k


def test_from_compvis_matches_reference(ref, image):
    cfg = config_from_dict(AutoencoderKLConfig, TINY_CONFIG)
    ckpt = to_compvis(ref.state_dict(), len(cfg.block_out_channels))
    assert ckpt["first_stage_model.decoder.up.0.block.1.conv1.weight"].shape[0] == 16  # full-size level is 0
    assert_matches_reference(AutoencoderKL.from_compvis(ckpt, cfg), ref, image)
    del ckpt["first_stage_model.encoder.mid.attn_1.k.weight"]
    with pytest.raises(CheckpointError, match=r"encoder\.mid_block\.attentions\.0\.to_k\.weight"):
        AutoencoderKL.from_compvis(ckpt, cfg)


def test_posterior_clamps_and_samples_as_reference():
    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(4)) * 40  # beyond [-30, 20]
    ours, theirs = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert torch.equal(ours.logvar, theirs.logvar) and ours.logvar.min() == -30 and ours.logvar.max() == 20
    assert torch.equal(ours.std, theirs.std)
    torch.manual_seed(5)
    a = ours.sample()
    torch.manual_seed(5)
    assert torch.equal(a, theirs.sample())  # no generator: both draw from the global RNG


def test_full_size_equals_reference_on_meta():
    cfg = config_from_dict(AutoencoderKLConfig, SD15_CONFIG)
    assert cfg == AutoencoderKLConfig()  # our defaults are the published SD-1.5 sizes
    assert cfg.scaling_factor == SCALING_FACTOR == SD15_CONFIG["scaling_factor"]
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
        theirs = RefAutoencoderKL(**{k: v for k, v in SD15_CONFIG.items() if not k.startswith("_")})
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        AutoencoderKLConfig(down_block_types=("AttnDownEncoderBlock2D",) * 4)


def test_autoencoder_loss_is_l1_plus_ldms_weighted_kl(ref, image, tmp_path, monkeypatch):
    # train.py --stage vae: the L1 reconstruction of z = mean + std * noise, plus the KL to N(0, I) that
    # diffusers' posterior computes (LDM's, summed per sample), averaged and spread over the pixels.
    assert KL_WEIGHT == 1e-6  # LDM's kl_weight
    monkeypatch.setattr(vae, "KL_WEIGHT", 1.0)  # at 1e-6 the KL term is below float32's resolution of the sum
    ref.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        post = DiagonalGaussianDistribution(ours.quant_conv(ours.encoder(image)))
        l1 = (ours.decode(post.mean + post.std * noise) - image).abs().mean()
        kl = post.kl().mean() / image[0].numel()
        got = autoencoder_loss(ours, image, noise)
    assert kl > 0.01 and torch.allclose(got, l1 + kl, rtol=1e-5, atol=0)


def test_measured_scaling_factor_gives_unit_variance_latents(ref, tmp_path):
    ref.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1
    scale = measure_scaling_factor(ours, images)
    assert scale == measure_scaling_factor(ours, images)  # the same draw every time
    with torch.no_grad():
        post = ours.encode(images)
        z = (post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(0))) * scale
    assert abs(float(z.std()) - 1) < 1e-3
