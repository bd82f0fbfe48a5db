"""CLIP, the parts BLIP-Diffusion uses: the BPE tokenizer, the text transformer that takes the subject
embeddings, and the ViT-L/14 image tower in front of the Q-Former.

- Tokenizer: CLIP's byte-level BPE (Radford et al. 2021, sec. 2.4), ids equal to transformers' slow
  `CLIPTokenizer` as the BLIP-Diffusion pipeline runs it (without ftfy installed); and
  `train_clip_tokenizer`, a BPE in CLIP's format learnt from captions, for models trained from nothing.
- Text transformer: SD-1.5's CLIP text encoder (transformers `CLIPTextModel`). BLIP-Diffusion (Li et al.
  2023, sec. 3.2) inserts the 16 subject embeddings after "a" of the prompt; this must equal diffusers'
  `ContextCLIPTextModel` (pipelines/blip_diffusion/modeling_ctx_clip.py). `contrastive_loss` is CLIP's
  objective, for an image/text pair trained from nothing (train.py --stage clip).
- Vision tower: OpenAI's ViT-L/14 with 23 of its 24 blocks plus BLIP-2's `ln_vision` (BLIP-2, Li et al.
  2023, sec. 3.1), equal to diffusers' `Blip2VisionModel` (pipelines/blip_diffusion/modeling_blip2.py);
  blip2.vision_from_clip makes it from OpenAI's weights (`vision_keys_from_clip`), as BLIP-2
  pre-training starts. By config the same tower is also CLIP ViT-B/32's and DINO's ViT-S/16, the
  metric networks of evaluate.py (metrics.py).
- CLIPSeg, the segmenter of prompted context generation, is built from these blocks in clipseg.py.

Letters in shape comments: B batch, L text positions, N image patches, D width, H heads.
"""

import functools
import json
import os
import unicodedata
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from checkpoint import CheckpointError, config_from_dict, load_strict, read_folder, write_text

# BLIP-Diffusion inserts NUM_QUERY_TOKENS subject embeddings (the Q-Former's 16 queries) into the prompt
# at CTX_BEGIN_POS, after <|startoftext|> and "a" (paper sec. 3.2; model_index.json `ctx_begin_pos: 2`).
NUM_QUERY_TOKENS = 16
CTX_BEGIN_POS = 2
# CLIP's text context; the conditional prompt is tokenized to 77 - 16 = 61 ids so the result is 77 long.
MAX_LENGTH = 77
# OpenAI CLIP's image normalisation (BLIP-Diffusion's preprocessor_config.json image_mean / image_std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------

# The words CLIP's BPE sees: contractions, runs of letters, single digits, runs of other symbols.
CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# CLIP's vocabulary is 256 bytes x 2 (with and without </w>) + merges + 2 specials = 49408 ids, so
# only the first 49152 - 256 - 2 merges are used (the slow tokenizer slices merges.txt the same way).
MAX_MERGES = 49152 - 256 - 2
# CLIP's special tokens; the end token pads too (SD-1.5's special_tokens_map.json).
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"


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

    def __init__(self, vocab, merges, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                 unk_token=EOS_TOKEN):
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


def train_clip_tokenizer(captions, folder, vocab_size=700):
    """A byte-level BPE in CLIP's format (vocab.json, merges.txt) learnt from `captions` with the
    `tokenizers` library, for a model trained from nothing: CLIP's pre-tokenizer and end-of-word
    suffix, every byte in the base vocabulary (with and without "</w>", as CLIP's), the learnt merges
    (none from no captions: every word spelt out byte by byte), then the two special tokens.
    -> the vocabulary size."""
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator([c.lower() for c in captions], trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars]
    seen = set(tokens)
    for m in merges:
        merged = m.replace(" ", "")
        if merged not in seen:
            seen.add(merged)
            tokens.append(merged)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    os.makedirs(folder, exist_ok=True)
    write_text(os.path.join(folder, "vocab.json"), json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    write_text(os.path.join(folder, "merges.txt"), "#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return len(tokens)


# ---------------------------------------------------------------------------------------------------
# Transformer blocks shared by the text and image towers (pre-LN, QuickGELU, as in OpenAI CLIP)
# ---------------------------------------------------------------------------------------------------

def quick_gelu(x):
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x) (config hidden_act "quick_gelu")."""
    return x * torch.sigmoid(1.702 * x)


# The activations of the published towers, by their config name: QuickGELU in OpenAI's CLIP, the exact
# (erf) GELU in the ViT that DINO trained (facebook/dino-vits16's hidden_act "gelu", transformers' GELUActivation).
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


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
    """Pre-LN residual block: x + attn(LN(x)), then x + mlp(LN(x)). transformers' ViTLayer is the same
    block (layernorm_before, attention, layernorm_after, intermediate + output)."""

    def __init__(self, self_attn, dim, hidden, eps, act=quick_gelu):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = self_attn
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, hidden, act)

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


def check_activation(cfg, supported=("quick_gelu",)):
    """-> the activation `cfg.hidden_act` names. Every published CLIP tower here uses QuickGELU: OpenAI's
    ViT-L/14 and ViT-B/32, SD-1.5's text encoder and the vision_config of BLIP-Diffusion's
    qformer/config.json all set hidden_act "quick_gelu"; the image tower also takes DINO's "gelu".
    Others are refused rather than silently computing something else."""
    if cfg.hidden_act not in supported:
        raise CheckpointError(f"hidden_act {cfg.hidden_act!r}: only {' or '.join(map(repr, supported))} "
                              f"is supported here")
    return ACTIVATIONS[cfg.hidden_act]


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
        # tokens before them, not each other in both directions (diffusers' ContextCLIPTextTransformer,
        # pipelines/blip_diffusion/modeling_ctx_clip.py, builds it over ids + subject embeddings).
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


def eos_positions(input_ids, eos_token_id):
    """(B, L) ids -> (B,) the position whose output is the prompt's CLIP embedding (transformers'
    CLIPTextTransformer `pooler_output`, before `text_projection`): <|endoftext|>. A config written
    before transformers PR #24773 (OpenAI's CLIP folders, CLIPSeg's) says eos_token_id 2; transformers
    then takes the highest id, which is <|endoftext|>, the last of CLIP's vocabulary. Otherwise the
    first eos id (the pad id may equal it)."""
    if eos_token_id == 2:
        return input_ids.argmax(dim=-1)
    return (input_ids == eos_token_id).int().argmax(dim=-1)


def contrastive_loss(image_embeds, text_embeds, logit_scale):
    """CLIP's objective (Radford et al. 2021, Fig. 3) for B matching pairs: both embeddings
    L2-normalised, their (B, B) similarities scaled by exp(logit_scale) (capped at 100, as CLIP), and a
    symmetric cross-entropy in which image i must pick caption i and caption i image i."""
    image, text = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * image @ text.T  # (B, B): image i vs caption j
    labels = torch.arange(len(text), device=text.device)
    return (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.T.float(), labels)) / 2


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
    # (lavis/models/clip_vit.py builds its LayerNorms with PyTorch's default eps). We follow the
    # config, so a folder that sets 1e-5 gets 1e-5.
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
    """CLIP ViT-L/14 without its last block and `ln_post`, then BLIP-2's `ln_vision` (`post_layernorm`).
    With other configs: CLIP ViT-B/32 whole, `post_layernorm` being CLIP's `ln_post`; with two parts
    replaced, DINO's ViT-S/16, `post_layernorm` being ViT's final `layernorm` (metrics.DINOViT)."""

    def __init__(self, cfg=None):
        super().__init__()
        self.config = cfg = cfg or VisionConfig()
        act = check_activation(cfg, ("quick_gelu", "gelu"))
        D = cfg.hidden_size
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layernorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.encoder = Encoder([
            EncoderLayer(VisionAttention(D, cfg.num_attention_heads, cfg.qkv_bias), D, cfg.intermediate_size,
                         cfg.layer_norm_eps, act)
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


# transformers' CLIPVisionConfig defaults (ViT-B/32): a config.json omits the fields equal to these.
CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def vision_keys_from_clip(sd, num_layers, source):
    """The image tower of a transformers CLIPVisionModel or CLIPModel file -> VisionTransformer's tensors
    for its embeddings, `pre_layernorm` and blocks 0..num_layers-1. `sd` holds the file's `vision_model.*`
    tensors without that prefix; what is taken is removed from it, and the caller decides the rest
    (`post_layernorm`, later blocks, leftovers: blip2.vision_from_clip, evaluate.CLIPModel). Rules:
    - q/k/v projections are packed as [q; k; v] into `qkv`, VisionAttention's one projection (OpenAI's
      `in_proj`); `out_proj` is `projection`;
    - class embedding (D) -> (1, 1, D), position table (1 + N, D) -> (1, 1 + N, D), as diffusers'
      Blip2VisionModel keeps them;
    - `pre_layrnorm` (sic) is our `pre_layernorm`;
    - `embeddings.position_ids`, an arange buffer older transformers saved, is dropped.
    """
    def take(key):
        if key not in sd:
            raise CheckpointError(f"{source}: vision_model.{key} not found; not a CLIP image tower?")
        return sd.pop(key)

    out = {"embeddings.class_embedding": take("embeddings.class_embedding").reshape(1, 1, -1),
           "embeddings.patch_embedding.weight": take("embeddings.patch_embedding.weight"),
           "embeddings.position_embedding": take("embeddings.position_embedding.weight")[None]}
    sd.pop("embeddings.position_ids", None)
    for p in ("weight", "bias"):
        out[f"pre_layernorm.{p}"] = take(f"pre_layrnorm.{p}")
        for i in range(num_layers):
            layer = f"encoder.layers.{i}."
            qkv = [take(layer + f"self_attn.{x}_proj.{p}") for x in "qkv"]
            out[layer + f"self_attn.qkv.{p}"] = torch.cat(qkv)  # [q; k; v] along the output rows
            out[layer + f"self_attn.projection.{p}"] = take(layer + f"self_attn.out_proj.{p}")
            for name in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
                out[layer + f"{name}.{p}"] = take(layer + f"{name}.{p}")
    return out
