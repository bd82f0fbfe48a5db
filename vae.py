"""The Stable Diffusion v1.5 variational autoencoder (KL-regularised), which BLIP-Diffusion reuses.

Latent diffusion (Rombach et al. 2022, sec. 3) runs the denoiser on a 4 x H/8 x W/8 latent instead of
pixels; BLIP-Diffusion (Li et al. 2023, sec. 3.2) keeps that setup and ships the SD-1.5 VAE in its
`vae/` folder. The encoder turns an image in [-1, 1] into a diagonal Gaussian over latents, the decoder
maps a latent back to an image. The caller multiplies latents by SCALING_FACTOR after encoding and
divides by it before decoding, as the diffusers pipelines do.

Must equal diffusers' `AutoencoderKL` (0.33.1) configured by SD-1.5's `vae/config.json`. Module names
are diffusers' current state-dict keys; `from_pretrained` also takes the older attention names, and
`from_compvis` reads the VAE out of SD-1.5's original single-file checkpoint.
"""

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import CheckpointError, config_from_dict, load_strict, read_folder

# Latents are multiplied by this so they have roughly unit variance (LDM sec. 3.3, "rescale the
# latent"); the value is `scaling_factor` in SD-1.5's and BLIP-Diffusion's vae/config.json.
SCALING_FACTOR = 0.18215

# Letters in shape comments: B batch, C channels, H x W spatial size.


@dataclass
class AutoencoderKLConfig:
    in_channels: int = 3
    out_channels: int = 3
    # Only the plain ResNet encoder/decoder levels exist in the published VAE; other types are refused.
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple = (128, 256, 512, 512)  # one entry per level; each level but the last halves H, W
    layers_per_block: int = 2  # ResBlocks per encoder level; the decoder uses one more, as LDM does
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512  # the image size it was trained at; the model itself works at any multiple of 8
    scaling_factor: float = SCALING_FACTOR

    def __post_init__(self):
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        self.block_out_channels = tuple(self.block_out_channels)
        n = len(self.block_out_channels)
        if self.down_block_types != ("DownEncoderBlock2D",) * n or self.up_block_types != ("UpDecoderBlock2D",) * n:
            raise ValueError(f"only {n} DownEncoderBlock2D / UpDecoderBlock2D levels are supported, got "
                             f"{self.down_block_types} / {self.up_block_types}")
        if self.act_fn != "silu":
            raise ValueError(f"only act_fn='silu' is supported, got {self.act_fn!r}")


def group_norm(groups, channels):
    return nn.GroupNorm(groups, channels, eps=1e-6)  # eps 1e-6 throughout, as LDM's Normalize()


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, plus a 1x1 conv on the skip path when the width changes. No time input."""

    def __init__(self, in_ch, out_ch, groups):
        super().__init__()
        self.norm1 = group_norm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0 in the published VAE, so it is left out
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, GroupNorm first, residual after (LDM's AttnBlock)."""

    def __init__(self, ch, groups):
        super().__init__()
        self.group_norm = group_norm(groups, ch)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # diffusers' to_out.1 is a weightless Dropout

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))  # scale 1/sqrt(C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)  # (B, H*W, C) -> (B, C, H, W)
        return x + h


class MidBlock(nn.Module):
    """ResBlock, attention, ResBlock at the lowest resolution, in both encoder and decoder."""

    def __init__(self, ch, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(ch, ch, groups), ResBlock(ch, ch, groups)])
        self.attentions = nn.ModuleList([Attention(ch, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    """Stride-2 3x3 conv. LDM pads only right and bottom by one, so H, W halve exactly with no shift."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResBlocks, then an optional Down- or Upsample (diffusers' Down/UpDecoderBlock2D)."""

    def __init__(self, in_ch, out_ch, num_layers, groups, down=False, up=False):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_layers)])
        if down:
            self.downsamplers = nn.ModuleList([Downsample(out_ch)])
        if up:
            self.upsamplers = nn.ModuleList([Upsample(out_ch)])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> Gaussian moments (B, 2*latent_channels, H/f, W/f), f = 2^(levels-1)."""

    def __init__(self, cfg):
        super().__init__()
        chs, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            Level(chs[max(i - 1, 0)], ch, cfg.layers_per_block, g, down=i < len(chs) - 1) for i, ch in enumerate(chs)])
        self.mid_block = MidBlock(chs[-1], g)
        self.conv_norm_out = group_norm(g, chs[-1])
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f); levels run widest-last."""

    def __init__(self, cfg):
        super().__init__()
        chs, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = MidBlock(chs[0], g)
        self.up_blocks = nn.ModuleList([
            Level(chs[max(i - 1, 0)], ch, cfg.layers_per_block + 1, g, up=i < len(chs) - 1)
            for i, ch in enumerate(chs)])
        self.conv_norm_out = group_norm(g, chs[-1])
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))) that the encoder predicts (LDM sec. 3, KL-reg)."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as diffusers, so exp() can neither vanish nor overflow
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        """z = mean + std * eps. eps is drawn on the generator's device and moved, as diffusers'
        randn_tensor does, so the same seeded generator gives the same z."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self):
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, cfg=None):
        super().__init__()
        self.config = cfg = cfg or AutoencoderKLConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # 1x1 convs between the encoder/decoder and the latent, kept from LDM's VQ variant.
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def downsampling(self):
        """Pixels per latent pixel: every level but the last halves the side (SD-1.5: 8)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x):
        """Image in [-1, 1], (B, 3, H, W) -> posterior over unscaled latents (B, 4, H/8, W/8)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """Unscaled latent (divide by SCALING_FACTOR first) -> image in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    @classmethod
    def from_pretrained(cls, folder):
        """A diffusers `vae/` folder: config.json + diffusion_pytorch_model.{safetensors,bin}."""
        config, sd, source = read_folder(folder)
        sd = {legacy_to_current(k): v for k, v in sd.items()}
        return cls._load(config_from_dict(AutoencoderKLConfig, config), sd, source)

    @classmethod
    def from_compvis(cls, state_dict, cfg=None, prefix="first_stage_model."):
        """The VAE inside an original CompVis/SD single-file checkpoint (e.g. v1-5-pruned-emaonly)."""
        cfg = cfg or AutoencoderKLConfig()
        with torch.device("meta"):
            ours = cls(cfg).state_dict()
        to_ours = {compvis_name(k, len(cfg.block_out_channels)): k for k in ours}
        sd = {}
        for key, t in state_dict.items():
            if key.startswith(prefix):
                name = to_ours.get(key[len(prefix):], key[len(prefix):])  # unknown keys stay, to be reported
                # CompVis attention projections are 1x1 convs (C, C, 1, 1); ours are Linear (C, C).
                sd[name] = t.flatten(1) if t.ndim == 4 and name in ours and ours[name].ndim == 2 else t
        if not sd:
            raise CheckpointError(f"single-file checkpoint: no keys start with {prefix!r}")
        return cls._load(cfg, sd, f"single-file checkpoint ({prefix}*)")

    @classmethod
    def _load(cls, cfg, sd, source):
        with torch.device("meta"):
            model = cls(cfg)
        return load_strict(model, sd, source).eval()


# ---------------------------------------------------------------------------------------------------
# Training from nothing (train.py --stage vae): LDM's objective and its measured scaling factor
# ---------------------------------------------------------------------------------------------------

# LDM's autoencoder (its configs/autoencoder/autoencoder_kl_*.yaml, `kl_weight: 0.000001`, read by
# ldm/modules/losses/contperceptual.py): the KL term weighs 1e-6 against the per-pixel reconstruction.
KL_WEIGHT = 1e-6


def autoencoder_loss(vae, images, noise):
    """Per-pixel L1 reconstruction of z = mean + std·noise, plus KL_WEIGHT times the KL divergence of
    the posterior to N(0, I) (per pixel, LDM's balance). LDM's perceptual and GAN losses are left out:
    pictures of flat colours (the toy world's) need neither. images (B, 3, H, W) in [-1, 1]."""
    post = vae.encode(images)
    recon = vae.decode(post.mean + post.std * noise)
    kl = 0.5 * (post.mean ** 2 + post.std ** 2 - 1 - post.logvar).sum(dim=(1, 2, 3)).mean()
    return (recon.float() - images.float()).abs().mean() + KL_WEIGHT * kl / images[0].numel()


@torch.no_grad()
def measure_scaling_factor(vae, images):
    """A VAE's scaling factor, measured as LDM's: 1 / std of the latents of `images`, so that the
    diffusion model sees latents of unit variance (SD-1.5's SCALING_FACTOR was found the same way).
    The latents are drawn from the posterior with a fixed seed, so the measurement repeats exactly."""
    post = vae.encode(images.to(next(vae.parameters()).device))
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(0)).to(post.mean)
    return round(1 / float(z.float().std()), 5)


# Renames for diffusers folders written before diffusers 0.17. BLIP-Diffusion's vae/config.json says
# 0.16.0: the mid-block attention then called its projections query/key/value/proj_attn (same Linear
# shapes); diffusers renames them the same way when it loads such a file.
LEGACY_ATTENTION_RULES = [
    (".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")]


def legacy_to_current(key):
    if ".attentions." in key:
        for old, new in LEGACY_ATTENTION_RULES:
            key = key.replace(old, new)
    return key


def compvis_name(key, num_levels):
    """Our (diffusers) key -> the same tensor's key in the CompVis/LDM layout, by structural rules.
    `from_compvis` inverts it over the model's keys, so no per-key table is written anywhere."""
    flip = lambda i: num_levels - 1 - int(i)  # noqa: E731
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.", lambda m: f"down.{m[1]}.block."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"down.{m[1]}.downsample."),
        # LDM numbers decoder levels by resolution (0 = full size); diffusers in the order they run.
        (r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{flip(m[1])}.block."),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{flip(m[1])}.upsample."),
        (r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),  # LDM counts from 1
        (r"mid_block\.attentions\.0\.", lambda m: "mid.attn_1."),
        (r"\.group_norm\.", lambda m: ".norm."),
        (r"\.to_([qkv])\.", lambda m: f".{m[1]}."),
        (r"\.to_out\.0\.", lambda m: ".proj_out."),
        (r"\.conv_shortcut\.", lambda m: ".nin_shortcut."),
        (r"\.conv_norm_out\.", lambda m: ".norm_out."),
    ]
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key
