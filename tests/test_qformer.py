"""Parity of qformer.py with diffusers' Blip2QFormerModel (and transformers' BertTokenizer).

The reference builds small random models, they are perturbed and saved in the published layout, and
ours loads them with `from_pretrained`; outputs must agree in fp32. The full published size is
compared on the meta device (parameter count and state-dict keys).
"""

import json
import os

import pytest
import torch
from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel
from diffusers.pipelines.blip_diffusion.modeling_blip2 import ProjLayer as RefProjLayer
from transformers import BertTokenizer
from transformers.models.blip_2.configuration_blip_2 import Blip2Config as RefBlip2Config

import qformer
from checkpoint import read_folder
from reference import assert_close, perturb, write_bert_vocab

# Two subject categories of different lengths, so the shorter one is padded and the mask matters.
TEXTS = ["dog", "a red striped ball on the grass"]


def vocab_size(folder):
    with open(os.path.join(folder, "vocab.txt")) as f:
        return len(f.read().splitlines()) + 1  # + [DEC]


def tiny_config(tok_folder, cross_attention_frequency=1):
    # Vision width 48 != Q-Former width 32, so the cross-attention key/value shapes are checked.
    return RefBlip2Config(
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=14, hidden_act="quick_gelu"),
        qformer_config=dict(vocab_size=vocab_size(tok_folder), hidden_size=32, num_hidden_layers=3,
                            num_attention_heads=4, intermediate_size=64, max_position_embeddings=40,
                            cross_attention_frequency=cross_attention_frequency),
        num_query_tokens=4, tokenizer=tok_folder)


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
    return write_bert_vocab(str(tmp_path_factory.mktemp("bert_tokenizer")))


def make_reference(tok_folder, seed=0, **kw):
    torch.manual_seed(seed)
    # Weights larger than the 0.02 init, so activations reach where GELU variants differ.
    return perturb(Blip2QFormerModel(tiny_config(tok_folder, **kw)), seed, scale=0.3).eval()


@pytest.fixture(scope="module")
def reference(tok_folder):
    return make_reference(tok_folder)


def pixels(batch=2, size=28, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_subject_embeddings_match_reference(reference, tok_folder, tmp_path, safe):
    reference.save_pretrained(tmp_path, safe_serialization=safe)
    ours = qformer.QFormer.from_pretrained(str(tmp_path))
    tokenizer = qformer.QFormerTokenizer.from_file(os.path.join(tok_folder, "vocab.txt"))
    input_ids, attention_mask = tokenizer(TEXTS)
    assert attention_mask[0].sum() < attention_mask.shape[1], "the batch must contain padding"
    x = pixels()
    with torch.no_grad():
        want = reference(text_input=TEXTS, image_input=x, return_dict=False)
        got = ours(x, input_ids, attention_mask)
        # The raw hidden states (queries and text) are what later training reads.
        want_hidden = reference(text_input=TEXTS, image_input=x).last_hidden_state
        got_hidden = ours.encode(ours.visual_encoder(x), input_ids, attention_mask)
    assert got.shape == (2, 4, 32)
    assert_close(got, want)
    assert_close(got_hidden, want_hidden)


def test_sparse_cross_attention_matches_reference(tok_folder, tmp_path):
    """cross_attention_frequency 2 (BLIP-2's own setting): only even layers hold `crossattention`."""
    reference = make_reference(tok_folder, seed=3, cross_attention_frequency=2)
    reference.save_pretrained(tmp_path)
    ours = qformer.QFormer.from_pretrained(str(tmp_path))
    assert not hasattr(ours.encoder.layer[1], "crossattention")
    input_ids, attention_mask = qformer.QFormerTokenizer.from_file(os.path.join(tok_folder, "vocab.txt"))(TEXTS)
    x = pixels(seed=4)
    with torch.no_grad():
        assert_close(ours(x, input_ids, attention_mask),
                     reference(text_input=TEXTS, image_input=x, return_dict=False))


def test_text_only_and_causal_masks_match_reference_encoder(reference, tok_folder, tmp_path):
    """The modes BLIP-2's training losses use: text alone (no queries, no image), and a
    per-position (B, L, L) mask with causal text, run through the reference's layer stack."""
    reference.save_pretrained(tmp_path)
    ours = qformer.QFormer.from_pretrained(str(tmp_path))
    input_ids, attention_mask = qformer.QFormerTokenizer.from_file(os.path.join(tok_folder, "vocab.txt"))(TEXTS)
    B, T = input_ids.shape
    Q = ours.config.num_query_tokens
    with torch.no_grad():
        image = ours.visual_encoder(pixels(seed=5))

        text = ours.embeddings(input_ids)
        mask = reference.get_extended_attention_mask(attention_mask, (B, T), "cpu")
        want = reference.encoder(text, attention_mask=mask, query_length=0).last_hidden_state
        assert_close(ours.encode(None, input_ids, attention_mask, use_queries=False), want)

        # Queries see queries only; text sees all queries and earlier text (BLIP-2's ITG mask).
        full = torch.ones(B, Q + T, Q + T)
        full[:, :Q, Q:] = 0
        full[:, Q:, Q:] = torch.tril(torch.ones(T, T)) * attention_mask[:, None, :]
        x = ours.embeddings(input_ids, ours.query_tokens.expand(B, -1, -1))
        mask = reference.get_extended_attention_mask(full, (B, Q + T), "cpu")
        image_mask = torch.zeros(B, 1, 1, image.shape[1])
        want = reference.encoder(x, attention_mask=mask, encoder_hidden_states=image,
                                 encoder_attention_mask=image_mask, query_length=Q).last_hidden_state
        assert_close(ours.encode(image, input_ids, full), want)


def test_proj_layer_matches_reference():
    torch.manual_seed(0)
    ref = perturb(RefProjLayer(in_dim=32, out_dim=32, hidden_dim=128, drop_p=0.1, eps=1e-12), seed=2).eval()
    ours = qformer.ProjLayer(32, 128, drop_p=0.1, eps=1e-12).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 4, 32) * 3 + 1
    with torch.no_grad():
        assert_close(ours(x), ref(x))


TRICKY = ["Dog", "A RED striped BALL!", "Café naïve résumé Über", "qwertyzzz unknownish words",
          "dog's ball (oil painting) -- 3.5 x 2", "  spaced\tout\n text  ", "", "狗 dog",
          "dog [SEP] cat [DEC] [MASK]", "swimming underwater, at night; lowres"]


def test_tokenizer_matches_bert_tokenizer(tok_folder):
    ref = BertTokenizer.from_pretrained(tok_folder)
    ref.add_special_tokens({"bos_token": "[DEC]"})
    ours = qformer.QFormerTokenizer.from_file(os.path.join(tok_folder, "vocab.txt"))
    assert len(ours) == len(ref) and ours.vocab["[DEC]"] == ref.convert_tokens_to_ids("[DEC]")
    for text in TRICKY:
        assert ours([text])[0][0].tolist() == ref(text)["input_ids"], text
    want = ref(TRICKY, padding=True, return_tensors="pt")
    ids, mask = ours(TRICKY)
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])


def test_config_takes_transformers_defaults_for_missing_fields(tmp_path):
    """The published qformer/config.json names only what differs from transformers' defaults."""
    published = {"num_query_tokens": 16,
                 "qformer_config": {"cross_attention_frequency": 1, "encoder_hidden_size": 1024, "vocab_size": 30523},
                 "vision_config": {"hidden_act": "quick_gelu", "hidden_size": 1024, "intermediate_size": 4096,
                                   "num_hidden_layers": 23}}
    ours = qformer.Blip2Config(**json.loads(json.dumps(published)))
    ref = RefBlip2Config(**published)
    assert ours.num_query_tokens == ref.num_query_tokens
    for sub in ("qformer_config", "vision_config"):
        for name, value in vars(getattr(ours, sub)).items():
            assert value == getattr(getattr(ref, sub), name), f"{sub}.{name}"
    assert ours.vision_config.layer_norm_eps == 1e-6


def test_full_size_matches_reference_on_meta(tok_folder):
    cfg = qformer.Blip2Config()  # our defaults are the published sizes
    with torch.device("meta"):
        ours = qformer.QFormer(cfg)
        ref = Blip2QFormerModel(RefBlip2Config(
            vision_config=vars(cfg.vision_config), qformer_config=vars(cfg.qformer_config),
            num_query_tokens=16, tokenizer=tok_folder))
    ref_keys = {k for k in ref.state_dict() if not qformer.drop_key(k)}
    assert set(ours.state_dict()) == ref_keys
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert ours.query_tokens.shape == (1, 16, 768)
    assert ours.encoder.layer[0].crossattention.attention.key.weight.shape == (768, 1024)


def test_position_ids_buffer_is_the_only_rename(reference, tmp_path):
    reference.save_pretrained(tmp_path)
    _, sd, _ = read_folder(str(tmp_path))
    ours = qformer.QFormer.from_pretrained(str(tmp_path))
    assert set(sd) - set(ours.state_dict()) == {"embeddings.position_ids"}
