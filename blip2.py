"""BLIP-2 pre-training, stage 1 of BLIP-Diffusion: the Q-Former learns to read images with text.

BLIP-Diffusion (Li, Li, Hoi 2023, §3.1) starts from a BLIP-2 Q-Former pre-trained as BLIP-2 (Li et al.
2023, §3.2): the image tower frozen, the Q-Former trained with three losses that share it, each with
its own attention mask: image-text contrast (ITC), image-text matching (ITM) and image-grounded text
generation (ITG). The heads below exist only for this stage; the published BLIP-Diffusion `qformer/`
(diffusers' `Blip2QFormerModel`) holds none of them, and `proj_layer` is unused here.

Parts, in file order:
- `Blip2Pretraining`: the Q-Former (qformer.py) plus BLIP-2's heads and losses.
  Reference behaviour: LAVIS `lavis/models/blip2_models/blip2_qformer.py` (`Blip2Qformer.forward`).
- `init_from_bert`: the Q-Former's start from bert-base-uncased, as BLIP-2 does.
- `vision_from_clip`: the image tower's start from OpenAI CLIP ViT-L/14, as BLIP-2 does.
- `pretraining_model`: stage 1's starting point from those folders (train.py --stage multimodal).

Shapes: B batch, Q query tokens, T text tokens, N image tokens, D width, E contrastive width (256).
"""

import dataclasses
import os
import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from checkpoint import CheckpointError, config_from_dict, load_strict, read_folder
from clip import CLIP_VISION_DEFAULTS, NUM_QUERY_TOKENS, VisionConfig, VisionTransformer, vision_keys_from_clip
from qformer import Blip2Config, QFormer, QFormerConfig

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
def hard_negatives(sim, own, generator=None):
    """For row i of a (B, G) similarity, a column j != own[i] drawn with probability ~ softmax(row) + 1e-4
    (LAVIS' floor, so any other pair can be drawn). `generator`: one CPU generator for all rows, or a
    list of one per row (then a row's draw depends on that row alone, as on any number of processes).
    Drawn on the CPU, so a CPU generator gives the same negatives whatever the device."""
    weights = F.softmax(sim.float(), dim=1).cpu() + 1e-4
    weights[torch.arange(len(weights)), own.cpu()] = 0
    if isinstance(generator, (list, tuple)):
        drawn = torch.cat([torch.multinomial(w, 1, generator=g) for w, g in zip(weights, generator)])
    else:
        drawn = torch.multinomial(weights, 1, generator=generator)[:, 0]
    return drawn.to(sim.device)


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward gives each process the gradient of its own rows, summed over the
    processes whose losses used them (LAVIS' `all_gather_with_grad`)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd may share the incoming one
        dist.all_reduce(grad)
        n = len(grad) // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(x):
    """The rows of `x` from every process of the run, in rank order (`x` itself in a single process),
    with the gradient flowing back to each process's own rows."""
    return GatherWithGrad.apply(x) if distributed() else x


def mean_count(flags):
    """The number of true `flags` on each process, averaged over the processes."""
    n = flags.sum().float()
    if distributed():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n


def longest(n, device):
    """The largest `n` of all processes (each pads its captions to its own longest); the collective
    runs on `device` (NCCL takes CUDA tensors only)."""
    if not distributed():
        return n
    n = torch.tensor(n, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return int(n)


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

    def forward(self, input_ids, attention_mask, pixel_values=None, image_embeds=None, generator=None,
                positions=None):
        """One batch of B matching pairs -> dict(loss, itc, itm, itg); loss is their sum, as LAVIS.

        Give pixel_values (the ViT runs without grad, `ln_vision` trains) or image_embeds (B, N, 1024),
        precomputed features after `post_layernorm`, which then trains nothing in the image tower.
        input_ids (B, T) from `QFormerTokenizer` ([CLS] first); attention_mask (B, T).
        `generator` (a CPU torch.Generator, or a list of one per pair) draws the ITM hard negatives,
        reproducibly on any device.

        Under torch.distributed, as LAVIS, ITC contrasts each pair with the pairs of every process and
        ITM draws its negatives from all of them (`gather`, gradients flowing back; every process gives
        the same B). `positions` (B,) are the pairs' places in the global batch (default: the
        processes' batches one after the other): the gathered pairs are put in that order, so with
        one generator per pair, N processes compute what one process computes on the whole batch.
        """
        if image_embeds is None:
            image_embeds = self.image_features(pixel_values)
        B, T = input_ids.shape
        Q = self.qformer.config.num_query_tokens
        if positions is None:  # the processes' batches one after the other
            positions = torch.arange(B) + (dist.get_rank() * B if distributed() else 0)
        positions = positions.to(input_ids.device)
        everyone = gather(positions)
        if len(everyone.unique()) != len(everyone):
            raise ValueError("positions: two pairs at one place of the global batch; give each its own")
        order = everyone.argsort()
        own = torch.searchsorted(everyone[order], positions)  # each pair's column among all of them
        if len(everyone) < 2:
            raise ValueError("BLIP-2 pre-training needs at least 2 pairs per batch: ITC and ITM take "
                             "their negatives from the other pairs of the batch")

        # ITC: queries alone (with the image) vs text alone ([CLS] output); the similarity of a pair is
        # the best of its Q query-text similarities.
        image_feats = F.normalize(self.vision_proj(self.qformer.encode(image_embeds)), dim=-1)  # (B, Q, E)
        text = self.qformer.encode(None, input_ids, attention_mask, use_queries=False)
        text_feat = F.normalize(self.text_proj(text[:, 0]), dim=-1)  # (B, E)
        all_image_feats, all_text_feat = gather(image_feats)[order], gather(text_feat)[order]  # (G, Q, E), (G, E)
        sim_i2t = torch.einsum("iqe,te->itq", image_feats, all_text_feat).amax(-1) / self.temp  # (B, G)
        sim_t2i = torch.einsum("iqe,te->tiq", all_image_feats, text_feat).amax(-1) / self.temp  # (B, G)
        itc = (F.cross_entropy(sim_i2t, own, label_smoothing=LABEL_SMOOTHING)
               + F.cross_entropy(sim_t2i, own, label_smoothing=LABEL_SMOOTHING)) / 2

        # ITM: for each image a hard negative text and for each text a hard negative image, drawn in
        # proportion to their ITC similarity (never the true partner); queries and text see each other.
        neg_text, neg_image = hard_negatives(sim_i2t, own, generator), hard_negatives(sim_t2i, own, generator)
        # Captions padded to the longest of any process ([PAD] = 0, masked: the same results).
        pad = longest(T, input_ids.device) - T
        itm_ids, itm_mask = F.pad(input_ids, (0, pad)), F.pad(attention_mask, (0, pad))
        all_ids, all_mask, all_images = (gather(x)[order] for x in (itm_ids, itm_mask, image_embeds))
        ids = torch.cat([itm_ids, itm_ids, all_ids[neg_text]])                       # pos, pos, neg
        mask = torch.cat([itm_mask, itm_mask, all_mask[neg_text]])
        images = torch.cat([image_embeds, all_images[neg_image], image_embeds])      # pos, neg, pos
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
        # Position t predicts token t + 1. The mean over the caption tokens of all processes: each
        # process divides its sum by their count over the processes' number (DDP averages).
        itg = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(), ignore_index=-100,
                              label_smoothing=LABEL_SMOOTHING, reduction="sum") / mean_count(targets[:, 1:] != -100)
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


def vision_from_clip(folder):
    """OpenAI CLIP's image tower from a transformers CLIPVisionModel or CLIPModel folder
    (openai/clip-vit-large-patch14), made into BLIP-2's ViT (clip.VisionTransformer) as BLIP-2
    pre-training starts. Rules:
    - keep blocks 0..n-2 and drop the last: BLIP-2 feeds the Q-Former the penultimate block's
      output, so block n-1 and CLIP's `post_layernorm` (its `ln_post`) are dropped unused;
    - the kept tensors are renamed by clip.vision_keys_from_clip's rules (q/k/v packed into `qkv`,
      the class and position embeddings reshaped, `pre_layrnorm` (sic) is `pre_layernorm`);
    - our `post_layernorm` is BLIP-2's new `ln_vision`, NOT CLIP's post_layernorm: it starts as
      the identity LayerNorm (ones, zeros) and is trained in stage 1;
    - text-tower keys of a CLIPModel are ignored; any other leftover vision key is an error.
    LayerNorm eps is CLIP's (1e-5, as LAVIS), not the 1e-6 of BLIP-Diffusion's published config.
    """
    config, sd, source = read_folder(folder)
    c = {**CLIP_VISION_DEFAULTS, **config.get("vision_config", config)}
    cfg = config_from_dict(VisionConfig, {**c, "num_hidden_layers": c["num_hidden_layers"] - 1})
    sd = {k.removeprefix("vision_model."): v for k, v in sd.items() if k.startswith("vision_model.")}
    out = vision_keys_from_clip(sd, cfg.num_hidden_layers, source)
    out["post_layernorm.weight"] = torch.ones(cfg.hidden_size)
    out["post_layernorm.bias"] = torch.zeros(cfg.hidden_size)
    dropped = (f"encoder.layers.{cfg.num_hidden_layers}.", "post_layernorm.")
    if leftover := [k for k in sd if not k.startswith(dropped)]:
        raise CheckpointError(f"{source}: unexpected vision keys: {leftover[:8]}")
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    return load_strict(model, out, source).eval()


def pretraining_model(bert, clip_vision, sizes=None):
    """Stage 1's starting point -> (Blip2Pretraining, path of the Q-Former's vocab.txt, report).

    Published (`sizes` None, BLIP-2 §3): the image tower from OpenAI CLIP ViT-L/14 (`clip_vision`, an
    openai/clip-vit-large-patch14 folder, by `vision_from_clip`), the Q-Former from BERT-base (`bert`,
    a bert-base-uncased folder, by `init_from_bert`); the report names what BERT did not fill.
    With `sizes` (a Blip2Config: a smaller model's, the toy's), `clip_vision` is an image tower of
    ours (clip.VisionTransformer's folder, as train.py --stage clip writes it) and the Q-Former starts
    from scratch at those sizes, there being no BERT of them: `bert` needs only its vocab.txt. The
    vocabulary size is the vocab.txt's (+ [DEC]) and the image tower's config is the tower's.
    Its random initialisation draws from torch's global generator (the caller seeds it).
    """
    vocab = os.path.join(bert, "vocab.txt")
    if not os.path.isfile(vocab):
        raise CheckpointError(f"{vocab}: missing; the BERT folder must hold its vocab.txt")
    with open(vocab, encoding="utf-8") as f:
        tokens = sum(1 for _ in f) + 1  # + [DEC]
    vit = VisionTransformer.from_pretrained(clip_vision) if sizes else vision_from_clip(clip_vision)
    qformer = dataclasses.replace(sizes.qformer_config if sizes else QFormerConfig(), vocab_size=tokens)
    model = Blip2Pretraining(Blip2Config(num_query_tokens=sizes.num_query_tokens if sizes else NUM_QUERY_TOKENS,
                                         qformer_config=qformer, vision_config=vit.config))
    model.qformer.visual_encoder = vit
    if sizes:
        return model, vocab, None
    unused, fresh = init_from_bert(model, bert)
    return model, vocab, (f"initialised from BERT; not used: {', '.join(unused) or 'nothing'}; "
                          f"newly initialised: {', '.join(fresh) or 'nothing'}")
