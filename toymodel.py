"""The toy BLIP-Diffusion: the published architecture at sizes a laptop CPU trains, its tokenizers
learnt from the toy world's captions, and the curriculum that trains weights/toy/ from nothing.

Every module is the project's own (clip.py, qformer.py, unet.py, vae.py) with small widths; only the
sizes differ from the published model, so every command of the project runs on the toy model as it
is. The curriculum is the paper's, with the part the paper takes from Stable Diffusion trained here
too (stage 0):

  0. data       toyworld.py data: pictures of training identities, their true masks, backgrounds
     vae        the autoencoder (reconstruction + a small KL, as LDM without its GAN)
     clip       tokenizers learnt from the captions; a CLIP image/text pair, contrastive
     t2i        the text-to-image UNet under the frozen CLIP text encoder, as SD
  1. multimodal BLIP-2 stage 1 on the frozen image tower (ITC, ITG, ITM)
  2. pairs      pairs.py --from-masks: degraded true masks, trimap, closed-form matting, new context
     subject    stage 2, subject representation learning on those pairs
  (fine-tuning on a held-out subject is measured by `python toyworld.py evaluate`)

    python toymodel.py --out runs/toy           # every stage, then the model is copied to weights/toy
"""

import argparse
import json
import os
import shutil
import sys
import time

from clip import CLIP_PATTERN, CLIPTextConfig, VisionConfig
from qformer import Blip2Config, QFormerConfig
from unet import UNetConfig
from vae import AutoencoderKLConfig

IMAGE_SIZE = 64  # the toy world's pictures (toyworld.WorldConfig.size)
WIDTH = 128  # text encoder, image tower and Q-Former width; the subject embeddings are (1, 16, WIDTH)


def vae_config():
    # Three levels: 64 px pictures -> 16 x 16 x 4 latents (SD-1.5: 512 -> 64, four levels). The
    # scaling factor is measured on the trained encoder (LDM's 1 / std of the latents) and stored.
    return AutoencoderKLConfig(block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                               up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8,
                               sample_size=IMAGE_SIZE, scaling_factor=1.0)


def text_config(vocab_size):
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                          num_hidden_layers=4, num_attention_heads=4)


def vision_config():
    # 8 px patches: an 8 x 8 grid plus the class token. CLIP's LayerNorm eps.
    return VisionConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=4, num_attention_heads=4,
                        image_size=IMAGE_SIZE, patch_size=8, layer_norm_eps=1e-5)


def blip2_config(vocab_size, vision=None):
    # No dropout: the toy runs are short and must be bit-for-bit reproducible across process counts.
    return Blip2Config(qformer_config=QFormerConfig(
        vocab_size=vocab_size, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=4 * WIDTH, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=64), vision_config=vision or vision_config())


def unet_config():
    # Cross-attention at every level (16, 8, 4): the subject's colour and pattern must reach the
    # finest level through the text states, there being no other way in.
    return UNetConfig(sample_size=IMAGE_SIZE // 4, block_out_channels=(32, 64, 64), layers_per_block=1,
                      down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
                      attention_head_dim=4, cross_attention_dim=WIDTH, norm_num_groups=8)


# ---------------------------------------------------------------------------------------------
# Tokenizers, learnt from the captions
# ---------------------------------------------------------------------------------------------

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def train_clip_tokenizer(captions, folder, vocab_size=700):
    """A byte-level BPE in CLIP's format (vocab.json, merges.txt), learnt from `captions` with the
    `tokenizers` library: CLIP's pre-tokenizer and end-of-word suffix, every byte in the base
    vocabulary (with and without "</w>", as CLIP's), the learnt merges, then the two special tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True), byte_level])
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
    tokens += [BOS, EOS]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return len(tokens)


def write_bert_vocab(captions, path):
    """The Q-Former's WordPiece vocabulary: BERT's special tokens, every word of the captions whole,
    and the letters (alone and as "##" continuations) so an unseen word is still spelt out."""
    words = sorted({w for c in captions for w in c.lower().split()})
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-&")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters]
    tokens += [w for w in words if w not in tokens]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(tokens) + "\n")
    return len(tokens) + 1  # + [DEC], which the Q-Former adds as the last id
