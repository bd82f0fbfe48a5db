"""Benchmark: matting.py's closed-form matting against pymatting's `estimate_alpha_cf`.

Both solve the same hard-constrained system (L_uu a_u = -L_uk a_k, eps = 1e-7): we build the
Laplacian with numpy and factorise with SuperLU; pymatting builds it with numba and runs CG with
its incomplete-Cholesky preconditioner. The inputs are synthetic composites made here, so the true
alpha is known and nothing is downloaded: a smooth random alpha (soft edges a few pixels wide),
textured foreground and background colours, and a trimap that is unknown on the soft edges
dilated by a few pixels and equals the true alpha (0 or 1) elsewhere.

Method, so the comparison is fair:
- every (method, size) runs in a fresh subprocess with one thread (OMP / OpenBLAS / MKL / numba),
  as pymatting's own published benchmarks; the machine is shared, so take times as relative;
- each worker first solves a tiny case, so numba's compilation (cached on disk after the first
  run) and first-call imports are excluded; then it reports the best of --repeats runs;
- memory is the process's peak resident set (ru_maxrss) minus its resident set just before the
  first timed call: all allocations, numpy, numba and SuperLU's C heap alike (tracemalloc sees
  only Python-side allocations);
- SAD = sum |alpha - alpha_true| over the image / 1000 (the alphamatting.com convention; known
  pixels are exact for both, so it is the unknown region's error); MSE = mean (alpha -
  alpha_true)^2 over the unknown pixels.

    python bench_matting.py                       # 0.26, 0.52 and 1.05 megapixel, ~3 minutes
    python bench_matting.py --sides 512 --repeats 1
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import scipy.ndimage as ndi

ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}


def make_case(side, seed=0, band=4):
    """(image, trimap uint8, true alpha) of a side x side synthetic composite."""
    rng = np.random.default_rng(seed)
    # Alpha: a smooth random field (blobs ~10% of the side) through a steep ramp, so edges are soft
    # over a few pixels; a little finer noise makes them ragged.
    field = ndi.gaussian_filter(rng.standard_normal((side, side)), 0.05 * side)
    ragged = ndi.gaussian_filter(rng.standard_normal((side, side)), 2.0)
    alpha = np.clip(0.5 + (field / field.std() + 0.15 * ragged / ragged.std()) / 0.25, 0, 1)

    def texture(base):  # slowly varying colour plus 5% per-pixel noise
        low = ndi.gaussian_filter(rng.random((side, side, 3)), (20, 20, 0))
        low = (low - low.min()) / (low.max() - low.min())
        return np.clip(0.5 * base + 0.4 * low + 0.05 * rng.random((side, side, 3)), 0, 1)

    F, B = texture(np.array([0.9, 0.5, 0.2])), texture(np.array([0.1, 0.3, 0.7]))
    image = alpha[..., None] * F + (1 - alpha[..., None]) * B
    unknown = ndi.binary_dilation((alpha > 0) & (alpha < 1), iterations=band)
    trimap = np.where(unknown, 128, np.round(alpha) * 255).astype(np.uint8)
    return image, trimap, alpha


def solver(method):
    """A function (image, trimap uint8) -> alpha for the given method."""
    if method == "matting.py":
        from matting import estimate_alpha
        return estimate_alpha
    from pymatting import estimate_alpha_cf
    return lambda image, trimap: estimate_alpha_cf(image, trimap / 255.0)  # pymatting: {0, 0.5, 1}


def worker(method, case, repeats):
    """Runs in its own process: time and measure one method on one case, print a JSON line."""
    data = np.load(case)
    image, trimap, alpha_true = data["image"], data["trimap"], data["alpha"]
    estimate = solver(method)
    estimate(*make_case(64, seed=1)[:2])  # warm-up: numba compilation / loading, first-call costs
    with open("/proc/self/statm") as f:
        baseline_kb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        alpha = estimate(image, trimap)
        times.append(time.perf_counter() - start)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    unknown = trimap == 128
    np.save(case.replace(".npz", f".{method}.npy"), alpha)
    print(json.dumps(dict(seconds=min(times), peak_mb=(peak_kb - baseline_kb) / 1024,
                          sad=float(np.abs(alpha - alpha_true).sum() / 1000),
                          mse=float(((alpha - alpha_true)[unknown] ** 2).mean()))))


def main():
    parser = argparse.ArgumentParser(description="Time, memory and error of matting.py vs pymatting.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 724, 1024],
                        help="square image sides: 0.26, 0.52 and 1.05 megapixel")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method and size; best is kept")
    parser.add_argument("--band", type=int, default=4, help="unknown pixels added each side of the soft edges")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker, args.repeats)

    methods = ["matting.py", "pymatting"]
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sides:
            image, trimap, alpha = make_case(side, band=args.band)
            case = os.path.join(tmp, f"case{side}.npz")
            np.savez(case, image=image, trimap=trimap, alpha=alpha)
            results = {}
            for method in methods:
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", method, case,
                                      "--repeats", str(args.repeats)], env={**os.environ, **ONE_THREAD},
                                     capture_output=True, text=True, check=True)
                results[method] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{side}x{side} {method}: {results[method]}", file=sys.stderr)
            ours, ref = (np.load(case.replace(".npz", f".{m}.npy")) for m in methods)
            rows.append((side, int((trimap == 128).sum()), results, float(np.abs(ours - ref).max())))

    print("| image | unknown px | method | seconds | peak RSS (MB) | SAD (/1000) | MSE (unknown) |")
    print("|---|---|---|---|---|---|---|")
    for side, n_unknown, results, _ in rows:
        for method in methods:
            r = results[method]
            print(f"| {side}x{side} ({side * side / 1e6:.2f} MP) | {n_unknown:,} | {method} | {r['seconds']:.2f} "
                  f"| {r['peak_mb']:.0f} | {r['sad']:.4f} | {r['mse']:.6f} |")
    print()
    for side, _, results, diff in rows:
        t = results["matting.py"]["seconds"] / results["pymatting"]["seconds"]
        m = results["matting.py"]["peak_mb"] / max(results["pymatting"]["peak_mb"], 1)
        print(f"{side}x{side}: time ratio matting.py / pymatting {t:.2f}x, memory ratio {m:.2f}x, "
              f"max |alpha difference| {diff:.1e}")
    print(f"\nreproduce: python bench_matting.py --sides {' '.join(map(str, args.sides))} "
          f"--repeats {args.repeats} --band {args.band}")
    print(f"benchmarked {len(args.sides)} sizes x {len(methods)} methods in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
