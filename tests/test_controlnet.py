"""controlnet.py against diffusers' ControlNetModel and BlipDiffusionControlNetPipeline on tiny random
models in the published layout, the full published size on the meta device, and the Canny detector
on shapes whose edges are known."""

import json

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image
from scipy import ndimage

from blipdiff import BlipDiffusion
from checkpoint import CheckpointError
from controlnet import Control, ControlNet, ControlNetConfig, canny, canny_control_image, control_pixels
from reference import assert_close, perturb

# Fits the tiny UNet of reference.tiny_reference_pipeline. Its VAE has 2 levels (pixels / 2 = latent),
# so the control-image embedder has 2 levels too: one stride-2 step.
TINY = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            layers_per_block=1, cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
            conditioning_embedding_out_channels=(8, 16))
SIZE = dict(height=32, width=24)  # not square, so a swapped height and width shows


def reference(kw=TINY, seed=0):
    torch.manual_seed(seed)
    return perturb(ControlNetModel(**kw), seed, scale=0.05).eval()


def inputs(batch=2, size=(8, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, *size, generator=g), torch.randn(batch, 5, 32, generator=g),
            torch.rand(batch, 3, 2 * size[0], 2 * size[1], generator=g))


BGR = dict(TINY, controlnet_conditioning_channel_order="bgr", layers_per_block=2)


@pytest.mark.parametrize("kw, safe", [(TINY, True), (TINY, False), (BGR, True)],
                         ids=["safetensors", "bin", "bgr_two_layers"])
@torch.no_grad()
def test_parity_with_diffusers(tmp_path, kw, safe):
    ref = reference(kw)
    ref.save_pretrained(tmp_path, safe_serialization=safe)
    ours = ControlNet.from_pretrained(str(tmp_path)).eval()
    x, text, cond = inputs()
    for t, scale in ((torch.tensor([10, 700]), 1.0), (981, 0.6)):
        down, mid = ours(x, t, text, cond, scale)
        ref_down, ref_mid = ref(x, t, encoder_hidden_states=text, controlnet_cond=cond, conditioning_scale=scale,
                                return_dict=False)
        assert len(down) == len(ref_down) == 1 + 2 * kw["layers_per_block"] + 1
        for a, b in zip(down, ref_down):
            assert_close(a, b)
        assert_close(mid, ref_mid)


def test_unsupported_options_refused(tmp_path):
    reference().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, global_pool_conditions=True)))
    with pytest.raises(CheckpointError, match="global_pool_conditions"):
        ControlNet.from_pretrained(str(tmp_path))


def test_fresh_controlnet_changes_nothing():
    # Zero convolutions: before training every residual is exactly zero.
    torch.manual_seed(0)
    x, text, cond = inputs()
    down, mid = ControlNet(ControlNetConfig(**TINY))(x, 5, text, cond)
    assert all(r.abs().max() == 0 for r in down) and mid.abs().max() == 0


def test_full_size_matches_diffusers_on_meta():
    # lllyasviel/sd-controlnet-canny's config: diffusers' defaults but for cross_attention_dim.
    with torch.device("meta"):
        ref = ControlNetModel(cross_attention_dim=768)
        ours = ControlNet(ControlNetConfig())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert not list(ours.buffers())


def test_control_pixels_equal_reference_preprocessing():
    from diffusers.pipelines.blip_diffusion.blip_image_processing import BlipImageProcessor

    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(30, 41, 3) * 255).astype(np.uint8))
    ref = BlipImageProcessor().preprocess(image, size={"width": 24, "height": 32}, do_rescale=True,
                                          do_center_crop=False, do_normalize=False, return_tensors="pt")
    ours = control_pixels(image, 32, 24)
    assert ours.shape == (1, 3, 32, 24)
    torch.testing.assert_close(ours, ref["pixel_values"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The whole pipeline
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tiny_pipeline, tmp_path_factory):
    from diffusers import BlipDiffusionControlNetPipeline

    pipe, folder = tiny_pipeline
    ref_controlnet = reference()
    controlnet_folder = tmp_path_factory.mktemp("controlnet")
    ref_controlnet.save_pretrained(controlnet_folder)  # the published controlnet/ holds safetensors
    ref = BlipDiffusionControlNetPipeline(**pipe.components, controlnet=ref_controlnet, ctx_begin_pos=2,
                                          mean=pipe.config.mean, std=pipe.config.std)
    ref.set_progress_bar_config(disable=True)
    return ref, BlipDiffusion.from_pretrained(folder), ControlNet.from_pretrained(str(controlnet_folder)).eval()


def picture(seed, h=40, w=30):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))


def disc(h=32, w=24):
    yy, xx = np.mgrid[:h, :w]
    return Image.fromarray(np.where((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < 64, 220, 30).astype(np.uint8))


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_generate_equals_reference_pipeline(models, guidance):
    ref, ours, controlnet = models
    control = canny_control_image(disc(), 30, 70)
    expected = ref(prompt=["on a marble table"], reference_image=picture(0), condtioning_image=control,  # (sic)
                   source_subject_category=["dog"], target_subject_category=["dog"], guidance_scale=guidance,
                   num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(4),
                   **SIZE).images
    out = ours.generate("on a marble table", [picture(0)], "dog", guidance=guidance, steps=3, seed=4,
                        control=Control(controlnet, control), output="np", progress=False, **SIZE)
    assert out.shape == expected.shape == (1, 32, 24, 3)
    assert np.abs(out - expected).max() <= 1e-4
    plain = ours.generate("on a marble table", [picture(0)], "dog", guidance=guidance, steps=3, seed=4,
                          output="np", progress=False, **SIZE)
    assert np.abs(out - plain).max() > 1e-3  # the control really acts


class TwoControlNets(torch.nn.Module):
    """Two ControlNets in the reference pipeline, which takes one: diffusers' own MultiControlNetModel
    (each net on its own image at its own scale, the residuals summed), given the pipeline's control
    image for the first and a second one (prepared as the pipeline prepares one) for the second."""

    def __init__(self, first, second, second_image, scales):
        super().__init__()
        from diffusers.pipelines.controlnet.multicontrolnet import MultiControlNetModel
        self.nets, self.second_image, self.scales = MultiControlNetModel([first, second]), second_image, scales

    @property
    def dtype(self):
        return self.nets.nets[0].dtype

    @property
    def device(self):
        return self.nets.nets[0].device

    def forward(self, x, t, encoder_hidden_states, controlnet_cond, return_dict=False):
        return self.nets(x, t, encoder_hidden_states=encoder_hidden_states,
                         controlnet_cond=[controlnet_cond, self.second_image], conditioning_scale=list(self.scales),
                         return_dict=False)


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_two_controlnets_equal_reference_pipeline(models, tmp_path, guidance):
    ref, ours, controlnet = models
    second_ref = reference(seed=5)
    second_ref.save_pretrained(tmp_path / "second")
    second = ControlNet.from_pretrained(str(tmp_path / "second")).eval()
    edges, other = canny_control_image(disc(), 30, 70), picture(6, 32, 24)
    second_image = ref.prepare_control_image(other, 24, 32, 1, 1, "cpu", torch.float32, guidance > 1.0)
    single = ref.controlnet
    ref.controlnet = TwoControlNets(single, second_ref, second_image, (0.8, 0.5))
    try:
        expected = ref(prompt=["on a marble table"], reference_image=picture(0), condtioning_image=edges,  # (sic)
                       source_subject_category=["dog"], target_subject_category=["dog"], guidance_scale=guidance,
                       num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(4),
                       **SIZE).images
    finally:
        ref.controlnet = single
    out = ours.generate("on a marble table", [picture(0)], "dog", guidance=guidance, steps=3, seed=4,
                        control=[Control(controlnet, edges, 0.8), Control(second, other, 0.5)], output="np",
                        progress=False, **SIZE)
    assert np.abs(out - expected).max() <= 2e-3
    one = ours.generate("on a marble table", [picture(0)], "dog", guidance=guidance, steps=3, seed=4,
                        control=Control(controlnet, edges, 0.8), output="np", progress=False, **SIZE)
    assert np.abs(out - one).max() > 1e-3  # the second ControlNet acts


def test_zero_control_scale_is_plain_generation(models):
    _, ours, controlnet = models
    kw = dict(steps=2, seed=1, output="np", progress=False, **SIZE)
    plain = ours.generate("at night", [picture(1)], "dog", **kw)
    off = ours.generate("at night", [picture(1)], "dog", control=Control(controlnet, picture(2), 0.0), **kw)
    assert np.abs(off - plain).max() <= 1e-6
    with pytest.raises(ValueError, match="control image"):
        ours.generate("at night", [picture(1)], "dog", control=Control(controlnet, None), **kw)


def test_several_controlnets_sum_their_scaled_residuals(models):
    """A list of Controls adds each ControlNet's residuals times its own scale: the same net twice at
    half scale is that net once at full scale; a second net at scale 0 changes nothing."""
    _, ours, controlnet = models
    kw = dict(steps=2, seed=3, output="np", progress=False, **SIZE)
    edges = canny_control_image(disc(), 30, 70)
    once = ours.generate("at night", [picture(1)], "dog", control=Control(controlnet, edges), **kw)
    halves = ours.generate("at night", [picture(1)], "dog",
                           control=[Control(controlnet, edges, 0.5), Control(controlnet, edges, 0.5)], **kw)
    idle = ours.generate("at night", [picture(1)], "dog",
                         control=[Control(controlnet, edges), Control(controlnet, picture(2), 0.0)], **kw)
    assert np.abs(halves - once).max() <= 1e-5 and np.abs(idle - once).max() <= 1e-6


# ---------------------------------------------------------------------------------------------
# Canny
# ---------------------------------------------------------------------------------------------

def near(mask, radius=1):
    """Pixels within `radius` (chessboard distance) of the mask."""
    return ndimage.binary_dilation(mask, np.ones((2 * radius + 1,) * 2, bool))


def boundary(inside):
    """Pixels of the shape with a 4-neighbour outside it, and outside pixels with one inside."""
    return inside ^ ndimage.binary_erosion(inside) | ndimage.binary_dilation(inside) & ~inside


@pytest.mark.parametrize("shape, sigma", [("square", 0.0), ("disc", 0.0), ("disc", 1.0)])
def test_canny_finds_the_boundary_and_nothing_else(shape, sigma):
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[:64, :64]
    inside = ((abs(yy - 31.5) < 12) & (abs(xx - 29.5) < 16) if shape == "square"
              else (yy - 30.3) ** 2 + (xx - 33.1) ** 2 < 17.5 ** 2)
    image = np.where(inside, 190.0, 60.0) + rng.randn(64, 64) * 3  # mild noise
    edges = canny(np.clip(image, 0, 255).round().astype(np.uint8), sigma=sigma) > 0
    true = boundary(inside)
    assert edges.dtype == bool and edges.any()
    assert not (edges & ~near(true)).any()  # nothing farther than 1 px from the boundary
    assert near(edges)[true].mean() > 0.97  # and the boundary is found (corners may be cut)


def steps_image(contrasts=(10, 30, 60, 120), rows=20):
    """Vertical steps of the given heights, 12 px apart, on a flat background."""
    levels = np.cumsum((0,) + contrasts)
    return np.tile(np.repeat(levels, 12), (rows, 1)).astype(np.uint8)


def test_canny_thresholds_follow_the_gradient_magnitude():
    # A vertical step of height d has Sobel magnitude |gx| + |gy| = 4d on its two sides; suppression
    # keeps the left one. Steps 10, 30, 60, 120 -> magnitudes 40, 120, 240, 480.
    def found(low, high):
        return list(np.flatnonzero((canny(steps_image(), low, high) > 0).all(axis=0)))

    assert found(20, 35) == [11, 23, 35, 47]
    assert found(100, 200) == [35, 47]  # 120 is a candidate only, with no strong edge beside it
    assert found(100, 300) == [47]  # a higher high threshold: fewer edges
    assert found(200, 100) == found(100, 200)  # the order of the thresholds does not matter, as in OpenCV
    assert (canny(steps_image(), 500, 600) == 0).all()


def test_canny_hysteresis_keeps_weak_edges_joined_to_strong_ones():
    image = np.zeros((40, 40))
    image[:, 10:20] += 30  # a bar with weak sides (magnitude 120) all the way down ...
    image[:20, 10:20] += 30  # ... made strong (240) on its top half
    image[:, 30:] += 30  # another weak step, joined to nothing strong
    edges = canny(image.astype(np.uint8), 100, 200) > 0
    assert edges[:15, 9].all() and edges[25:, 9].all()  # the weak half follows the strong half
    assert not edges[:, 25:].any()


def test_canny_colour_takes_the_strongest_channel():
    # An edge in the blue channel alone: grey would see 0.114 x 175 = 20 (magnitude 80 < 100);
    # OpenCV's colour Canny, which LAVIS runs on RGB, takes the strongest channel per pixel.
    rgb = np.full((20, 20, 3), 80, np.uint8)
    rgb[:, 10:, 2] = 255
    assert (canny(rgb)[:, 9] == 255).all()
    assert (canny(Image.fromarray(rgb).convert("L")) == 0).all()
    control = canny_control_image(Image.fromarray(rgb))
    assert control.mode == "RGB" and (np.asarray(control)[..., 0] == canny(rgb)).all()


def test_canny_equals_opencv():
    cv2 = pytest.importorskip("cv2")  # not a dependency; run where OpenCV happens to be installed
    rng = np.random.RandomState(0)
    for i in range(4):
        image = ndimage.gaussian_filter(rng.rand(50 + i, 60, 3) * 255, (2, 2, 0)) * 3 - 200
        image = np.clip(image + rng.randn(*image.shape) * 4, 0, 255).astype(np.uint8)
        for low, high in ((30, 70), (100, 200)):
            assert np.array_equal(canny(image, low, high), cv2.Canny(image, low, high))
            assert np.array_equal(canny(image[..., 0], low, high), cv2.Canny(image[..., :1].copy(), low, high))
