"""BLIP-2 pre-training (stage 1): initialisation from BERT and CLIP, and the ITC / ITM / ITG losses.

Initialisation is checked against transformers' own BERT and CLIP on small random models saved in the
published layouts; the losses against what BLIP-2 §3.2 defines (labels, masks, negatives, frozen ViT).
"""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM, CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from checkpoint import CheckpointError
from blip2 import Blip2Pretraining, init_from_bert, multimodal_causal_mask, vision_from_clip
from clip import VisionConfig
from qformer import Blip2Config, QFormerConfig
from reference import assert_close, perturb

BERT_VOCAB = 99  # + [DEC] = 100 in the Q-Former


def tiny_config(dropout=0.1):
    # Vision width 48 != Q-Former width 32, so the cross-attention key/value shapes are checked.
    return Blip2Config(
        num_query_tokens=4,
        qformer_config=QFormerConfig(vocab_size=BERT_VOCAB + 1, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=40,
                                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout),
        vision_config=VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, image_size=28, patch_size=14))


def text_batch(batch=4, length=7, seed=0):
    """Random ids with [CLS]=2 first and a shorter second row, so padding (id 0, mask 0) is present."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, BERT_VOCAB, (batch, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, 4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def image_batch(batch=4, seed=1):
    return torch.randn(batch, 5, 48, generator=torch.Generator().manual_seed(seed))  # (B, 1 + 2*2 patches, 48)


# --- initialisation from bert-base-uncased ---------------------------------------------------------

@pytest.fixture(scope="module")
def bert():
    cfg = BertConfig(vocab_size=BERT_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=40)
    torch.manual_seed(0)
    model = perturb(BertForMaskedLM(cfg), seed=0, scale=0.3).eval()
    # The Q-Former has no token-type embeddings (BLIP-2 drops them), so BERT's type-0 vector, added to
    # every token, must be zero for the two to compute the same thing.
    model.bert.embeddings.token_type_embeddings.weight.data.zero_()
    return model


@pytest.mark.parametrize("layout", ["safetensors", "legacy-bin"])
def test_init_from_bert_matches_bert(bert, tmp_path, layout):
    bert.save_pretrained(tmp_path)
    if layout == "legacy-bin":  # bert-base-uncased's own names: no `bert.` prefix, LayerNorm gamma/beta
        sd = load_file(tmp_path / "model.safetensors")
        (tmp_path / "model.safetensors").unlink()
        sd = {k.removeprefix("bert.").replace("LayerNorm.weight", "LayerNorm.gamma")
              .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in sd.items()}
        sd["cls.predictions.decoder.weight"] = sd["embeddings.word_embeddings.weight"]  # tied, saved twice
        torch.save(sd, tmp_path / "pytorch_model.bin")
    model = Blip2Pretraining(tiny_config()).eval()
    unused, fresh = init_from_bert(model, str(tmp_path))

    assert [k.removeprefix("bert.") for k in unused] == ["embeddings.token_type_embeddings.weight"]
    assert "qformer.encoder.layer.*.crossattention.attention.query.weight" in fresh
    assert {"qformer.query_tokens", "temp", "itm_head.weight", "vision_proj.weight"} <= set(fresh)
    assert not [k for k in fresh if ".attention.attention." in k or "intermediate" in k or k.startswith("cls.")]

    ids, mask = text_batch()
    with torch.no_grad():
        want = bert.bert(ids, attention_mask=mask).last_hidden_state
        got = model.qformer.encode(None, ids, mask, use_queries=False)
        assert_close(got, want)
        want_logits = bert(ids, attention_mask=mask).logits
        logits = model.cls.predictions(got, model.qformer.embeddings.word_embeddings.weight)
        assert logits.shape[-1] == BERT_VOCAB + 1  # + [DEC]
        assert_close(logits[..., :BERT_VOCAB], want_logits)

    sd = model.state_dict()
    for i in range(2):
        for part in ("intermediate.dense.weight", "output.dense.weight", "output.LayerNorm.bias"):
            text = f"qformer.encoder.layer.{i}.{part}"
            query = text.replace(".intermediate.", ".intermediate_query.").replace(".output.", ".output_query.")
            assert torch.equal(sd[text], sd[query]), query
    dec = sd["qformer.embeddings.word_embeddings.weight"][BERT_VOCAB]
    assert 0 < dec.abs().max() < 0.2  # BERT's N(0, 0.02) init, not PyTorch's N(0, 1)


def test_init_from_bert_refuses_wrong_vocab(bert, tmp_path):
    bert.save_pretrained(tmp_path)
    cfg = tiny_config()
    cfg.qformer_config.vocab_size = BERT_VOCAB  # no room for [DEC]
    with pytest.raises(CheckpointError, match="DEC"):
        init_from_bert(Blip2Pretraining(cfg), str(tmp_path))


# --- initialisation from OpenAI CLIP ---------------------------------------------------------------

TINY_CLIP_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                        image_size=28, patch_size=14, hidden_act="quick_gelu")


@pytest.mark.parametrize("kind", ["CLIPVisionModel", "CLIPModel"])
def test_vision_from_clip_keeps_all_but_the_last_block(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "CLIPVisionModel":
        ref = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_VISION))
    else:  # text keys and projections to ignore
        text = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2)
        ref = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_CLIP_VISION, projection_dim=8))
    perturb(ref, seed=0, scale=0.3).eval().save_pretrained(tmp_path)
    vit = vision_from_clip(str(tmp_path))
    assert vit.config.num_hidden_layers == 2 and vit.config.layer_norm_eps == 1e-5

    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.vision_model(x, output_hidden_states=True).hidden_states[2]  # after blocks 0 and 1
        got = vit.encoder(vit.pre_layernorm(vit.embeddings(x)))
        assert_close(got, want)
        # ln_vision starts as a plain LayerNorm, not CLIP's post_layernorm.
        assert_close(vit(x), F.layer_norm(want, (48,), eps=1e-5))


def test_vision_from_clip_refuses_unknown_vision_keys(tmp_path):
    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_VISION)).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["vision_model.encoder.layers.0.extra.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="extra"):
        vision_from_clip(str(tmp_path))


# --- the three losses ------------------------------------------------------------------------------

@pytest.fixture
def model():
    torch.manual_seed(0)
    return Blip2Pretraining(tiny_config(dropout=0.0))


def test_losses_are_finite_and_positive(model):
    ids, mask = text_batch()
    out = model(ids, mask, image_embeds=image_batch(), generator=torch.Generator().manual_seed(0))
    for name in ("itc", "itm", "itg"):
        assert torch.isfinite(out[name]) and out[name] > 0, name
    assert_close(out["loss"], out["itc"] + out["itm"] + out["itg"])


def test_batch_of_one_is_refused(model):
    ids, mask = text_batch(batch=1)
    with pytest.raises(ValueError, match="at least 2"):
        model(ids, mask, image_embeds=image_batch(batch=1))
    ids, mask = text_batch()
    with pytest.raises(ValueError, match="two pairs at one place"):  # ITC's targets would be ambiguous
        model(ids, mask, image_embeds=image_batch(), positions=torch.tensor([0, 1, 1, 2]))


def test_itm_labels_one_match_two_mismatches(model):
    """B matching pairs, then B (text, hard negative image) and B (hard negative text, image)."""
    ids, mask = text_batch()
    with torch.no_grad():
        model.itm_head.weight.zero_()
        model.itm_head.bias.copy_(torch.tensor([0.0, 20.0]))  # always says "match" (class 1)
        says_match = model(ids, mask, image_embeds=image_batch())["itm"]
        model.itm_head.bias.copy_(torch.tensor([20.0, 0.0]))  # always says "no match"
        says_no_match = model(ids, mask, image_embeds=image_batch())["itm"]
    # Cross-entropy of a wrong class at logit margin 20 is 20 (+ e^-20); 2 of 3 rows are mismatches.
    assert abs(says_match.item() - 20 * 2 / 3) < 1e-4
    assert abs(says_no_match.item() - 20 / 3) < 1e-4


def test_hard_negatives_are_never_the_partner_and_reproducible(model, monkeypatch):
    B = 4
    drawn = []
    real_multinomial = torch.multinomial

    def spy(weights, n, generator=None):
        assert (weights.diagonal() == 0).all()
        drawn.append(real_multinomial(weights, n, generator=generator)[:, 0])
        return drawn[-1][:, None]

    monkeypatch.setattr(torch, "multinomial", spy)
    ids, mask = text_batch(batch=B)
    image_embeds = image_batch(batch=B)
    with torch.no_grad():
        model(ids, mask, image_embeds=image_embeds, generator=torch.Generator().manual_seed(0))
    assert len(drawn) == 2 and all((d != torch.arange(B)).all() for d in drawn)

    # The same generator seed gives the same negatives: training can be reproduced step by step.
    first = [d.clone() for d in drawn]
    drawn.clear()
    with torch.no_grad():
        model(ids, mask, image_embeds=image_embeds, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(first, drawn))


def test_itg_mask_queries_see_queries_text_sees_the_past(model):
    ids, mask = text_batch()
    Q, image_embeds = 4, image_batch()
    itg_mask = multimodal_causal_mask(mask, Q)
    changed = ids.clone()
    changed[:, 3] = 8 + (ids[:, 3] == 8)  # position 3 differs in every row
    with torch.no_grad():
        hidden = model.qformer.encode(image_embeds, ids, itg_mask)
        hidden_changed = model.qformer.encode(image_embeds, changed, itg_mask)
        queries_alone = model.qformer.encode(image_embeds)
    assert_close(hidden[:, :Q], queries_alone)  # the text is invisible to the queries
    assert_close(hidden_changed[:, :Q + 3], hidden[:, :Q + 3])  # positions 0..2 do not see position 3
    assert not torch.allclose(hidden_changed[:, Q + 3:], hidden[:, Q + 3:])


def test_itg_ignores_padding_but_not_text(model):
    ids, mask = text_batch()
    def gen():  # the same ITM negatives in every call
        return torch.Generator().manual_seed(0)

    with torch.no_grad():
        base = model(ids, mask, image_embeds=image_batch(), generator=gen())["itg"]
        other_pad = ids.masked_fill(mask == 0, 7)  # different ids where the mask is 0
        assert_close(model(other_pad, mask, image_embeds=image_batch(), generator=gen())["itg"], base)
        other_text = ids.clone()
        other_text[-1, 3] = 8 if ids[-1, 3] != 8 else 9  # the last real token of the padded row
        changed = model(other_text, mask, image_embeds=image_batch(), generator=gen())["itg"]
        assert not torch.allclose(changed, base)


def test_frozen_image_tower_gets_no_gradient(model):
    ids, mask = text_batch()
    pixels = torch.randn(4, 3, 28, 28)
    vit = model.qformer.visual_encoder
    with torch.no_grad():
        image_embeds = vit(pixels)
    model(ids, mask, image_embeds=image_embeds)["loss"].backward()
    assert all(p.grad is None for p in vit.parameters())
    assert model.qformer.encoder.layer[0].crossattention.attention.key.weight.grad is not None
    assert model.temp.grad is not None and model.cls.predictions.bias.grad is not None

    # From pixels, BLIP-2 trains ln_vision (our post_layernorm) but not the ViT blocks.
    model.zero_grad(set_to_none=True)
    model(ids, mask, pixel_values=pixels)["loss"].backward()
    assert vit.post_layernorm.weight.grad is not None
    assert all(p.grad is None for n, p in vit.named_parameters() if not n.startswith("post_layernorm."))


def test_a_few_adam_steps_reduce_every_loss(model):
    ids, mask = text_batch()
    image_embeds = image_batch()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for step in range(30):
        out = model(ids, mask, image_embeds=image_embeds, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in out.items()})
    first, last = history[0], history[-1]
    assert last["itc"] < 0.8 * first["itc"] and last["itg"] < 0.8 * first["itg"], (first, last)
    # In so few steps ITM only learns its 1 : 2 label prior (loss ln 3 - 2/3 ln 2 = 0.64); telling
    # pairs apart takes ~70 more steps here, too slow for this test.
    assert last["itm"] < 0.9 * first["itm"], (first, last)


# --- several processes ---------------------------------------------------------------------------

SPLIT = '''
import os, sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
import torch.distributed as dist
from blip2 import Blip2Pretraining
from test_blip2 import image_batch, text_batch, tiny_config
torch.set_num_threads(1)
torch.manual_seed(0)
model = Blip2Pretraining(tiny_config(dropout=0.0))
ln_vision = torch.nn.LayerNorm(48)  # a trained layer before the image features, as stage 1's ln_vision
torch.nn.init.normal_(ln_vision.weight)
ids, mask = text_batch(8, 9)
mask[::3, 5:] = 0  # captions of different lengths on each process
ids = ids.masked_fill(mask == 0, 0)
embeds = image_batch(8)
rows = list(range(8))
if "RANK" in os.environ:  # the rows of a torchrun process: rank, rank + world, ... as train.py deals them
    dist.init_process_group("gloo")
    rows = rows[dist.get_rank()::dist.get_world_size()]
out = model(ids[rows], mask[rows], image_embeds=ln_vision(embeds[rows]), positions=torch.tensor(rows),
            generator=[torch.Generator().manual_seed(100 + i) for i in rows])
out["loss"].backward()
grads = {{n: p.grad for n, p in [*model.named_parameters(), *ln_vision.named_parameters()] if p.grad is not None}}
losses = torch.stack([out[k].detach() for k in ("itc", "itm", "itg")])
if "RANK" in os.environ:  # what DDP does: the average over the processes
    for g in [*grads.values(), losses]:
        dist.all_reduce(g)
        g /= dist.get_world_size()
if os.environ.get("RANK", "0") == "0":
    torch.save(dict(grads=grads, losses=losses), {out!r})
'''


def test_two_processes_compute_what_one_computes_on_the_whole_batch(tmp_path):
    """As LAVIS, ITC contrasts each pair with the pairs of every process and ITM draws its negatives
    from all of them; with the pairs put in their global order and a generator per pair, the losses
    and gradients of two processes (averaged, as DDP does) are those of one process on the batch."""
    import os
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))
    results = {}
    for name, launch in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])):
        script = tmp_path / f"{name}.py"
        script.write_text(SPLIT.format(root=os.path.dirname(tests), tests=tests, out=str(tmp_path / f"{name}.pt")))
        run = subprocess.run([sys.executable, *launch, str(script)], capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert run.returncode == 0, run.stderr[-3000:]
        results[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    one, two = results["one"], results["two"]
    assert torch.allclose(one["losses"], two["losses"], rtol=1e-5, atol=1e-6)
    assert one["grads"].keys() == two["grads"].keys() and "weight" in one["grads"]  # ln_vision's too
    for k, g in one["grads"].items():
        assert (g - two["grads"][k]).abs().max() <= 1e-6 + 1e-3 * g.abs().max(), k
