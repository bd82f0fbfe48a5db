"""evaluate.py against its references: each DreamBench score against transformers' ViTModel, CLIPModel,
CLIPImageProcessor and CLIPTokenizer on small random models saved in the published layouts (image size
224, patch sizes 16 and 32, so the preprocessing is the real one), DINO's torchvision preprocessing
written here from torchvision's formulas; strict loading; the published sizes; the command line."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from reference import tiny_reference_clip, tiny_reference_dino
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig as RefCLIPConfig
from transformers import CLIPImageProcessor
from transformers import CLIPModel as RefCLIPModel
from transformers import CLIPTokenizer as RefTokenizer
from transformers import ViTConfig, ViTModel

import evaluate
import metrics
from checkpoint import CheckpointError
from data import center_crop

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])
LONG_PROMPT = "wearing a santa hat, " * 30  # well over 77 tokens: cut, <|endoftext|> kept last


# ---------------------------------------------------------------------------------------------------
# Pictures and manifest
# ---------------------------------------------------------------------------------------------------

# name -> (width, height, mode). The sizes put the references' roundings apart: 200x333 resizes to
# 224x372 in transformers (int) where rounding to nearest gives 373; 200x303, 517x301 and 97x61 put
# torchvision's crop corner (round half to even) a pixel past the floored one for DINO's 256.
PICTURES = {"portrait.png": (200, 333, "RGB"), "portrait.jpg": (200, 303, "RGB"),
            "refs/landscape.png": (517, 301, "RGB"), "refs/small.png": (97, 61, "RGB"),
            "refs/gray.png": (150, 150, "L"), "rgba.png": (320, 240, "RGBA"), "exact.png": (224, 300, "RGB")}
RECORDS = [
    {"image": "portrait.png", "references": ["refs/landscape.png", "refs/small.png", "refs/gray.png"],
     "prompt": "a photo of a dog swimming underwater"},
    {"image": "rgba.png", "references": ["portrait.jpg", "refs/landscape.png"], "prompt": LONG_PROMPT},
    {"image": "refs/gray.png", "references": ["rgba.png"], "prompt": "a cat sitting on the sofa in the snow"},
    {"image": "exact.png", "references": ["refs/landscape.png", "refs/small.png", "refs/gray.png"],
     "prompt": "a red striped ball on the grass at night"},
    # The same picture again, with another prompt: its embedding is not computed twice.
    {"image": "portrait.png", "references": ["portrait.jpg"], "prompt": "A teapot on a marble table (oil painting)!"},
]


def picture(width, height, mode, seed):
    """Smooth random colours plus noise, so the networks see different content in each picture."""
    g = np.random.default_rng(seed)
    coarse = g.uniform(0, 255, (4, 4, 4)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
    noisy = np.clip(np.asarray(image, np.int16) + g.integers(-40, 40, (height, width, 4)), 0, 255)
    image = Image.fromarray(noisy.astype(np.uint8))
    return image if mode == "RGBA" else image.convert(mode)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    (folder / "refs").mkdir()
    for i, (name, (w, h, mode)) in enumerate(PICTURES.items()):
        picture(w, h, mode, seed=i).save(folder / name)
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]) + "\n"  # a blank line is skipped
                    + "".join(json.dumps(r) + "\n" for r in RECORDS[2:]))
    return path


# Two layouts each: (.safetensors, with ViT's pooler, eos_token_id 2) and (.bin, no pooler, the real eos id).
@pytest.fixture(scope="module", params=["safetensors", "bin"])
def networks(request, tmp_path_factory):
    safe = request.param == "safetensors"
    dino_dir, clip_dir = tmp_path_factory.mktemp("dino"), tmp_path_factory.mktemp("clip")
    dino_ref = tiny_reference_dino(str(dino_dir), safe=safe, pooler=safe)
    clip_ref = tiny_reference_clip(str(clip_dir), safe=safe, legacy_eos=safe)
    return dict(dino_ref=dino_ref, clip_ref=clip_ref, dino_dir=str(dino_dir), clip_dir=str(clip_dir),
                dino=metrics.DINOViT.from_pretrained(str(dino_dir)),
                clip=metrics.CLIPModel.from_pretrained(str(clip_dir)))


# ---------------------------------------------------------------------------------------------------
# The reference computation
# ---------------------------------------------------------------------------------------------------

def torchvision_dino_pixels(path):
    """Resize(256, bicubic) + CenterCrop(224) + ToTensor + Normalize(ImageNet), written from torchvision's
    formulas (transforms/functional.py: _compute_resized_output_size, center_crop), not the project's."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = 256, int(256 * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
    image = image.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    return (x - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]


@torch.no_grad()
def reference_scores(folder, networks):
    """Per record (dino, clip_i, clip_t), by transformers' models, image processor and slow tokenizer."""
    processor = CLIPImageProcessor.from_pretrained(networks["clip_dir"])
    tokenizer = RefTokenizer.from_pretrained(networks["clip_dir"])
    vit, clip = networks["dino_ref"], networks["clip_ref"]

    def dino(name):
        return vit(pixel_values=torchvision_dino_pixels(folder / name)[None]).last_hidden_state[0, 0]

    def clip_image(name):
        return clip.get_image_features(**processor(images=Image.open(folder / name), return_tensors="pt"))[0]

    def cosine(a, b):
        return torch.nn.functional.cosine_similarity(a, b, dim=0).item()

    rows = []
    for r in RECORDS:
        text = tokenizer([r["prompt"]], padding=True, truncation=True, max_length=77, return_tensors="pt")
        rows.append((np.mean([cosine(dino(r["image"]), dino(f)) for f in r["references"]]),
                     np.mean([cosine(clip_image(r["image"]), clip_image(f)) for f in r["references"]]),
                     cosine(clip_image(r["image"]), clip.get_text_features(**text)[0])))
    return np.array(rows)


# ---------------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------------

def test_scores_equal_transformers(manifest, networks):
    records = evaluate.read_score_manifest(str(manifest))
    got = evaluate.score(records, networks["dino"], networks["clip"])
    want = reference_scores(manifest.parent, networks)
    ours = np.array([[row[k] for k in evaluate.SCORES] for row in got["images"]])
    assert [row["image"] for row in got["images"]] == [r["image"] for r in RECORDS]  # as written, in order
    diff = np.abs(ours - want)
    print(f"largest differences (dino, clip_i, clip_t): {diff.max(axis=0)}")
    assert diff.max() <= 1e-4
    assert np.allclose([got["mean"][k] for k in evaluate.SCORES], want.mean(axis=0), atol=1e-4)
    # The scores tell the pictures apart, so a wrong pixel or token would show.
    assert (want.max(axis=0) - want.min(axis=0)).min() > 1e-2


def test_preprocessing_equals_references(manifest, networks):
    processor = CLIPImageProcessor.from_pretrained(networks["clip_dir"])
    for name in PICTURES:
        image = Image.open(manifest.parent / name)
        want = processor(images=image, return_tensors="pt").pixel_values
        assert (metrics.clip_pixels([image.convert("RGB")]) - want).abs().max() < 1e-5, name
        want = torchvision_dino_pixels(manifest.parent / name)[None]
        assert (metrics.dino_pixels([image.convert("RGB")]) - want).abs().max() < 1e-5, name


def test_center_crop_roundings_are_the_references():
    image = picture(200, 303, "RGB", seed=0)
    # DINO, 200x303 -> 256x387: torchvision's corner round(81.5) = 82, transformers' floor 81.
    tv, hf = (center_crop(image, 224, 224, rounding=r, short_side=256) for r in ("torchvision", "transformers"))
    resized = image.resize((256, 387), Image.BICUBIC)
    assert np.array_equal(np.asarray(tv), np.asarray(resized.crop((16, 82, 240, 306))))
    assert np.array_equal(np.asarray(hf), np.asarray(resized.crop((16, 81, 240, 305))))
    # CLIP, 200x333 -> 224x372.96: int() gives 372 (transformers), the default's nearest 373.
    image = picture(200, 333, "RGB", seed=1)
    hf = center_crop(image, 224, 224, rounding="transformers")
    want = image.resize((224, 372), Image.BICUBIC).crop((0, 74, 224, 298))
    assert np.array_equal(np.asarray(hf), np.asarray(want))
    want = image.resize((224, 373), Image.BICUBIC).crop((0, 74, 224, 298))
    assert np.array_equal(np.asarray(center_crop(image, 224, 224)), np.asarray(want))
    with pytest.raises(ValueError, match="short_side"):
        center_crop(image, 224, 224, short_side=256)


def test_each_picture_and_prompt_embedded_once(manifest, networks):
    records = evaluate.read_score_manifest(str(manifest))
    dino, clip = networks["dino"], networks["clip"]
    seen = {"dino": 0, "clip": 0, "text": 0}

    def counting(name, fn):
        def wrapped(x):
            seen[name] += len(x)
            return fn(x)
        return wrapped

    dino.embed = counting("dino", dino.embed)
    clip.image_features = counting("clip", clip.image_features)
    clip.text_features = counting("text", clip.text_features)
    try:
        evaluate.score(records, dino, clip, batch_size=3)
    finally:
        del dino.embed, clip.image_features, clip.text_features
    assert seen == {"dino": len(PICTURES), "clip": len(PICTURES), "text": len(RECORDS)}


def test_legacy_config_dicts(networks, tmp_path):
    # Older transformers wrote `text_config_dict` / `vision_config_dict`, which then win over `*_config`.
    config = json.loads(open(os.path.join(networks["clip_dir"], "config.json")).read())
    legacy = {**config, "text_config_dict": config["text_config"], "vision_config_dict": config["vision_config"],
              "text_config": {"hidden_size": 999}, "vision_config": {"patch_size": 7}}
    cfg = metrics.CLIPConfig.from_dict(legacy)
    assert cfg == metrics.CLIPConfig.from_dict(config)
    assert (cfg.vision_config.patch_size, cfg.text_config.hidden_size, cfg.projection_dim) == (32, 32, 24)


# ---------------------------------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------------------------------

def edited_copy(folder, tmp_path, edit):
    """`folder`'s model.safetensors with `edit` applied to its tensors, beside a copy of its other files."""
    for name in os.listdir(folder):
        if name != "model.safetensors":
            (tmp_path / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    sd = load_file(os.path.join(folder, "model.safetensors"))
    edit(sd)
    save_file(sd, tmp_path / "model.safetensors")
    return str(tmp_path)


@pytest.mark.parametrize("edit,named", [
    (lambda sd: sd.pop("encoder.layer.1.attention.attention.value.bias"),
     "encoder.layer.1.attention.attention.value.bias"),
    (lambda sd: sd.pop("layernorm.weight"), "post_layernorm.weight"),  # after the renames
    (lambda sd: sd.update({"encoder.layer.0.extra.weight": torch.zeros(2)}), "encoder.layers.0.extra.weight"),
])
def test_dino_loading_is_strict(tmp_path, edit, named):
    folder = str(tmp_path / "dino")
    tiny_reference_dino(folder)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        metrics.DINOViT.from_pretrained(edited_copy(folder, tmp_path, edit))


@pytest.mark.parametrize("edit,named", [
    (lambda sd: sd.pop("vision_model.encoder.layers.1.mlp.fc1.bias"), "vision_model.encoder.layers.1.mlp.fc1.bias"),
    (lambda sd: sd.pop("vision_model.post_layernorm.bias"), "vision_model.post_layernorm.bias"),
    (lambda sd: sd.pop("text_projection.weight"), "text_projection.weight"),
    (lambda sd: sd.update({"vision_model.encoder.layers.0.extra.weight": torch.zeros(2)}),
     "vision_model.encoder.layers.0.extra.weight"),
    (lambda sd: sd.update({"text_model.extra.weight": torch.zeros(2)}), "text_model.extra.weight"),
])
def test_clip_loading_is_strict(tmp_path, edit, named):
    folder = str(tmp_path / "clip")
    tiny_reference_clip(folder)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        metrics.CLIPModel.from_pretrained(edited_copy(folder, tmp_path, edit))


# ---------------------------------------------------------------------------------------------------
# Published sizes, on the meta device
# ---------------------------------------------------------------------------------------------------

def same_tensors(ours, converted):
    assert ours.state_dict().keys() == converted.keys()
    assert all(ours.state_dict()[k].shape == v.shape for k, v in converted.items())


def test_published_sizes():
    # facebook/dino-vits16 (ViT-S/16: 384 wide, 12 blocks, 6 heads) and openai/clip-vit-base-patch32
    # (transformers' CLIPConfig defaults: vision 768 x 12, text 512 x 12, projection 512).
    with torch.device("meta"):
        dino, vit = metrics.DINOViT(), ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                                           intermediate_size=1536, patch_size=16))
        clip, ref = metrics.CLIPModel(), RefCLIPModel(RefCLIPConfig())
    same_tensors(dino, metrics.DINOViT.convert(vit.state_dict()))
    same_tensors(clip, metrics.CLIPModel.convert(ref.state_dict(), clip.config))
    pooler = sum(p.numel() for p in vit.pooler.parameters())
    assert sum(p.numel() for p in dino.parameters()) == sum(p.numel() for p in vit.parameters()) - pooler == 21_665_664
    assert sum(p.numel() for p in clip.parameters()) == sum(p.numel() for p in ref.parameters()) == 151_277_313
    assert dino.config.layer_norm_eps == vit.config.layer_norm_eps and clip.config.vision_config.layer_norm_eps == 1e-5


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def run(networks, manifest, out, capsys, dino=None, clip=None):
    rc = evaluate.main(["score", str(manifest), "--dino", dino or networks["dino_dir"],
                        "--clip", clip or networks["clip_dir"], "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_writes_scores(manifest, networks, tmp_path, capsys):
    out = tmp_path / "scores.json"
    rc, stdout, _ = run(networks, manifest, out, capsys)
    assert rc == 0 and stdout.strip().splitlines()[-1].startswith(f"wrote {out}")
    written = json.loads(out.read_text())
    want = evaluate.score(evaluate.read_score_manifest(str(manifest)), networks["dino"], networks["clip"])
    assert written == json.loads(json.dumps(want)) and set(written["mean"]) == set(evaluate.SCORES)
    assert os.listdir(tmp_path) == ["scores.json"]  # written atomically: no temporary file left


def bad(manifest, tmp_path, what):
    """A copy of the manifest's folder with one thing wrong; -> the new manifest."""
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in PICTURES:
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes((manifest.parent / name).read_bytes())
    records = json.loads(json.dumps(RECORDS))  # a deep copy
    if what == "unreadable image":
        (folder / "refs" / "small.png").write_bytes(b"not a picture")
    elif what == "missing key":
        del records[2]["prompt"]
    elif what == "missing reference":
        records[1]["references"].append("refs/none.png")
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("what,message", [
    ("missing manifest", "no such manifest"), ("unreadable image", "small.png"), ("missing key", "line 3"),
    ("missing reference", "none.png"), ("clip folder as --dino", "does not match DINOViT"),
    ("dino folder as --clip", "vocab.json"), ("no folder", "not a folder"),
])
def test_cli_bad_input_is_one_line(manifest, networks, tmp_path, capsys, what, message):
    path = tmp_path / "none.jsonl" if what == "missing manifest" else bad(manifest, tmp_path, what)
    out = tmp_path / "scores.json"
    folders = {"clip folder as --dino": dict(dino=networks["clip_dir"]),
               "dino folder as --clip": dict(clip=networks["dino_dir"]),
               "no folder": dict(dino=str(tmp_path / "nowhere"))}.get(what, {})
    rc, stdout, stderr = run(networks, path, out, capsys, **folders)
    lines = stderr.strip().splitlines()
    assert rc == 2 and lines[-1].startswith("error: ") and message in lines[-1], stderr
    assert [line for line in lines if line.startswith("error")] == lines[-1:] and "\n" not in lines[-1]
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".scores")]


def test_cli_refuses_bad_options(manifest, networks, tmp_path, capsys):
    rc, _, stderr = run(networks, manifest, tmp_path, capsys)  # --out is a folder
    assert rc == 2 and stderr.strip().splitlines()[-1].startswith("error: --out")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["score", str(manifest), "--batch-size", "0"])
    assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err
