"""Benchmark: reading tar shards (shards.py) with 0, 1 and 2 data-loader workers.

Writes synthetic shards in img2dataset's layout (JPEG pictures of --side pixels and their captions),
then, for each worker count: the samples per second one process reads and decodes alone, and the
share of a training step spent waiting for data in a real run of train.py (tiny stage 1, its log's
data_ms against step_ms, the first steps left out while the loader fills). Worker counts alternate
--rounds times; the figures are medians.

    python bench_data.py --workers 0 1 2 --rounds 3
"""

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from shards import ShardStream, shard_paths


def write_shards(folder, shards, per_shard, side):
    rng = np.random.RandomState(0)
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for k in range(per_shard):
                buf = io.BytesIO()
                # smooth noise compresses and decodes like a photograph, not like white noise
                small = rng.rand(side // 16, side // 16, 3) * 255
                Image.fromarray(small.astype(np.uint8)).resize((side, side), Image.BICUBIC).save(buf, "JPEG", quality=90)
                for suffix, data in (("jpg", buf.getvalue()), ("txt", f"a picture number {k}".encode())):
                    info = tarfile.TarInfo(f"{s * per_shard + k:09d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, "{00000..%05d}.tar" % (shards - 1))


def read_rate(pattern, batch, steps, workers):
    stream = ShardStream(shard_paths(pattern), batch, range(batch), 0, 0, workers)
    stream.step(0)  # the loader's start
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        stream.step(s)
    return batch * steps / (time.perf_counter() - t0)


def waiting_share(pattern, batch, steps, workers, out):
    cmd = [sys.executable, "train.py", "--stage", "multimodal", "--model", "tiny", "--data", pattern,
           "--batch-size", str(batch), "--steps", str(steps), "--workers", str(workers), "--out", out,
           "--save-every", str(steps)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(out, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f][3:]
    return sum(r["data_ms"] for r in rows) / sum(r["step_ms"] for r in rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--side", type=int, default=256, help="picture side in pixels (img2dataset's --image_size)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_shards(tmp, shards=8, per_shard=64, side=args.side)
        rates, shares = {w: [] for w in args.workers}, {w: [] for w in args.workers}
        for r in range(args.rounds):
            for w in args.workers:
                rates[w].append(read_rate(pattern, args.batch_size, args.steps, w))
                shares[w].append(waiting_share(pattern, args.batch_size, args.steps, w, os.path.join(tmp, f"run-{r}-{w}")))
                print(f"round {r + 1}/{args.rounds}: {w} workers: {rates[w][-1]:.0f} samples/s read, "
                      f"{100 * shares[w][-1]:.0f}% of a step waiting", file=sys.stderr)
    print(f"{args.side}x{args.side} JPEGs in 8 shards of 64, batch {args.batch_size}, medians of {args.rounds} rounds\n")
    print("| workers | samples/s read and decoded | share of a tiny stage-1 step waiting for data |\n|---|---|---|")
    for w in args.workers:
        print(f"| {w} | {statistics.median(rates[w]):.0f} | {100 * statistics.median(shares[w]):.0f}% |")
    print(f"\nreproduce: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
