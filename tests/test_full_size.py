"""Forward parity at the published sizes (slow: minutes and several GB on a CPU; `pytest -m slow`).

The fast tests check the full-size key sets and parameter counts on the meta device and the
forward passes on small models; these run the real sizes once, with the reference's random
initialisation copied into ours."""

import os

import pytest
import torch

from reference import assert_close, perturb

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def all_threads():
    # Full-size models do want every core (conftest.py sets one thread for the tiny ones).
    saved = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count())
    yield
    torch.set_num_threads(saved)


def copy_into(ours_cls, ref, *args, drop=()):
    ours = ours_cls(*args)
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k not in drop})
    return ours.eval()


@torch.no_grad()
def test_unet_sd15():
    from diffusers import UNet2DConditionModel

    from unet import UNet, UNetConfig

    torch.manual_seed(0)
    ref = perturb(UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8), scale=0.01).eval()
    ours = copy_into(UNet, ref, UNetConfig())
    x, text = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
    assert_close(ours(x, 500, text), ref(x, 500, text).sample)


@torch.no_grad()
def test_vae_sd15():
    from diffusers import AutoencoderKL as Reference

    from vae import AutoencoderKL

    torch.manual_seed(0)
    ref = perturb(Reference(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512), scale=0.01)
    ours = copy_into(AutoencoderKL, ref.eval())
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    assert_close(ours.encode(x).mean, ref.encode(x).latent_dist.mean)
    z = torch.randn(1, 4, 32, 32)
    assert_close(ours.decode(z), ref.decode(z).sample)


@torch.no_grad()
def test_text_encoder_sd15_with_subject_embeddings():
    from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import CLIPTextConfig

    from clip import CLIPTextModel

    torch.manual_seed(0)
    ref = perturb(ContextCLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                      projection_dim=768, hidden_act="quick_gelu")), scale=0.01).eval()
    ours = copy_into(CLIPTextModel, ref, drop=("text_model.embeddings.position_ids",))
    ids, ctx = torch.randint(0, 49408, (2, 61)), torch.randn(2, 16, 768)
    out_ref = ref(input_ids=ids, ctx_embeddings=ctx, ctx_begin_pos=[2, 2])[0]
    assert_close(ours(ids, ctx_embeddings=ctx), out_ref)
