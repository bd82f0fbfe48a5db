"""The BLIP-2 Q-Former as BLIP-Diffusion uses it: image + subject category -> 16 subject embeddings.

BLIP-Diffusion (Li, Li, Hoi 2023, §3.1) feeds a reference image and its category text (e.g. "dog")
to a BLIP-2 Q-Former (Li et al. 2023, §3.1). 16 learned query tokens attend to each other and to the
text, cross-attend to the frozen image features, and their outputs, passed through a projection
layer, are the subject embeddings the text encoder splices into the prompt.

Parts, in file order:
- `QFormerTokenizer`: bert-base-uncased WordPiece plus the `[DEC]` token BLIP-2 adds.
- The Q-Former: a BERT-base encoder (post-LN) whose query tokens get their own feed-forward and a
  cross-attention to the image in every layer; the image tower is `clip.VisionTransformer`.
- `ProjLayer`: pre-LN MLP with a residual on the un-normalised input.
- BLIP-2 pre-training (stage 1 of BLIP-Diffusion, §5.7 of the reference notes): `Blip2Pretraining`
  with the ITC, ITM and ITG losses, and `init_from_bert`.

Reference it must equal (fp32): diffusers 0.33.1 `Blip2QFormerModel` in
`pipelines/blip_diffusion/modeling_blip2.py` with the transformers 4.51.3 BLIP-2 blocks it imports;
state-dict keys are that model's, so the published `qformer/` folder loads as it is.

Shapes: B batch, Q query tokens (16), T text tokens, N image tokens (257), D width (768),
E contrastive width (256).
"""

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from torch import nn

from checkpoint import CheckpointError, config_from_dict, load_strict, read_folder
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


# ---------------------------------------------------------------------------------------------------
# BLIP-2 pre-training (stage 1 of BLIP-Diffusion): ITC, ITM and ITG on image-text pairs
# ---------------------------------------------------------------------------------------------------
# BLIP-2 §3.2 trains the Q-Former (the image tower frozen) with three losses that share it, each with
# its own attention mask. The heads below exist only for this stage; the published BLIP-Diffusion
# `qformer/` holds none of them (reference notes §3.3), and `proj_layer` is unused here.
# Reference behaviour: LAVIS `lavis/models/blip2_models/blip2_qformer.py` (`Blip2Qformer.forward`).

EMBED_DIM = 256              # BLIP-2's contrastive embedding width (`embed_dim`)
TEMP_INIT = 0.07             # BLIP-2's initial learned temperature; LAVIS does not clamp it in stage 1
LABEL_SMOOTHING = 0.1        # LAVIS smooths the ITC and ITG targets (not ITM's)
BERT_INIT_STD = 0.02         # bert-base-uncased `initializer_range`


def bert_init(module):
    """BERT's initialisation (transformers `_init_weights`), which LAVIS gets for every Q-Former weight
    that bert-base-uncased does not provide (cross-attention, the [DEC] row)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=BERT_INIT_STD)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class LMPredictionHead(nn.Module):
    """BERT's `cls.predictions`: dense -> GELU -> LayerNorm, then the word-embedding matrix + a bias.

    BERT ties `cls.predictions.decoder.weight` to the word embeddings; we multiply by them directly and
    keep no decoder module, so a checkpoint has no duplicate key and loading cannot untie them.
    """

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.transform = nn.ModuleDict(dict(dense=nn.Linear(cfg.hidden_size, cfg.hidden_size),
                                            LayerNorm=nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)))
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x, word_embeddings):
        x = self.transform.LayerNorm(F.gelu(self.transform.dense(x)))
        return F.linear(x, word_embeddings, self.bias)  # (B, T, D) -> (B, T, vocab)


@torch.no_grad()
def hard_negatives(sim, generator=None):
    """For row i of a (B, B) similarity, a column j != i drawn with probability ~ softmax(row) + 1e-4
    (LAVIS' floor, so any other pair can be drawn). Drawn on the CPU: a CPU generator then gives the
    same negatives whatever the device."""
    weights = F.softmax(sim.float(), dim=1).cpu() + 1e-4
    weights.fill_diagonal_(0)
    return torch.multinomial(weights, 1, generator=generator)[:, 0].to(sim.device)


def multimodal_causal_mask(attention_mask, num_queries):
    """(B, T) text padding mask -> (B, Q+T, Q+T) for ITG: queries see the queries only, text sees
    every query and the non-padding text up to itself."""
    B, T, Q = *attention_mask.shape, num_queries
    causal = torch.ones(T, T, dtype=attention_mask.dtype, device=attention_mask.device).tril()
    mask = attention_mask.new_zeros(B, Q + T, Q + T)
    mask[:, :, :Q] = 1
    mask[:, Q:, Q:] = causal * attention_mask[:, None, :]
    return mask


class Blip2Pretraining(nn.Module):
    """The Q-Former (`.qformer`, keys as published) plus BLIP-2's pre-training heads and losses."""

    def __init__(self, cfg: Blip2Config, embed_dim=EMBED_DIM):
        super().__init__()
        d = cfg.qformer_config.hidden_size
        self.qformer = QFormer(cfg)
        self.cls = nn.ModuleDict(dict(predictions=LMPredictionHead(cfg.qformer_config)))
        self.vision_proj = nn.Linear(d, embed_dim)
        self.text_proj = nn.Linear(d, embed_dim)
        self.itm_head = nn.Linear(d, 2)
        self.temp = nn.Parameter(torch.tensor(TEMP_INIT))
        # As LAVIS: BERT's init for the Q-Former and LM head, N(0, 0.02) queries; the three projections
        # keep PyTorch's default, being plain nn.Linear outside BERT there too.
        for m in (self.qformer.embeddings, self.qformer.encoder, self.cls):
            bert_init(m)
        nn.init.normal_(self.qformer.query_tokens, std=BERT_INIT_STD)
        # [DEC] took the first free id when BLIP-2 added it, i.e. the last row of the embeddings.
        self.dec_token_id = cfg.qformer_config.vocab_size - 1

    def image_features(self, pixel_values):
        """BLIP-2 freezes the ViT but trains `ln_vision` (our `post_layernorm`) in stage 1."""
        vit = self.qformer.visual_encoder
        with torch.no_grad():
            x = vit.encoder(vit.pre_layernorm(vit.embeddings(pixel_values)))
        return vit.post_layernorm(x)

    def forward(self, input_ids, attention_mask, pixel_values=None, image_embeds=None, generator=None):
        """One batch of B >= 2 matching pairs -> dict(loss, itc, itm, itg); loss is their sum, as LAVIS.

        Give pixel_values (the ViT runs without grad, `ln_vision` trains) or image_embeds (B, N, 1024),
        precomputed features after `post_layernorm`, which then trains nothing in the image tower.
        input_ids (B, T) from `QFormerTokenizer` ([CLS] first); attention_mask (B, T).
        `generator` (a CPU torch.Generator) draws the ITM hard negatives, reproducibly on any device.
        Differs from LAVIS: contrast and negatives come from this process's batch only; LAVIS gathers
        features and images from all GPUs (all_gather) before both.
        """
        if image_embeds is None:
            image_embeds = self.image_features(pixel_values)
        B, T = input_ids.shape
        if B < 2:
            raise ValueError("BLIP-2 pre-training needs at least 2 pairs per batch: ITC and ITM take "
                             "their negatives from the other pairs of the batch")
        Q = self.qformer.config.num_query_tokens

        # ITC: queries alone (with the image) vs text alone ([CLS] output); the similarity of a pair is
        # the best of its Q query-text similarities.
        image_feats = F.normalize(self.vision_proj(self.qformer.encode(image_embeds)), dim=-1)  # (B, Q, E)
        text = self.qformer.encode(None, input_ids, attention_mask, use_queries=False)
        text_feat = F.normalize(self.text_proj(text[:, 0]), dim=-1)  # (B, E)
        sim = torch.einsum("iqe,te->itq", image_feats, text_feat).amax(-1) / self.temp  # (B images, B texts)
        targets = torch.arange(B, device=sim.device)
        itc = (F.cross_entropy(sim, targets, label_smoothing=LABEL_SMOOTHING)
               + F.cross_entropy(sim.T, targets, label_smoothing=LABEL_SMOOTHING)) / 2

        # ITM: for each image a hard negative text and for each text a hard negative image, drawn in
        # proportion to their ITC similarity (never the true partner); queries and text see each other.
        neg_text, neg_image = hard_negatives(sim, generator), hard_negatives(sim.T, generator)
        ids = torch.cat([input_ids, input_ids, input_ids[neg_text]])                 # pos, pos, neg
        mask = torch.cat([attention_mask, attention_mask, attention_mask[neg_text]])
        images = torch.cat([image_embeds, image_embeds[neg_image], image_embeds])    # pos, neg, pos
        logits = self.itm_head(self.qformer.encode(images, ids, mask)[:, :Q]).mean(1)  # (3B, 2)
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
        itm = F.cross_entropy(logits, labels)

        # ITG: caption the image. [DEC] replaces [CLS]; queries see only queries, text sees all queries
        # and the earlier text (BLIP-2 Fig. 2's multimodal causal mask); padding is never a target.
        # LAVIS feeds the text the ITC query pass as cached keys/values; running the queries again
        # under this mask gives the same values (one more query pass, fresh dropout).
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.dec_token_id
        hidden = self.qformer.encode(image_embeds, dec_ids, multimodal_causal_mask(attention_mask, Q))[:, Q:]
        logits = self.cls.predictions(hidden, self.qformer.embeddings.word_embeddings.weight)
        targets = dec_ids.masked_fill(attention_mask == 0, -100)
        # Position t predicts token t + 1.
        itg = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(),
                              ignore_index=-100, label_smoothing=LABEL_SMOOTHING)
        return dict(loss=itc + itm + itg, itc=itc, itm=itm, itg=itg)


def init_from_bert(model, folder):
    """Initialise a Q-Former (`QFormer` or `Blip2Pretraining`) from a transformers BERT folder
    (bert-base-uncased: config.json + weights), as BLIP-2 does. Returns (unused BERT keys, our keys
    left as initialised), layer numbers folded to `*`. Rules:
    - an optional `bert.` prefix is dropped; `attention.self` is our `attention.attention`;
    - LayerNorm `gamma`/`beta` (the names in bert-base-uncased's own files) are `weight`/`bias`;
    - BERT's feed-forward (`intermediate`, `output`) fills the text one and ALSO the query one
      (`*_query`), as LAVIS copies it after loading;
    - the word embeddings and LM bias fill their first 30522 rows; the [DEC] row gets what
      transformers' `resize_token_embeddings` gave it in LAVIS: N(0, 0.02), and a zero bias;
    - `cls.predictions` (transform and bias) fills the LM head of a `Blip2Pretraining`; its decoder
      weight is the word-embedding matrix again (tied) and is not counted as unused;
    - cross-attention, query tokens and the BLIP-2 heads are not in BERT and keep their init;
    - unused: the token-type embeddings (the Q-Former has none, as in LAVIS), pooler, NSP head.
    """
    config, sd, source = read_folder(folder)
    prefix = "qformer." if isinstance(model, Blip2Pretraining) else ""
    ours = model.state_dict()
    vocab = ours[prefix + "embeddings.word_embeddings.weight"].shape[0]
    if config.get("vocab_size", 30522) + 1 != vocab:
        raise CheckpointError(f"{source}: BERT vocab {config.get('vocab_size')} + [DEC] != Q-Former vocab {vocab}")

    def targets(key):
        key = key.removeprefix("bert.").replace(".attention.self.", ".attention.attention.")
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
        if key == "cls.predictions.decoder.bias":  # the same tensor as cls.predictions.bias
            key = "cls.predictions.bias"
        if key.startswith("cls."):
            return [key]
        ffn = re.fullmatch(r"(encoder\.layer\.\d+)\.(intermediate|output)\.(.+)", key)
        if ffn:
            layer, part, rest = ffn.groups()
            return [f"{prefix}{layer}.{part}.{rest}", f"{prefix}{layer}.{part}_query.{rest}"]
        return [prefix + key]

    filled, unused = set(), []
    with torch.no_grad():
        for key, tensor in sd.items():
            names = [n for n in targets(key) if n in ours]
            if not names:
                if key.removeprefix("bert.") != "cls.predictions.decoder.weight":
                    unused.append(key)
                continue
            for name in names:
                dst = ours[name]
                if name.endswith(("word_embeddings.weight", "cls.predictions.bias")):  # one row per token
                    dst, dec = dst[:tensor.shape[0]], dst[tensor.shape[0]:]
                    if dec.dim() == 2:
                        dec.normal_(std=BERT_INIT_STD)
                    else:
                        dec.zero_()
                if dst.shape != tensor.shape:
                    raise CheckpointError(f"{source}: {key} {tuple(tensor.shape)} does not fit {name} "
                                          f"{tuple(dst.shape)}")
                dst.copy_(tensor)
                filled.add(name)
    required = [k for k in ours if k.startswith((prefix + "embeddings.", prefix + "encoder."))
                and ".crossattention." not in k]
    if missing := [k for k in required if k not in filled]:
        raise CheckpointError(f"{source}: BERT weights missing for {len(missing)} Q-Former keys, "
                              f"e.g. {missing[:4]}")
    fresh = [k for k in ours if k not in filled and not k.startswith(prefix + "visual_encoder.")]
    return fold_layers(unused), fold_layers(fresh)


def fold_layers(keys):
    """encoder.layer.0.x, encoder.layer.1.x, ... -> encoder.layer.*.x, for short reports."""
    return sorted({re.sub(r"\.\d+\.", ".*.", k) for k in keys})
