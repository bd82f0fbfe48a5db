"""The toy BLIP-Diffusion: the published architecture at sizes a laptop CPU trains, and the
curriculum that trains the shipped weights/toy/ from nothing.

Every module is the project's own (clip.py, qformer.py, unet.py, vae.py) with small widths; only the
sizes differ from the published model, so every command of the project runs on the toy model as it
is. The sizes are defined here (`sizes`); the curriculum writes them to OUT/sizes/<part>/config.json
and gives that folder to train.py as --model (train.py --model toy reads the same sizes from
weights/toy). The curriculum is the paper's, with the part the paper takes from Stable Diffusion
trained here too (stage 0; its objectives are train.py's --stage vae, clip and t2i):

  0. data       toyworld.py data: pictures of training identities, their true masks, backgrounds
     vae        the autoencoder (reconstruction + a small KL, as LDM without its GAN)
     clip       tokenizers learnt from the captions; a CLIP image/text pair, contrastive
     t2i        the text-to-image UNet under the frozen CLIP text encoder, as SD
  1. multimodal BLIP-2 stage 1 on the frozen image tower (ITC, ITG, ITM)
  2. pairs      pairs.py --from-masks: degraded true masks, trimap, closed-form matting, new context
     subject    stage 2, subject representation learning on those pairs
  (fine-tuning on a held-out subject is measured by `python toyworld.py evaluate`)

    python toymodel.py            # every stage into runs/toy (rerun to resume), then weights/toy-retrained

Each stage prints the exact command it runs, so any one can be rerun or changed by hand.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from checkpoint import latest_training, write_folder_atomically, write_json
from cli import Parser, whole
from clip import CLIPTextConfig, VisionConfig
from qformer import Blip2Config, QFormerConfig
from train import sigusr1
from unet import UNetConfig
from vae import AutoencoderKLConfig

IMAGE_SIZE = 64  # the toy world's pictures (toyworld.WorldConfig.size)
LATENT_CHANNELS = 8
WIDTH = 128  # text encoder, image tower and Q-Former width; the subject embeddings are (1, 16, WIDTH)
# The guidance scale the installed model samples at by default (model_index.json's "guidance", read by
# blipdiff.BlipDiffusion). Chosen on 32 held-out subjects the evaluation does not use
# (toyeval.eval_subjects(16, seed) for seeds 1 and 2): at the published 7.5 the toy model's colours
# drift to a neighbouring hue (orange to red or yellow, pink to white); see docs/toy-world.md.
GUIDANCE = 5.0


def vae_config():
    # Three levels: 64 px pictures -> 16 x 16 x 8 latents (SD-1.5: 512 -> 64 x 64 x 4, four levels).
    # Eight channels, not SD's four: with four, a 16 x 16 grid loses the dots and checks of the
    # patterns, and the patterns are what a subject is.
    # The scaling factor is measured on the trained encoder (LDM's 1 / std of the latents) and stored.
    return AutoencoderKLConfig(block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                               up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8,
                               latent_channels=LATENT_CHANNELS, sample_size=IMAGE_SIZE, scaling_factor=1.0)


def text_config(vocab_size=None):
    # vocab_size: the tokenizer's, learnt from the captions by train.py --stage clip.
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                          num_hidden_layers=4, num_attention_heads=4)


def vision_config():
    # 8 px patches: an 8 x 8 grid plus the class token. CLIP's LayerNorm eps.
    return VisionConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=4, num_attention_heads=4,
                        image_size=IMAGE_SIZE, patch_size=8, layer_norm_eps=1e-5)


def blip2_config(vocab_size=None, vision=None):
    # No dropout: the toy runs are short and must be bit-for-bit reproducible across process counts.
    # vocab_size: the WordPiece vocabulary's + [DEC], learnt from the captions by train.py --stage clip.
    return Blip2Config(qformer_config=QFormerConfig(
        vocab_size=vocab_size, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=4 * WIDTH, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=64), vision_config=vision or vision_config())


def unet_config():
    # Attention (self and cross, where the text and the subject come in) at 8 x 8 and 4 x 4 only:
    # at 16 x 16 it costs more than half of a training step on a CPU, and the ResBlocks there render
    # what the coarser levels decided. Those ResBlocks are 64 channels wide, as the levels below: at
    # 32, even 300 steps of fine-tuning on one subject's own pictures do not draw its checks (they
    # come out as stripes) or keep a striped body's colour, though a step takes less time.
    return UNetConfig(sample_size=IMAGE_SIZE // 4, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                      block_out_channels=(64, 64, 64), layers_per_block=1,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      attention_head_dim=4, cross_attention_dim=WIDTH, norm_num_groups=8)


def sizes():
    """The toy model's sizes, part by part, as the config.json of each part of the published layout.
    What training learns or measures is left open: the vocabularies (None; train.py takes the learnt
    tokenizers') and the VAE's scaling factor (1.0; measured when --stage vae exports)."""
    return {"vae": vae_config(), "text_encoder": text_config(), "unet": unet_config(), "qformer": blip2_config()}


def write_sizes(folder):
    """sizes() into folder/<part>/config.json: the --model of every stage-0 and stage-1 command.
    Written once; a rerun keeps the folder its stages were started with."""
    if os.path.isdir(folder):
        return

    def write(tmp):
        for part, config in sizes().items():
            os.makedirs(os.path.join(tmp, part))
            write_json(os.path.join(tmp, part, "config.json"), dataclasses.asdict(config))

    write_folder_atomically(folder, write)


# ---------------------------------------------------------------------------------------------
# The curriculum: every stage, in order, by the project's own commands
# ---------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))


def curriculum(out, data_size, override=()):
    """The commands that train the toy model from nothing -> phases, run in order; a phase is lanes
    that run side by side (independent stages, one process per core: small models use one core
    better than two), a lane is steps run in turn, a step (name, its output that marks it done,
    argv; None = gather the base folder). Stage 0 and stage 1 are built at the sizes of OUT/sizes
    (`write_sizes`). Hyper-parameters are the toy's (stage 0 as train.py's defaults); each stage has
    its own --out, so its log and checkpoints are its own and an interrupted stage resumes.
    `override`: train.py flags for every stage (a smoke test's --steps 2)."""
    d = lambda *p: os.path.join(out, *p)
    stage = lambda name, *rest, to=None: ["train.py", "--stage", name, "--out", to or d(name), "--log-every", "50",
                                          *rest, *override]
    records, toy = d("data", "records.jsonl"), d("sizes")
    return [
        [[("data", records, ["toyworld.py", "data", "--n", str(data_size), "--out", d("data")])]],
        [[("vae", d("vae", "vae"), stage("vae", "--model", toy, "--data", records))],
         [("clip", d("clip", "text_encoder"), stage("clip", "--model", toy, "--data", records, "--schedule", "cosine"))]],
        # The base folder is the toy's Stable Diffusion: stage 0's VAE, text encoder and tokenizer,
        # joined by the UNet that --stage t2i trains into it.
        [[("base", d("base", "tokenizer"), None),
          ("t2i", d("base", "unet"), stage("t2i", "--model", toy, "--data", records, "--sd", d("base"), "--ema", "0.995",
                                             "--cache", to=d("base")))],
         [("multimodal", d("multimodal", "qformer"),
           stage("multimodal", "--model", toy, "--data", records, "--clip-vision", d("clip", "vision_model"),
                 "--bert", d("clip", "bert_tokenizer"), "--steps", "600", "--batch-size", "64", "--lr", "1e-3",
                 "--warmup", "50", "--weight-decay", "0.05")),
          # The pairs need only the data; after stage 1 the lane takes about as long as the UNet's, and
          # the CLIP pair gets both cores once the VAE is done.
          ("pairs", None,  # pairs.py resumes by itself: items already written are not redone
           ["pairs.py", "--data", d("data", "pairs.jsonl"), "--from-masks", "--backgrounds", d("data", "backgrounds"),
            "--out", d("pairs"), "--size", str(IMAGE_SIZE), "--band", "2"])]],
        [[("subject", d("subject", "model_index.json"),
           stage("subject", "--data", d("pairs", "records.jsonl"), "--sd", d("base"), "--qformer", d("multimodal"),
                 "--steps", "3000", "--batch-size", "32", "--lr", "5e-4", "--warmup", "50", "--caption-drop", "0.05",
                 "--ema", "0.995", "--cache", "--min-snr", "5", "--schedule", "cosine"))]],
    ]


def gather_base(out):
    def write(tmp):
        shutil.copytree(os.path.join(out, "vae", "vae"), os.path.join(tmp, "vae"))
        for part in ("text_encoder", "tokenizer"):
            shutil.copytree(os.path.join(out, "clip", part), os.path.join(tmp, part))

    write_folder_atomically(os.path.join(out, "base"), write, merge=True)


class Phase:
    """The lanes of one phase side by side, each its own processes, the cores shared among the lanes
    still running. A lane that ends leaves its cores idle, as two lanes seldom take equally long, so
    when one lane is left, its running stage is told with SIGUSR1 to take every core (train.py
    listens, train.every_core_on_sigusr1), and its next stages start on all."""

    def __init__(self, lanes, out, cores, times):
        self.lanes, self.out, self.cores, self.times = lanes, out, cores, times
        self.lock, self.left, self.running = threading.Lock(), len(lanes), {}

    def run(self):
        """-> the names of the stages that failed (one at most per lane)."""
        with sigusr1(signal.SIG_IGN), ThreadPoolExecutor(len(self.lanes)) as pool:  # stages inherit it
            return [f for f in pool.map(self.run_lane, range(len(self.lanes))) if f]

    def run_lane(self, i):
        """The steps of lane i in turn; the first failure ends the lane and is returned."""
        try:
            for name, done, command in self.lanes[i]:
                if done and os.path.exists(done):
                    print(f"[{name}] done already ({done})", flush=True)
                    continue
                t0 = time.time()
                if command is None:
                    gather_base(self.out)
                else:
                    if command[0] == "train.py" and latest_training(command[command.index("--out") + 1]):
                        command = [*command, "--resume"]  # an interrupted stage goes on from its checkpoint
                    print(f"[{name}] python {' '.join(command)}", flush=True)
                    with self.lock:  # started and known together, so a lane ending now cannot miss it
                        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, self.cores // self.left)))
                        self.running[i] = subprocess.Popen([sys.executable, *command], cwd=HERE, env=env)
                    if self.running[i].wait():
                        return name
                self.times[name] = round(time.time() - t0, 1)
            return None
        finally:
            with self.lock:
                self.running.pop(i, None)
                self.left -= 1
                if self.left == 1 and hasattr(signal, "SIGUSR1"):
                    for process in self.running.values():
                        if process.poll() is None:
                            process.send_signal(signal.SIGUSR1)


def install(model, folder):
    """The trained model's published-layout parts (not its checkpoints, samples or log) into `folder`,
    its model_index.json naming the toy's guidance scale; other files there (the oracle) stay."""
    keep = [n for n in os.listdir(model) if n not in ("checkpoints", "samples", "log.jsonl") and not n.startswith(".")]

    def write(tmp):
        for n in keep:
            (shutil.copytree if os.path.isdir(os.path.join(model, n)) else shutil.copyfile)(
                os.path.join(model, n), os.path.join(tmp, n))
        with open(os.path.join(tmp, "model_index.json")) as f:
            index = json.load(f)
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            f.write(json.dumps({**index, "guidance": GUIDANCE}, indent=2) + "\n")

    write_folder_atomically(folder, write, merge=True)


def main(argv=None):
    p = Parser(prog="toymodel.py", description="Train the toy BLIP-Diffusion from nothing: the toy world's data, "
                                               "stage 0 (VAE, CLIP pair, text-to-image UNet), stage 1, pairs, stage 2.")
    p.add_argument("--out", default="runs/toy", help="working folder: one sub-folder per stage; rerun to resume")
    p.add_argument("--install", default="weights/toy-retrained",
                   help="where the trained model is copied at the end ('': not); a folder that holds a model "
                        "already (the shipped weights/toy) is replaced only with --force")
    p.add_argument("--force", action="store_true", help="let --install replace the model in its folder")
    p.add_argument("--data-size", type=whole(1), default=20000, help="pictures of training identities")
    p.add_argument("--steps", type=whole(1), default=None, help="every stage this many steps (a smoke test)")
    p.add_argument("--batch-size", type=whole(1), default=None, help="every stage this batch (a smoke test)")
    args = p.parse_args(argv)
    if args.install and os.path.isfile(os.path.join(args.install, "model_index.json")) and not args.force:
        p.error(f"--install {args.install} holds a model already; add --force to replace it, or choose another folder")
    override = (["--steps", str(args.steps)] if args.steps else []) + (
        ["--batch-size", str(args.batch_size)] if args.batch_size else [])
    cores = os.cpu_count() or 1
    times, start = {}, time.time()
    write_sizes(os.path.join(args.out, "sizes"))
    for phase in curriculum(args.out, args.data_size, override):
        failed = Phase(phase, args.out, cores, times).run()
        if failed:
            sys.exit(f"error: the {', '.join(failed)} stage failed (its message is above); "
                     f"fix it and rerun to resume")
    total = round(time.time() - start, 1)
    with open(os.path.join(args.out, "times.json"), "w") as f:
        json.dump({"stages_s": times, "total_s": total, "cores": cores}, f, indent=1)
    if args.install:
        install(os.path.join(args.out, "subject"), args.install)
    print(f"trained the toy model in {total / 60:.1f} min (per stage: {args.out}/times.json); "
          + (f"installed in {args.install} (python sample.py --weights {args.install})" if args.install
             else f"the model is in {args.out}/subject"))


if __name__ == "__main__":
    main()
