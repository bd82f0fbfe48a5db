"""CLIP, the parts BLIP-Diffusion uses: the BPE tokenizer, the text transformer that takes the subject
embeddings, and the ViT-L/14 image tower in front of the Q-Former.

- Tokenizer: CLIP's byte-level BPE (Radford et al. 2021, sec. 2.4), ids equal to transformers' slow
  `CLIPTokenizer` as the BLIP-Diffusion pipeline runs it (without ftfy installed).
- Text transformer: SD-1.5's CLIP text encoder (transformers `CLIPTextModel`). BLIP-Diffusion (Li et al.
  2023, sec. 3.2) inserts the 16 subject embeddings after "a" of the prompt; this must equal diffusers'
  `ContextCLIPTextModel` (pipelines/blip_diffusion/modeling_ctx_clip.py).
- Vision tower: OpenAI's ViT-L/14 with 23 of its 24 blocks plus BLIP-2's `ln_vision` (BLIP-2, Li et al.
  2023, sec. 3.1), equal to diffusers' `Blip2VisionModel` (pipelines/blip_diffusion/modeling_blip2.py).
- CLIPSeg (Lüddecke & Ecker 2022), the text-prompted segmenter of BLIP-Diffusion's prompted context
  generation (stage-2 pre-training): CLIP ViT-B/16 plus a small FiLM-conditioned decoder, equal to
  transformers' `CLIPSegForImageSegmentation` loaded from `CIDAS/clipseg-rd64-refined`.

Letters in shape comments: B batch, L text positions, N image patches, D width, H heads, R decoder
width (reduce_dim), G patch-grid side.
"""

import functools
import json
import math
import os
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from checkpoint import CheckpointError, config_from_dict, load_strict, read_folder

# BLIP-Diffusion inserts NUM_QUERY_TOKENS subject embeddings (the Q-Former's 16 queries) into the prompt
# at CTX_BEGIN_POS, after <|startoftext|> and "a" (paper sec. 3.2; model_index.json `ctx_begin_pos: 2`).
NUM_QUERY_TOKENS = 16
CTX_BEGIN_POS = 2
# CLIP's text context; the conditional prompt is tokenized to 77 - 16 = 61 ids so the result is 77 long.
MAX_LENGTH = 77
# OpenAI CLIP's image normalisation (BLIP-Diffusion's preprocessor_config.json image_mean / image_std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# CLIPSeg's input (CIDAS/clipseg-rd64-refined preprocessor_config.json): a direct 352 x 352 resize, aspect
# not kept, bilinear, then ImageNet's mean/std, not CLIP's (the published processor switched to these in
# January 2023; the original Quickstart notebook uses them too).
CLIPSEG_SIZE = 352
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------

# The words CLIP's BPE sees: contractions, runs of letters, single digits, runs of other symbols.
CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# CLIP's vocabulary is 256 bytes x 2 (with and without </w>) + merges + 2 specials = 49408 ids, so
# only the first 49152 - 256 - 2 merges are used (the slow tokenizer slices merges.txt the same way).
MAX_MERGES = 49152 - 256 - 2


def is_cjk(ch):
    """The CJK ideograph blocks that BERT's BasicTokenizer sets apart as words of their own."""
    cp = ord(ch)
    return any(a <= cp <= b for a, b in [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                          (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                          (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)])


def clean_text(text):
    """The clean-up of transformers' slow CLIPTokenizer when ftfy is not installed (BERT's BasicTokenizer
    without accent stripping or punctuation splitting): whitespace characters become spaces, other
    control characters go, CJK ideographs become words, NFC, split on whitespace, lower-case each word."""
    chars = []
    for ch in text:
        category = unicodedata.category(ch)
        if ch in "\t\n\r" or category == "Zs":
            chars.append(" ")
        elif ch == "\ufffd" or category.startswith("C"):
            continue
        else:
            chars.append(f" {ch} " if is_cjk(ch) else ch)
    words = unicodedata.normalize("NFC", "".join(chars)).split()
    # Python's lower() per word (not the tokenizers library's per-character Lowercase), so a final
    # sigma becomes "ς" as in the reference.
    return " ".join(w.lower() for w in words)


def _special(value):
    """A special token as written in the maps: a string, or an AddedToken dict with a `content`."""
    return value["content"] if isinstance(value, dict) else value


class CLIPTokenizer:
    """CLIP's BPE on the `tokenizers` library, with the text clean-up of transformers' slow tokenizer.

    The BLIP-Diffusion pipeline loads transformers' slow `CLIPTokenizer`; without ftfy it cleans text
    as `clean_text` does. transformers' fast tokenizer keeps control characters (zero-width joiners in
    emoji too), keeps runs of CJK ideographs whole and lower-cases a final sigma to "σ", so it
    disagrees with the slow one on such text; we follow the slow one.
    """

    def __init__(self, vocab, merges, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                 pad_token="<|endoftext|>", unk_token="<|endoftext|>"):
        for name, token in [("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)]:
            if token not in vocab:
                raise CheckpointError(f"{name} token {token!r} is not in the vocabulary")
        bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=unk_token)
        self.tokenizer = Tokenizer(bpe)
        self.tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> printable chars
        ])
        # Special tokens written in a prompt stay whole, as in the reference tokenizers. That includes
        # the pad token: with pad "!" (SD-2's tokenizer) every "!" in a prompt is the single id of "!".
        self.tokenizer.add_special_tokens([bos_token, eos_token, pad_token, unk_token])
        self.bos_id, self.eos_id, self.pad_id = vocab[bos_token], vocab[eos_token], vocab[pad_token]
        # Training sees the same few prompts again and again, and clean_text is slow Python: remembered.
        self._ids = functools.lru_cache(maxsize=1 << 16)(
            lambda text: tuple(self.tokenizer.encode(clean_text(text), add_special_tokens=False).ids))

    @classmethod
    def from_folder(cls, folder):
        """A published tokenizer folder: vocab.json, merges.txt, and the special-token maps if present."""
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
            lines = f.read().strip().split("\n")[1:MAX_MERGES + 1]  # line 0 is "#version: ..."
        merges = [tuple(line.split()) for line in lines]
        specials = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins, as in transformers
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    d = json.load(f)
                specials.update({k: _special(d[k]) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                                 if d.get(k) is not None})
        return cls(vocab, merges, **specials)

    def encode(self, text):
        """The BPE ids of `text`, without <|startoftext|> / <|endoftext|>."""
        return list(self._ids(text))

    def count(self, text):
        """How many ids `text` needs, with <|startoftext|> and <|endoftext|>, before any truncation."""
        return len(self.encode(text)) + 2

    def __call__(self, texts, max_length=MAX_LENGTH):
        """Prompts -> ids (B, max_length): BOS, text cut to fit, EOS, then the pad token."""
        rows = []
        for text in texts:
            ids = [self.bos_id] + self.encode(text)[:max_length - 2] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------
# Transformer blocks shared by the text and image towers (pre-LN, QuickGELU, as in OpenAI CLIP)
# ---------------------------------------------------------------------------------------------------

def quick_gelu(x):
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x) (config hidden_act "quick_gelu")."""
    return x * torch.sigmoid(1.702 * x)


def attention(q, k, v, heads, mask=None):
    """Multi-head attention of (B, L, D) projections; `mask` is boolean, True where attention is allowed."""
    B, L, D = q.shape
    q, k, v = (t.view(B, L, heads, D // heads).transpose(1, 2) for t in (q, k, v))  # -> (B, H, L, D/H)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale 1/sqrt(D/H), as CLIP
    return x.transpose(1, 2).reshape(B, L, D)


class TextAttention(nn.Module):
    """CLIP text attention: separate q/k/v projections (transformers `CLIPAttention`, which transformers'
    CLIP image towers use too, CLIPSeg's included)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask))


class VisionAttention(nn.Module):
    """ViT attention: one packed [q; k; v] projection (OpenAI's `in_proj`, diffusers' `qkv`)."""

    def __init__(self, dim, heads, bias=True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.projection = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.projection(attention(q, k, v, self.heads, mask))


class MLP(nn.Module):
    def __init__(self, dim, hidden, act=quick_gelu):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = act  # QuickGELU in the CLIP towers, ReLU in CLIPSeg's decoder

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, self_attn, dim, hidden, eps):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = self_attn
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, hidden)

    def forward(self, x, mask=None):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask)
        return x


def check_activation(cfg):
    # Every published CLIP tower here uses QuickGELU (fact 11 of the reference notes); refuse others
    # rather than silently computing something else.
    if cfg.hidden_act != "quick_gelu":
        raise CheckpointError(f"hidden_act {cfg.hidden_act!r}: only 'quick_gelu' (OpenAI CLIP) is supported")


# ---------------------------------------------------------------------------------------------------
# Text transformer
# ---------------------------------------------------------------------------------------------------

@dataclass
class CLIPTextConfig:
    """transformers' CLIPTextConfig fields; defaults = SD-1.5's text encoder (BLIP-Diffusion's text_encoder/)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


class TextEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids, ctx_embeddings=None, ctx_begin_pos=CTX_BEGIN_POS):
        x = self.token_embedding(input_ids)
        if ctx_embeddings is not None:
            # BLIP-Diffusion sec. 3.2: the subject embeddings become ordinary prompt tokens, placed
            # before the position embeddings are added, so they take positions 2..17. (B, 61 + 16, D)
            p = ctx_begin_pos
            x = torch.cat([x[:, :p], ctx_embeddings.to(x.dtype), x[:, p:]], dim=1)
        L = x.shape[1]
        if L > self.position_embedding.num_embeddings:
            raise ValueError(f"{L} positions (ids + subject embeddings) exceed CLIP's "
                             f"{self.position_embedding.num_embeddings}; tokenize the prompt to 77 - 16 = 61 ids")
        return x + self.position_embedding(torch.arange(L, device=x.device))


class TextTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        check_activation(cfg)
        D = cfg.hidden_size
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder([
            EncoderLayer(TextAttention(D, cfg.num_attention_heads), D, cfg.intermediate_size, cfg.layer_norm_eps)
            for _ in range(cfg.num_hidden_layers)])
        # diffusers' ContextCLIPTextModel builds this one with LayerNorm's default eps 1e-5 whatever the
        # config says; transformers uses layer_norm_eps. Both are 1e-5 in every published config.
        self.final_layer_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)

    def forward(self, input_ids, ctx_embeddings=None, ctx_begin_pos=CTX_BEGIN_POS):
        x = self.embeddings(input_ids, ctx_embeddings, ctx_begin_pos)
        # CLIP's causal mask over every position, the inserted subject tokens included: they see the
        # tokens before them, not each other in both directions (fact 1 of the reference notes).
        L = x.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        return self.final_layer_norm(self.encoder(x, causal))


class CLIPTextModel(nn.Module):
    """SD-1.5's CLIP text encoder; with `ctx_embeddings`, BLIP-Diffusion's ContextCLIPTextModel."""

    def __init__(self, cfg=None):
        super().__init__()
        self.config = cfg = cfg or CLIPTextConfig()
        self.text_model = TextTransformer(cfg)

    def forward(self, input_ids, ctx_embeddings=None, ctx_begin_pos=CTX_BEGIN_POS):
        """ids (B, L) -> last hidden state (B, L, D).

        With `ctx_embeddings` (B, 16, D) the ids are the 61-long conditional prompt and the subject
        embeddings are inserted after the first `ctx_begin_pos` ids, so the output is (B, 77, D).
        (diffusers takes one begin position per sample; the pipeline always uses 2 for all.)
        """
        return self.text_model(input_ids, ctx_embeddings, ctx_begin_pos)

    # Rename rules, applied to the published files before strict loading:
    # - drop `text_model.embeddings.position_ids`: an arange(77) buffer that older transformers saved
    #   (BLIP-Diffusion's text_encoder/pytorch_model.bin and SD-1.5's single file hold it); we compute it.
    DROPPED = ("text_model.embeddings.position_ids",)
    # - SD-1.5's single file (CompVis layout) keeps the HF CLIP names under this prefix, the one diffusers'
    #   `convert_ldm_clip_checkpoint` strips.
    COMPVIS_PREFIX = "cond_stage_model.transformer."

    @classmethod
    def from_state_dict(cls, state_dict, cfg=None, source="state dict"):
        sd = {k: v for k, v in state_dict.items() if k not in cls.DROPPED}
        with torch.device("meta"):
            model = cls(cfg)
        return load_strict(model, sd, source).eval()

    @classmethod
    def from_pretrained(cls, folder):
        """A transformers CLIPTextModel / diffusers ContextCLIPTextModel folder (config.json + weights)."""
        config, sd, source = read_folder(folder)
        return cls.from_state_dict(sd, config_from_dict(CLIPTextConfig, config), source)

    @classmethod
    def from_compvis(cls, state_dict, cfg=None, source="CompVis single-file checkpoint"):
        """The text encoder out of a whole Stable Diffusion v1 single file (v1-5-pruned-emaonly.safetensors)."""
        n = len(cls.COMPVIS_PREFIX)
        sd = {k[n:]: v for k, v in state_dict.items() if k.startswith(cls.COMPVIS_PREFIX)}
        if not sd:
            raise CheckpointError(f"{source}: no keys under {cls.COMPVIS_PREFIX!r}; not an SD-1.x checkpoint")
        return cls.from_state_dict(sd, cfg, source)


# ---------------------------------------------------------------------------------------------------
# Vision transformer
# ---------------------------------------------------------------------------------------------------

@dataclass
class VisionConfig:
    """transformers' Blip2VisionConfig fields; defaults = BLIP-Diffusion's qformer/config.json vision_config."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 23  # BLIP-2 drops the last of ViT-L/14's 24 blocks (uses the penultimate)
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    # diffusers' Blip2VisionConfig default, which the published config leaves in place; LAVIS uses 1e-5
    # (fact 6 of the reference notes). We follow the config, so a folder that sets 1e-5 gets 1e-5.
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, P = cfg.hidden_size, cfg.patch_size
        num_positions = (cfg.image_size // P) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, D))
        self.patch_embedding = nn.Conv2d(3, D, kernel_size=P, stride=P, bias=False)  # OpenAI's bias-free conv1
        self.position_embedding = nn.Parameter(torch.zeros(1, num_positions, D))

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, D, H/P, W/P) -> (B, N, D)
        cls = self.class_embedding.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        return x + self.position_embedding[:, :x.shape[1]]


class VisionTransformer(nn.Module):
    """CLIP ViT-L/14 without its last block and `ln_post`, then BLIP-2's `ln_vision` (`post_layernorm`)."""

    def __init__(self, cfg=None):
        super().__init__()
        self.config = cfg = cfg or VisionConfig()
        check_activation(cfg)
        D = cfg.hidden_size
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layernorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.encoder = Encoder([
            EncoderLayer(VisionAttention(D, cfg.num_attention_heads, cfg.qkv_bias), D, cfg.intermediate_size,
                         cfg.layer_norm_eps)
            for _ in range(cfg.num_hidden_layers)])
        self.post_layernorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values):
        """Normalised images (B, 3, H, W) -> image features (B, 1 + N, D), N = (H/P)(W/P)."""
        x = self.pre_layernorm(self.embeddings(pixel_values))
        return self.post_layernorm(self.encoder(x))

    @classmethod
    def from_pretrained(cls, folder):
        """A diffusers/transformers Blip2VisionModel folder (config.json + weights). No renames needed."""
        config, sd, source = read_folder(folder)
        with torch.device("meta"):
            model = cls(config_from_dict(VisionConfig, config))
        return load_strict(model, sd, source).eval()

    # transformers' CLIPVisionConfig defaults (ViT-B/32): config.json omits fields equal to these.
    CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)

    @classmethod
    def from_clip(cls, folder):
        """OpenAI CLIP's image tower from a transformers CLIPVisionModel or CLIPModel folder
        (openai/clip-vit-large-patch14), made into BLIP-2's ViT as BLIP-2 pre-training starts. Rules:
        - keep blocks 0..n-2 and drop the last: BLIP-2 feeds the Q-Former the penultimate block's
          output, so block n-1 and CLIP's `post_layernorm` (its `ln_post`) are dropped unused;
        - q/k/v projections are packed as [q; k; v] into `qkv`; `out_proj` is `projection`;
        - class embedding (D) -> (1, 1, D), position table (1 + N, D) -> (1, 1 + N, D);
        - `pre_layrnorm` (sic) is our `pre_layernorm`;
        - our `post_layernorm` is BLIP-2's new `ln_vision`, NOT CLIP's post_layernorm: it starts as
          the identity LayerNorm (ones, zeros) and is trained in stage 1;
        - text-tower keys of a CLIPModel are ignored; any other leftover vision key is an error.
        LayerNorm eps is CLIP's (1e-5, as LAVIS), not the 1e-6 of BLIP-Diffusion's published config.
        """
        config, sd, source = read_folder(folder)
        c = {**cls.CLIP_DEFAULTS, **config.get("vision_config", config)}
        cfg = config_from_dict(VisionConfig, {**c, "num_hidden_layers": c["num_hidden_layers"] - 1})
        sd = {k.removeprefix("vision_model."): v for k, v in sd.items() if k.startswith("vision_model.")}

        def take(key):
            if key not in sd:
                raise CheckpointError(f"{source}: vision_model.{key} not found; not a CLIP image tower?")
            return sd.pop(key)

        out = {"embeddings.class_embedding": take("embeddings.class_embedding").reshape(1, 1, -1),
               "embeddings.patch_embedding.weight": take("embeddings.patch_embedding.weight"),
               "embeddings.position_embedding": take("embeddings.position_embedding.weight")[None]}
        sd.pop("embeddings.position_ids", None)  # an arange buffer older transformers saved
        for p in ("weight", "bias"):
            out[f"pre_layernorm.{p}"] = take(f"pre_layrnorm.{p}")
            for i in range(cfg.num_hidden_layers):
                layer = f"encoder.layers.{i}."
                qkv = [take(layer + f"self_attn.{x}_proj.{p}") for x in "qkv"]
                out[layer + f"self_attn.qkv.{p}"] = torch.cat(qkv)  # [q; k; v] along the output rows
                out[layer + f"self_attn.projection.{p}"] = take(layer + f"self_attn.out_proj.{p}")
                for name in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
                    out[layer + f"{name}.{p}"] = take(layer + f"{name}.{p}")
        out["post_layernorm.weight"] = torch.ones(cfg.hidden_size)
        out["post_layernorm.bias"] = torch.zeros(cfg.hidden_size)
        dropped = (f"encoder.layers.{cfg.num_hidden_layers}.", "post_layernorm.")
        if leftover := [k for k in sd if not k.startswith(dropped)]:
            raise CheckpointError(f"{source}: unexpected vision keys: {leftover[:8]}")
        with torch.device("meta"):
            model = cls(cfg)
        return load_strict(model, out, source).eval()


# ---------------------------------------------------------------------------------------------------
# CLIPSeg: text-prompted segmentation (prompted context generation's first step)
# ---------------------------------------------------------------------------------------------------

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
        if self.eos_token_id == 2:  # the published config: transformers' legacy pooling at the highest id
            eos = input_ids.argmax(dim=-1)
        else:  # newer configs: the first eos id (the pad id may equal it)
            eos = (input_ids == self.eos_token_id).int().argmax(dim=-1)
        return self.text_projection(x[torch.arange(len(x), device=x.device), eos])


class CLIPSegDecoderLayer(nn.Module):
    """Post-LN with ReLU: x = LN(x + attn(x)), then x = LN(x + mlp(x)). The original decoder is PyTorch's
    default nn.TransformerEncoderLayer, unlike CLIP's pre-LN QuickGELU blocks (reference notes, fact 8)."""

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
