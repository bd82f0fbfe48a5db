"""Benchmark: zero-shot generation with blipdiff against diffusers' BlipDiffusionPipeline, side by side.

Both run the same randomly initialised model at the published sizes (ViT-L/14 + Q-Former, SD-1.5's
text encoder, UNet and VAE), loaded from one folder in the published layout that this script writes
itself (no download), with the same subject image, prompt, seed, steps and size. Each method runs in
a fresh process, timed from its imports: import + load + the first `generate` call is the time of one
image in a new process, then the median of --repeats later calls, the UNet calls per second of the
denoising loop alone, and the peak memory (resident memory on the CPU; CUDA's peak allocation on a
GPU). --methods names what runs, NAME[:DTYPE] each (see METHODS); the first is the reference of the
ratio lines. The methods alternate, --rounds times, and the figures are the medians over the rounds,
so a machine that slows down or speeds up part-way through weighs on all alike. Every pair of outputs
is compared (largest and mean absolute difference).

    python bench_generate.py --size 256 --steps 5 --rounds 3 --repeats 1 \
        --methods diffusers blipdiff blipdiff:bf16 diffusers+keep                 # 2 CPU cores
    python bench_generate.py --device cuda --size 512 --steps 50 --repeats 2 --finetune-steps 40 \
        --methods diffusers:fp16 blipdiff:fp16 diffusers:bf16 blipdiff:bf16 blipdiff+compile:fp16
"""

import argparse
import json
import os
import statistics
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


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# What a method spec may name: blipdiff as sample.py runs it (keep_freed_memory() first), blipdiff with
# its UNet compiled (sample.py --compile), diffusers as it comes, and diffusers in a process given
# blipdiff's allocator setting (to show how much of a difference is that setting).
METHODS = ("blipdiff", "blipdiff+compile", "diffusers", "diffusers+keep")


def parse_method(spec, default_dtype):
    """"NAME" or "NAME:DTYPE" -> (name, dtype)."""
    name, _, dtype = spec.partition(":")
    dtype = dtype or default_dtype
    if name not in METHODS or dtype not in DTYPES:
        raise argparse.ArgumentTypeError(f"{spec!r}: use NAME[:DTYPE], NAME one of {', '.join(METHODS)}, "
                                         f"DTYPE one of {', '.join(DTYPES)}")
    return name, dtype


def run(spec, folder, args, out):
    """One method in this fresh process, timed from its imports: import + load + the first generate
    call is the whole-process time of one image; then --repeats timed calls. Writes a JSON of figures
    and the last images as .npy."""
    start = time.perf_counter()
    import torch
    from PIL import Image
    method, dtype_name = parse_method(spec, args.dtype)
    rng = np.random.RandomState(0)
    subject = Image.fromarray((rng.rand(256, 256, 3) * 255).astype(np.uint8))
    device, dtype, size, steps = args.device, getattr(torch, DTYPES[dtype_name]), args.size, args.steps
    if method.startswith("blipdiff"):
        from blipdiff import BlipDiffusion, keep_freed_memory
        keep_freed_memory()
        imported = time.perf_counter()
        model = BlipDiffusion.from_pretrained(folder).to(device, dtype)
        if method == "blipdiff+compile":  # as sample.py --compile
            model.compile_unet()

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
        if method == "diffusers+keep":
            from blipdiff import keep_freed_memory
            keep_freed_memory()
        imported = time.perf_counter()
        os.chdir(folder)  # the reference finds its BERT tokenizer relative to the working folder
        # Part by part: diffusers 0.33.1's BlipDiffusionPipeline.from_pretrained fails with KeyError
        # 'mean' on its own model_index.json (a type-annotation check that misses mean and std).
        pipe = BlipDiffusionPipeline(
            tokenizer=CLIPTokenizer.from_pretrained("tokenizer"),
            text_encoder=ContextCLIPTextModel.from_pretrained("text_encoder"),
            vae=AutoencoderKL.from_pretrained("vae"), unet=UNet2DConditionModel.from_pretrained("unet"),
            scheduler=PNDMScheduler.from_pretrained("scheduler"), qformer=Blip2QFormerModel.from_pretrained("qformer"),
            image_processor=BlipImageProcessor.from_pretrained("image_processor"), ctx_begin_pos=2,
            mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711]).to(device, dtype)
        pipe.set_progress_bar_config(disable=True)

        def call():  # "pt": diffusers' numpy output cannot hold bf16
            images = pipe(prompt=[PROMPT], reference_image=subject, source_subject_category=[SUBJECT],
                          target_subject_category=[SUBJECT], num_inference_steps=steps, height=size, width=size,
                          generator=torch.Generator().manual_seed(0), output_type="pt").images
            return images.float().permute(0, 2, 3, 1).cpu().numpy()
    unet = model.unet if method.startswith("blipdiff") else pipe.unet
    marks = []  # a time before and after each UNet call: the denoising loop is from the first to the last

    def mark(*_):
        if device.startswith("cuda"):
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        else:
            marks.append(time.perf_counter())
    unet.register_forward_pre_hook(mark)
    unet.register_forward_hook(mark)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    loaded = time.perf_counter()
    with torch.no_grad():
        call()
        sync()
        first = time.perf_counter()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times, loops = [], []
        for _ in range(args.repeats):
            sync()
            marks.clear()
            t0 = time.perf_counter()
            images = call()
            sync()
            times.append(time.perf_counter() - t0)
            loops.append(marks[0].elapsed_time(marks[-1]) / 1000 if device.startswith("cuda") else marks[-1] - marks[0])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else peak_rss_gb()
    np.save(out + ".npy", images)
    with open(out + ".json", "w") as f:
        json.dump({"import_s": imported - start, "load_s": loaded - imported, "first_s": first - loaded,
                   "whole_s": first - start, "generate_s": statistics.median(times),
                   "loop_s": statistics.median(loops), "unet_calls": len(marks) // 2, "peak_gb": peak}, f)


def finetune_time(folder, args):
    """blipdiff's subject fine-tuning as a user runs it (train.py --stage finetune, LAVIS' recipe) on the
    written model: the wall time of the whole command, and of its steps alone (diffusers has none)."""
    from PIL import Image
    subject = os.path.join(folder, "_subject")
    os.makedirs(subject, exist_ok=True)
    rng = np.random.RandomState(1)
    for i in range(3):
        Image.fromarray((rng.rand(512, 512, 3) * 255).astype(np.uint8)).save(os.path.join(subject, f"{i}.png"))
    cmd = [sys.executable, "train.py", "--stage", "finetune", "--weights", folder, "--subject", subject,
           "--subject-text", SUBJECT, "--steps", str(args.finetune_steps), "--out", os.path.join(folder, "_ft"),
           "--log-every", "1", "--save-every", str(args.finetune_steps)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=os.path.dirname(os.path.abspath(__file__)), stdout=subprocess.DEVNULL)
    total = time.perf_counter() - t0
    with open(os.path.join(folder, "_ft", "log.jsonl")) as f:
        steps_s = sum(json.loads(line)["step_ms"] for line in f) / 1000
    return total, steps_s


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
    p.add_argument("--repeats", type=int, default=2, help="timed calls after the first, in each process; the median")
    p.add_argument("--rounds", type=int, default=1, help="processes per method, alternating; medians over them")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="precision of a method named without one")
    p.add_argument("--methods", nargs="+", default=["diffusers", "blipdiff"], metavar="NAME[:DTYPE]",
                   help=f"what to run, the first being the reference of the ratios; NAME one of {', '.join(METHODS)}")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="also time blipdiff's subject fine-tuning this many steps (0: not; the paper's 40)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--run", nargs=3, metavar=("METHOD", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        specs = [":".join(parse_method(m, args.dtype)) for m in args.methods]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.run:
        run(args.run[0], args.run[1], args, args.run[2])
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "blipdiffusion")
        t0 = time.perf_counter()
        write_folder(folder)
        print(f"wrote a random full-size model in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        rows = {spec: [] for spec in specs}
        for r in range(args.rounds):
            for i, spec in enumerate(rows):  # alternating, so drift on the machine weighs on all alike
                out = os.path.join(tmp, f"{i}-{r}")
                cmd = [sys.executable, os.path.abspath(__file__), "--run", spec, folder, out, "--size", str(args.size),
                       "--steps", str(args.steps), "--repeats", str(args.repeats), "--device", args.device]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                subprocess.run(cmd, check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
                with open(out + ".json") as f:
                    rows[spec].append({**json.load(f), "images": np.load(out + ".npy")})
                print(f"round {r + 1}/{args.rounds}: {spec} one image in {rows[spec][-1]['whole_s']:.1f} s, "
                      f"then {rows[spec][-1]['generate_s']:.2f} s a call", file=sys.stderr)
        finetune = finetune_time(folder, args) if args.finetune_steps else None
    keys = ("import_s", "load_s", "first_s", "whole_s", "generate_s", "loop_s", "peak_gb")
    med = {m: {k: statistics.median(r[k] for r in runs) for k in keys} for m, runs in rows.items()}
    calls = rows[specs[0]][0]["unet_calls"]
    memory = "peak CUDA memory" if args.device.startswith("cuda") else "peak RSS"
    print(f"{args.device}, {args.size}x{args.size}, {args.steps} PNDM steps ({calls} UNet calls of batch 2), "
          f"medians of {args.rounds} alternating round(s), {args.repeats} call(s) after the first\n")
    print(f"| method | import + load (s) | first call (s) | one image, whole process (s) | a later call (s) | "
          f"UNet calls/s | {memory} (GB) |")
    print("|---|---|---|---|---|---|---|")
    for spec, m in med.items():
        print(f"| {spec} | {m['import_s'] + m['load_s']:.1f} | {m['first_s']:.2f} | {m['whole_s']:.1f} | "
              f"{m['generate_s']:.2f} | {calls / m['loop_s']:.2f} | {m['peak_gb']:.2f} |")
    ref = specs[0]
    print()
    for spec in specs[1:]:
        print(f"{spec} / {ref}: one image in a fresh process {med[spec]['whole_s'] / med[ref]['whole_s']:.2f}x the time, "
              f"a later call {med[spec]['generate_s'] / med[ref]['generate_s']:.2f}x, "
              f"the denoising loop {med[spec]['loop_s'] / med[ref]['loop_s']:.2f}x")
    for i, a in enumerate(specs):
        for b in specs[i + 1:]:
            d = np.abs(rows[a][0]["images"] - rows[b][0]["images"])
            print(f"outputs {a} against {b}: max abs difference {d.max():.2e}, mean {d.mean():.2e}")
    if finetune:
        print(f"blipdiff fine-tuning, {args.finetune_steps} steps of 3 at 512 px: {finetune[1]:.1f} s of steps, "
              f"{finetune[0]:.1f} s for the whole command (load, steps, export)")
    print(f"reproduce: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
