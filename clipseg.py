"""CLIPSeg (Lüddecke & Ecker 2022), the text-prompted segmenter of BLIP-Diffusion's prompted context
generation (stage-2 pre-training, paper sec. 3.2): CLIP ViT-B/16 plus a small FiLM-conditioned
decoder, equal to transformers' `CLIPSegForImageSegmentation` loaded from `CIDAS/clipseg-rd64-refined`.
Its towers are clip.py's blocks at ViT-B/16 sizes.

Letters in shape comments: B batch, L text positions, N image patches, D width, H heads, R decoder
width (reduce_dim), G patch-grid side.
"""
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from checkpoint import config_from_dict, load_strict, read_folder
from clip import (CLIPTextConfig, CLIPTokenizer, Encoder, EncoderLayer, MLP, TextAttention, TextTransformer,
                  check_activation, eos_positions)

# CLIPSeg's input (CIDAS/clipseg-rd64-refined preprocessor_config.json): a direct 352 x 352 resize, aspect
# not kept, bilinear, then ImageNet's mean/std, not CLIP's (the published processor switched to these in
# January 2023; the original Quickstart notebook uses them too).
CLIPSEG_SIZE = 352
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class CLIPSegTextConfig(CLIPTextConfig):
    """transformers' CLIPSegTextConfig; defaults = CIDAS/clipseg-rd64-refined (OpenAI ViT-B/16's text tower)."""
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    # The published config keeps the eos_token_id 2 written before transformers PR #24773; with it
    # transformers pools at argmax(ids), which is <|endoftext|>, the highest id in CLIP's vocabulary.
    eos_token_id: int = 2


@dataclass
class CLIPSegVisionConfig:
    """transformers' CLIPSegVisionConfig; defaults = CIDAS/clipseg-rd64-refined (OpenAI ViT-B/16)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224  # CLIP's training size: a 14 x 14 position table, resized to the input's grid
    patch_size: int = 16  # transformers' default is 32; the published config sets 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass
class CLIPSegConfig:
    """transformers' CLIPSegConfig; defaults = CIDAS/clipseg-rd64-refined."""
    text_config: CLIPSegTextConfig = field(default_factory=CLIPSegTextConfig)
    vision_config: CLIPSegVisionConfig = field(default_factory=CLIPSegVisionConfig)
    projection_dim: int = 512
    extract_layers: tuple = (3, 6, 9)  # 0-based vision blocks whose outputs feed the decoder
    reduce_dim: int = 64  # the decoder's width, "rd64"
    decoder_num_attention_heads: int = 4
    decoder_intermediate_size: int = 2048
    # Ignored, as transformers ignores it: the decoder uses ReLU (PyTorch's nn.TransformerEncoderLayer
    # default, which the original code used), though the published config says quick_gelu.
    decoder_hidden_act: str = "quick_gelu"
    conditional_layer: int = 0  # FiLM goes in before this decoder block
    use_complex_transposed_convolution: bool = True  # the "refined" head (3x3 conv, then x4, x4)

    # transformers' tower defaults where they differ from the published sizes (see from_dict).
    LIBRARY_DEFAULTS = {"text_config": {"eos_token_id": 49407}, "vision_config": {"patch_size": 32}}

    @classmethod
    def from_dict(cls, d):
        """A published config.json. Files written by older transformers may also hold `*_config_dict`;
        transformers then completes it with its own defaults and lets the result replace `*_config`."""
        def tower(name):
            if d.get(name + "_dict") is not None:
                return {**cls.LIBRARY_DEFAULTS[name], **d[name + "_dict"]}
            return d.get(name) or {}
        towers = {name: config_from_dict(sub, tower(name))
                  for name, sub in (("text_config", CLIPSegTextConfig), ("vision_config", CLIPSegVisionConfig))}
        cfg = config_from_dict(cls, {**d, **towers})
        cfg.extract_layers = tuple(cfg.extract_layers)  # a JSON list
        return cfg


class CLIPSegVisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, P = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(D))
        self.patch_embedding = nn.Conv2d(3, D, kernel_size=P, stride=P, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // P) ** 2 + 1, D)

    def positions(self, h, w):
        """The position table for an h x w patch grid (1 + h*w, D). CLIP's G x G grid is resized
        bicubically (align_corners=False) to 22 x 22 for 352 px inputs, as the original CLIPSeg and
        transformers' `interpolate_pos_encoding` do; the class position is kept as it is."""
        table = self.position_embedding.weight
        G = math.isqrt(len(table) - 1)
        if (h, w) == (G, G):
            return table
        grid = table[1:].reshape(1, G, G, -1).permute(0, 3, 1, 2)  # (G*G, D) -> (1, D, G, G)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([table[:1], grid.flatten(2)[0].T])  # (1, D, h, w) -> (1 + h*w, D)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        B, D, h, w = x.shape
        x = torch.cat([self.class_embedding.expand(B, 1, D), x.flatten(2).transpose(1, 2)], dim=1)  # (B, 1 + N, D)
        return x + self.positions(h, w)


class CLIPSegVisionTransformer(nn.Module):
    """CLIP ViT-B/16 in transformers' layout. Only the blocks up to the deepest extracted one run: the rest,
    `post_layernorm` and `visual_projection` make CLIP's image embedding (CLIPSeg's visual prompts, which
    we do not use), so they are loaded but not run. transformers runs all 12; the logits are the same."""

    def __init__(self, cfg):
        super().__init__()
        check_activation(cfg)
        D = cfg.hidden_size
        self.embeddings = CLIPSegVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)  # sic, transformers' key
        self.encoder = Encoder([
            EncoderLayer(TextAttention(D, cfg.num_attention_heads), D, cfg.intermediate_size, cfg.layer_norm_eps)
            for _ in range(cfg.num_hidden_layers)])
        self.post_layernorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values, extract_layers):
        """Images (B, 3, H, W) -> the residual stream after each block in `extract_layers`, each (B, 1 + N, D)."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        out = []
        for i, layer in enumerate(self.encoder.layers[:max(extract_layers) + 1]):
            x = layer(x)
            if i in extract_layers:
                out.append(x)
        return out


class CLIPSegBackbone(nn.Module):
    """The frozen CLIP of CLIPSeg (transformers' `CLIPSegModel`, the `clip.` keys)."""

    def __init__(self, cfg):
        super().__init__()
        self.eos_token_id = cfg.text_config.eos_token_id
        self.text_model = TextTransformer(cfg.text_config)
        self.vision_model = CLIPSegVisionTransformer(cfg.vision_config)
        self.visual_projection = nn.Linear(cfg.vision_config.hidden_size, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text_config.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.zeros(()))  # CLIP's contrastive temperature; unused here

    def text_features(self, input_ids):
        """Prompt ids (B, L) -> CLIP's text embedding (B, projection_dim), unnormalised, as CLIPSeg conditions on."""
        x = self.text_model(input_ids)
        eos = eos_positions(input_ids, self.eos_token_id)
        return self.text_projection(x[torch.arange(len(x), device=x.device), eos])


class CLIPSegDecoderLayer(nn.Module):
    """Post-LN with ReLU: x = LN(x + attn(x)), then x = LN(x + mlp(x)). The original decoder is PyTorch's
    default nn.TransformerEncoderLayer (timojl/clipseg, models/clipseg.py), unlike CLIP's pre-LN QuickGELU
    blocks, and ReLU although the published config says quick_gelu."""

    def __init__(self, dim, heads, hidden, eps):
        super().__init__()
        self.self_attn = TextAttention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, hidden, act=F.relu)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        x = self.layer_norm1(x + self.self_attn(x))
        return self.layer_norm2(x + self.mlp(x))


class CLIPSegDecoder(nn.Module):
    """Each extracted activation, deepest first, is reduced to R channels and added to the running state,
    which FiLM modulates by the prompt once and a decoder block refines; the patch grid is then upsampled
    by the patch size to one logit per pixel (CLIPSeg paper, sec. 3)."""

    def __init__(self, cfg):
        super().__init__()
        R, V, n = cfg.reduce_dim, cfg.vision_config, len(cfg.extract_layers)
        self.conditional_layer = cfg.conditional_layer
        self.film_mul = nn.Linear(cfg.projection_dim, R)
        self.film_add = nn.Linear(cfg.projection_dim, R)
        self.reduces = nn.ModuleList([nn.Linear(V.hidden_size, R) for _ in range(n)])
        # transformers builds these from a copy of the vision config, hence the vision LayerNorm eps.
        self.layers = nn.ModuleList([
            CLIPSegDecoderLayer(R, cfg.decoder_num_attention_heads, cfg.decoder_intermediate_size, V.layer_norm_eps)
            for _ in range(n)])
        P = V.patch_size
        # "refined": two x(P/4) steps, which make up the patch size only for the published P = 16.
        if cfg.use_complex_transposed_convolution:
            self.transposed_convolution = nn.Sequential(
                nn.Conv2d(R, R, kernel_size=3, padding=1), nn.ReLU(),
                nn.ConvTranspose2d(R, R // 2, kernel_size=P // 4, stride=P // 4), nn.ReLU(),
                nn.ConvTranspose2d(R // 2, 1, kernel_size=P // 4, stride=P // 4))
        else:
            self.transposed_convolution = nn.ConvTranspose2d(R, 1, kernel_size=P, stride=P)

    def forward(self, activations, cond):
        """Activations shallow to deep, each (B, 1 + N, D), and prompt embeddings (B, projection_dim)
        -> logits (B, G*P, G*P)."""
        x = 0
        for i, (a, reduce, layer) in enumerate(zip(reversed(activations), self.reduces, self.layers)):
            x = reduce(a) + x  # (B, 1 + N, D) -> (B, 1 + N, R)
            if i == self.conditional_layer:
                x = self.film_mul(cond)[:, None] * x + self.film_add(cond)[:, None]
            x = layer(x)
        B, N, R = x[:, 1:].shape  # the class token is dropped
        G = math.isqrt(N)
        if G * G != N:
            raise ValueError(f"{N} patches do not make a square grid; resize images to a square first")
        x = x[:, 1:].transpose(1, 2).reshape(B, R, G, G)  # (B, N, R) -> (B, R, G, G)
        return self.transposed_convolution(x)[:, 0]


def clipseg_preprocess(images, size=CLIPSEG_SIZE):
    """PIL images -> (B, 3, size, size), as CLIPSeg's published ViTImageProcessor: RGB, a direct resize
    (aspect squashed) with PIL's bilinear filter on the uint8 image, /255, ImageNet mean/std."""
    x = torch.stack([torch.from_numpy(np.array(im.convert("RGB").resize((size, size), Image.BILINEAR)))
                     for im in images])
    x = x.permute(0, 3, 1, 2).float() / 255  # (B, H, W, 3) -> (B, 3, H, W)
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


class CLIPSeg(nn.Module):
    """transformers' `CLIPSegForImageSegmentation`, text prompts only: (image, prompt) pairs -> logits."""

    def __init__(self, cfg=None):
        super().__init__()
        self.config = cfg = cfg or CLIPSegConfig()
        self.clip = CLIPSegBackbone(cfg)
        self.decoder = CLIPSegDecoder(cfg)
        self.tokenizer = None  # set by from_pretrained when the folder holds one, as the published one does

    def forward(self, pixel_values, input_ids=None, conditional_embeddings=None):
        """Preprocessed images (B, 3, H, W) and one prompt each, as ids (B, L) or as a CLIP embedding
        (B, projection_dim) -> logits (B, H, W) for square images."""
        if conditional_embeddings is None:
            conditional_embeddings = self.clip.text_features(input_ids)
        activations = self.clip.vision_model(pixel_values, self.config.extract_layers)
        return self.decoder(activations, conditional_embeddings)

    @torch.no_grad()
    def segment(self, images, texts):
        """PIL images and one prompt per image (a single image is paired with every prompt) ->
        probabilities (B, 352, 352), sigmoid of the logits. The caller resizes them to the image."""
        if self.tokenizer is None:
            raise ValueError("no tokenizer: load a folder that holds vocab.json and merges.txt")
        images = list(images) * len(texts) if len(images) == 1 else list(images)
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} prompts")
        w = self.decoder.film_mul.weight
        pixels = clipseg_preprocess(images).to(w.device, w.dtype)
        return torch.sigmoid(self(pixels, self.tokenizer(texts).to(w.device)).float())

    # Rename rules, applied to the published files before strict loading:
    # - drop `*.embeddings.position_ids`: arange buffers that transformers before 4.31 saved (the published
    #   pytorch_model.bin is from 2022); we compute positions.
    @classmethod
    def from_pretrained(cls, folder):
        """A transformers CLIPSegForImageSegmentation folder (CIDAS/clipseg-rd64-refined), with its tokenizer."""
        config, sd, source = read_folder(folder)
        sd = {k: v for k, v in sd.items() if not k.endswith(".embeddings.position_ids")}
        with torch.device("meta"):
            model = cls(CLIPSegConfig.from_dict(config))
        model = load_strict(model, sd, source).eval()
        if os.path.isfile(os.path.join(folder, "vocab.json")):
            model.tokenizer = CLIPTokenizer.from_folder(folder)
        return model
