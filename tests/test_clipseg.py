"""clipseg.py's CLIPSeg against transformers 4.51.3's CLIPSegForImageSegmentation and CLIPSegProcessor:
small random models saved in the published `CIDAS/clipseg-rd64-refined` layout and loaded back by our
code, the processor with the published settings, and the published sizes on the meta device."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from reference import assert_close, perturb, write_clip_tokenizer
from transformers import CLIPSegConfig as RefConfig
from transformers import CLIPSegForImageSegmentation as RefCLIPSeg
from transformers import CLIPSegProcessor, ViTImageProcessor
from transformers import CLIPTokenizer as RefTokenizer

import clipseg
from checkpoint import CheckpointError

PROMPTS = ["a dog", "a red striped ball on the grass", "the teapot"]


def tiny_config(vocab_size, eos_token_id, complex_head=True):
    """Small sizes that keep what the method relies on: 77 text positions, a position table smaller
    than the input grid (so it is interpolated), extracted blocks short of the last one, and patch 16, for
    which the refined head's two x(16/4) steps give one logit per pixel."""
    return RefConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0,
                         eos_token_id=eos_token_id),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                           image_size=32, patch_size=16),
        projection_dim=20, extract_layers=[0, 1, 2], reduce_dim=16, decoder_num_attention_heads=2,
        decoder_intermediate_size=24, use_complex_transposed_convolution=complex_head)


def saved_reference(folder, eos, safe=True, complex_head=True):
    """A perturbed reference model saved under `folder` with a tiny CLIP tokenizer beside it, as the
    published folder holds one. `eos` "legacy" writes the published eos_token_id 2."""
    write_clip_tokenizer(str(folder))
    ref_tok = RefTokenizer.from_pretrained(folder)
    eos_id = 2 if eos == "legacy" else ref_tok.eos_token_id
    torch.manual_seed(0)
    ref = perturb(RefCLIPSeg(tiny_config(len(ref_tok), eos_id, complex_head)).eval(), seed=1, scale=0.2)
    ref.save_pretrained(folder, safe_serialization=safe)
    if not safe:  # the published 2022 .bin also holds the position_ids buffers; our rename rule drops them
        path = folder / "pytorch_model.bin"
        sd = torch.load(path, weights_only=True)
        sd["clip.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        sd["clip.vision_model.embeddings.position_ids"] = torch.arange(5)[None]
        torch.save(sd, path)
    return ref, ref_tok


@pytest.mark.parametrize("safe,eos,complex_head", [(True, "legacy", True), (False, "first", True),
                                                   (True, "legacy", False)])
def test_logits_equal_transformers(tmp_path, safe, eos, complex_head):
    ref, ref_tok = saved_reference(tmp_path, eos, safe, complex_head)
    ours = clipseg.CLIPSeg.from_pretrained(tmp_path)
    assert ours.config.use_complex_transposed_convolution is complex_head
    # 64 px -> a 4 x 4 grid against the 2 x 2 position table: the interpolated path, as 352 px vs 224.
    pixels = torch.randn(len(PROMPTS), 3, 64, 64)
    # transformers as its pipeline runs: padded to the longest prompt, with an attention mask; ours pads
    # to 77. The text tower is causal, so positions after <|endoftext|> cannot change its embedding.
    ref_in = ref_tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = ref(pixel_values=pixels, **ref_in)
        ids = ours.tokenizer(PROMPTS)
        assert_close(ours.clip.text_features(ids), want.conditional_embeddings)
        got = ours(pixels, ids)
        assert got.shape == (len(PROMPTS), 64, 64)
        assert_close(got, want.logits)
        # Each prompt conditions its own image: swapping prompts changes the logits.
        assert not torch.allclose(ours(pixels, ids.flip(0)), got, atol=1e-3)
        # At the table's own size no interpolation happens, in either implementation.
        small = pixels[:, :, :32, :32]
        assert_close(ours(small, ids), ref(pixel_values=small, **ref_in).logits)


def test_segment_equals_processor_and_model(tmp_path):
    ref, ref_tok = saved_reference(tmp_path, "legacy")
    ours = clipseg.CLIPSeg.from_pretrained(tmp_path)
    processor = CLIPSegProcessor(image_processor=published_image_processor(), tokenizer=ref_tok)
    image = random_image(90, 61)
    with torch.no_grad():
        want = torch.sigmoid(ref(**processor(text=PROMPTS, images=[image] * 3, padding=True,
                                             return_tensors="pt")).logits)
        got = ours.segment([image], PROMPTS)
    assert got.shape == (3, clipseg.CLIPSEG_SIZE, clipseg.CLIPSEG_SIZE)
    assert_close(got, want)
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        ours.segment([image, image], PROMPTS)


def published_image_processor():
    # CIDAS/clipseg-rd64-refined's preprocessor_config.json: a 352x352 squash, ImageNet mean and std.
    return ViTImageProcessor(do_resize=True, size={"height": 352, "width": 352}, resample=2, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True,
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    # Smooth plus noisy content, so the bilinear filter's weights matter.
    ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    noise = rng.integers(0, 80, (height, width, 3))
    return Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8))


def test_preprocess_equals_published_processor():
    images = [random_image(97, 61), random_image(400, 500, seed=1)]  # non-square, down and up
    want = torch.from_numpy(published_image_processor()(images, return_tensors="np").pixel_values)
    got = clipseg.clipseg_preprocess(images)
    assert got.shape == (2, 3, 352, 352) and got.dtype == torch.float32
    assert (got - want).abs().max() < 1e-5


def test_strict_loading_names_head_keys(tmp_path):
    saved_reference(tmp_path, "legacy")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "use_complex_transposed_convolution": False}))
    with pytest.raises(CheckpointError, match="decoder.transposed_convolution"):
        clipseg.CLIPSeg.from_pretrained(tmp_path)


def test_published_size():
    # CIDAS/clipseg-rd64-refined's config.json; the rest are transformers' defaults.
    published = RefConfig(text_config=dict(bos_token_id=0, eos_token_id=2), vision_config=dict(patch_size=16),
                          extract_layers=[3, 6, 9], reduce_dim=64, conditional_layer=0,
                          decoder_num_attention_heads=4, decoder_intermediate_size=2048,
                          decoder_hidden_act="quick_gelu", projection_dim=512,
                          use_complex_transposed_convolution=True)
    with torch.device("meta"):
        ours, ref = clipseg.CLIPSeg(), RefCLIPSeg(published)
    theirs = ref.state_dict()
    assert ours.state_dict().keys() == theirs.keys()
    assert all(v.shape == theirs[k].shape for k, v in ours.state_dict().items())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert sum(p.numel() for p in ours.decoder.parameters()) == 1_127_009  # the published decoder's parameters
    assert ours.clip.vision_model.embeddings.position_embedding.weight.shape == (197, 768)
    # Our config reads the published config.json back to its own defaults.
    assert clipseg.CLIPSegConfig.from_dict(published.to_dict()) == clipseg.CLIPSegConfig()


def test_config_dict_wins_as_in_transformers():
    # Configs written by older transformers carry `vision_config_dict` beside `vision_config`.
    # transformers completes `*_config_dict` with its own defaults and lets that replace `*_config`.
    for d in [{"vision_config": {"patch_size": 32}, "vision_config_dict": {"patch_size": 16},
               "text_config": {"eos_token_id": 2, "hidden_size": 64}, "text_config_dict": {"hidden_size": 48}},
              {"vision_config": {"patch_size": 16, "image_size": 32}, "vision_config_dict": {"image_size": 64},
               "text_config_dict": {"bos_token_id": 0, "eos_token_id": 2}}]:
        ref, ours = RefConfig(**d), clipseg.CLIPSegConfig.from_dict(d)
        for tower in ("text_config", "vision_config"):
            for name, value in vars(getattr(ours, tower)).items():
                assert value == getattr(getattr(ref, tower), name), (tower, name)
