"""The BLIP-2 Q-Former as BLIP-Diffusion uses it: image + subject category -> 16 subject embeddings.

BLIP-Diffusion (Li, Li, Hoi 2023, §3.1) feeds a reference image and its category text (e.g. "dog")
to a BLIP-2 Q-Former (Li et al. 2023, §3.1). 16 learned query tokens attend to each other and to the
text, cross-attend to the frozen image features, and their outputs, passed through a projection
layer, are the subject embeddings the text encoder splices into the prompt.

Parts, in file order:
- `QFormerTokenizer`: bert-base-uncased WordPiece plus the `[DEC]` token BLIP-2 adds, and
  `write_bert_vocab`, a vocabulary in BERT's format for a Q-Former trained here from nothing.
- The Q-Former: a BERT-base encoder (post-LN) whose query tokens get their own feed-forward and a
  cross-attention to the image in every layer; the image tower is `clip.VisionTransformer`.
- `ProjLayer`: pre-LN MLP with a residual on the un-normalised input.
BLIP-2 pre-training (stage 1 of BLIP-Diffusion: the ITC, ITM and ITG heads and losses, the start from
BERT and CLIP) is in blip2.py.

Reference it must equal (fp32): diffusers 0.33.1 `Blip2QFormerModel` in
`pipelines/blip_diffusion/modeling_blip2.py` with the transformers 4.51.3 BLIP-2 blocks it imports;
state-dict keys are that model's, so the published `qformer/` folder loads as it is.

Shapes: B batch, Q query tokens (16), T text tokens, N image tokens (257), D width (768).
"""

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from torch import nn

from checkpoint import config_from_dict, load_strict, read_folder, write_text
from clip import NUM_QUERY_TOKENS, VisionConfig, VisionTransformer, quick_gelu

# BLIP-2 appends a decoder start token to bert-base-uncased (`add_special_tokens({"bos_token": "[DEC]"})`);
# it takes the next free id, which is why the published vocab_size is 30522 + 1.
DEC_TOKEN = "[DEC]"
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class QFormerTokenizer:
    """bert-base-uncased WordPiece as transformers' `BertTokenizer` does it, plus `[DEC]`.

    Lowercase and strip accents, split on whitespace and punctuation (CJK characters alone), greedy
    longest-match WordPiece with `[UNK]`, then `[CLS] ... [SEP]`. BLIP-Diffusion tokenizes the subject
    category with `padding=True` and no truncation, so a batch is padded with `[PAD]` to its longest.
    """

    def __init__(self, vocab):
        self.vocab = dict(vocab)
        if DEC_TOKEN not in self.vocab:
            self.vocab[DEC_TOKEN] = len(self.vocab)
        tok = Tokenizer(WordPiece(self.vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        # strip_accents=None follows lowercase, BertTokenizer's default for an uncased vocab.
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        # Special tokens written in the text stay whole, as BertTokenizer's added-token split does.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in BERT_SPECIAL_TOKENS + (DEC_TOKEN,) if t in self.vocab])
        cls, sep = self.vocab["[CLS]"], self.vocab["[SEP]"]
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        tok.enable_padding(pad_id=self.vocab["[PAD]"], pad_token="[PAD]")
        self.tokenizer = tok

    @classmethod
    def from_file(cls, vocab_path):
        """A BERT `vocab.txt`: one token a line, its id the line number."""
        with open(vocab_path, encoding="utf-8") as f:
            return cls({line.rstrip("\n"): i for i, line in enumerate(f)})

    def __len__(self):
        return len(self.vocab)

    def __call__(self, texts):
        """texts (a string or a list) -> (input_ids, attention_mask), both (B, T) int64."""
        encodings = self.tokenizer.encode_batch([texts] if isinstance(texts, str) else list(texts))
        input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        attention_mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return input_ids, attention_mask


# What a WordPiece vocabulary of our own holds beside the words: BERT's special tokens, and the letters
# and signs (alone and as "##" continuations) so that any lower-case word can still be spelt out.
LETTERS = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-&")


def write_bert_vocab(captions, path):
    """A `vocab.txt` in bert-base-uncased's format for a Q-Former trained from nothing (the toy's;
    the tiny test model's with no captions): BERT's special tokens, the letters alone and as "##"
    continuations, then every word of `captions` whole. -> the Q-Former's vocab_size (+ [DEC])."""
    words = sorted({w for c in captions for w in c.lower().split()})
    tokens = list(BERT_SPECIAL_TOKENS) + LETTERS + ["##" + c for c in LETTERS]
    tokens += [w for w in words if w not in tokens]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_text(path, "\n".join(tokens) + "\n")
    return len(tokens) + 1  # + [DEC], which the Q-Former adds as the last id


@dataclass
class QFormerConfig:
    """The `qformer_config` of the published `qformer/config.json` (a Blip2QFormerConfig)."""
    vocab_size: int = 30523                 # bert-base-uncased 30522 + [DEC]
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"                # exact (erf) GELU, as BERT; the only one supported
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_frequency: int = 1      # BLIP-Diffusion cross-attends to the image in every layer
    encoder_hidden_size: int = 1024         # image feature width (CLIP ViT-L); Blip2Config forces it

    def __post_init__(self):
        if self.hidden_act != "gelu":
            raise ValueError(f"qformer_config.hidden_act {self.hidden_act!r}: only 'gelu' is implemented")


@dataclass
class Blip2Config:
    """The published `qformer/config.json`: the Q-Former, its image tower and the number of queries.

    Fields absent from the json take transformers' Blip2*Config defaults, which our defaults equal
    where the published model relies on them (notably the vision LayerNorm eps 1e-6, not LAVIS' 1e-5).
    """
    num_query_tokens: int = NUM_QUERY_TOKENS
    qformer_config: QFormerConfig = field(default_factory=QFormerConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    # Where the reference loads its BertTokenizer from (None = bert-base-uncased). Kept so a loader
    # can find vocab.txt; the weights do not depend on it.
    tokenizer: str | None = None

    def __post_init__(self):
        if isinstance(self.qformer_config, dict):
            self.qformer_config = config_from_dict(QFormerConfig, self.qformer_config)
        if isinstance(self.vision_config, dict):
            self.vision_config = config_from_dict(VisionConfig, self.vision_config)
        # transformers' Blip2Config overwrites the cross-attention key/value width with the image width.
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size


def additive_mask(mask, dtype):
    """1 = attend, 0 = ignore -> 0 / -10000 added to the scores, as BERT and the reference do.

    (B, L) masks the keys for every query; (B, L, L) gives each query position its own row
    (causal text for captioning, or queries that must not see the text). Returns (B, 1, L|1, L).
    """
    mask = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None, :, :]
    return (1.0 - mask.to(dtype)) * -10000.0


class Embeddings(nn.Module):
    """Word + absolute position embeddings for the text; query tokens are prepended without positions."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids=None, queries=None):
        parts = [] if queries is None else [queries]
        if input_ids is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        # (B, Q, D) ; (B, T, D) -> (B, Q+T, D): one LayerNorm over queries and text alike.
        return self.dropout(self.LayerNorm(torch.cat(parts, dim=1)))


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention; keys and values come from `context` (the image) if given."""

    def __init__(self, cfg: QFormerConfig, kv_dim):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.dropout_p = cfg.attention_probs_dropout_prob
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_dim, cfg.hidden_size)
        self.value = nn.Linear(kv_dim, cfg.hidden_size)

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        # (B, L, D) -> (B, heads, L, D/heads)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.query(x), self.key(context), self.value(context)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).flatten(2)


class Output(nn.Module):
    """The end of every BERT sublayer: dense -> dropout -> LayerNorm(h + residual) (post-LN)."""

    def __init__(self, cfg: QFormerConfig, in_dim):
        super().__init__()
        self.dense = nn.Linear(in_dim, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class Attention(nn.Module):
    """Self- or cross-attention followed by its post-LN residual."""

    def __init__(self, cfg: QFormerConfig, kv_dim):
        super().__init__()
        self.attention = MultiHeadAttention(cfg, kv_dim)
        self.output = Output(cfg, cfg.hidden_size)

    def forward(self, x, context=None, mask=None):
        return self.output(self.attention(x, context, mask), x)


class Intermediate(nn.Module):
    """The first half of the feed-forward: dense to 3072, exact GELU."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    """Self-attention over [queries ; text], cross-attention from the queries to the image, then a
    feed-forward of their own for the queries (`*_query`) and another for the text (BLIP-2 §3.1)."""

    def __init__(self, cfg: QFormerConfig, index):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size)
        # With frequency 1 (BLIP-Diffusion) every layer has one; the attribute is absent otherwise,
        # as in the reference, so the state-dict keys match for any frequency.
        if index % cfg.cross_attention_frequency == 0:
            self.crossattention = Attention(cfg, cfg.encoder_hidden_size)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = Output(cfg, cfg.intermediate_size)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg, cfg.intermediate_size)

    def forward(self, x, mask=None, image=None, num_queries=0):
        x = self.attention(x, mask=mask)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if num_queries and image is not None and hasattr(self, "crossattention"):
            # All image tokens are valid: the reference's image mask is all ones, i.e. no mask.
            queries = self.crossattention(queries, context=image)
        queries = self.output_query(self.intermediate_query(queries), queries)
        text = self.output(self.intermediate(text), text)
        return torch.cat([queries, text], dim=1)


class QFormerEncoder(nn.Module):
    """The stack of layers (key prefix `encoder.layer.N`)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList([QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers)])

    def forward(self, x, mask=None, image=None, num_queries=0):
        for layer in self.layer:
            x = layer(x, mask, image, num_queries)
        return x


class ProjLayer(nn.Module):
    """y = x + Dropout(dense2(QuickGELU(dense1(LayerNorm(x))))): pre-LN, residual on the
    un-normalised input, QuickGELU (BLIP-Diffusion §3.1; LAVIS `ProjLayer`, diffusers the same)."""

    def __init__(self, dim=768, hidden_dim=3072, drop_p=0.1, eps=1e-12):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.dense1 = nn.Linear(dim, hidden_dim)
        self.dense2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(drop_p)

    def forward(self, x):
        return x + self.dropout(self.dense2(quick_gelu(self.dense1(self.LayerNorm(x)))))


class QFormer(nn.Module):
    """Image tower + Q-Former + projection: `forward` gives BLIP-Diffusion's subject embeddings."""

    def __init__(self, cfg: Blip2Config):
        super().__init__()
        self.config = cfg
        d = cfg.qformer_config.hidden_size
        self.embeddings = Embeddings(cfg.qformer_config)
        self.visual_encoder = VisionTransformer(cfg.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, d))
        # The reference hard-codes these (hidden 4x width, dropout 0.1, eps 1e-12); none is in the config.
        self.proj_layer = ProjLayer(d, 4 * d, drop_p=0.1, eps=1e-12)
        self.encoder = QFormerEncoder(cfg.qformer_config)

    def encode(self, image_embeds=None, input_ids=None, attention_mask=None, use_queries=True):
        """The Q-Former's last hidden states, (B, Q+T, D) with the Q query outputs first.

        image_embeds (B, N, 1024) from `visual_encoder` (None: no cross-attention, e.g. text only);
        input_ids (B, T) or None (queries only); use_queries=False for text alone.
        attention_mask: (B, T) text padding mask (queries always attend), or (B, Q+T, Q+T) for the
        whole sequence when a caller needs per-position rows (causal text); None = attend all.
        """
        queries = None
        if use_queries:
            batch = (input_ids if input_ids is not None else image_embeds).shape[0]
            queries = self.query_tokens.expand(batch, -1, -1)
        x = self.embeddings(input_ids, queries)
        num_queries = 0 if queries is None else queries.shape[1]
        if attention_mask is not None and attention_mask.dim() == 2 and num_queries:
            ones = attention_mask.new_ones(attention_mask.shape[0], num_queries)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        mask = None if attention_mask is None else additive_mask(attention_mask, x.dtype)
        return self.encoder(x, mask, image_embeds, num_queries)

    def forward(self, pixel_values, input_ids, attention_mask):
        """pixel_values (B, 3, 224, 224), the tokenized subject category -> (B, 16, 768)."""
        image_embeds = self.visual_encoder(pixel_values)
        hidden = self.encode(image_embeds, input_ids, attention_mask)
        return self.proj_layer(hidden[:, :self.config.num_query_tokens])

    @classmethod
    def from_pretrained(cls, folder):
        """Load the published `qformer/` folder (config.json + weights) strictly.

        The tokenizer's vocab.txt is not in that folder (the reference downloads bert-base-uncased);
        the caller finds it and uses `QFormerTokenizer.from_file`.
        """
        config, sd, source = read_folder(folder)
        cfg = config_from_dict(Blip2Config, config)
        sd = {k: v for k, v in sd.items() if not drop_key(k)}
        with torch.device("meta"):
            model = cls(cfg)
        return load_strict(model, sd, source).eval()


def drop_key(key):
    """Rename rules for the published state dict; there is one:
    - drop `*position_ids`: the arange buffer older transformers saved; we compute positions in forward.
    """
    return key.endswith("position_ids")
