"""A training step of the toy UNet and VAE (forward, backward, AdamW), their weights in the default
layout against channels-last, which train.py uses for them, interleaved in one run so both see the
same machine. Prints the median step time of each round and the mean over the rounds.

    python bench_train.py --threads 1 --rounds 5
"""
import argparse
import statistics
import time

import torch

import toymodel
from diffusion import NUM_TRAIN_TIMESTEPS, epsilon_loss
from unet import UNet
from vae import AutoencoderKL, autoencoder_loss


def step_fn(name, batch):
    """-> (model, its training loss on fixed random inputs at the toy's sizes): the objectives of train.py's
    --stage t2i (SD's ε-loss) and --stage vae (LDM's autoencoder loss)."""
    g = torch.Generator().manual_seed(0)
    c = toymodel.LATENT_CHANNELS
    if name == "unet":
        side = toymodel.IMAGE_SIZE // 4
        context = toymodel.text_config().max_position_embeddings  # 77, CLIP's
        noisy, noise = torch.randn(2, batch, c, side, side, generator=g)
        text, t = torch.randn(batch, context, toymodel.WIDTH, generator=g), torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=g)
        return UNet(toymodel.unet_config()), lambda m: epsilon_loss(m(noisy, t, text), noise)
    vae = AutoencoderKL(toymodel.vae_config())
    crop = toymodel.IMAGE_SIZE // 2  # train.py's random crops of half the side
    images = torch.randn(batch, 3, crop, crop, generator=g)
    noise = torch.randn(batch, c, crop // vae.downsampling, crop // vae.downsampling, generator=g)
    return vae, lambda m: autoencoder_loss(m, images, noise)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=12, help="steps a round (the first 2 are not timed)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.steps < 3:
        raise SystemExit("error: --steps must be at least 3 (the first 2 warm up)")
    torch.set_num_threads(args.threads)
    for name in ("unet", "vae"):
        torch.manual_seed(0)
        model, loss_of = step_fn(name, args.batch_size)
        layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
        times = {layout: [] for layout in layouts}
        for _ in range(args.rounds):
            for layout, memory_format in layouts.items():
                model.to(memory_format=memory_format)
                opt = torch.optim.AdamW(model.parameters(), 1e-4)
                steps = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    loss = loss_of(model)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    steps.append(time.perf_counter() - t0)
                times[layout].append(statistics.median(steps[2:]))
        for layout, medians in times.items():
            print(f"{name} {layout:13s} {statistics.mean(medians):.3f} s a step of {args.batch_size} "
                  f"on {args.threads} thread(s) (round medians {', '.join(f'{m:.3f}' for m in medians)})")


if __name__ == "__main__":
    main()
