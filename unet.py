"""The Stable Diffusion v1.5 denoising UNet that BLIP-Diffusion fine-tunes.

BLIP-Diffusion (Li et al., 2023, Sec. 3.2) keeps SD-1.5's latent diffusion UNet unchanged and only
changes what it cross-attends to: CLIP text embeddings in which 16 subject tokens were inserted.
The network predicts the noise eps in a 4x64x64 latent (Ho et al., 2020; Rombach et al., 2022).

It must equal diffusers' `UNet2DConditionModel` as configured by the published `unet/config.json`
(3 CrossAttnDownBlock2D + DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D + 3 CrossAttnUpBlock2D).
Module names equal that state dict, so `diffusion_pytorch_model.{bin,safetensors}` loads as it is;
`from_compvis` loads SD-1.5's original single-file checkpoint by structural rules.

Letters used in shape comments: B batch, C channels, H, W latent height and width, N = H*W query
tokens, M text tokens, h heads, d channels per head.
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from checkpoint import config_from_dict, load_strict, read_folder


@dataclass
class UNetConfig:
    # Field names are the keys of diffusers' unet/config.json; defaults are SD-1.5's published values.
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64                 # latent side at 512x512 pixels (the VAE downsamples by 8)
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    # diffusers quirk kept for config compatibility: in SD-1.5 this is the NUMBER of heads (8),
    # each head then has C // 8 channels (40, 80, 160).
    attention_head_dim: int = 8
    cross_attention_dim: int = 768        # width of the CLIP text embeddings attended to
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True          # timestep embedding laid out as [cos, sin]
    freq_shift: int = 0                   # frequencies exp(-ln(10000) * i / (half - freq_shift))
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0   # the mid-block ResBlocks divide their output by this
    act_fn: str = "silu"                  # the only activation SD-1.5 uses; others are refused

    def __post_init__(self):
        known = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
        used = set(self.down_block_types) | set(self.up_block_types)
        if not used <= known or self.act_fn != "silu" or not isinstance(self.attention_head_dim, int):
            raise ValueError(f"unsupported UNet config (SD-1.5 blocks, silu and an int head count only): {self}")


@dataclass(frozen=True)
class AttentionPlace:
    """Where an attention layer sits, handed to a controller with its probabilities."""
    block: str   # "down", "mid" or "up"
    kind: str    # "self" (attn1) or "cross" (attn2, keys are the text tokens)
    index: int   # running count of attention layers in forward order
    name: str    # module path, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


def timestep_batch(timestep, sample):
    """An int, a float, a 0-d or a (B,) tensor -> a float (B,) tensor on the sample's device."""
    t = torch.as_tensor(timestep, device=sample.device)
    return t.reshape(-1).float().expand(sample.shape[0])


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of t (DDPM, Vaswani et al.) followed by diffusers' two-layer MLP."""

    def __init__(self, channels, flip_sin_to_cos, freq_shift):
        super().__init__()
        self.channels, self.flip, self.shift = channels, flip_sin_to_cos, freq_shift
        self.linear_1 = nn.Linear(channels, 4 * channels)
        self.linear_2 = nn.Linear(4 * channels, 4 * channels)

    def forward(self, t, dtype):
        # Computed here, not stored as a buffer, so the model can be built on the meta device.
        half = self.channels // 2
        i = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(10000.0) * i / (half - self.shift))
        angles = t[:, None] * freqs[None]
        parts = (angles.cos(), angles.sin()) if self.flip else (angles.sin(), angles.cos())
        emb = torch.cat(parts, dim=-1).to(dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between (diffusers ResnetBlock2D)."""

    def __init__(self, cfg, cin, cout, temb, output_scale=1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_num_groups, cin, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(cfg.norm_num_groups, cout, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        # A 1x1 conv matches channels on the skip path only where they change, as in SD-1.5.
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.output_scale = output_scale

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (skip + h) / self.output_scale


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, else cross-attention to it.

    Default path: F.scaled_dot_product_attention. With a controller the probabilities are computed
    explicitly, softmax(q k^T / sqrt(d)), passed through `controller(probs, place)` and then applied
    to v (the prompt-to-prompt hook; LAVIS's P2PCrossAttnProcessor does the same).
    """

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' to_out.1 is a parameter-free dropout
        self.place = None  # an AttentionPlace, set by UNet.__init__

    def forward(self, x, context=None, controller=None):
        context = x if context is None else context
        B, N, C = x.shape
        # (B, N, C) -> (B, h, N, d)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if controller is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
            probs = scores.float().softmax(dim=-1).to(q.dtype)  # softmax in fp32, safe under fp16
            out = controller(probs, self.place) @ v  # probs: (B, h, N, M)
        # (B, h, N, d) -> (B, N, C)
        return self.to_out[0](out.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer, 2020), the feed-forward SD-1.5 uses."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        # Named like diffusers' FeedForward: net.1 is a parameter-free dropout.
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the text, and a GEGLU feed-forward."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, 4 * dim)

    def forward(self, x, context, controller=None):
        x = x + self.attn1(self.norm1(x), controller=controller)
        x = x + self.attn2(self.norm2(x), context, controller=controller)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """Image features as tokens through one transformer block, with a residual around it
    (diffusers Transformer2DModel, SD-1.5's use_linear_projection=False: 1x1 convs in and out)."""

    def __init__(self, cfg, channels):
        super().__init__()
        # GroupNorm eps is 1e-6 here in SD-1.5 (not norm_eps), as in CompVis' SpatialTransformer.
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, cfg.attention_head_dim, cfg.cross_attention_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context, controller=None):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C)
        for block in self.transformer_blocks:
            h = block(h, context, controller)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, N, C) -> (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels, padding):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size):
        # Nearest-neighbour to the size of the skip connection waiting at the next level: that is
        # x2 for sides divisible by 2**levels, and what diffusers' upsample_size does otherwise.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownBlock(nn.Module):
    """One encoder level: ResBlocks (each followed by a Transformer2D in the CrossAttn variant),
    then a stride-2 conv except at the last level. Returns the features and every skip output."""

    def __init__(self, cfg, cin, cout, cross, add_downsample):
        super().__init__()
        temb, n = 4 * cfg.block_out_channels[0], cfg.layers_per_block
        self.resnets = nn.ModuleList([ResBlock(cfg, cin if j == 0 else cout, cout, temb) for j in range(n)])
        self.attentions = nn.ModuleList([Transformer2D(cfg, cout) for _ in range(n)] if cross else [])
        self.downsamplers = nn.ModuleList([Downsample(cout, cfg.downsample_padding)] if add_downsample else [])

    def forward(self, x, emb, context, controller=None):
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions:
                x = self.attentions[j](x, context, controller)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """The bottleneck: ResBlock, Transformer2D, ResBlock (diffusers UNetMidBlock2DCrossAttn)."""

    def __init__(self, cfg, channels):
        super().__init__()
        temb, scale = 4 * cfg.block_out_channels[0], cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList([ResBlock(cfg, channels, channels, temb, scale) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2D(cfg, channels)])

    def forward(self, x, emb, context, controller=None):
        x = self.resnets[0](x, emb)
        x = self.attentions[0](x, context, controller)
        return self.resnets[1](x, emb)


class UpBlock(nn.Module):
    """One decoder level: layers_per_block + 1 ResBlocks, each eating one skip connection
    (concatenated on channels), Transformer2Ds in the CrossAttn variant, then a x2 upsampler."""

    def __init__(self, cfg, cin, cout, cprev, cross, add_upsample):
        super().__init__()
        temb, n = 4 * cfg.block_out_channels[0], cfg.layers_per_block + 1
        # Skips are eaten in reverse: the last one is what entered the matching encoder level (cin channels).
        skip = [cout] * (n - 1) + [cin]
        self.resnets = nn.ModuleList(
            [ResBlock(cfg, (cprev if j == 0 else cout) + skip[j], cout, temb) for j in range(n)])
        self.attentions = nn.ModuleList([Transformer2D(cfg, cout) for _ in range(n)] if cross else [])
        self.upsamplers = nn.ModuleList([Upsample(cout)] if add_upsample else [])

    def forward(self, x, emb, context, skips, size=None, controller=None):
        # `skips`: this level's skip connections, in encoder order; eaten from the last.
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - j]], dim=1), emb)
            if self.attentions:
                x = self.attentions[j](x, context, controller)
        for up in self.upsamplers:
            x = up(x, size)
        return x


def encoder_levels(cfg):
    """The encoder's DownBlocks as the config lists them (ControlNet builds the same ones)."""
    ch, last = cfg.block_out_channels, len(cfg.block_out_channels) - 1
    return nn.ModuleList([DownBlock(cfg, ch[max(i - 1, 0)], ch[i], kind.startswith("CrossAttn"), i < last)
                          for i, kind in enumerate(cfg.down_block_types)])


class UNet(nn.Module):
    """eps_theta(z_t, t, text): conv_in, the encoder levels, the mid block, the decoder levels, conv_out."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        last = len(ch) - 1
        self.down_blocks = encoder_levels(cfg)
        self.mid_block = MidBlock(cfg, ch[-1])
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList([
            UpBlock(cfg, rev[min(i + 1, last)], rev[i], rev[max(i - 1, 0)], kind.startswith("CrossAttn"), i < last)
            for i, kind in enumerate(cfg.up_block_types)])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.gradient_checkpointing = False  # train.py --grad-checkpoint turns it on
        # Registration order is forward order (down, mid, up; attn1 before attn2), so numbering the
        # attention layers as named_modules lists them gives the controller a running index.
        attentions = [(name, m) for name, m in self.named_modules() if isinstance(m, Attention)]
        for i, (name, m) in enumerate(attentions):
            m.place = AttentionPlace(name.split("_")[0], "self" if name.endswith("attn1") else "cross", i, name)

    def forward(self, sample, timestep, encoder_hidden_states, down_block_additional_residuals=None,
                mid_block_additional_residual=None, controller=None):
        """sample (B, 4, H, W) noisy latent, timestep, encoder_hidden_states (B, M, 768) -> eps (B, 4, H, W).

        The additional residuals are ControlNet's outputs, one per skip connection and one for the
        mid block, added as diffusers does. `controller(probs, place) -> probs` edits every attention map.
        """
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            # diffusers reads down residuals alone as a (deprecated) T2I-Adapter input; we support ControlNet only.
            raise ValueError("pass both ControlNet residuals (down and mid) or neither")
        emb = self.time_embedding(timestep_batch(timestep, sample), sample.dtype)
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, out = self.run(block, x, emb, encoder_hidden_states, controller)
            skips += out
        if down_block_additional_residuals is not None:
            # strict: diffusers' zip would silently drop residuals beyond a too-short list.
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals, strict=True)]
        x = self.run(self.mid_block, x, emb, encoder_hidden_states, controller)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        for block in self.up_blocks:
            # Each level takes the last skips off the stack; its upsampler aims at the size of the
            # skip waiting at the next level.
            skips, level = skips[:-len(block.resnets)], skips[-len(block.resnets):]
            size = skips[-1].shape[-2:] if skips else None
            x = self.run(block, x, emb, encoder_hidden_states, level, size, controller)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def run(self, block, *args):
        """A block, or with `gradient_checkpointing` in training its recomputation in the backward pass
        (activations are not kept: much less memory for about a third more compute)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    @classmethod
    def from_pretrained(cls, folder):
        """A diffusers `unet/` folder (config.json + diffusion_pytorch_model.*): names load unchanged."""
        config, state_dict, source = read_folder(folder)
        cfg = config_from_dict(UNetConfig, config)
        with torch.device("meta"):
            model = cls(cfg)
        return load_strict(model, state_dict, source)

    @classmethod
    def from_compvis(cls, state_dict, cfg=None, source="CompVis single-file checkpoint"):
        """SD-1.5's original single file (e.g. v1-5-pruned-emaonly.safetensors, already read into a
        dict). Only keys under `model.diffusion_model.` are taken: the VAE and the text encoder in
        the same file load separately. Each name is mapped by `compvis_key`, inverted."""
        cfg = cfg or UNetConfig()
        with torch.device("meta"):
            model = cls(cfg)
        ours = {COMPVIS_PREFIX + compvis_key(k, cfg): k for k in model.state_dict()}
        # A key without a rule keeps its CompVis name, so load_strict reports it as unexpected.
        sd = {ours.get(k, k): v for k, v in state_dict.items() if k.startswith(COMPVIS_PREFIX)}
        return load_strict(model, sd, source)


# CompVis (the original latent-diffusion code) names, as in SD-1.5's single-file checkpoint.
# Its UNet is flat: input_blocks.0 is conv_in, then each level contributes layers_per_block entries
# [ResBlock, SpatialTransformer] and, except the last level, one more holding the downsampler `op`;
# middle_block is [ResBlock, SpatialTransformer, ResBlock]; output_blocks has layers_per_block + 1
# entries per level, [ResBlock, SpatialTransformer?, Upsample?]. SpatialTransformer's inner names
# equal diffusers', ResBlock's are Sequentials, hence the renames below.
COMPVIS_PREFIX = "model.diffusion_model."
COMPVIS_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
# ResBlock: in_layers = [GroupNorm, SiLU, conv], emb_layers = [SiLU, Linear],
# out_layers = [GroupNorm, SiLU, Dropout, conv]; the 1x1 shortcut is called skip_connection.
COMPVIS_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def compvis_key(key, cfg):
    """Our (= diffusers) state-dict name -> the CompVis name of the same tensor, without prefix."""
    module, param = key.rsplit(".", 1)
    if module in COMPVIS_TOP:
        return f"{COMPVIS_TOP[module]}.{param}"
    m = re.fullmatch(r"(down_blocks\.(\d+)\.|up_blocks\.(\d+)\.|mid_block\.)(\w+)\.(\d+)\.(.+)", key)
    if m is None:
        raise KeyError(f"no CompVis rule for {key}")
    _, down, up, part, j, rest = m.groups()
    j, per_level = int(j), cfg.layers_per_block + 1
    if part == "resnets":
        name, param = rest.split(".", 1)
        rest = f"{COMPVIS_RESNET[name]}.{param}"
    if down is not None:
        entry = 1 + int(down) * per_level + (cfg.layers_per_block if part == "downsamplers" else j)
        slot = {"resnets": 0, "attentions": 1, "downsamplers": 0}[part]
        rest = rest.replace("conv.", "op.", 1) if part == "downsamplers" else rest
        return f"input_blocks.{entry}.{slot}.{rest}"
    if up is not None:
        entry = int(up) * per_level + (cfg.layers_per_block if part == "upsamplers" else j)
        cross = cfg.up_block_types[int(up)].startswith("CrossAttn")
        slot = {"resnets": 0, "attentions": 1, "upsamplers": 2 if cross else 1}[part]
        return f"output_blocks.{entry}.{slot}.{rest}"
    return f"middle_block.{2 * j if part == 'resnets' else 1}.{rest}"
