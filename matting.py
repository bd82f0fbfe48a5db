"""Closed-form alpha matting, foreground estimation and compositing for prompted context generation.

BLIP-Diffusion's stage-2 data (Li et al. 2023, sec. 3.2, "prompted context generation") cuts the
subject out of an image with CLIPSeg, turns the confidence map into a trimap, refines it with
closed-form matting and pastes the subject onto a random background. This file is the last three
steps: the trimap rule, the matte and the composite.

Closed-form matting (Levin, Lischinski, Weiss, "A Closed-Form Solution to Natural Image Matting",
TPAMI 30(2), 2008): inside every 3 x 3 window alpha is assumed to be an affine function of colour,
alpha_i ~ a^T I_i + b. Eliminating a and b leaves the quadratic cost alpha^T L alpha with the
"matting Laplacian" L (eq. 12). The trimap's known pixels are held fixed (hard constraints, as in
Grady et al.'s random-walk matting), so only the unknown pixels are solved for: L_uu a_u = -L_uk a_k.

Must equal pymatting 1.1.16: `matting_laplacian` equals `cf_laplacian` (same windows, eps = 1e-7)
and `estimate_alpha` solves the same hard-constrained system as `estimate_alpha_cf`, with scipy
instead of numba. `estimate_foreground` is the multi-level method of Germer et al. (ICPR 2020),
pymatting's `estimate_foreground_ml`, written as vectorised Jacobi sweeps instead of a pixel loop.

Conventions: images are float (H, W, 3) in [0, 1]. Trimaps are (H, W): uint8 with 0 = background,
255 = foreground, or float with 0.0 = background, 1.0 = foreground; every other value is unknown.
"""

import os
import sys
import time

import numpy as np
import scipy.ndimage as ndi
import scipy.sparse as sp
import scipy.sparse.linalg as sla
from PIL import Image

from checkpoint import write_atomically
from cli import Parser, check_writable, real
from data import read_image

EPS = 1e-7  # colour-line regulariser of every reference (MATLAB getLaplacian1.m, pymatting cf_laplacian)

# A 3 x 3 window (radius 1, |w| = 9, as the paper) couples pixels up to 2 apart: each row of L has
# its non-zeros in the 5 x 5 neighbourhood. OFFSETS3 are (dy, dx) of the 9 window pixels.
OFFSETS3 = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])


def split_trimap(trimap):
    """(is_foreground, is_background) boolean masks of a uint8 {0, 255} or float {0.0, 1.0} trimap."""
    trimap = np.asarray(trimap)
    if trimap.ndim != 2:
        raise ValueError(f"a trimap is (H, W), got shape {trimap.shape}")
    if np.issubdtype(trimap.dtype, np.integer):
        return trimap == 255, trimap == 0
    if trimap.max(initial=0) > 1:
        raise ValueError("a float trimap is in [0, 1] (1.0 = foreground); pass uint8 for 0..255 values")
    return trimap == 1.0, trimap == 0.0


def matting_laplacian(image, known_mask=None, eps=EPS):
    """The matting Laplacian L (n x n sparse CSR, n = H*W, row-major pixels) of eq. 12.

    For every 3 x 3 window w_k with colour mean mu_k and covariance S_k, each pixel pair (i, j) in it
    adds  delta_ij - (1 + (I_i - mu_k)^T (S_k + eps/9 I)^-1 (I_j - mu_k)) / 9.
    Windows are centred on interior pixels only (the border ring has no window of its own), as in
    all references. With `known_mask`, windows whose 9 pixels are all known are skipped: they only
    couple fixed pixels, so the solve never reads them (pymatting's `is_known` does the same).
    """
    h, w, _ = image.shape
    n = h * w
    if known_mask is None:
        known_mask = np.zeros((h, w), bool)
    # Window centres: interior pixels whose window touches an unknown pixel.
    touches_unknown = ndi.maximum_filter(~known_mask, size=3, mode="constant")
    interior = np.zeros((h, w), bool)
    interior[1:-1, 1:-1] = True
    centres = np.flatnonzero(touches_unknown & interior)

    # Rows of L that receive anything: the pixels covered by some window. `band` holds their 25
    # slots (the 5 x 5 neighbourhood), the layout pymatting uses, so no COO sort is needed.
    covered = np.zeros(n, bool)
    window = centres[:, None] + (OFFSETS3 @ (w, 1))[None, :]  # (K, 9) pixel ids of each window
    covered[window.ravel()] = True
    rows = np.flatnonzero(covered)
    row_of = np.full(n, -1)
    row_of[rows] = np.arange(len(rows))
    band = np.zeros((len(rows), 25))
    # slot[a, b]: where pixel b of a window sits in the 5 x 5 neighbourhood of pixel a.
    delta = OFFSETS3[None, :, :] - OFFSETS3[:, None, :] + 2  # (9, 9, 2)
    slot = delta[..., 0] * 5 + delta[..., 1]

    colours = image.reshape(n, 3).astype(np.float64)
    # Chunks of 16k windows keep each (K, 9, 9) block (10 MB) in cache: ~2x faster than one pass.
    for chunk in np.array_split(window, max(1, len(window) // 16384)):
        X = colours[chunk]  # (K, 9, 3)
        X -= X.mean(axis=1, keepdims=True)
        cov = X.transpose(0, 2, 1) @ X / 9 + (eps / 9) * np.eye(3)  # (K, 3, 3)
        values = (X @ _inv3(cov)) @ X.transpose(0, 2, 1)  # (K, 9, 9): (I_i - mu)^T S^-1 (I_j - mu)
        values += 1
        values /= -9
        values += np.eye(9)
        # For a fixed window position a, distinct windows give distinct pixels, so the fancy-index
        # update never writes one cell twice and plain += is correct.
        for a in range(9):
            band[row_of[chunk[:, a]][:, None], slot[a]] += values[:, a, :]

    # Band -> CSR. A slot is non-zero only if some window holds both pixels, so never outside the
    # image; slots are in raster order, so each row's column indices come out sorted.
    dy, dx = np.divmod(np.arange(25), 5)
    r, s = np.nonzero(band)
    indptr = np.zeros(n + 1, np.int64)
    indptr[rows + 1] = np.count_nonzero(band, axis=1)
    cols = rows[r] + (dy[s] - 2) * w + (dx[s] - 2)
    return sp.csr_matrix((band[r, s], cols, np.cumsum(indptr)), shape=(n, n))


def _inv3(m):
    """Inverses of a stack of symmetric 3 x 3 matrices by cofactors (faster than batched LAPACK)."""
    a, b, c, d, e, f = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2], m[:, 1, 1], m[:, 1, 2], m[:, 2, 2]
    cof = np.stack([d * f - e * e, c * e - b * f, b * e - c * d,
                    c * e - b * f, a * f - c * c, b * c - a * e,
                    b * e - c * d, b * c - a * e, a * d - b * b], axis=1).reshape(-1, 3, 3)
    det = a * cof[:, 0, 0] + b * cof[:, 0, 1] + c * cof[:, 0, 2]
    return cof / det[:, None, None]


def estimate_alpha(image, trimap, eps=EPS):
    """Closed-form alpha (H, W) in [0, 1] for an image (H, W, 3) in [0, 1] and a trimap (H, W).

    Solver: a sparse LDL^T-style direct factorisation with SuperLU (`splu`) of the unknown-only
    system, in symmetric mode (minimum degree on A^T + A, no pivoting: L_uu is symmetric positive
    definite, so pivoting buys nothing and only breaks the symmetric ordering). Not conjugate
    gradients, as pymatting: what makes its CG converge in a few iterations is an incomplete
    Cholesky preconditioner, which scipy lacks, and the preconditioners scipy has converge far
    slower than this factorisation (spilu is not even symmetric). The default `spsolve` (COLAMD
    ordering with partial pivoting) is a slower, memory-hungrier direct solve; symmetric mode is
    what makes the difference. Its cost grows like n^1.5 in the number of unknowns n, so keep the
    unknown band narrow (the trimap rule's job). Against pymatting: bench_matting.py, figures in
    docs/benchmarks.md.
    """
    image = np.asarray(image, dtype=np.float64)
    h, w = image.shape[:2]
    if image.shape != (h, w, 3):
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    is_fg, is_bg = split_trimap(trimap)
    if is_fg.shape != (h, w):
        raise ValueError(f"image is {w}x{h} but trimap is {is_fg.shape[1]}x{is_fg.shape[0]}")
    known = is_fg | is_bg
    alpha = is_fg.astype(np.float64)
    if known.all():
        return alpha
    if not known.any():
        raise ValueError("the trimap has no known pixels: mark some foreground (255) or background (0)")
    if h < 3 or w < 3:
        raise ValueError(f"closed-form matting needs at least a 3x3 image, got {w}x{h}")

    L = matting_laplacian(image, known, eps)
    u = np.flatnonzero(~known.ravel())
    L_u = L[u]  # the unknown rows; their known columns times alpha_k give the right-hand side
    rhs = -(L_u @ alpha.ravel())  # alpha is 0 on unknown pixels, so this is -L_uk alpha_k
    L_uu = L_u[:, u].tocsc()
    lu = sla.splu(L_uu, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                  options=dict(SymmetricMode=True))
    alpha.ravel()[u] = lu.solve(rhs)
    return np.clip(alpha, 0.0, 1.0)


def _resize_nearest(a, h, w):
    ys = np.arange(h) * a.shape[0] // h
    xs = np.arange(w) * a.shape[1] // w
    return a[ys[:, None], xs[None, :]]


def estimate_foreground(image, alpha, regularization=1e-5, n_small_iterations=10, n_big_iterations=2,
                        small_size=32, gradient_weight=1.0):
    """Foreground colours F (H, W, 3) such that image ~ alpha F + (1 - alpha) B (Germer et al. 2020).

    Coarse to fine over ceil(log2(max(H, W))) + 1 levels, each pixel solves the 2 x 2 least-squares
    system for (F_i, B_i): the compositing equation plus 4-neighbour smoothness weighted by
    regularization + gradient_weight * |alpha_i - alpha_j| (smooth where alpha is flat, free across
    edges). Defaults are pymatting's. We update all pixels at once (Jacobi) where pymatting sweeps
    in place (Gauss-Seidel); that is what lets numpy do it without a pixel loop.
    """
    image = np.asarray(image, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64)
    h0, w0 = alpha.shape
    F = image[alpha > 0.9].mean(axis=0) if (alpha > 0.9).any() else np.zeros(3)
    B = image[alpha < 0.1].mean(axis=0) if (alpha < 0.1).any() else np.zeros(3)
    F, B = F.reshape(1, 1, 3), B.reshape(1, 1, 3)
    n_levels = max(1, int(np.ceil(np.log2(max(h0, w0)))))
    for level in range(n_levels + 1):
        h, w = round(h0 ** (level / n_levels)), round(w0 ** (level / n_levels))
        I, a = _resize_nearest(image, h, w), _resize_nearest(alpha, h, w)[..., None]
        F, B = _resize_nearest(F, h, w), _resize_nearest(B, h, w)
        a_pad = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
        # Neighbour weights (left, right, up, down) are fixed per level; edge padding = clamped index.
        neighbours = [(slice(1, -1), slice(0, -2)), (slice(1, -1), slice(2, None)),
                      (slice(0, -2), slice(1, -1)), (slice(2, None), slice(1, -1))]
        weights = [regularization + gradient_weight * np.abs(a - a_pad[s]) for s in neighbours]
        w_sum = sum(weights)
        a00, a01, a11 = a * a + w_sum, a * (1 - a), (1 - a) * (1 - a) + w_sum
        det = a00 * a11 - a01 * a01
        for _ in range(n_small_iterations if max(h, w) <= small_size else n_big_iterations):
            F_pad = np.pad(F, ((1, 1), (1, 1), (0, 0)), mode="edge")
            B_pad = np.pad(B, ((1, 1), (1, 1), (0, 0)), mode="edge")
            b0 = a * I + sum(wt * F_pad[s] for wt, s in zip(weights, neighbours))
            b1 = (1 - a) * I + sum(wt * B_pad[s] for wt, s in zip(weights, neighbours))
            F = np.clip((a11 * b0 - a01 * b1) / det, 0.0, 1.0)
            B = np.clip((a00 * b1 - a01 * b0) / det, 0.0, 1.0)
    return F


def composite(fg, bg, alpha):
    """alpha * fg + (1 - alpha) * bg; fg and bg (H, W, 3), alpha (H, W), all in [0, 1]."""
    alpha = np.asarray(alpha, dtype=np.float64)[..., None]
    return alpha * fg + (1.0 - alpha) * bg


def _disk(radius):
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def trimap_from_confidence(p, high=0.6, low=0.1, band=0):
    """uint8 trimap (0 / 128 / 255) from a foreground confidence map p (H, W) in [0, 1].

    p >= high is foreground, low <= p < high unknown, p < low background. With band > 0, every
    pixel within `band` pixels (Euclidean) of the foreground's edge, on either side, is unknown too.
    BLIP-Diffusion publishes no thresholds; these defaults are the project's choice for CLIPSeg
    probabilities: 0.6 keeps only confident subject pixels fixed, 0.1 leaves CLIPSeg's soft halo to
    the matting, and a band of ~8 px at 512 px covers edges that CLIPSeg (a 22 x 22 token grid,
    upsampled 16x) places only roughly. band defaults to 0 so the thresholds alone are the rule.
    """
    p = np.asarray(p, dtype=np.float64)
    fg = p >= high
    trimap = np.where(fg, 255, np.where(p >= low, 128, 0)).astype(np.uint8)
    if band > 0:
        disk = _disk(band)
        # border_value=1: foreground reaching the image border is not an edge there.
        edge = ndi.binary_dilation(fg, disk) & ~ndi.binary_erosion(fg, disk, border_value=1)
        trimap[edge] = 128
    return trimap


def _load(path, mode):
    return np.asarray(read_image(path, mode))  # an ImageError (a ValueError) names an unreadable file


def write_png(array, path):
    write_atomically(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def main():
    parser = Parser(prog="matting.py",
                    description="Closed-form alpha matting (Levin et al. 2008) of an image given a trimap.")
    parser.add_argument("--image", required=True, help="RGB image (PNG, JPEG, ...)")
    parser.add_argument("--trimap", required=True,
                        help="grey trimap of the same size: 0 = background, 255 = foreground, else unknown")
    parser.add_argument("--out", required=True, help="where to write the 8-bit alpha PNG")
    parser.add_argument("--foreground", default=None, help="also write the estimated foreground RGB PNG here")
    parser.add_argument("--eps", type=real(above=0), default=EPS, help="colour-line regulariser; the paper's value")
    args = parser.parse_args()

    try:
        for flag, path in (("--out", args.out), ("--foreground", args.foreground)):
            if path is None:
                continue
            if not path.lower().endswith(".png"):
                raise ValueError(f"{flag} {path}: the output is a PNG; give a name ending in .png")
            if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                raise ValueError(f"the folder of {path} does not exist; create it first")
            check_writable(path, flag)
        image = _load(args.image, "RGB").astype(np.float64) / 255.0
        trimap = _load(args.trimap, "L")
        if image.shape[:2] != trimap.shape:
            raise ValueError(f"{args.image} is {image.shape[1]}x{image.shape[0]} but {args.trimap} is "
                             f"{trimap.shape[1]}x{trimap.shape[0]}; make the trimap the image's size")
        start = time.perf_counter()
        alpha = estimate_alpha(image, trimap, args.eps)
        print(f"solved {int((~np.isin(trimap, (0, 255))).sum())} unknown pixels in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
        fg = estimate_foreground(image, alpha) if args.foreground else None
    except ValueError as e:
        sys.exit(f"error: {e}")
    write_png(np.round(alpha * 255).astype(np.uint8), args.out)
    written = f"alpha to {args.out}"
    if fg is not None:
        write_png(np.round(fg * 255).astype(np.uint8), args.foreground)
        written += f", foreground to {args.foreground}"
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
