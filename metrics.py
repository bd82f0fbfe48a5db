"""The networks DreamBench's scores are computed with: DINO ViT-S/16 and CLIP ViT-B/32, written on the
project's own ViT and CLIP code (clip.py), loading the transformers folders facebook/dino-vits16 (a
ViTModel) and openai/clip-vit-base-patch32 (a CLIPModel) strictly, and their preprocessing. Each score
of evaluate.py equals transformers' computation on those folders (tests/test_evaluate.py).

- DINO: DINO's own evaluation transform (facebookresearch/dino, eval_linear.py; ImagenHub's
  miscmodels/dino_vit.py): torchvision's Resize(256) (bicubic) + CenterCrop(224), ImageNet mean/std;
  the embedding is the class token after the last LayerNorm (ViTModel's last_hidden_state[:, 0]).
- CLIP: transformers' CLIPImageProcessor for clip-vit-base-patch32: the short side to 224 (bicubic),
  the centre 224 x 224, CLIP's mean/std. OpenAI's own transform (clip/clip.py, `_transform`) crops
  with torchvision's CenterCrop, whose corner rounds half to even where transformers' floors: its crop
  may sit one pixel further. The prompt: CLIP's BPE with <|startoftext|> and <|endoftext|>, cut to 77
  tokens; the text embedding is the projected output at the end token.
Differs from facebookresearch/dino: its ViT builds its LayerNorms with eps 1e-6; transformers' ViTModel
uses the folder's layer_norm_eps (ViTConfig's default 1e-12), and so do we.

Letters in shape comments: B batch, D width, E projected (embedding) width.
"""

import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from checkpoint import CheckpointError, config_from_dict, load_strict, read_folder
from clip import (CLIP_MEAN, CLIP_STD, CLIP_VISION_DEFAULTS, CLIPTextConfig, CLIPTextModel, CLIPTokenizer,
                  TextTransformer, VisionConfig, VisionTransformer, eos_positions, vision_keys_from_clip)
from clipseg import IMAGENET_MEAN, IMAGENET_STD
from data import center_crop

# DINO's evaluation transform (facebookresearch/dino eval_linear.py, as ImagenHub's VITs16 uses it):
# Resize(256), CenterCrop(224).
DINO_RESIZE, DINO_CROP = 256, 224
# openai/clip-vit-base-patch32's preprocessor_config.json: shortest edge 224, crop 224, bicubic.
CLIP_SIZE = 224


# ---------------------------------------------------------------------------------------------------
# DINO ViT-S/16: clip.py's image tower, configured as transformers' ViTModel
# ---------------------------------------------------------------------------------------------------

@dataclass
class DINOConfig(VisionConfig):
    """transformers' ViTConfig fields; defaults = facebook/dino-vits16 (ViT-S/16)."""
    hidden_size: int = 384
    intermediate_size: int = 1536
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    patch_size: int = 16
    hidden_act: str = "gelu"  # the exact GELU, not CLIP's QuickGELU
    layer_norm_eps: float = 1e-12  # ViTConfig's default (facebookresearch/dino's own ViT: 1e-6)

    # transformers' ViTConfig defaults: a config.json omits the fields equal to these.
    LIBRARY_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-12, qkv_bias=True)


class DINOViT(VisionTransformer):
    """DINO's ViT as transformers' ViTModel computes it: clip.VisionTransformer with a DINOConfig and two
    parts replaced, where the ViT DINO trained differs from OpenAI's: its patch projection has a bias
    (OpenAI's conv1 has none), and no LayerNorm comes before the blocks (OpenAI's `ln_pre`). Its
    `post_layernorm` is ViT's final `layernorm`."""

    def __init__(self, cfg=None):
        super().__init__(cfg or DINOConfig())
        P = self.config.patch_size
        self.embeddings.patch_embedding = nn.Conv2d(3, self.config.hidden_size, kernel_size=P, stride=P)
        self.pre_layernorm = nn.Identity()

    def embed(self, pixel_values):
        """DINO-normalised images (B, 3, 224, 224) -> (B, D): the class token after the final LayerNorm
        (transformers' last_hidden_state[:, 0]; facebookresearch/dino's VisionTransformer.forward)."""
        return self(pixel_values)[:, 0]

    # Rename rules, transformers' ViTModel names -> ours, applied before strict loading. clip.py's ViT
    # keeps OpenAI CLIP's names (as transformers' CLIP writes them); ViTModel's are BERT-style:
    RENAMES = (
        (r"^embeddings\.cls_token$", "embeddings.class_embedding"),
        (r"^embeddings\.position_embeddings$", "embeddings.position_embedding"),
        (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
        (r"^encoder\.layer\.", "encoder.layers."),
        (r"\.layernorm_before\.", ".layer_norm1."),
        (r"\.layernorm_after\.", ".layer_norm2."),
        (r"\.attention\.output\.dense\.", ".self_attn.projection."),  # before the next rule
        (r"\.intermediate\.dense\.", ".mlp.fc1."),
        (r"\.output\.dense\.", ".mlp.fc2."),
        (r"^layernorm\.", "post_layernorm."),
    )
    # - `attention.attention.{query,key,value}` are packed as [q; k; v] into `self_attn.qkv`
    #   (VisionAttention's one projection), as clip.vision_keys_from_clip packs CLIP's;
    QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")
    # - `pooler.*` is dropped: ViTModel's dense + tanh pooler is no part of DINO (facebookresearch/dino has
    #   none; the embedding is the class token itself), whether or not the file holds it.
    DROPPED = ("pooler.",)

    @classmethod
    def convert(cls, sd, source="state dict"):
        """A transformers ViTModel state dict -> ours, by the rules above."""
        out, qkv = {}, {}
        for key, tensor in sd.items():
            if key.startswith(cls.DROPPED):
                continue
            if m := cls.QKV.fullmatch(key):
                layer, part, p = m.groups()
                qkv.setdefault((layer, p), {})[part] = tensor
                continue
            for pattern, replacement in cls.RENAMES:
                key = re.sub(pattern, replacement, key)
            out[key] = tensor
        for (layer, p), parts in qkv.items():
            names = ("query", "key", "value")
            if missing := [f"encoder.layer.{layer}.attention.attention.{x}.{p}" for x in names if x not in parts]:
                raise CheckpointError(f"{source}: missing keys: {', '.join(missing)}")
            out[f"encoder.layers.{layer}.self_attn.qkv.{p}"] = torch.cat([parts[x] for x in names])
        return out

    @classmethod
    def from_pretrained(cls, folder):
        """A transformers ViTModel folder (facebook/dino-vits16: config.json + weights)."""
        config, sd, source = read_folder(folder)
        with torch.device("meta"):
            model = cls(config_from_dict(DINOConfig, {**DINOConfig.LIBRARY_DEFAULTS, **config}))
        return load_strict(model, cls.convert(sd, source), source).eval()


# ---------------------------------------------------------------------------------------------------
# CLIP ViT-B/32: clip.py's towers plus CLIP's projections, as transformers' CLIPModel
# ---------------------------------------------------------------------------------------------------

@dataclass
class CLIPModelTextConfig(CLIPTextConfig):
    """transformers' CLIPTextConfig fields; defaults = openai/clip-vit-base-patch32's text tower."""
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    eos_token_id: int = 2  # as configs written before transformers PR #24773 say (clip.eos_positions)


@dataclass
class CLIPModelVisionConfig(VisionConfig):
    """transformers' CLIPVisionConfig fields; defaults = openai/clip-vit-base-patch32's image tower."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    patch_size: int = 32
    layer_norm_eps: float = 1e-5


@dataclass
class CLIPConfig:
    """transformers' CLIPConfig fields; defaults = openai/clip-vit-base-patch32."""
    text_config: CLIPModelTextConfig = field(default_factory=CLIPModelTextConfig)
    vision_config: CLIPModelVisionConfig = field(default_factory=CLIPModelVisionConfig)
    projection_dim: int = 512

    # transformers' tower defaults: a config.json omits the fields equal to these.
    LIBRARY_DEFAULTS = {
        "text_config": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                            num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5, eos_token_id=49407),
        "vision_config": CLIP_VISION_DEFAULTS}

    @classmethod
    def from_dict(cls, d):
        """A published config.json. A `*_config_dict` (written by older transformers) replaces
        `*_config`, completed with transformers' defaults, as transformers' CLIPConfig does."""
        def tower(name, sub):
            given = d[name + "_dict"] if d.get(name + "_dict") is not None else d.get(name) or {}
            return config_from_dict(sub, {**cls.LIBRARY_DEFAULTS[name], **given})
        return cls(text_config=tower("text_config", CLIPModelTextConfig),
                   vision_config=tower("vision_config", CLIPModelVisionConfig),
                   projection_dim=d.get("projection_dim", 512))


class CLIPModel(nn.Module):
    """transformers' CLIPModel as the scores use it: the image tower (clip.VisionTransformer, whose
    `post_layernorm` is CLIP's `ln_post`), the text tower, both projections, and the tokenizer."""

    def __init__(self, cfg=None):
        super().__init__()
        self.config = cfg = cfg or CLIPConfig()
        self.text_model = TextTransformer(cfg.text_config)
        self.vision_model = VisionTransformer(cfg.vision_config)
        self.visual_projection = nn.Linear(cfg.vision_config.hidden_size, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text_config.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.zeros(()))  # CLIP's contrastive temperature; loaded, unused
        self.tokenizer = None  # from_pretrained sets it: the folder's own

    def image_features(self, pixel_values):
        """CLIP-normalised images (B, 3, 224, 224) -> (B, E), transformers' get_image_features: CLIP's
        `ln_post` on the class token, projected."""
        return self.visual_projection(self.vision_model(pixel_values)[:, 0])

    def text_features(self, input_ids):
        """Prompt ids (B, 77) -> (B, E), transformers' get_text_features: the output at <|endoftext|>, projected."""
        x = self.text_model(input_ids)
        eos = eos_positions(input_ids, self.config.text_config.eos_token_id)
        return self.text_projection(x[torch.arange(len(x), device=x.device), eos])

    # Rename rules, applied to the published files before strict loading:
    # - the image tower's tensors by clip.vision_keys_from_clip's rules; the rest of `vision_model.*`
    #   (CLIP's `post_layernorm`, our `post_layernorm` too) keeps its name;
    # - `text_model.embeddings.position_ids`, an arange buffer older transformers saved, is dropped
    #   (as CLIPTextModel drops it); the text tower's other names are ours already.
    @classmethod
    def convert(cls, sd, cfg, source="state dict"):
        """A transformers CLIPModel state dict -> ours, by the rules above."""
        vision = {k.removeprefix("vision_model."): v for k, v in sd.items() if k.startswith("vision_model.")}
        out = {k: v for k, v in sd.items() if not k.startswith("vision_model.") and k not in CLIPTextModel.DROPPED}
        renamed = vision_keys_from_clip(vision, cfg.vision_config.num_hidden_layers, source)
        out.update({"vision_model." + k: v for k, v in {**renamed, **vision}.items()})  # leftovers: load_strict judges
        return out

    @classmethod
    def from_pretrained(cls, folder):
        """A transformers CLIPModel folder with its tokenizer (openai/clip-vit-base-patch32)."""
        tokenizer_files = [os.path.join(folder, f) for f in ("vocab.json", "merges.txt")]
        if os.path.isdir(folder) and not all(map(os.path.isfile, tokenizer_files)):
            raise CheckpointError(f"{folder}: no vocab.json and merges.txt; the CLIP folder must hold its "
                                  f"tokenizer, as openai/clip-vit-base-patch32 does")
        config, sd, source = read_folder(folder)
        cfg = CLIPConfig.from_dict(config)
        with torch.device("meta"):
            model = cls(cfg)
        model = load_strict(model, cls.convert(sd, cfg, source), source).eval()
        model.tokenizer = CLIPTokenizer.from_folder(folder)
        return model


# ---------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------

def pixels(images, short_side, crop, rounding, mean, std):
    """PIL RGB images -> (B, 3, crop, crop): data.center_crop (bicubic, `rounding`'s pixel rounding),
    [0, 1], then (x - mean) / std."""
    x = np.stack([np.asarray(center_crop(im, crop, crop, rounding=rounding, short_side=short_side), np.float32)
                  for im in images]) / 255
    x = torch.from_numpy(x).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def dino_pixels(images):
    """torchvision's Resize(256) + CenterCrop(224) + ToTensor + Normalize(ImageNet), DINO's evaluation."""
    return pixels(images, DINO_RESIZE, DINO_CROP, "torchvision", IMAGENET_MEAN, IMAGENET_STD)


def clip_pixels(images):
    """transformers' CLIPImageProcessor for clip-vit-base-patch32."""
    return pixels(images, CLIP_SIZE, CLIP_SIZE, "transformers", CLIP_MEAN, CLIP_STD)
