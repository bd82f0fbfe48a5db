"""The toy world's attribute oracle: a small CNN trained on the world's own pictures (toyworld.py) to
read category, body colour, pattern and context back from any picture. It scores generations in the
toy Table 1 (toyeval.py), and its penultimate features stand in for DINO's in cosine similarities.
Half its training pictures are softened first (`degrade`), as soft as a generation is, so a faithful
but blurred picture is not scored as a miss.

    python toyworld.py train-oracle --out weights/toy/oracle.safetensors   # time: docs/benchmarks.md
    python toyworld.py eval-oracle --weights weights/toy/oracle.safetensors
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from checkpoint import CheckpointError, load_strict, read_tensors, write_atomically
from toyworld import WorldConfig, batch, default_heads


@dataclass
class OracleConfig:
    image_size: int = 64  # the world's size; other sizes are resized to it
    widths: tuple = (32, 64, 96, 128)  # one stride-2 stage per width: 64 -> 4 px before pooling
    feature_dim: int = 128  # the penultimate features (the DINO stand-in)
    heads: dict = field(default_factory=default_heads)  # attribute -> its class names, in label order


class ConvBlock(nn.Module):
    """conv 3x3 stride 2 -> BN -> ReLU -> conv 3x3 -> BN -> ReLU: halves the resolution."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 2, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(x)))


class AttributeOracle(nn.Module):
    """A small CNN with one linear head per attribute, trained on the world's pictures."""

    def __init__(self, cfg=None):
        super().__init__()
        self.config = cfg = cfg or OracleConfig()
        widths = (3,) + tuple(cfg.widths)
        self.blocks = nn.ModuleList(ConvBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.proj = nn.Linear(widths[-1], cfg.feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(cfg.feature_dim, len(classes)) for name, classes in cfg.heads.items()})

    def pixels(self, images):
        """PIL images, or a (B, 3, H, W) float tensor in [0, 1] -> (B, 3, S, S) in [-1, 1]."""
        if not isinstance(images, torch.Tensor):
            images = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), np.float32) / 255 for im in images]))
            images = images.permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
        images = images.float().to(self.proj.weight.device)
        s = self.config.image_size
        if images.shape[-2:] != (s, s):
            images = F.interpolate(images, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return images * 2 - 1

    def forward(self, x):
        """(B, 3, S, S) in [-1, 1] -> ((B, feature_dim) features, {attribute: (B, classes) logits})."""
        for block in self.blocks:
            x = block(x)
        features = F.relu(self.proj(x.mean(dim=(2, 3))))  # global average pool: (B, C, h, w) -> (B, C)
        return features, {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images):
        """-> {attribute: (B,) class indices into config.heads[attribute]}."""
        _, logits = self(self.pixels(images))
        return {name: v.argmax(-1).cpu() for name, v in logits.items()}

    @torch.no_grad()
    def features(self, images):
        """Penultimate features (B, feature_dim), for cosine similarities (the DINO stand-in)."""
        return self(self.pixels(images))[0].cpu()


def save_oracle(oracle, path):
    meta = {"config": json.dumps(asdict(oracle.config))}
    tensors = {k: v.detach().contiguous().cpu() for k, v in oracle.state_dict().items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_oracle(path, device="cpu"):
    """The oracle saved by `train-oracle`, in eval mode. Its class names must be this world's."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found; train one with: python toyworld.py train-oracle --out {path}")
    tensors = read_tensors(path)  # refuses anything but a readable safetensors (or weights-only) file
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise CheckpointError(f"{path}: no 'config' in the safetensors metadata; not an oracle file")
    cfg = OracleConfig(**json.loads(meta["config"]))
    cfg.widths = tuple(cfg.widths)
    if cfg.heads != default_heads():
        raise CheckpointError(f"{path}: trained for another world vocabulary ({cfg.heads}); retrain it")
    oracle = load_strict(AttributeOracle(cfg), tensors, path)
    return oracle.to(device).eval()


def accuracy(oracle, rng, n, split, cfg=WorldConfig(), chunk=100, soften=False):
    """Per-attribute accuracy of the oracle on n fresh pictures of `split` identities; with `soften`
    each picture degraded first (`degrade`, its draws from `rng`)."""
    correct = {name: 0 for name in oracle.config.heads}
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    for start in range(0, n, chunk):
        x, y, _ = batch(rng, min(chunk, n - start), split, cfg)
        x = degrade(x, gen) if soften else x
        pred = oracle.predict(x)
        for name in correct:
            correct[name] += int((pred[name] == y[name]).sum())
    return {name: c / n for name, c in correct.items()}


def gaussian_blur(x, sigma):
    """(B, 3, H, W) blurred by a separable Gaussian of `sigma` pixels (edges replicated)."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma * sigma))
    k = (k / k.sum()).repeat(3, 1, 1, 1)  # (3, 1, 1, 2r + 1): one kernel per channel
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k, groups=3)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.transpose(2, 3), groups=3)


def degrade(x, gen):
    """(B, 3, H, W) pictures in [0, 1], each made softer as a generated one is: a Gaussian blur of
    up to 1.2 px, resampled through up to half the side and back, pixel noise of up to 0.04. A
    person reads every attribute of the result as before (a subject's colour fills ten pixels or
    more); an oracle trained on clean pictures alone did not (a down-and-up resample turned white
    subjects green and yellow ones orange), so it would have scored a faithful but soft generation
    as a miss."""
    out = []
    for image in x:
        u = torch.rand(3, generator=gen).tolist()
        image = image[None]
        if u[0] > 0.3:
            image = gaussian_blur(image, 0.3 + 0.9 * u[0])
        if u[1] > 0.3:
            side = round(x.shape[-1] * (1 - 0.5 * u[1]))
            image = F.interpolate(F.interpolate(image, size=side, mode="bilinear", antialias=True),
                                  size=x.shape[-2:], mode="bilinear", align_corners=False)
        image = image + 0.04 * u[2] * torch.randn(image.shape, generator=gen)
        out.append(image.clamp(0, 1))
    return torch.cat(out)


def train_oracle(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    oracle = AttributeOracle(OracleConfig())
    params = sum(p.numel() for p in oracle.parameters())
    print(f"oracle: {params:,} parameters; {args.steps} steps of {args.batch_size} fresh train-split pictures")
    opt = torch.optim.AdamW(oracle.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.15)
    start = time.time()
    oracle.train()
    bar = tqdm(range(args.steps), desc="train-oracle")
    gen = torch.Generator().manual_seed(args.seed)
    for step in bar:
        x, y, _ = batch(rng, args.batch_size)
        half = args.batch_size // 2  # half the batch as drawn, half degraded
        x = torch.cat([x[:half], degrade(x[half:], gen)])
        _, logits = oracle(x * 2 - 1)
        losses = {name: F.cross_entropy(logits[name], y[name]) for name in logits}
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_s = time.time() - start
    oracle.eval()
    eval_rng = np.random.default_rng(args.seed + 1)
    for split, soften in (("train", False), ("heldout", False), ("heldout", True)):
        acc = accuracy(oracle, eval_rng, args.eval_n, split, soften=soften)
        print(f"accuracy on {args.eval_n} fresh {split} pictures{', softened' if soften else ''}: "
              + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_oracle(oracle, args.out)
    print(f"trained the oracle ({params:,} parameters) in {train_s / 60:.1f} min: {args.out}")


def eval_oracle(args):
    torch.set_num_threads(args.threads)
    oracle = load_oracle(args.weights)
    rng = np.random.default_rng(args.seed)
    for split, soften in (("train", False), ("heldout", False), ("heldout", True)):
        acc = accuracy(oracle, rng, args.n, split, soften=soften)
        print(f"{args.weights} on {args.n} fresh {split} pictures{', softened' if soften else ''}: "
              + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
