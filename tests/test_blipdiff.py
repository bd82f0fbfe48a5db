"""BlipDiffusion against diffusers' BlipDiffusionPipeline on a tiny random model in the published layout."""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from blipdiff import BlipDiffusion, build_prompt, preprocess_subject
from data import to_rgb

SIZE = dict(height=32, width=32)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def models(tiny_pipeline):
    pipe, folder = tiny_pipeline
    return pipe, BlipDiffusion.from_pretrained(folder)


def image(seed, h=40, w=30):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))


def reference(pipe, img, seed, **kw):
    args = dict(prompt=["swimming underwater"], reference_image=img, source_subject_category=["dog"],
                target_subject_category=["dog"], num_inference_steps=3, output_type="np",
                generator=torch.Generator().manual_seed(seed), **SIZE)
    args.update(kw)
    return pipe(**args).images


@pytest.mark.parametrize("guidance,negative", [(7.5, ""), (7.5, "blurry, lowres, bad anatomy"), (1.0, "")])
def test_generate_equals_reference_pndm(models, guidance, negative):
    pipe, ours = models
    ref = reference(pipe, image(0), 5, guidance_scale=guidance, neg_prompt=negative)
    out = ours.generate("swimming underwater", [image(0)], "dog", guidance=guidance, negative_prompt=negative,
                        steps=3, seed=5, output="np", progress=False, **SIZE)
    assert out.shape == ref.shape == (1, 32, 32, 3) and out.dtype == np.float32
    assert np.abs(out - ref).max() <= 1e-4


def test_a_shorter_text_context_equals_reference(tmp_path):
    """A model whose text encoder reads 40 positions, not CLIP's 77 (as a small model may be built):
    the prompt takes 40 - 16 tokens, the negative prompt 40, as diffusers reads them off the config."""
    from reference import tiny_reference_pipeline
    pipe = tiny_reference_pipeline(str(tmp_path), seed=3, context=40)
    ours = BlipDiffusion.from_pretrained(str(tmp_path))
    assert ours.context_length == 40
    prompt = "swimming underwater in a deep blue sea"  # repeated 20 times: truncated at 24 tokens
    ref = reference(pipe, image(4), 2, prompt=[prompt], neg_prompt="blurry, lowres")
    out = ours.generate(prompt, [image(4)], "dog", negative_prompt="blurry, lowres", steps=3, seed=2,
                        output="np", progress=False, **SIZE)
    assert np.abs(out - ref).max() <= 1e-4


def test_generate_equals_reference_ddim(models):
    pipe, ours = models
    saved = pipe.scheduler
    # Stable Diffusion v1.5's DDIM settings, which --scheduler ddim promises.
    pipe.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    try:
        ref = reference(pipe, image(1), 7, guidance_scale=7.5, neg_prompt="ugly")
    finally:
        pipe.scheduler = saved
    out = ours.generate("swimming underwater", [image(1)], "dog", negative_prompt="ugly", steps=3, seed=7,
                        scheduler="ddim", output="np", progress=False, **SIZE)
    assert np.abs(out - ref).max() <= 1e-4


@pytest.mark.parametrize("steps,negative,named_spacing", [(8, "", True), (20, "", True), (8, "blurry, lowres", True),
                                                         (20, "blurry, lowres", True), (20, "", False)])
def test_generate_equals_reference_dpm_solver(models, tiny_pipeline, tmp_path, steps, negative, named_spacing):
    """--scheduler dpm: diffusers' BlipDiffusionPipeline with DPMSolverMultistepScheduler.from_config of
    the folder's own scheduler config swapped in; a config as diffusers writes it (timestep_spacing
    named, "leading") or as BLIP-Diffusion's published one (none named: DPM's "linspace")."""
    import json
    import shutil
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler
    pipe, ours = models
    folder = tiny_pipeline[1]
    if not named_spacing:
        folder = str(tmp_path / "published")
        shutil.copytree(tiny_pipeline[1], folder)
        path = tmp_path / "published" / "scheduler" / "scheduler_config.json"
        config = json.loads(path.read_text())
        del config["timestep_spacing"]
        path.write_text(json.dumps(config))
        ours = BlipDiffusion.from_pretrained(folder)
    saved = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        PNDMScheduler.from_pretrained(folder, subfolder="scheduler").config)
    assert pipe.scheduler.config.timestep_spacing == ("leading" if named_spacing else "linspace")
    try:
        ref = reference(pipe, image(3), 9, num_inference_steps=steps, neg_prompt=negative)
    finally:
        pipe.scheduler = saved
    out = ours.generate("swimming underwater", [image(3)], "dog", negative_prompt=negative, steps=steps, seed=9,
                        scheduler="dpm", output="np", progress=False, **SIZE)
    assert np.abs(out - ref).max() <= 2e-3
    pndm = ours.generate("swimming underwater", [image(3)], "dog", negative_prompt=negative, steps=steps, seed=9,
                         output="np", progress=False, **SIZE)
    assert np.abs(out - pndm).max() > 1e-3  # another sampler, another picture


def test_target_text_and_pil_output(models):
    pipe, ours = models
    ref = reference(pipe, image(2), 3, target_subject_category=["cat"])
    out = ours.generate("swimming underwater", image(2), "dog", target_text="cat", steps=3, seed=3,
                        progress=False, **SIZE)
    assert isinstance(out[0], Image.Image) and out[0].size == (32, 32)
    assert np.abs(np.asarray(out[0], dtype=np.float32) - ref[0] * 255).max() <= 0.5 + 1e-3  # same rounding


def test_batch_image_k_uses_seed_plus_k(models):
    _, ours = models
    kw = dict(steps=2, output="np", progress=False, **SIZE)
    both = ours.generate("on the grass", [image(0)], "dog", seed=11, num_images=2, **kw)
    first = ours.generate("on the grass", [image(0)], "dog", seed=11, **kw)
    second = ours.generate("on the grass", [image(0)], "dog", seed=12, **kw)
    assert np.abs(both - np.concatenate([first, second])).max() <= 1e-5


def test_several_images_are_averaged_and_mixing_weights(models):
    _, ours = models
    a, b = image(0), image(1)
    emb_a, emb_b = ours.subject_embeddings([a], "dog"), ours.subject_embeddings([b], "dog")
    assert torch.allclose(ours.subject_embeddings([a, b], "dog"), (emb_a + emb_b) / 2, atol=1e-6)
    assert torch.allclose(ours.subject_embeddings([a, a, a], "dog"), emb_a, atol=1e-6)
    kw = dict(steps=2, seed=0, output="np", progress=False, **SIZE)
    single = ours.generate("at night", [a], "dog", **kw)
    mixed = ours.generate("at night", [[a], [b]], ["dog", "cat"], subject_weights=[1.0, 0.0], **kw)
    assert np.abs(single - mixed).max() <= 1e-5
    half = ours.generate("at night", [[a], [b]], ["dog", "dog"], subject_weights=[0.5, 0.5], **kw)
    assert np.abs(half - ours.generate("at night", [a, b], "dog", **kw)).max() <= 1e-5


def test_prompt_is_repeated_20_times_and_truncated(models):
    _, ours = models
    assert build_prompt(" on the beach ", "dog") == ", ".join(["a dog on the beach"] * 20)
    with pytest.warns(UserWarning, match="truncated"):
        ours.generate("very " * 80 + "long", [image(0)], "dog", steps=1, output="np", progress=False, **SIZE)
    with pytest.warns(UserWarning, match="negative prompt is"):  # diffusers crashes here; we truncate
        ours.generate("ok", [image(0)], "dog", negative_prompt="bad " * 90, steps=1, output="np",
                      progress=False, **SIZE)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "LA", "I;16", "I"])
def test_odd_image_modes_are_converted(mode):
    rgb = image(3)
    if mode == "I;16":
        odd = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
        assert odd.mode.startswith("I;16")
    elif mode == "I":
        odd = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.int32) * 257)
    else:
        odd = rgb.convert(mode)
    converted = to_rgb(odd)
    assert converted.mode == "RGB" and converted.size == rgb.size
    if mode in ("I;16", "I"):  # 16-bit grey rescaled to 8 bits, not clipped to white
        assert np.array_equal(np.asarray(converted)[..., 0], np.asarray(rgb.convert("L")))
    pixels = preprocess_subject([odd])
    assert pixels.shape == (1, 3, 224, 224) and torch.isfinite(pixels).all()


def test_center_crop_keeps_the_aspect_ratio():
    # A wide image whose left and right thirds are black: the crop keeps only the white middle.
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, 100:200] = 255
    squash = preprocess_subject([Image.fromarray(a)], (50, 50))
    crop = preprocess_subject([Image.fromarray(a)], (50, 50), center_crop=True)
    assert crop[..., 5:45].min() > squash.min()  # all white inside the crop
    assert squash[..., :10].max() < 0  # squashing keeps the black bars


def test_missing_vocab_and_files_named(tiny_pipeline, tmp_path):
    import shutil

    from checkpoint import CheckpointError
    _, folder = tiny_pipeline
    copy = tmp_path / "w"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "bert_tokenizer")
    (copy / "qformer" / "config.json").write_text(
        (copy / "qformer" / "config.json").read_text().replace('"bert_tokenizer"', '"elsewhere"'))
    with pytest.raises(CheckpointError, match=r"bert_tokenizer/vocab.txt: missing; download bert-base-uncased"):
        BlipDiffusion.from_pretrained(str(copy))
    (copy / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer/merges.txt: missing; see weights/README.md"):
        BlipDiffusion.from_pretrained(str(copy))


def test_save_pretrained_round_trip_and_fine_tuned_subject(models, tmp_path):
    _, ours = models
    out = tmp_path / "saved"
    kw = dict(steps=2, seed=1, output="np", progress=False, **SIZE)
    before = ours.generate("in the snow", [image(0)], "dog", **kw)
    ours.save_pretrained(str(out))
    again = BlipDiffusion.from_pretrained(str(out))
    assert np.abs(again.generate("in the snow", [image(0)], "dog", **kw) - before).max() <= 1e-6
    # A model that carries its subject generates it with no subject images.
    again.ctx_embeddings = torch.nn.Parameter(ours.subject_embeddings([image(0)], "dog"), requires_grad=False)
    again.subject_text = "dog"
    again.save_pretrained(str(out))  # over the previous contents
    tuned = BlipDiffusion.from_pretrained(str(out))
    assert tuned.subject_text == "dog"
    assert np.abs(tuned.generate("in the snow", **kw) - before).max() <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no temporary folders left


FAULTS_OF_BIG_ALLOCATIONS = """
import resource, sys, torch
from blipdiff import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def cycle():  # allocate, fill and free 64 MB, as a UNet call does with its activations
    torch.ones(16 * 2**20).sum()
cycle()
cycle()  # the heap may take two rounds to settle where its first growth was not contiguous
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc")
def test_keep_freed_memory_stops_the_page_faults_of_reallocation():
    """By default every 64 MB block freed goes back to the kernel and its reuse faults each page in
    again (16,384 pages of 4 kB each time); after keep_freed_memory() the freed block is reused."""
    def faults(mode):
        done = subprocess.run([sys.executable, "-c", FAULTS_OF_BIG_ALLOCATIONS, mode], capture_output=True, text=True,
                              cwd=ROOT, check=True)
        return int(done.stdout)
    assert faults("default") > 4 * 10_000
    assert faults("keep") < 1_000
