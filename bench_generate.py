"""Benchmark: zero-shot generation with blipdiff against diffusers' BlipDiffusionPipeline, side by side.

Both run the same randomly initialised model at the published sizes (ViT-L/14 + Q-Former, SD-1.5's
text encoder, UNet and VAE), loaded from one folder in the published layout that this script writes
itself (no download), with the same subject image, prompt, seed, steps and size. Each method runs in a
fresh process: the time of a whole `generate` call (best of --repeats, after a warm-up call), the time
to load the folder, and the peak resident memory of the process. The outputs are compared too.

    python bench_generate.py --size 256 --steps 10 --repeats 2
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

PROMPT, SUBJECT = "swimming underwater", "dog"


def write_folder(folder):
    """A full-size random BLIP-Diffusion in the published layout, built by the reference libraries."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.blip_diffusion import BlipDiffusionPipeline
    from diffusers.pipelines.blip_diffusion.blip_image_processing import BlipImageProcessor
    from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import CLIPTextConfig, CLIPTokenizer
    from transformers.models.blip_2.configuration_blip_2 import Blip2Config
    from tokenizers.pre_tokenizers import ByteLevel

    torch.manual_seed(0)
    # Tokenizer files of the published sizes: CLIP's 49408 ids (bytes, fillers, the two specials last)
    # and bert-base-uncased's 30522 lines; the fillers are never produced, the ids are what matter.
    chars = sorted(ByteLevel.alphabet())
    clip_tokens = chars + [c + "</w>" for c in chars]
    clip_tokens += [f"filler{i}" for i in range(49406 - len(clip_tokens))] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(os.path.join(folder, "_tok"))
    with open(os.path.join(folder, "_tok", "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(clip_tokens)}, f)
    with open(os.path.join(folder, "_tok", "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    os.makedirs(os.path.join(folder, "bert_tokenizer"))
    letters = list("abcdefghijklmnopqrstuvwxyz")
    bert = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters]
    bert += [f"[unused{i}]" for i in range(30522 - len(bert))]
    with open(os.path.join(folder, "bert_tokenizer", "vocab.txt"), "w") as f:
        f.write("\n".join(bert) + "\n")

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        blip = Blip2Config(vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                              num_attention_heads=16, patch_size=14, hidden_act="quick_gelu"),
                           qformer_config=dict(vocab_size=30523, cross_attention_frequency=1, encoder_hidden_size=1024),
                           num_query_tokens=16, tokenizer="bert_tokenizer")
        qformer = Blip2QFormerModel(blip)
    finally:
        os.chdir(cwd)
    pipe = BlipDiffusionPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(folder, "_tok")),
        text_encoder=ContextCLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                         projection_dim=768, hidden_act="quick_gelu")),
        vae=AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512),
        unet=UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8),
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                set_alpha_to_one=False, skip_prk_steps=True),
        qformer=qformer, image_processor=BlipImageProcessor(), ctx_begin_pos=2,
        mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711])
    pipe.save_pretrained(folder)


def run(method, folder, size, steps, repeats, out):
    """One method in this (fresh) process; writes a JSON of figures and the images as .npy."""
    import torch
    from PIL import Image
    rng = np.random.RandomState(0)
    subject = Image.fromarray((rng.rand(256, 256, 3) * 255).astype(np.uint8))
    start = time.perf_counter()
    if method == "blipdiff":
        from blipdiff import BlipDiffusion
        model = BlipDiffusion.from_pretrained(folder)

        def call():
            return model.generate(PROMPT, [subject], SUBJECT, steps=steps, seed=0, height=size, width=size,
                                  output="np", progress=False)
    else:
        from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
        from diffusers.pipelines.blip_diffusion import BlipDiffusionPipeline
        from diffusers.pipelines.blip_diffusion.blip_image_processing import BlipImageProcessor
        from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel
        from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
        from transformers import CLIPTokenizer
        os.chdir(folder)  # the reference finds its BERT tokenizer relative to the working folder
        # Part by part: diffusers 0.33.1's BlipDiffusionPipeline.from_pretrained fails with KeyError
        # 'mean' on its own model_index.json (a type-annotation check that misses mean and std).
        pipe = BlipDiffusionPipeline(
            tokenizer=CLIPTokenizer.from_pretrained("tokenizer"),
            text_encoder=ContextCLIPTextModel.from_pretrained("text_encoder"),
            vae=AutoencoderKL.from_pretrained("vae"), unet=UNet2DConditionModel.from_pretrained("unet"),
            scheduler=PNDMScheduler.from_pretrained("scheduler"), qformer=Blip2QFormerModel.from_pretrained("qformer"),
            image_processor=BlipImageProcessor.from_pretrained("image_processor"), ctx_begin_pos=2,
            mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711])
        pipe.set_progress_bar_config(disable=True)

        def call():
            return pipe(prompt=[PROMPT], reference_image=subject, source_subject_category=[SUBJECT],
                        target_subject_category=[SUBJECT], num_inference_steps=steps, height=size, width=size,
                        generator=torch.Generator().manual_seed(0), output_type="np").images
    load = time.perf_counter() - start
    with torch.no_grad():
        call()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            images = call()
            times.append(time.perf_counter() - t0)
    np.save(out + ".npy", images)
    with open(out + ".json", "w") as f:
        json.dump({"load_s": load, "generate_s": min(times), "peak_rss_gb": peak_rss_gb()}, f)


def peak_rss_gb():
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss, which Linux carries over
    from the parent across fork and exec (the parent held the whole model while writing it)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 2**20


def main():
    p = argparse.ArgumentParser(description="blipdiff vs diffusers: generation time and memory, side by side.")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (the published model: 512)")
    p.add_argument("--steps", type=int, default=10, help="PNDM steps (steps + 1 UNet calls, batch 2 with guidance)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls after a warm-up; the best is reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--run", nargs=3, metavar=("METHOD", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.run:
        run(args.run[0], args.run[1], args.size, args.steps, args.repeats, args.run[2])
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "blipdiffusion")
        t0 = time.perf_counter()
        write_folder(folder)
        print(f"wrote a random full-size model in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        rows = {}
        for method in ("diffusers", "blipdiff"):
            out = os.path.join(tmp, method)
            cmd = [sys.executable, os.path.abspath(__file__), "--run", method, folder, out, "--size", str(args.size),
                   "--steps", str(args.steps), "--repeats", str(args.repeats)]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            subprocess.run(cmd, check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
            with open(out + ".json") as f:
                rows[method] = json.load(f)
            rows[method]["images"] = np.load(out + ".npy")
    diff = np.abs(rows["blipdiff"]["images"] - rows["diffusers"]["images"]).max()
    print(f"| method | load (s) | generate {args.size}x{args.size}, {args.steps} steps (s) | peak RSS (GB) |")
    print("|---|---|---|---|")
    for method, r in rows.items():
        print(f"| {method} | {r['load_s']:.1f} | {r['generate_s']:.2f} | {r['peak_rss_gb']:.2f} |")
    speed = rows["diffusers"]["generate_s"] / rows["blipdiff"]["generate_s"]
    print(f"\nblipdiff is {speed:.2f}x the speed of diffusers; outputs differ by at most {diff:.2e}")
    print(f"reproduce: python bench_generate.py --size {args.size} --steps {args.steps} --repeats {args.repeats}")


if __name__ == "__main__":
    main()
