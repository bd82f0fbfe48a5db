"""unet.py against diffusers' UNet2DConditionModel: tiny random models saved in the published layout,
the full SD-1.5 size on the meta device, the CompVis single-file names against diffusers' own
converter, and the attention-controller hook prompt-to-prompt editing relies on."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.attention_processor import Attention as RefAttention

from checkpoint import CheckpointError
from reference import assert_close, perturb
from unet import COMPVIS_PREFIX, UNet, UNetConfig, compvis_key

TINY = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2,
            norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2, sample_size=8)
# Same shape, other published knobs: 32 groups, 8 heads of 4 channels, [sin, cos] with a shift,
# a mid-block output scale.
TINY_B = dict(TINY, norm_num_groups=32, attention_head_dim=8, flip_sin_to_cos=False, freq_shift=1,
              mid_block_scale_factor=2.0)
SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
            cross_attention_dim=768, sample_size=64,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TEXT_LEN = 5


def reference(kw=TINY, seed=0):
    torch.manual_seed(seed)
    return perturb(UNet2DConditionModel(**kw), seed).eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = reference()
    folder = tmp_path_factory.mktemp("unet")
    ref.save_pretrained(folder)
    return ref, UNet.from_pretrained(folder).eval()


def inputs(batch=2, size=(8, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, *size, generator=g), torch.randn(batch, TEXT_LEN, 32, generator=g)


@pytest.mark.parametrize("kw, safe", [(TINY, True), (TINY, False), (TINY_B, True)],
                         ids=["safetensors", "bin", "groups32_heads8_sin_shift"])
@torch.no_grad()
def test_parity_with_diffusers(tmp_path, kw, safe):
    ref = reference(kw)
    ref.save_pretrained(tmp_path, safe_serialization=safe)
    ours = UNet.from_pretrained(tmp_path).eval()
    x, text = inputs()
    for t in (torch.tensor([10, 700]), 981):
        assert_close(ours(x, t, text), ref(x, t, text).sample)


@torch.no_grad()
def test_timestep_forms_agree(pair):
    _, ours = pair
    x, text = inputs()
    out = ours(x, torch.tensor([37, 37]), text)
    for t in (37, 37.0, torch.tensor(37), torch.tensor([37.0])):
        torch.testing.assert_close(ours(x, t, text), out, rtol=0, atol=0)


@torch.no_grad()
def test_parity_odd_latent_size(pair):
    # Sides not divisible by 2**levels: the upsampler must aim at the skip connection's size.
    ref, ours = pair
    x, text = inputs(size=(9, 7))
    assert_close(ours(x, 500, text), ref(x, 500, text).sample)


@torch.no_grad()
def test_parity_with_controlnet_residuals(pair):
    ref, ours = pair
    x, text = inputs()
    g = torch.Generator().manual_seed(2)
    # One residual per skip connection: conv_in, 2 ResBlocks + downsampler at 8x8/32ch, 2 at 4x4/64ch.
    shapes = [(32, 8, 8)] * 3 + [(32, 4, 4)] + [(64, 4, 4)] * 2
    down = [torch.randn(2, *s, generator=g) for s in shapes]
    mid = torch.randn(2, 64, 4, 4, generator=g)
    plain = ours(x, 100, text)
    with_res = ours(x, 100, text, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    expected = ref(x, 100, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert_close(with_res, expected)
    assert (with_res - plain).abs().max() > 1e-3
    with pytest.raises(ValueError):
        ours(x, 100, text, down_block_additional_residuals=down)


@torch.no_grad()
def test_identity_controller_equals_sdpa_path(pair):
    _, ours = pair
    x, text = inputs()
    assert_close(ours(x, 250, text, controller=lambda probs, place: probs), ours(x, 250, text))


@torch.no_grad()
def test_controller_edits_cross_attention(pair):
    _, ours = pair
    x, text = inputs()

    def only_first_token(probs, place):
        if place.kind != "cross":
            return probs
        probs = torch.zeros_like(probs)
        probs[..., 0] = 1.0
        return probs

    plain = ours(x, 250, text)
    assert (ours(x, 250, text, controller=only_first_token) - plain).abs().max() > 1e-3
    # The edited maps are really used: attending only to token 0 ignores every other text token.
    other = text.clone()
    other[:, 1:] = torch.randn_like(other[:, 1:])
    torch.testing.assert_close(ours(x, 250, other, controller=only_first_token),
                               ours(x, 250, text, controller=only_first_token))


@torch.no_grad()
def test_controller_sees_every_attention_in_forward_order(pair):
    ref, ours = pair
    x, text = inputs(size=(8, 8))
    # The forward order of the reference's attention layers, by name, from hooks.
    ref_order = []
    for name, m in ref.named_modules():
        if isinstance(m, RefAttention):
            m.register_forward_hook(lambda mod, args, out, name=name: ref_order.append(name))
    ref(x, 250, text)
    calls = []
    ours(x, 250, text, controller=lambda probs, place: calls.append((place, probs.shape)) or probs)

    # Transformer blocks in TINY: 2 in the CrossAttn down level, 1 in the mid block, 3 in the
    # CrossAttn up level -> one self and one cross call each.
    assert len(calls) == 2 * (2 + 1 + 3)
    assert [place.name for place, _ in calls] == ref_order
    assert [place.index for place, _ in calls] == list(range(len(calls)))
    for place, shape in calls:
        assert place.kind == ("self" if place.name.endswith("attn1") else "cross")
        assert place.block == {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[place.name.split(".")[0]]
        tokens = 16 if place.block == "mid" else 64  # 4x4 at the bottom, 8x8 at the top level
        assert shape == (2, TINY["attention_head_dim"], tokens, tokens if place.kind == "self" else TEXT_LEN)


def test_sd15_controller_places():
    # SD-1.5: 16 transformer blocks -> 32 controller calls, traced on the meta device (no compute).
    with torch.device("meta"):
        ours = UNet(UNetConfig())
        calls = []
        ours(torch.empty(1, 4, 64, 64), 1, torch.empty(1, 77, 768),
             controller=lambda probs, place: calls.append((place, probs.shape)) or probs)
    assert len(calls) == 32 and [p.index for p, _ in calls] == list(range(32))
    assert [p.block for p, _ in calls] == ["down"] * 12 + ["mid"] * 2 + ["up"] * 18
    queries = [s[-2] for _, s in calls]
    assert queries[:4] == [4096] * 4 and queries[12:14] == [64, 64] and queries[-6:] == [4096] * 6
    assert all(s[1] == 8 and s[-1] == (77 if p.kind == "cross" else s[-2]) for p, s in calls)


def test_full_size_matches_diffusers_on_meta():
    with torch.device("meta"):
        ref = UNet2DConditionModel(**SD15)
        ours = UNet(UNetConfig())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == ref_shapes


def to_compvis(state_dict, cfg):
    return {COMPVIS_PREFIX + compvis_key(k, cfg): v for k, v in state_dict.items()}


@pytest.mark.parametrize("kw, cfg", [(TINY, UNetConfig(**TINY)), (SD15, UNetConfig())], ids=["tiny", "sd15"])
def test_compvis_names_match_diffusers_converter(kw, cfg):
    # diffusers' single-file converter is the authority on the CompVis layout: our names mapped to
    # CompVis and converted back by it must give exactly the original state dict.
    torch.manual_seed(0)
    if kw is SD15:
        # Full size without memory: distinct tiny tensors stand in for the weights; names are checked.
        with torch.device("meta"):
            ref = UNet2DConditionModel(**SD15)
        sd = {k: torch.full((1,), float(i)) for i, k in enumerate(ref.state_dict())}
    else:
        ref = reference(kw)
        sd = ref.state_dict()
    back = convert_ldm_unet_checkpoint(to_compvis(sd, cfg), dict(ref.config))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@torch.no_grad()
def test_from_compvis_parity_and_strictness(pair):
    ref, _ = pair
    cfg = UNetConfig(**TINY)
    single_file = to_compvis(ref.state_dict(), cfg)
    # The other components of the single file are ignored (they load separately).
    single_file["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)
    single_file["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.zeros(1)
    ours = UNet.from_compvis(single_file, cfg).eval()
    x, text = inputs()
    assert_close(ours(x, 42, text), ref(x, 42, text).sample)

    missing = dict(single_file)
    del missing[COMPVIS_PREFIX + "middle_block.1.proj_in.weight"]
    with pytest.raises(CheckpointError, match="mid_block.attentions.0.proj_in.weight"):
        UNet.from_compvis(missing, cfg)
    extra = dict(single_file, **{COMPVIS_PREFIX + "input_blocks.99.0.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="input_blocks.99.0.weight"):
        UNet.from_compvis(extra, cfg)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16, attention_head_dim=2,
                     norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    model = UNet(cfg).train()
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    grads = []
    for on in (False, True):
        model.gradient_checkpointing = on
        model.zero_grad()
        model(x, 10, text).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])
