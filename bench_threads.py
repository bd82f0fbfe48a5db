"""How --threads matters on an idle machine and on one where another job keeps the cores busy.

Runs the README's quick start (sample.py on the shipped toy model) and a tiny training run, each as
a fresh process timed from start to exit, with torch's default threads and with --threads N, while
--load other processes spin on the CPU (each a busy loop, as a job beside ours would be). The
settings take turns within a round, so a slow moment of the machine does not favour one of them.

    python bench_threads.py --load 0 2 --threads 1 --repeats 3
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
COMMANDS = {
    "quick start": ["sample.py", "--subject", "examples/red-dotted-ball.png", "--subject-text", "ball",
                    "--prompt", "in the snow", "--out", "{tmp}/out.png"],
    "tiny training": ["train.py", "--stage", "subject", "--model", "tiny", "--data", "toy", "--steps", "{steps}",
                      "--batch-size", "4", "--out", "{tmp}/run"],
}


def timed(command, threads, tmp, steps):
    argv = [a.format(tmp=tmp, steps=steps) for a in command] + (["--threads", str(threads)] if threads else [])
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=HERE, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", type=int, nargs="+", default=[0, os.cpu_count() or 1],
                   help="busy processes beside the measured one (default: 0, then one per core)")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="--threads values to compare with the default")
    p.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported")
    p.add_argument("--steps", type=int, default=200, help="steps of the tiny training (the README's 200)")
    args = p.parse_args()
    settings = [None] + args.threads
    print(f"{os.cpu_count()} cores; default threads = torch's (one per core); medians of {args.repeats}", flush=True)
    print("| command | busy processes beside | " + " | ".join(f"--threads {t or 'default'}" for t in settings) + " |")
    print("|---|---|" + "---|" * len(settings))
    for load in args.load:
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
        try:
            for name, command in COMMANDS.items():
                times = {t: [] for t in settings}
                for _ in range(args.repeats):
                    for t in settings:
                        with tempfile.TemporaryDirectory() as tmp:
                            times[t].append(timed(command, t, tmp, args.steps))
                print(f"| {name} | {load} | " + " | ".join(f"{statistics.median(times[t]):.1f} s" for t in settings)
                      + " |", flush=True)
        finally:
            for b in burners:
                b.kill()


if __name__ == "__main__":
    main()
