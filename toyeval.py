"""The toy Table 1: how well a BLIP-Diffusion model keeps a subject it never saw, read back exactly.

The paper compares methods on DreamBench with DINO and CLIP similarities (sec. 4, Table 1, following
DreamBooth). In the toy world (toyworld.py) the truth is known, so held-out subjects are rendered in
every context three ways (the prompt's text only, zero-shot from reference pictures, after 40 steps
of fine-tuning on them) and the attribute oracle reads each generation back: did it keep the
subject's category, colour and pattern, does it show the prompted context, and how close are its
oracle features to the references' (the stand-in for DINO); with 90% bootstrap intervals over the
subjects, which differ far more than generations do. Linear probes say where a subject is
lost before the UNet: in the frozen image tower, or in the subject embeddings.

    python toyworld.py evaluate --weights weights/toy --json toy_eval.json --sheet toy_eval.png
    python toyworld.py probe --weights weights/toy

It also holds the toy world's command line (`python toyworld.py show|data|examples|train-oracle|
eval-oracle|evaluate|probe`), here because its commands build on the world (toyworld.py), the oracle
(oracle.py) and this evaluation, which toyworld.py runs as its entry point.
"""

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import train
from blipdiff import DTYPES, BlipDiffusion, keep_freed_memory, preprocess_subject
from checkpoint import CheckpointError, write_atomically
from cli import Parser, whole
from oracle import eval_oracle, load_oracle, train_oracle
from toyworld import CONTEXTS, WorldConfig, batch, identities, render, show, write_data, write_examples


METHODS = ("text-only", "zero-shot", "fine-tuned")  # the rows: no subject, reference images, fine-tuned


def eval_subjects(n, seed):
    """The first n of a seeded permutation of the held-out identities: subjects no stage trained on."""
    pool = identities("heldout")
    if not 1 <= n <= len(pool):
        raise ValueError(f"--subjects must be 1 to {len(pool)} (the held-out identities), got {n}")
    return [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))[:n]]


def reference_images(identity, n, rng):
    """n pictures of the subject, each in another context: the few photos a user has of it."""
    if not 1 <= n <= len(CONTEXTS):
        raise ValueError(f"--refs must be 1 to {len(CONTEXTS)} (one context each), got {n}")
    return [render(identity, CONTEXTS[i], rng, WorldConfig.size).image
            for i in rng.choice(len(CONTEXTS), n, replace=False)]


def finetune(refs, category, args, tmp):
    """Subject fine-tuning (paper sec. 3.2) run as a user runs it: the references written to a folder,
    then train.py --stage finetune. -> the output folder, a model that carries its subject."""
    subject, out = os.path.join(tmp, "subject"), os.path.join(tmp, "finetuned")
    os.makedirs(subject)
    for i, image in enumerate(refs):
        image.save(os.path.join(subject, f"{i}.png"))
    argv = ["--stage", "finetune", "--weights", args.weights, "--subject", subject, "--subject-text", category,
            "--out", out, "--steps", str(args.finetune_steps), "--lr", str(args.finetune_lr),
            "--min-snr", str(args.finetune_min_snr), "--batch-size", "3",
            "--save-every", "1000000", "--log-every", "1000000", "--keep", "1"]
    with contextlib.redirect_stdout(io.StringIO()):  # its report, once per subject, would break the progress bar
        if train.main(argv) != 0:
            raise ValueError(f"fine-tuning on a {category} failed (train.py's error is above)")
    return out


def score(oracle, images, identity, contexts, reference_features):
    """The oracle's reading of one subject's generations -> per generation: whether it read back the
    subject's category, colour and pattern and the prompted context, and the cosine between its
    features and the references' mean (DINO's stand-in)."""
    pred, heads = oracle.predict(images), oracle.config.heads
    cosine = F.cosine_similarity(oracle.features(images), reference_features[None], dim=-1)
    truth = {"category": identity.category, "color": identity.color, "pattern": identity.pattern}
    return [{**{a: heads[a][int(pred[a][k])] == v for a, v in truth.items()},
             "context": heads["context"][int(pred["context"][k])] == context, "cosine": float(cosine[k])}
            for k, context in enumerate(contexts)]


def whole_subject(records):
    """Per generation, 1.0 where the oracle read back all three of category, colour and pattern:
    the category alone is in the prompt, so text-only gets it for free. -> (N,)"""
    return np.array([r["category"] and r["color"] and r["pattern"] for r in records], np.float64)


def summarize(records):
    """One method's per-generation records -> its numbers; subject fidelity is `whole_subject`'s mean."""
    column = {key: np.array([r[key] for r in records], np.float64) for key in records[0]}
    return {"subject_fidelity": float(whole_subject(records).mean()), "prompt_fidelity": float(column["context"].mean()),
            "feature_cosine": float(column["cosine"].mean()),
            **{a: float(column[a].mean()) for a in ("category", "color", "pattern")}, "generations": len(records)}


def bootstrap(records, per_subject, draws=2000, seed=0):
    """Subject fidelity's spread over subjects, which differ far more than generations do: the 5th and
    95th percentiles of each method's mean, and of fine-tuned minus zero-shot, over the subjects
    resampled with replacement (paired: one draw serves every method). records: {method: per
    generation, per_subject consecutive ones a subject} -> {name: [low, high]}."""
    whole = {m: whole_subject(records[m]).reshape(-1, per_subject).mean(1) for m in METHODS}  # (subjects,)
    n = len(whole[METHODS[0]])
    pick = np.random.default_rng(seed).integers(0, n, (draws, n))
    means = {m: whole[m][pick].mean(1) for m in METHODS}
    means["fine-tuned - zero-shot"] = means["fine-tuned"] - means["zero-shot"]
    return {name: [float(np.percentile(v, 5)), float(np.percentile(v, 95))] for name, v in means.items()}


def targets(rows):
    """The issue's targets for the toy model -> {target: met?}."""
    text, zero, tuned = (rows[m]["subject_fidelity"] for m in METHODS)
    return {"zero-shot subject fidelity >= 0.5": zero >= 0.5,
            "zero-shot subject fidelity >= 5x text-only": zero > 0 and zero >= 5 * text,
            "zero-shot prompt fidelity >= 0.85": rows["zero-shot"]["prompt_fidelity"] >= 0.85,
            "fine-tuned subject fidelity > zero-shot": tuned > zero}


def evaluate(args):
    """The toy Table 1 (the paper's DreamBench comparison, DreamBooth's protocol): held-out subjects rendered in each
    context by text only, zero-shot from their reference pictures, and after fine-tuning on them;
    every generation read back by the oracle. The seed of a generation depends on (subject, context)
    only, so the three rows differ by method alone."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isfile(os.path.join(args.weights, "model_index.json")):
        raise ValueError(f"{args.weights}: no BLIP-Diffusion model there; train the toy one with: "
                         f"python toymodel.py --out runs/toy (it ends in weights/toy)")
    if not 1 <= args.contexts <= len(CONTEXTS):
        raise ValueError(f"--contexts must be 1 to {len(CONTEXTS)}, got {args.contexts}")
    for path in filter(None, (args.sheet, args.json)):  # before the long run, not after it
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{path}: its folder does not exist; create it first")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # train.py's fine-tuning picks the same
    oracle = load_oracle(args.oracle, device)
    dtype = DTYPES[args.dtype]
    model = BlipDiffusion.from_pretrained(args.weights).to(device, dtype)
    side = model.resolution
    args.guidance = model.guidance if args.guidance is None else args.guidance
    contexts, subjects = CONTEXTS[:args.contexts], eval_subjects(args.subjects, args.seed)
    kw = dict(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, height=side, width=side,
              progress=False)
    records = {m: [] for m in METHODS}
    drawn = len(subjects) if args.sheet_subjects <= 0 else min(args.sheet_subjects, len(subjects))
    sheet = np.zeros((drawn * len(METHODS) * side, (1 + len(contexts)) * side, 3), np.uint8)
    for s, identity in enumerate(tqdm(subjects, desc="subjects")):
        refs = reference_images(identity, args.refs, np.random.default_rng([args.seed, s]))
        reference_features = oracle.features(refs).mean(0)
        with tempfile.TemporaryDirectory() as tmp:
            tuned = BlipDiffusion.from_pretrained(finetune(refs, identity.category, args, tmp)).to(device, dtype)
        models = {"text-only": model, "zero-shot": model, "fine-tuned": tuned}
        subject = {"text-only": dict(subject_text=identity.category),
                   "zero-shot": dict(subject_images=refs, subject_text=identity.category), "fine-tuned": {}}
        for m, method in enumerate(METHODS):
            images = [models[method].generate(c, seed=args.seed + len(CONTEXTS) * s + k, **subject[method], **kw)[0]
                      for k, c in enumerate(contexts)]
            records[method] += score(oracle, images, identity, contexts, reference_features)
            if s >= drawn:
                continue
            y = (s * len(METHODS) + m) * side  # (subject, method) -> one row: first reference, then each context
            for col, image in enumerate([refs[0].resize((side, side), Image.BICUBIC)] + images):
                sheet[y:y + side, col * side:(col + 1) * side] = np.asarray(image.convert("RGB"))
    rows = {m: summarize(records[m]) for m in METHODS}
    met, spread = targets(rows), bootstrap(records, len(contexts))
    n = len(subjects) * len(contexts)
    print(f"{args.weights}: {len(subjects)} held-out subjects x {len(contexts)} contexts = {n} generations per "
          f"method ({args.steps} {args.scheduler} steps, guidance {args.guidance}, {side} px)")
    print("| method | subject fidelity | prompt fidelity | oracle-feature cosine |\n|---|---|---|---|")
    for m in METHODS:
        print(f"| {m} | {rows[m]['subject_fidelity']:.3f} | {rows[m]['prompt_fidelity']:.3f} | "
              f"{rows[m]['feature_cosine']:.3f} |")
    print("\n| method | category | colour | pattern |\n|---|---|---|---|")
    for m in METHODS:
        print(f"| {m} | {rows[m]['category']:.3f} | {rows[m]['color']:.3f} | {rows[m]['pattern']:.3f} |")
    gain = rows["fine-tuned"]["subject_fidelity"] - rows["zero-shot"]["subject_fidelity"]
    low, high = spread["fine-tuned - zero-shot"]
    print("\nsubject fidelity, 90% intervals over the subjects (bootstrap): "
          + ", ".join(f"{m} {spread[m][0]:.3f}-{spread[m][1]:.3f}" for m in METHODS)
          + f"; fine-tuned - zero-shot {gain:+.3f} ({low:+.3f} to {high:+.3f})")
    print("\ntargets (the issue's, for weights/toy; a miss is reported, not an error):")
    for target, ok in met.items():
        print(f"  {'PASS' if ok else 'FAIL'} {target}")
    if args.json:
        result = {"weights": args.weights, "subjects": len(subjects), "contexts": len(contexts), "rows": rows,
                  "intervals_90": spread, "targets": met, "settings": {k: getattr(args, k) for k in (
                      "steps", "guidance", "scheduler", "refs", "finetune_steps", "finetune_lr", "finetune_min_snr",
                      "seed", "dtype")}}
        write_atomically(args.json, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
    image = Image.fromarray(sheet)
    if args.zoom > 1:
        image = image.resize((image.width * args.zoom, image.height * args.zoom), Image.NEAREST)
    write_atomically(args.sheet, lambda tmp: image.save(tmp, format="PNG"))
    print(f"evaluated {len(subjects)} subjects x {len(contexts)} contexts x {len(METHODS)} methods: sheet "
          f"(the first {drawn} subjects, per subject: {', '.join(METHODS)}; first reference, then each context) "
          f"in {args.sheet}"
          + (f", numbers in {args.json}" if args.json else ""))


# ---------------------------------------------------------------------------------------------
# Linear probes: what the frozen image tower and the subject embeddings know of a subject
# ---------------------------------------------------------------------------------------------

PROBED = ("category", "color", "pattern")


@torch.no_grad()
def probe_features(model, samples, chunk=200):
    """Pictures -> {"image tower": its class token (N, D), "subject embedding": the Q-Former's
    output given the true category word, flattened (N, 16 * D)}: what stage 2's UNet is told."""
    out = {"image tower": [], "subject embedding": []}
    for k in range(0, len(samples), chunk):
        part = samples[k:k + chunk]
        pixels = preprocess_subject([s.image for s in part], model.image_size, model.mean, model.std).to(model.device)
        out["image tower"].append(model.qformer.visual_encoder(pixels)[:, 0].float().cpu())
        ids, mask = (t.to(model.device) for t in model.qformer_tokenizer([s.category for s in part]))
        out["subject embedding"].append(model.qformer(pixels, ids, mask).flatten(1).float().cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}


def linear_probe(train_x, train_y, test_x, test_y, steps=400, lr=1e-2, decay=1e-4):
    """A softmax-regression on standardised features, full batch -> accuracy on the test set."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-5
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    classes = int(max(train_y.max(), test_y.max())) + 1
    w = torch.zeros(a.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (F.cross_entropy(a @ w + bias, train_y) + decay * w.pow(2).sum()).backward()
        opt.step()
    with torch.no_grad():
        return float(((b @ w + bias).argmax(1) == test_y).float().mean())


def probe(args):
    """Linear probes (as CLIP's paper measures representations) on held-out identities: can the
    category, colour and pattern be read off linearly from the frozen image tower's class token,
    and from the subject embeddings, by a classifier fitted on pictures of training identities?
    What the image tower does not hold, no later stage can give the UNet."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isfile(os.path.join(args.weights, "model_index.json")):
        raise ValueError(f"{args.weights}: no BLIP-Diffusion model there (a folder like weights/toy)")
    if args.n < 8:
        raise ValueError(f"--n must be at least 8 (a quarter of it are the held-out test pictures), got {args.n}")
    torch.manual_seed(args.seed)
    model = BlipDiffusion.from_pretrained(args.weights)
    rng = np.random.default_rng(args.seed)
    (_, train_y, train_s), (_, test_y, test_s) = batch(rng, args.n, "train"), batch(rng, args.n // 4, "heldout")
    train_f, test_f = probe_features(model, train_s), probe_features(model, test_s)
    rows = {name: {a: linear_probe(train_f[name], train_y[a], test_f[name], test_y[a]) for a in PROBED}
            for name in train_f}
    print(f"{args.weights}: linear probes fitted on {args.n} pictures of training identities, "
          f"accuracy on {args.n // 4} of held-out ones")
    print("| features | category | colour | pattern |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[a]:.3f}" for a in PROBED) + " |")
    return rows


# ---------------------------------------------------------------------------------------------
# The toy world's command line
# ---------------------------------------------------------------------------------------------

def main():
    """`python toyworld.py COMMAND`: the toy world's command line (toyworld.py's entry point)."""
    parser = Parser(prog="toyworld.py",
                    description="The toy world: pictures of known subjects, and their attribute oracle.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("show", help="write a contact sheet of example pictures",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="sheet.png", help="PNG to write")
    p.add_argument("--split", default="train", choices=("train", "heldout", "all"), help="whose identities to draw")
    p.add_argument("--columns", type=int, default=8, help="pictures per context")
    p.add_argument("--size", type=int, default=WorldConfig.size, help="pixels per picture")
    p.add_argument("--zoom", type=int, default=2, help="nearest-neighbour enlargement of the sheet, for viewing")
    p.add_argument("--masks", action="store_true", help="show each true mask and a degraded confidence beside the picture")
    p.add_argument("--seed", type=int, default=0, help="fixes every picture of the sheet")
    p = sub.add_parser("data", help="write a training set (pictures, masks, backgrounds, manifests) to a folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (replaced as a whole when done)")
    p.add_argument("--n", type=int, default=20000, help="pictures of training identities")
    p.add_argument("--backgrounds", type=int, default=400, help="subject-free pictures, the contexts in turn")
    p.add_argument("--inputs", action="store_true",
                   help="also stage 2's pairs made with the true masks (inputs/, subject.jsonl), as examples/toy-data has")
    p.add_argument("--shards", action="store_true",
                   help="also as tar shards for train.py: shards/ (stages 0, 1) and with --inputs subject-shards/")
    p.add_argument("--shard-size", type=whole(1), default=10000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="fixes every picture")
    p = sub.add_parser("examples", help="write the README's held-out subject pictures")
    p.add_argument("--out", default="examples", help="folder to write them in")
    p = sub.add_parser("train-oracle", help="train the attribute oracle on fresh train-split pictures",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="weights/toy/oracle.safetensors", help="safetensors file to write")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps, each on a fresh batch; the shipped weights")
    p.add_argument("--batch-size", type=int, default=64, help="pictures per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak of a one-cycle schedule")
    p.add_argument("--eval-n", type=int, default=2000, help="fresh pictures per split for the final accuracy")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="fixes the initial weights and every training picture")
    p = sub.add_parser("eval-oracle", help="per-attribute accuracy of a trained oracle on fresh pictures",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default="weights/toy/oracle.safetensors", help="an oracle saved by train-oracle")
    p.add_argument("--n", type=int, default=2000, help="fresh pictures per split")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=1234, help="fixes the pictures; not the training seed, so they are fresh")
    p = sub.add_parser("evaluate", help="the toy Table 1: held-out subjects by text only, zero-shot and fine-tuned",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default="weights/toy", help="a BLIP-Diffusion folder in the published layout")
    p.add_argument("--oracle", default="weights/toy/oracle.safetensors", help="the attribute oracle (train-oracle's)")
    p.add_argument("--subjects", type=int, default=30,
                   help="held-out identities (the first of a seeded permutation); 30, as DreamBench has")
    p.add_argument("--contexts", type=int, default=len(CONTEXTS), help="prompts: the first K contexts")
    p.add_argument("--refs", type=int, default=3, help="reference pictures per subject, each in another context")
    # Sampling as sample.py's defaults, so the table describes what a user gets.
    p.add_argument("--steps", type=int, default=50, help="denoising steps (PNDM: steps + 1 UNet calls)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale; <= 1 turns it off (None: the model's own, as sample.py)")
    p.add_argument("--scheduler", choices=("pndm", "ddim", "dpm"), default="pndm",
                   help="pndm: the published scheduler; dpm: DPM-Solver++(2M), as sample.py")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="precision of generation, as sample.py --dtype (fine-tuning trains in fp32 as train.py does)")
    p.add_argument("--finetune-steps", type=int, default=40, help="train.py --stage finetune steps (LAVIS' 40)")
    p.add_argument("--finetune-lr", type=float, default=2e-4,
                   help="fine-tuning lr; the toy model is small (LAVIS' 5e-6 is for the published model)")
    p.add_argument("--finetune-min-snr", type=float, default=5.0,
                   help="fine-tuning's min-SNR-γ loss weights (train.py --min-snr), as stage 2 trained; 0: off, as LAVIS")
    p.add_argument("--seed", type=int, default=0, help="fixes the subjects, their references and every generation")
    p.add_argument("--sheet", default="toy_eval.png", help="PNG: per subject a row per method, reference then contexts")
    p.add_argument("--zoom", type=int, default=2, help="nearest-neighbour enlargement of the sheet, for viewing")
    p.add_argument("--sheet-subjects", type=int, default=0, help="subjects drawn on the sheet, the first K (0: all)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's default)")
    p = sub.add_parser("probe", help="linear probes: category, colour, pattern read off the image tower and subject embeddings",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default="weights/toy", help="a BLIP-Diffusion folder in the published layout")
    p.add_argument("--n", type=int, default=2000, help="training-identity pictures to fit on (a quarter as many held-out ones to test)")
    p.add_argument("--seed", type=int, default=0, help="fixes the pictures and the probes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's default)")
    args = parser.parse_args()
    keep_freed_memory()
    commands = {"show": show, "data": write_data, "examples": write_examples, "train-oracle": train_oracle,
                "eval-oracle": eval_oracle, "evaluate": evaluate, "probe": probe}
    try:
        commands[args.command](args)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
