"""ControlNet: structure control for BLIP-Diffusion (Li et al. 2023: structure-controlled generation
and zero-shot style transfer).

BLIP-Diffusion's subject embeddings live in the text encoder, so the UNet is untouched and a
ControlNet trained for Stable Diffusion v1.5 plugs in as it is (Zhang et al. 2023, "Adding Conditional
Control to Text-to-Image Diffusion Models"). For zero-shot style transfer the style image is the
subject and the edges of another picture are the structure: LAVIS's stylization notebook runs the
published `lllyasviel/sd-controlnet-canny`; LAVIS also offers -depth and -hed.

A ControlNet is a trainable copy of the UNet's encoder: conv_in, the time embedding, the down levels
and the mid block (the blocks of `unet.py`, reused). A small conv net embeds the control image to
latent size and adds it after conv_in. Every skip connection and the mid-block output then pass
through a 1x1 "zero convolution" (initialised to zero, so training starts from the plain UNet) and
are added to the UNet's own skips (`UNet.forward`'s `down_block_additional_residuals` and
`mid_block_additional_residual`).

Must equal diffusers 0.33.1's `ControlNetModel` (guess_mode off, as BLIP-Diffusion's pipelines run it).
Module names equal its state dict, so `lllyasviel/sd-controlnet-{canny,depth,hed}` and
`Salesforce/blipdiffusion-controlnet/controlnet/` load with `ControlNet.from_pretrained(folder)`.

Also here: a Canny edge detector equal to OpenCV's `cv2.Canny` (what LAVIS and controlnet_aux call to
make the canny model's input), and the control-image preprocessing of diffusers'
`BlipDiffusionControlNetPipeline` (pipelines/controlnet/pipeline_controlnet_blip_diffusion.py).

Letters in shape comments: B batch, C channels, H, W the latent's height and width (8H, 8W in pixels).
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from checkpoint import CheckpointError, config_from_dict, load_strict, read_folder
from data import to_rgb
from unet import MidBlock, TimestepEmbedding, encoder_levels, timestep_batch

# Canny thresholds on the 0-255 intensity scale. 100/200 is controlnet_aux's CannyDetector default,
# the value of lllyasviel's sd-controlnet-canny model card and annotator, and LAVIS's commented
# default: the edge density the published model was trained on. LAVIS's stylization notebook and the
# diffusers example use 30/70 on their kettle photo, which keeps fainter edges.
CANNY_LOW, CANNY_HIGH = 100, 200


@dataclass
class ControlNetConfig:
    # Field names are the keys of diffusers' ControlNetModel config.json; defaults are those of
    # lllyasviel/sd-controlnet-canny (also -depth, -hed and blipdiffusion-controlnet's controlnet/):
    # the sizes of SD-1.5's UNet encoder, which the ControlNet copies.
    in_channels: int = 4
    conditioning_channels: int = 3        # the control image is RGB (an edge map repeated 3 times)
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    layers_per_block: int = 2
    attention_head_dim: int = 8           # the number of heads, as in unet.UNetConfig
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    # Widths of the control-image embedder's levels; each level after the first halves the image, so
    # 4 entries take 512 pixels to the 64-pixel latent (the VAE's factor 8).
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    # "bgr" models get their control image's channels reversed, as diffusers does.
    controlnet_conditioning_channel_order: str = "rgb"

    def __post_init__(self):
        known = {"CrossAttnDownBlock2D", "DownBlock2D"}
        if (not set(self.down_block_types) <= known or self.act_fn != "silu"
                or not isinstance(self.attention_head_dim, int)
                or self.controlnet_conditioning_channel_order not in ("rgb", "bgr")):
            raise ValueError(f"unsupported ControlNet config (SD-1.5 blocks, silu, an int head count and "
                             f"rgb/bgr only): {self}")


# Published options that change the computation but no weight name or shape, so strict loading
# cannot notice them; only the value every SD-1.5 ControlNet above uses is accepted.
FIXED_OPTIONS = {"global_pool_conditions": False, "only_cross_attention": False}


def zero_conv(cin, cout, kernel=1):
    """A convolution whose weights and bias start at zero: an untrained ControlNet changes nothing."""
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ConditioningEmbedding(nn.Module):
    """Control image (B, 3, 8H, 8W) in [0, 1] -> features (B, C, H, W) added after the UNet's conv_in.

    conv_in, then per level a 3x3 conv and a stride-2 3x3 conv, SiLU after each, and a zero conv out
    (diffusers' ControlNetConditioningEmbedding; the ControlNet paper describes 4x4 kernels, ReLU and
    widths 16-128, the released models use these)."""

    def __init__(self, cin, widths, cout):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, widths[0], 3, padding=1)
        blocks = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks += [nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = zero_conv(widths[-1], cout, kernel=3)

    def forward(self, x):
        x = F.silu(self.conv_in(x))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


class ControlNet(nn.Module):
    """(z_t, t, text, control image) -> one residual per UNet skip connection, and one for the mid block."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.controlnet_cond_embedding = ConditioningEmbedding(
            cfg.conditioning_channels, cfg.conditioning_embedding_out_channels, ch[0])
        last = len(ch) - 1
        self.down_blocks = encoder_levels(cfg)
        self.mid_block = MidBlock(cfg, ch[-1])
        # One zero conv per skip connection, in the UNet's order: conv_in's output, then per level one
        # per ResBlock and one after the downsampler (all levels but the last).
        skips = [ch[0]] + [c for i, c in enumerate(ch) for _ in range(cfg.layers_per_block + (i < last))]
        self.controlnet_down_blocks = nn.ModuleList([zero_conv(c, c) for c in skips])
        self.controlnet_mid_block = zero_conv(ch[-1], ch[-1])

    def forward(self, sample, timestep, encoder_hidden_states, cond, scale=1.0):
        """sample (B, 4, H, W), timestep, encoder_hidden_states (B, M, 768), cond (B, 3, 8H, 8W) in
        [0, 1] -> (list of down residuals, mid residual), all multiplied by `scale` (diffusers'
        conditioning_scale with guess_mode off; BLIP-Diffusion's pipelines use 1.0)."""
        if self.config.controlnet_conditioning_channel_order == "bgr":
            cond = cond.flip(1)
        emb = self.time_embedding(timestep_batch(timestep, sample), sample.dtype)
        x = self.conv_in(sample) + self.controlnet_cond_embedding(cond.to(sample.dtype))
        skips = [x]
        for block in self.down_blocks:
            x, out = block(x, emb, encoder_hidden_states)
            skips += out
        x = self.mid_block(x, emb, encoder_hidden_states)
        down = [zero(s) * scale for s, zero in zip(skips, self.controlnet_down_blocks, strict=True)]
        return down, self.controlnet_mid_block(x) * scale

    @classmethod
    def from_pretrained(cls, folder):
        """A diffusers ControlNet folder (config.json + diffusion_pytorch_model.*): names load unchanged."""
        config, state_dict, source = read_folder(folder)
        for key, value in FIXED_OPTIONS.items():
            if config.get(key, value) != value:
                raise CheckpointError(f"{source}: {key}={config[key]!r} is not supported (only {value!r})")
        cfg = config_from_dict(ControlNetConfig, config)
        with torch.device("meta"):
            model = cls(cfg)
        return load_strict(model, state_dict, source)


class Control(NamedTuple):
    """One ControlNet at work in generation: the network, its control image (a PIL edge, depth or
    pose map) and the scale of its residuals (0 turns it off)."""
    net: ControlNet
    image: Image.Image
    scale: float = 1.0


def control_pixels(image, height, width):
    """A PIL control image -> (1, 3, height, width) float32 in [0, 1], as the reference prepares it:
    RGB, bicubic resize to (width, height), /255, no normalisation (diffusers' BlipImageProcessor with
    do_normalize=False; LAVIS resizes with LANCZOS instead). Run Canny at the output size: resizing an
    edge map blurs its one-pixel lines."""
    image = to_rgb(image).resize((width, height), Image.BICUBIC)
    x = (np.asarray(image, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None]  # (8H, 8W, 3) -> (1, 3, 8H, 8W)


# ---------------------------------------------------------------------------------------------
# Canny edges (Canny 1986), as OpenCV computes them
# ---------------------------------------------------------------------------------------------

# OpenCV's non-maximum suppression sorts gradient directions with integer tangents:
# tan(22.5 deg) in 15-bit fixed point.
TG22 = int(math.tan(math.pi / 8) * (1 << 15) + 0.5)


def canny(image, low=CANNY_LOW, high=CANNY_HIGH, sigma=0.0):
    """Edges of a PIL image or a (H, W) / (H, W, C) array with 0-255 values -> uint8 (H, W), 0 or 255.

    The steps of `cv2.Canny(image, low, high)` (aperture 3, L1 gradient), which LAVIS and controlnet_aux
    run on the RGB image; on 8-bit images the result equals OpenCV's pixel for pixel:
    1. 3x3 Sobel derivatives gx, gy per channel, borders replicated; magnitude |gx| + |gy|. With
       several channels each pixel takes the channel of largest magnitude (OpenCV's colour Canny).
    2. Non-maximum suppression: a pixel survives if its magnitude beats its two neighbours across the
       edge (horizontal, vertical or diagonal by the gradient direction, strictly on one side as
       OpenCV does, so a two-pixel-wide ridge keeps one pixel).
    3. Double threshold: magnitude > high is an edge; > low is a candidate, kept when 8-connected to
       an edge (hysteresis: connected components of the candidates, by scipy.ndimage.label).
    Classic Canny first blurs with a Gaussian; cv2.Canny does not (only the Sobel's own smoothing), so
    sigma defaults to 0; sigma > 0 blurs first (then the result no longer equals OpenCV's).
    Differences from OpenCV: float input is not rounded to 8 bits; thresholds given with fractions
    are floored as OpenCV floors them.
    """
    from scipy import ndimage  # here, not at the top: generation without Canny need not wait for its import
    if isinstance(image, Image.Image) and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # drops alpha (controlnet_aux's HWC3 composites it over white)
    a = np.asarray(image, dtype=np.float64)
    a = a[..., None] if a.ndim == 2 else a
    if a.ndim != 3:
        raise ValueError(f"expected a (H, W) or (H, W, C) image, got shape {a.shape}")
    low, high = sorted((math.floor(low), math.floor(high)))
    channels = [a[..., c] for c in range(a.shape[-1])]
    if sigma > 0:
        channels = [ndimage.gaussian_filter(x, sigma, mode="nearest") for x in channels]
    gx = np.stack([ndimage.sobel(x, axis=1, mode="nearest") for x in channels], -1)  # right minus left
    gy = np.stack([ndimage.sobel(x, axis=0, mode="nearest") for x in channels], -1)  # down minus up
    mags = np.abs(gx) + np.abs(gy)
    k = mags.argmax(-1)[..., None]  # the first channel wins ties, as in OpenCV
    gx, gy, mag = (np.take_along_axis(v, k, -1)[..., 0] for v in (gx, gy, mags))

    m = np.pad(mag, 1)  # magnitude 0 outside the image
    c = m[1:-1, 1:-1]
    ax, ay = np.abs(gx), np.abs(gy) * (1 << 15)
    horizontal = ay < ax * TG22  # gradient within 22.5 deg of the x axis: compare left and right
    vertical = ~horizontal & (ay > ax * (TG22 + (1 << 16)))  # tan(67.5) = tan(22.5) + 2
    same_sign = (gx < 0) == (gy < 0)  # gradient along the main diagonal, else the anti-diagonal
    up_diag = np.where(same_sign, m[:-2, :-2], m[:-2, 2:])
    down_diag = np.where(same_sign, m[2:, 2:], m[2:, :-2])
    peak = np.where(horizontal, (c > m[1:-1, :-2]) & (c >= m[1:-1, 2:]),
                    np.where(vertical, (c > m[:-2, 1:-1]) & (c >= m[2:, 1:-1]), (c > up_diag) & (c > down_diag)))

    candidate = peak & (c > low)
    labels, _ = ndimage.label(candidate, structure=np.ones((3, 3)))
    kept = np.unique(labels[candidate & (c > high)])
    edges = np.isin(labels, kept[kept > 0])
    return edges.astype(np.uint8) * 255


def canny_control_image(image, low=CANNY_LOW, high=CANNY_HIGH, sigma=0.0):
    """The canny ControlNet's input: the edge map repeated to RGB (controlnet_aux's HWC3), white
    edges on black. Give it the picture at the size you generate (see control_pixels)."""
    edges = canny(image, low, high, sigma)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))
