"""clip.py against its references: transformers' CLIP tokenizers and CLIPTextModel, diffusers'
ContextCLIPTextModel, Blip2VisionModel and single-file converter, and CLIPModel's contrastive loss.
Small random models, saved in the published layouts and loaded back by our code."""

import json

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2VisionModel
from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
from reference import assert_close, perturb, write_clip_tokenizer
from transformers import CLIPTextConfig as RefTextConfig
from transformers import CLIPTextModel as RefTextModel
from transformers import CLIPTokenizer as SlowTokenizer
from transformers import CLIPTokenizerFast as FastTokenizer
from transformers.models.blip_2.configuration_blip_2 import Blip2VisionConfig

import clip
from checkpoint import CheckpointError

# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------

PROMPTS = [
    "a photo of a dog", "A Photo OF a DOG!!!", "hi! there", "hello,world;(oil painting)...",
    "it's they're I'M we'll '''s ''re ---", "  multiple   spaces\n\nnewlines\t\ttabs  ", "",
    "numbers 12345 3.14", "café naïve Ångström e\u0301", "nbsp\u00a0and\u2003em space", "line\u2028sep",
    "ﬁ ligature ① ² ½ Ǆ", "a <|endoftext|> inside", "a<|ENDOFTEXT|>b<|startoftext|>",
    "wearing a santa hat, " * 30,
]
# Where transformers' slow and fast tokenizers disagree (control characters, emoji joined by U+200D,
# CJK runs, final sigma); ours must equal the slow one, which the BLIP-Diffusion pipeline loads.
SLOW_ONLY = [
    "emoji 🐶🎉 ❤️ 👨\u200d👩\u200d👧", "CJK 猫の写真 한국어 日本語テキスト", "ΑΣ ΣΊΣΥΦΟΣ straße İstanbul",
    "ctrl\x07char\x00zero\u200bwidth\ufeffbom x\ufffdy", "a\x0bb\x0cc\x1cd\x85e",
]


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"])
def tokenizers(request, tmp_path_factory):
    folder = write_clip_tokenizer(str(tmp_path_factory.mktemp("tok")), pad_token=request.param)
    return clip.CLIPTokenizer.from_folder(folder), SlowTokenizer.from_pretrained(folder), \
        FastTokenizer.from_pretrained(folder)


def reference_ids(tok, texts, max_length):
    return tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt").input_ids


@pytest.mark.parametrize("max_length", [77, 61])
def test_tokenizer_equals_slow_and_fast(tokenizers, max_length):
    ours, slow, fast = tokenizers
    ids = ours(PROMPTS + SLOW_ONLY, max_length=max_length)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS + SLOW_ONLY), max_length)
    assert torch.equal(ids, reference_ids(slow, PROMPTS + SLOW_ONLY, max_length))
    assert torch.equal(ids[:len(PROMPTS)], reference_ids(fast, PROMPTS, max_length))
    # The disagreement is real (otherwise SLOW_ONLY belongs in PROMPTS).
    assert not torch.equal(ids[len(PROMPTS):], reference_ids(fast, SLOW_ONLY, max_length))


def test_tokenizer_truncation_padding_and_count(tokenizers):
    ours, slow, _ = tokenizers
    long, short = "wearing a santa hat, " * 30, "a dog"
    assert ours.count(long) == len(slow(long).input_ids) > 77  # what a CLI warns about
    assert ours.count(short) == len(slow(short).input_ids) < 77
    ids = ours([long, short])
    assert ids[0, 0] == slow.bos_token_id and ids[0, -1] == slow.eos_token_id  # EOS kept after cutting
    n = ours.count(short)
    assert ids[1, n - 1] == slow.eos_token_id and (ids[1, n:] == slow.pad_token_id).all()


def test_tokenizer_without_special_maps(tmp_path):
    # Only vocab.json + merges.txt: the defaults are CLIP's (pad = <|endoftext|>), as in transformers.
    folder = write_clip_tokenizer(str(tmp_path), with_maps=False)
    ours, slow = clip.CLIPTokenizer.from_folder(folder), SlowTokenizer.from_pretrained(folder)
    assert torch.equal(ours(PROMPTS), reference_ids(slow, PROMPTS, 77))


def test_tokenizer_special_map_wins_over_config(tmp_path):
    folder = write_clip_tokenizer(str(tmp_path), pad_token="!")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|endoftext|>"}))
    ours, slow = clip.CLIPTokenizer.from_folder(folder), SlowTokenizer.from_pretrained(folder)
    assert slow.pad_token == "!" and torch.equal(ours(PROMPTS), reference_ids(slow, PROMPTS, 77))


# ---------------------------------------------------------------------------------------------------
# Text transformer
# ---------------------------------------------------------------------------------------------------

TINY_TEXT = dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu")


def saved(ref, folder, safe=True):
    perturb(ref.eval(), seed=1, scale=0.5)
    ref.save_pretrained(folder, safe_serialization=safe)
    return ref


@pytest.mark.parametrize("safe", [True, False])
def test_text_equals_context_clip(tmp_path, safe):
    torch.manual_seed(0)
    ref = saved(ContextCLIPTextModel(RefTextConfig(**TINY_TEXT)), tmp_path, safe)
    if not safe:  # the .bin holds the position_ids buffer, as the published text_encoder/ does
        assert "text_model.embeddings.position_ids" in torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    ours = clip.CLIPTextModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 600, (2, 77 - clip.NUM_QUERY_TOKENS))
    ctx = torch.randn(2, clip.NUM_QUERY_TOKENS, 32)
    with torch.no_grad():
        got = ours(ids, ctx_embeddings=ctx)
        want = ref(input_ids=ids, ctx_embeddings=ctx, ctx_begin_pos=[clip.CTX_BEGIN_POS] * 2).last_hidden_state
        assert got.shape == (2, 77, 32)
        assert_close(got, want)
        with pytest.raises(ValueError, match="61 ids"):  # 77 ids + 16 embeddings do not fit
            ours(torch.randint(0, 600, (2, 77)), ctx_embeddings=ctx)
        # Without subject embeddings: plain causal CLIP on 77 ids.
        ids = torch.randint(0, 600, (2, 77))
        assert_close(ours(ids), ref(input_ids=ids, ctx_embeddings=None, ctx_begin_pos=None).last_hidden_state)


def test_text_equals_transformers_clip(tmp_path):
    torch.manual_seed(0)
    ref = saved(RefTextModel(RefTextConfig(**TINY_TEXT)), tmp_path)
    ours = clip.CLIPTextModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 600, (3, 77))
    with torch.no_grad():
        assert_close(ours(ids), ref(input_ids=ids).last_hidden_state)
        # Causal: changing the last id changes only the last position.
        changed = ids.clone()
        changed[:, -1] = (changed[:, -1] + 1) % 600
        diff = (ours(changed) - ours(ids)).abs().amax(dim=(0, 2))
        assert (diff[:-1] == 0).all() and diff[-1] > 0


def test_text_from_compvis_via_diffusers_converter():
    torch.manual_seed(0)
    ref = perturb(RefTextModel(RefTextConfig(**TINY_TEXT)).eval(), seed=2, scale=0.5)
    hf = ref.state_dict()
    hf["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # SD-1.5's file holds it
    single_file = {clip.CLIPTextModel.COMPVIS_PREFIX + k: v for k, v in hf.items()}
    single_file["model.diffusion_model.out.0.weight"] = torch.ones(4)  # the UNet etc. are in the same file
    single_file["first_stage_model.decoder.conv_in.bias"] = torch.ones(4)
    # diffusers' own converter maps this layout back to the transformers names...
    converted = convert_ldm_clip_checkpoint(single_file)
    assert converted.keys() == hf.keys() and all(torch.equal(converted[k], hf[k]) for k in hf)
    # ...and ours loads the same file into the same model.
    ours = clip.CLIPTextModel.from_compvis(single_file, clip.CLIPTextConfig(**TINY_TEXT))
    ids = torch.randint(0, 600, (2, 77))
    with torch.no_grad():
        assert_close(ours(ids), ref(input_ids=ids).last_hidden_state)
    with pytest.raises(CheckpointError, match="cond_stage_model"):
        clip.CLIPTextModel.from_compvis({"model.diffusion_model.out.0.weight": torch.ones(4)})


def test_text_strict_loading_names_missing_key(tmp_path):
    ref = RefTextModel(RefTextConfig(**TINY_TEXT))
    ref.text_model.final_layer_norm = torch.nn.Identity()  # a file without the final LayerNorm
    ref.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="final_layer_norm.weight"):
        clip.CLIPTextModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Vision transformer
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image_size,patch_size,eps,safe", [(28, 14, 1e-6, True), (32, 8, 1e-5, False)])
def test_vision_equals_blip2_vision_model(tmp_path, image_size, patch_size, eps, safe):
    torch.manual_seed(0)
    cfg = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=image_size, patch_size=patch_size, hidden_act="quick_gelu",
                            layer_norm_eps=eps)
    ref = saved(Blip2VisionModel(cfg), tmp_path, safe)
    ours = clip.VisionTransformer.from_pretrained(tmp_path)
    assert ours.config.layer_norm_eps == eps  # LAVIS's 1e-5 is honoured when a config sets it
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        got = ours(x)
        assert got.shape == (2, 1 + (image_size // patch_size) ** 2, 32)
        assert_close(got, ref(pixel_values=x).last_hidden_state)


# ---------------------------------------------------------------------------------------------------
# Published sizes, on the meta device
# ---------------------------------------------------------------------------------------------------

def same_parameters(ours, ref, dropped=()):
    ref_sd = {k: v for k, v in ref.state_dict().items() if k not in dropped}
    assert ours.state_dict().keys() == ref_sd.keys()
    assert all(ours.state_dict()[k].shape == v.shape for k, v in ref_sd.items())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_published_text_encoder_size():
    sd15 = RefTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768,
                         hidden_act="quick_gelu")  # SD-1.5's text_encoder/config.json
    with torch.device("meta"):
        ours, ref, ctx = clip.CLIPTextModel(), RefTextModel(sd15), ContextCLIPTextModel(sd15)
    same_parameters(ours, ref, clip.CLIPTextModel.DROPPED)
    same_parameters(ours, ctx, clip.CLIPTextModel.DROPPED)
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480  # SD-1.5's 123M text encoder


def test_published_vision_size():
    published = Blip2VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                  num_attention_heads=16, patch_size=14, hidden_act="quick_gelu")
    with torch.device("meta"):
        ours, ref = clip.VisionTransformer(), Blip2VisionModel(published)
    same_parameters(ours, ref)
    assert ours.embeddings.position_embedding.shape == (1, 257, 1024)


def test_contrastive_loss_is_clips():
    # train.py --stage clip: transformers' CLIPModel loss on the same projected embeddings.
    from transformers.models.clip.modeling_clip import clip_loss
    g = torch.Generator().manual_seed(0)
    image, text, logit_scale = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.tensor(2.0)
    normed = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    want = clip_loss(logit_scale.exp() * normed(text) @ normed(image).T)  # (texts, images), as CLIPModel
    assert torch.allclose(clip.contrastive_loss(image, text, logit_scale), want, rtol=1e-6, atol=1e-6)
    # exp(logit_scale) is capped at 100, as OpenAI's CLIP clamps it.
    capped = clip_loss(100 * normed(text) @ normed(image).T)
    assert torch.allclose(clip.contrastive_loss(image, text, torch.tensor(10.0)), capped, rtol=1e-6, atol=1e-6)
