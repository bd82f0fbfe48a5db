"""DreamBench evaluation: how well generated pictures keep their subject and follow their prompt.

DreamBench is DreamBooth's benchmark (Ruiz et al. 2023): 30 subjects (objects and pets), 4 to 6 real
pictures each, 25 prompts per subject, 4 generations per prompt (3000 images). BLIP-Diffusion (Li, Li,
Hoi 2023, Table 1) reports DreamBooth's three scores on it:

| | DINO | CLIP-I | CLIP-T |
|---|---|---|---|
| BLIP-Diffusion, zero-shot | 0.594 | 0.779 | 0.300 |
| BLIP-Diffusion, fine-tuned | 0.670 | 0.805 | 0.302 |

- DINO: the cosine between the DINO ViT-S/16 embedding of a generated image and that of each real
  picture of its subject, averaged over the pictures. DINO was trained without labels, so it tells
  apart two subjects of one class, where CLIP may not.
- CLIP-I: the same with CLIP ViT-B/32's projected image embedding.
- CLIP-T: the cosine between the generated image's CLIP embedding and its prompt's CLIP text embedding.

The definitions are ImagenHub's (src/imagen_hub/metrics/dreambooth_metric.py: a cosine per pair of
embeddings); the networks and their preprocessing are metrics.py's.

    python evaluate.py score MANIFEST.jsonl --dino DINO_DIR --clip CLIP_DIR --out scores.json
    python evaluate.py dreambench --data DREAMBOOTH_DATASET_DIR --weights W --out runs/dreambench

`score` scores any images against their subject's pictures and their prompt; `dreambench` renders the
benchmark with a BLIP-Diffusion model (zero-shot, or fine-tuned per subject), resumably, then scores it.
"""

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import train
from blipdiff import BlipDiffusion, Sampling, keep_freed_memory
from checkpoint import CheckpointError, write_atomically, write_json, write_text
from data import DataError, ImageError, center_crop, image_files, read_image
from metrics import CLIPModel, DINOViT, clip_pixels, dino_pixels
from cli import Parser, add_threads, pick_device, use_threads, whole

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------

SCORES = ("dino", "clip_i", "clip_t")


@torch.no_grad()
def score(records, dino, clip, device="cpu", progress=False, batch_size=32):
    """DreamBench's scores of each record -> {"images": [{"image", "dino", "clip_i", "clip_t"}, ...],
    "mean": {"dino", "clip_i", "clip_t"}}, in the records' order (the scores.json of `evaluate.py score`).

    A record: "image" (the name reported), "path" (its file; default "image"), "references" (the real
    pictures' files) and "prompt". DINO and CLIP-I average the cosine over the references; "mean" is
    the mean over the records. Each distinct picture and prompt is embedded once per call: a subject's
    references recur in every one of its generations. The networks run on `device`, in fp32.
    """
    dino, clip = dino.to(device).float().eval(), clip.to(device).float().eval()
    files = list(dict.fromkeys([r.get("path", r["image"]) for r in records]
                               + [f for r in records for f in r["references"]]))
    prompts = list(dict.fromkeys(r["prompt"] for r in records))
    dino_of, clip_of, text_of = {}, {}, {}
    with tqdm(total=len(files) + len(prompts), desc="embedding", unit="item", disable=not progress) as bar:
        for i in range(0, len(files), batch_size):
            batch = files[i:i + batch_size]
            images = [read_image(f) for f in batch]
            d = F.normalize(dino.embed(dino_pixels(images).to(device)), dim=-1).cpu()  # (B, D)
            c = F.normalize(clip.image_features(clip_pixels(images).to(device)), dim=-1).cpu()  # (B, E)
            dino_of.update(zip(batch, d))
            clip_of.update(zip(batch, c))
            bar.update(len(batch))
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            t = F.normalize(clip.text_features(clip.tokenizer(batch).to(device)), dim=-1).cpu()  # (B, E)
            text_of.update(zip(batch, t))
            bar.update(len(batch))

    def cosine(a, b):
        return float(a @ b)  # both unit vectors

    rows = []
    for r in records:
        image = r.get("path", r["image"])
        rows.append({"image": r["image"],
                     "dino": float(np.mean([cosine(dino_of[image], dino_of[f]) for f in r["references"]])),
                     "clip_i": float(np.mean([cosine(clip_of[image], clip_of[f]) for f in r["references"]])),
                     "clip_t": cosine(clip_of[image], text_of[r["prompt"]])})
    return {"images": rows, "mean": {k: float(np.mean([row[k] for row in rows])) for k in SCORES}}


def read_score_manifest(path):
    """MANIFEST.jsonl -> `score`'s records. One JSON object a line: {"image": "gen.png", "references":
    ["real0.jpg", ...], "prompt": "..."}, paths relative to the manifest's folder; blank lines are
    skipped. Each record keeps "image" as written and gains "path", its file; "references" become
    files. Every file must exist. Raises DataError, one line naming the manifest's line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such manifest; give a JSONL file, one image a line")
    base, records = os.path.dirname(os.path.abspath(path)), []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{where}: not valid JSON") from None
            if not isinstance(rec, dict) or not all(k in rec for k in ("image", "references", "prompt")):
                raise DataError(f'{where}: a record needs the keys "image", "references", "prompt"')
            refs = rec["references"]
            if not (isinstance(rec["image"], str) and isinstance(rec["prompt"], str) and isinstance(refs, list)
                    and refs and all(isinstance(r, str) for r in refs)):
                raise DataError(f'{where}: "image" and "prompt" must be strings, "references" a non-empty list '
                                f"of paths")
            files = [os.path.join(base, p) for p in [rec["image"], *refs]]
            if missing := [p for p in files if not os.path.isfile(p)]:
                raise DataError(f"{where}: no such image {missing[0]}")
            records.append({**rec, "path": files[0], "references": files[1:]})
    if not records:
        raise DataError(f"{path}: the manifest holds no records")
    return records


# ---------------------------------------------------------------------------------------------------
# DreamBench: generate the benchmark's images with a BLIP-Diffusion model, then score them
# ---------------------------------------------------------------------------------------------------

# The negative prompt of LAVIS' BLIP-Diffusion notebooks (projects/blip-diffusion/notebooks); the paper
# states no sampling settings for Table 1, so the run takes the released notebooks' (50 PNDM steps,
# guidance 7.5, 512 px: generate()'s defaults for the published model).
NEGATIVE_PROMPT = ("over-exposure, under-exposure, saturated, duplicate, out of frame, lowres, cropped, worst "
                   "quality, low quality, jpeg artifacts, morbid, mutilated, out of frame, ugly, bad anatomy, "
                   "bad proportions, deformed, blurry, duplicate")
# BLIP-Diffusion's Table 1 (and DreamBooth's real-image row): DINO, CLIP-I, CLIP-T.
PAPER = {"BLIP-Diffusion zero-shot": (0.594, 0.779, 0.300), "BLIP-Diffusion fine-tuned": (0.670, 0.805, 0.302),
         "real images": (0.774, 0.885, None)}
# DreamBooth's live subjects (its "Live Subject Prompts") are its pets; every other class is an object.
LIVE_CLASSES = ("cat", "dog")
METRICS = ("dino", "clip_i", "clip_t")


@dataclass
class BenchSubject:
    name: str  # the folder's name, "dog2"
    word: str  # its class, "dog": the subject text and the word the prompts use
    images: list  # paths of its pictures
    prompts: list  # Prompt, the list of its kind (object or live)


@dataclass
class Prompt:
    number: int  # 1-25, its place in the dataset's list
    text: str  # the whole prompt with the unique token dropped: "a red dog", "a dog in the jungle"
    target: str  # the words between "a" and the context, for generate()'s target_text: "red dog", "dog"
    context: str  # what follows, generate()'s prompt: "in the jungle" ("" for "a red dog")


def parse_prompt(number, template, word):
    """DreamBooth's 'a {0} {1} in the jungle' ({0} the unique token, {1} the class) for a class word ->
    Prompt. BLIP-Diffusion writes "a {target} {context}" with the subject embeddings after its "a", so
    words before the class ("a red {0} {1}") join the target: "red dog"."""
    before, after = template.split("{0} {1}")
    adjectives = before.strip().removeprefix("a").strip()
    target = f"{adjectives} {word}".strip()
    return Prompt(number, f"a {target} {after.strip()}".strip(), target, after.strip())


def read_dreambench(folder):
    """The DreamBooth data set as google/dreambooth publishes it (FOLDER or FOLDER/dataset holding
    prompts_and_classes.txt and one folder of pictures per subject) -> the subjects, in the file's order."""
    root = folder if os.path.isfile(os.path.join(folder, "prompts_and_classes.txt")) else os.path.join(folder, "dataset")
    path = os.path.join(root, "prompts_and_classes.txt")
    if not os.path.isfile(path):
        raise DataError(f"--data {folder}: no prompts_and_classes.txt there or in its dataset/; give the "
                        f"DreamBooth data set (github.com/google/dreambooth)")
    classes, lists, section = {}, {"object": [], "live": []}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("Object Prompts"):
                section = "object"
            elif line.startswith("Live Subject Prompts"):
                section = "live"
            elif section and line.startswith("'"):
                lists[section].append(line[1:line.rindex("'")])
            elif not section and "," in line and line != "subject_name,class":
                name, word = line.split(",", 1)
                classes[name.strip()] = word.strip()
    if not classes or not lists["object"] or not lists["live"]:
        raise DataError(f"{path}: not DreamBooth's prompts_and_classes.txt (a subject_name,class table and "
                        f"the object and live-subject prompt lists)")
    subjects = []
    for name, word in classes.items():
        images = image_files(os.path.join(root, name)) if os.path.isdir(os.path.join(root, name)) else []
        if not images:
            raise DataError(f"{os.path.join(root, name)}: subject {name} has no pictures; the data set is incomplete")
        kind = "live" if word in LIVE_CLASSES else "object"
        subjects.append(BenchSubject(name, word, images,
                                     [parse_prompt(i + 1, t, word) for i, t in enumerate(lists[kind])]))
    return subjects


def pick(subjects, names, numbers):
    """The --subjects and --prompts given (all when None), checked."""
    known = {s.name for s in subjects}
    if names and (unknown := [n for n in names if n not in known]):
        raise DataError(f"--subjects: no subject {', '.join(unknown)} in the data set; it has {', '.join(sorted(known))}")
    if numbers and (bad := [n for n in numbers if not 1 <= n <= len(subjects[0].prompts)]):
        raise DataError(f"--prompts: {bad} out of range; the prompts are numbered 1 to {len(subjects[0].prompts)}")
    chosen = [s for s in subjects if not names or s.name in names]
    for s in chosen:
        s.prompts = [p for p in s.prompts if not numbers or p.number in numbers]
    return chosen


def image_path(out, subject, prompt, k):
    return os.path.join(out, "images", subject.name, f"{prompt.number:02d}-{k}.png")


def check_run(out, settings):
    """run.json records what the images in --out were made with; a rerun with other settings would
    mix two runs, so it is refused."""
    path = os.path.join(out, "run.json")
    if os.path.isfile(path):
        with open(path) as f:
            before = json.load(f)
        if before != settings:
            changed = ", ".join(k for k in settings if before.get(k) != settings[k])
            raise DataError(f"{out} holds a run made with other settings ({changed}); use another --out "
                            f"or the same settings to resume")
    else:
        os.makedirs(out, exist_ok=True)
        write_text(path, json.dumps(settings, indent=1) + "\n")


def finetuned_model(subject, args, out):
    """train.py --stage finetune on the subject's pictures -> the fine-tuned model's folder (kept until
    the subject's images are done, so an interrupted run does not train again)."""
    folder = os.path.join(out, "finetuned", subject.name)
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        argv = ["--stage", "finetune", "--weights", args.weights, "--subject", os.path.dirname(subject.images[0]),
                "--subject-text", subject.word, "--out", folder, "--steps", str(args.finetune_steps),
                "--save-every", str(args.finetune_steps), "--keep", "1",
                "--log-every", str(args.finetune_steps)] + (["--lr", str(args.finetune_lr)] if args.finetune_lr else [])
        if train.main(argv) != 0:
            raise DataError(f"fine-tuning on {subject.name} failed (train.py's error is above)")
    return folder


def generate_missing(model, subject, args, sampling, out, bar, ctx=None):
    """Every missing image of the subject: per prompt the images k = 0..N-1 (seed + k), each written
    atomically, so a rerun never makes a finished image again; a run of missing ones is one batch."""
    references = None if ctx is not None else [read_image(p) for p in subject.images]
    for prompt in subject.prompts:
        missing = [k for k in range(args.images_per_prompt) if not os.path.isfile(image_path(out, subject, prompt, k))]
        while missing:
            run = [k for i, k in enumerate(missing) if k == missing[0] + i]  # consecutive ks: consecutive seeds
            images = model.generate(prompt.context, references, subject.word, replace(
                sampling, seed=args.seed + run[0], num_images=len(run)), target_text=prompt.target,
                ctx_embeddings=ctx, progress=False)
            for k, image in zip(run, images):
                path = image_path(out, subject, prompt, k)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))
                bar.update(1)
            missing = missing[len(run):]


def contact_sheet(subject, records, path, side=128):
    """The subject's references on the first row, then one row per prompt: its images, in order."""
    rows = [[read_image(p) for p in subject.images]]
    for prompt in subject.prompts:
        rows.append([read_image(r["path"]) for r in records if r["prompt"] == prompt.text])
    sheet = Image.new("RGB", (side * max(len(r) for r in rows), side * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            sheet.paste(center_crop(image, side, side), (x * side, y * side))
    write_atomically(path, lambda tmp: sheet.save(tmp, format="PNG"))


def results_table(subjects, scored, title):
    """Markdown: the run's means beside the paper's figures, then one row per subject."""
    def row(name, scores, n=""):
        return f"| {name} | {n} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in scores) + " |"
    lines = [f"# DreamBench: {title}", "", "| | images | DINO | CLIP-I | CLIP-T |", "|---|---|---|---|---|",
             row(f"this run ({title})", [scored["mean"][m] for m in METRICS], len(scored["images"]))]
    lines += [row(f"paper: {name}", figures) for name, figures in PAPER.items()]
    lines += ["", "| subject | images | DINO | CLIP-I | CLIP-T |", "|---|---|---|---|---|"]
    for s in subjects:
        mine = [r for r in scored["images"] if r["image"].startswith(f"images/{s.name}/")]
        lines.append(row(s.name, [sum(r[m] for r in mine) / len(mine) for m in METRICS], len(mine)))
    return "\n".join(lines) + "\n"


def dreambench(args):
    """python evaluate.py dreambench: generate DreamBench's images (zero-shot, or fine-tuned per subject
    with --finetune-steps), write the manifest, score it, write the tables and contact sheets."""
    if args.images_per_prompt < 1 or args.steps < 1 or (args.finetune_steps is not None and args.finetune_steps < 1):
        raise DataError("--images-per-prompt, --steps and --finetune-steps must be at least 1")
    subjects = pick(read_dreambench(args.data), args.subjects, args.prompts)
    # Every folder is read before any work, so a wrong one costs seconds, not a half run.
    device = pick_device(args.device)
    model = BlipDiffusion.from_pretrained(args.weights).to(device)
    dino, clip = DINOViT.from_pretrained(args.dino), CLIPModel.from_pretrained(args.clip)
    title = f"fine-tuned {args.finetune_steps} steps" if args.finetune_steps else "zero-shot"
    sampling = Sampling(steps=args.steps, guidance=args.guidance, height=model.resolution, width=model.resolution,
                        negative_prompt=args.negative_prompt)
    check_run(args.out, {"weights": os.path.abspath(args.weights), "finetune_steps": args.finetune_steps,
                         "finetune_lr": args.finetune_lr, "seed": args.seed, **asdict(sampling)})
    total = sum(len(s.prompts) for s in subjects) * args.images_per_prompt
    done = sum(os.path.isfile(image_path(args.out, s, p, k)) for s in subjects for p in s.prompts
               for k in range(args.images_per_prompt))
    with tqdm(total=total, initial=done, desc="generating", unit="image") as bar:
        for s in subjects:
            if all(os.path.isfile(image_path(args.out, s, p, k)) for p in s.prompts for k in range(args.images_per_prompt)):
                continue
            if args.finetune_steps:
                folder = finetuned_model(s, args, args.out)
                tuned = BlipDiffusion.from_pretrained(folder).to(device)
                generate_missing(tuned, s, args, sampling, args.out, bar, ctx=tuned.ctx_embeddings)
                del tuned
                shutil.rmtree(folder)  # gigabytes at the published size; its images are what counts
            else:
                generate_missing(model, s, args, sampling, args.out, bar)
    records = [{"image": os.path.relpath(image_path(args.out, s, p, k), args.out),
                "references": [os.path.relpath(r, args.out) for r in s.images], "prompt": p.text}
               for s in subjects for p in s.prompts for k in range(args.images_per_prompt)]
    manifest = os.path.join(args.out, "manifest.jsonl")
    write_text(manifest, "".join(json.dumps(r) + "\n" for r in records))
    scored = score(read_score_manifest(manifest), dino, clip, device, progress=True, batch_size=args.batch_size)
    write_atomically(os.path.join(args.out, "scores.json"), lambda tmp: write_json(tmp, scored))
    write_text(os.path.join(args.out, "results.md"), results_table(subjects, scored, title))
    os.makedirs(os.path.join(args.out, "sheets"), exist_ok=True)
    for s in subjects:
        contact_sheet(s, [dict(r, path=os.path.join(args.out, r["image"])) for r in records
                          if r["image"].startswith(f"images/{s.name}/")], os.path.join(args.out, "sheets", f"{s.name}.png"))
    m = scored["mean"]
    print(f"DreamBench {title}, {len(records)} images of {len(subjects)} subjects: DINO {m['dino']:.3f}, CLIP-I "
          f"{m['clip_i']:.3f}, CLIP-T {m['clip_t']:.3f}; {args.out}/results.md, scores.json, manifest.jsonl, sheets/")
    return 0


def add_dreambench_parser(sub):
    p = sub.add_parser("dreambench", help="generate DreamBench's images with a model, then score them",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="the DreamBooth data set (google/dreambooth, or its dataset/ folder)")
    p.add_argument("--weights", required=True, help="a BLIP-Diffusion folder in the published layout")
    p.add_argument("--out", required=True, help="run folder: images/, manifest.jsonl, scores.json, results.md, sheets/; "
                                                "rerun to resume")
    p.add_argument("--subjects", nargs="+", default=None, help="subject names (default: all 30)")
    p.add_argument("--prompts", nargs="+", type=int, default=None, help="prompt numbers, 1-25 as listed (default: all)")
    p.add_argument("--images-per-prompt", type=int, default=4, help="DreamBooth's protocol: 4")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="fine-tune on each subject's pictures this many steps first (train.py --stage finetune; "
                        "the paper: 40-120); default zero-shot")
    p.add_argument("--finetune-lr", type=float, default=None, help="fine-tuning lr (default: train.py's, LAVIS' 5e-6)")
    metric_arguments(p)
    p.add_argument("--steps", type=int, default=50, help="PNDM steps (LAVIS' notebooks)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's, 7.5 published)")
    p.add_argument("--negative-prompt", default=NEGATIVE_PROMPT, help="LAVIS' notebooks' negative prompt")
    p.add_argument("--seed", type=int, default=0, help="image k of every prompt starts from seed + k")


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def score_command(args):
    """`evaluate.py score`: score a manifest's images, write scores.json."""
    records = read_score_manifest(args.manifest)
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder) or os.path.isdir(args.out):
        raise DataError(f"--out {args.out}: give a file name in an existing folder")
    dino, clip = DINOViT.from_pretrained(args.dino), CLIPModel.from_pretrained(args.clip)
    result = score(records, dino, clip, pick_device(args.device), progress=True, batch_size=args.batch_size)
    write_atomically(args.out, lambda tmp: write_json(tmp, result))
    m = result["mean"]
    print(f"wrote {args.out}: {len(records)} images, mean DINO {m['dino']:.3f}, CLIP-I {m['clip_i']:.3f}, "
          f"CLIP-T {m['clip_t']:.3f}")
    return 0


def metric_arguments(p):
    """The metric networks' options, shared by the subcommands that score."""
    p.add_argument("--dino", default=os.path.relpath(os.path.join(HERE, "weights", "dino-vits16")),
                   help="facebook/dino-vits16, a transformers ViTModel folder (weights/README.md)")
    p.add_argument("--clip", default=os.path.relpath(os.path.join(HERE, "weights", "clip-vit-base-patch32")),
                   help="openai/clip-vit-base-patch32, a transformers CLIPModel folder with its tokenizer")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="auto: cuda, then mps, then cpu; the networks run in fp32")
    p.add_argument("--batch-size", type=whole(1), default=32, help="pictures (or prompts) per forward pass")
    add_threads(p)


def main(argv=None):
    parser = Parser(prog="evaluate.py", description="DreamBench evaluation: DINO, CLIP-I and CLIP-T, as DreamBooth "
                                                 "defines them (BLIP-Diffusion Table 1).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score generated images against their subject's pictures and their prompt",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("manifest", help='JSONL, one {"image", "references", "prompt"} a line, paths relative to it')
    metric_arguments(p)
    p.add_argument("--out", default="scores.json", help="JSON: each image's scores, in the manifest's order, and "
                                                        "their means")
    add_dreambench_parser(sub)
    args = parser.parse_args(argv)
    try:
        args.device = pick_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    use_threads(args.threads)
    keep_freed_memory()
    commands = {"score": score_command, "dreambench": dreambench}
    try:
        return commands[args.command](args)
    except (CheckpointError, DataError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
