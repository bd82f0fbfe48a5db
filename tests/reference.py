"""Helpers shared by the parity tests: small random reference models and tiny tokenizer files.

Nothing here comes from a hub. Tokenizer files are written by the test itself in the published
formats (CLIP's byte-level BPE `vocab.json` + `merges.txt`, BERT's WordPiece `vocab.txt`).
"""

import json
import os
import shutil
from collections import Counter

import torch

CORPUS = """a photo of a dog swimming underwater, a cat sitting on the sofa in the snow.
A red striped ball on the grass at night; the teapot on a marble table (oil painting)!
subject driven generation with blip diffusion: zero-shot, fine-tuned, controlnet & editing.
wearing a santa hat over-exposure under-exposure saturated duplicate out of frame lowres"""


@torch.no_grad()
def perturb(model, seed=0, scale=0.02):
    """Add noise to every floating parameter and buffer, so that no tensor keeps its
    initial value (a zero-initialised layer would otherwise hide a tensor that never loaded)."""
    g = torch.Generator().manual_seed(seed)
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * scale)
    return model


def bytes_to_unicode():
    """GPT-2/CLIP's reversible map from bytes to printable characters (from the published algorithm)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_bpe(words, num_merges):
    """A plain BPE learner over words ending in '</w>', enough to make a realistic merges file."""
    vocab = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in words if w)
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, n in vocab.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = Counter()
        for word, n in vocab.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        vocab = merged
    return merges


def write_clip_tokenizer(folder, num_merges=60, pad_token="<|endoftext|>", with_maps=True):
    """A small CLIP tokenizer folder in the published format (SD-1.5's `tokenizer/` shape).

    The vocabulary is laid out as CLIP's: 256 byte characters, the same with '</w>', the merges,
    then <|startoftext|> and <|endoftext|>. `pad_token` is written to special_tokens_map.json
    (SD-1.5 pads with <|endoftext|>; SD-2 with "!").
    """
    os.makedirs(folder, exist_ok=True)
    b2u = bytes_to_unicode()
    words = ["".join(b2u[b] for b in w.encode()) for w in CORPUS.lower().replace(",", " ").split()]
    merges = learn_bpe(words, num_merges)
    chars = list(b2u.values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    if with_maps:
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "pad_token": pad_token}
        with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
            json.dump(special, f)
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"model_max_length": 77, "do_lower_case": True, **special}, f)
    return folder


def write_bert_vocab(folder):
    """A small bert-base-uncased-style `vocab.txt`: specials, characters, words and ## pieces."""
    os.makedirs(folder, exist_ok=True)
    words = sorted(set(CORPUS.lower().replace(",", " ").replace(".", " ").split()))
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?()&-'\"é"))
    pieces = ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"] + ["##ing", "##ed", "##s", "##er"]
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(3)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += chars + [w for w in words if w not in chars] + pieces
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("".join(t + "\n" for t in dict.fromkeys(tokens)))
    return folder


def max_abs(a, b):
    return (a.detach().float() - b.detach().float()).abs().max().item()


def assert_close(ours, ref, rel=1e-4):
    """Parity criterion: max abs difference <= rel x the output's scale (its max abs value)."""
    scale = max(ref.detach().abs().max().item(), 1e-6)
    diff = max_abs(ours, ref)
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert diff <= rel * scale, f"max abs diff {diff:.3g} > {rel} x output scale {scale:.3g}"


def tiny_reference_pipeline(folder, seed=0, context=77):
    """A tiny random BLIP-Diffusion built by the reference (diffusers 0.33.1 + transformers 4.51.3),
    every tensor perturbed, saved in the published `Salesforce/blipdiffusion` layout under `folder`
    (with the Q-Former's vocab.txt at bert_tokenizer/, where weights/README.md puts it).

    Shapes keep what the method relies on (16 query tokens, 77 text positions unless `context` says
    fewer, a text width equal to the Q-Former's) and shrink the rest. Returns the reference pipeline,
    in eval mode."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.blip_diffusion import BlipDiffusionPipeline
    from diffusers.pipelines.blip_diffusion.blip_image_processing import BlipImageProcessor
    from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import CLIPTextConfig, CLIPTokenizer
    from transformers.models.blip_2.configuration_blip_2 import Blip2Config

    torch.manual_seed(seed)
    tok_dir = write_clip_tokenizer(os.path.join(folder, "_clip_tokenizer"))
    bert_dir = write_bert_vocab(os.path.join(folder, "bert_tokenizer"))
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    with open(os.path.join(bert_dir, "vocab.txt")) as f:
        bert_vocab = sum(1 for _ in f)
    width = 32
    text_encoder = ContextCLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=context, hidden_act="quick_gelu", projection_dim=width))
    blip = Blip2Config(
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=14, hidden_act="quick_gelu"),
        qformer_config=dict(vocab_size=bert_vocab + 1, hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=512, cross_attention_frequency=1),
        num_query_tokens=16, tokenizer="bert_tokenizer")
    cwd = os.getcwd()
    os.chdir(folder)  # the reference loads its BertTokenizer from config.tokenizer, relative to here
    try:
        qformer = Blip2QFormerModel(blip)
    finally:
        os.chdir(cwd)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width, attention_head_dim=2, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, layers_per_block=1, sample_size=32)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              set_alpha_to_one=False, skip_prk_steps=True)
    image_processor = BlipImageProcessor(size={"height": 28, "width": 28},
                                         image_mean=[0.48145466, 0.4578275, 0.40821073],
                                         image_std=[0.26862954, 0.26130258, 0.27577711])
    for model, scale in ((text_encoder, 0.1), (qformer, 0.1), (unet, 0.05), (vae, 0.05)):
        perturb(model, seed, scale)
    pipe = BlipDiffusionPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                                 scheduler=scheduler, qformer=qformer, image_processor=image_processor,
                                 ctx_begin_pos=2, mean=[0.48145466, 0.4578275, 0.40821073],
                                 std=[0.26862954, 0.26130258, 0.27577711])
    pipe.save_pretrained(folder, safe_serialization=False)  # the published folder holds .bin files
    shutil.rmtree(tok_dir)  # saved again as tokenizer/
    pipe.set_progress_bar_config(disable=True)
    for model in (text_encoder, qformer, unet, vae):
        model.eval()  # built in training mode: the Q-Former's and projection's dropout would be live
    return pipe


# The published preprocessor_config.json of openai/clip-vit-base-patch32 (written by transformers 4.x as a
# CLIPFeatureExtractor): short side 224, bicubic (PIL resample 3), centre crop 224, CLIP's mean/std.
CLIP_B32_PREPROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}


def tiny_reference_dino(folder, seed=0, safe=True, pooler=True, scale=0.3):
    """A small random DINO in facebook/dino-vits16's layout: a transformers ViTModel (4.51.3) with the
    published image and patch sizes (224, 16), so images are preprocessed at their real size, and a narrow
    2-block tower; every tensor perturbed, saved under `folder` (.safetensors, or .bin if not `safe`;
    with ViT's pooler weights if `pooler`). Returns the reference model, in eval mode."""
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                    image_size=224, patch_size=16)
    ref = perturb(ViTModel(cfg, add_pooling_layer=pooler), seed, scale).eval()
    ref.save_pretrained(folder, safe_serialization=safe)
    return ref


def tiny_reference_clip(folder, seed=0, safe=True, legacy_eos=True, scale=0.3):
    """A small random CLIP in openai/clip-vit-base-patch32's layout: a transformers CLIPModel (4.51.3)
    with the published image and patch sizes (224, 32) and narrow 2-block towers, the tiny CLIP tokenizer
    (`write_clip_tokenizer`) and the published preprocessor_config.json; every tensor perturbed, saved
    under `folder`. `legacy_eos`: the text config's eos_token_id is 2, as configs written before
    transformers PR #24773 say (pooling at the highest id); else the tokenizer's <|endoftext|> id.
    Returns the reference model, in eval mode."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    write_clip_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77,
                eos_token_id=2 if legacy_eos else tokenizer.eos_token_id)
    vision = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=224, patch_size=32)
    ref = perturb(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)), seed, scale)
    ref.eval().save_pretrained(folder, safe_serialization=safe)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(CLIP_B32_PREPROCESSOR, f)
    return ref
