"""Closed-form matting: the Laplacian against the textbook formula and pymatting, alpha and foreground
on composites whose truth is known, the trimap rule, compositing, and the command line's errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage as ndi
from PIL import Image

from matting import (composite, estimate_alpha, estimate_foreground, matting_laplacian,
                     trimap_from_confidence)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dense_laplacian(image, known=None, eps=1e-7):
    """Eq. 12 of Levin et al. written out: loop over 3 x 3 windows, sum the pair terms."""
    h, w, _ = image.shape
    L = np.zeros((h * w, h * w))
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            if known is not None and known[y - 1:y + 2, x - 1:x + 2].all():
                continue
            ids = [(y + dy) * w + (x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            I = image.reshape(-1, 3)[ids]
            mu = I.mean(axis=0)
            cov = (I - mu).T @ (I - mu) / 9
            inv = np.linalg.inv(cov + eps / 9 * np.eye(3))
            for a, i in enumerate(ids):
                for b, j in enumerate(ids):
                    L[i, j] += (i == j) - (1 + (I[a] - mu) @ inv @ (I[b] - mu)) / 9
    return L


def synthetic(h, w, seed=0, constant_colours=False):
    """image = alpha F + (1 - alpha) B with a smooth random alpha; returns image, alpha, F, trimap."""
    rng = np.random.default_rng(seed)
    # A wobbly disc with soft edges ~6 px wide, away from the image border: border pixels lie in
    # few windows, so there the colour lines cannot pin alpha and eps pulls it to the constraints.
    y, x = np.mgrid[:h, :w]
    r = np.hypot((y - h / 2) / h, (x - w / 2) / w)
    field = ndi.gaussian_filter(rng.standard_normal((h, w)), min(h, w) / 8)
    alpha = np.clip(0.5 + (0.3 - r) * min(h, w) / 6 + 0.5 * field / field.std(), 0, 1)
    if constant_colours:
        F, B = np.full((h, w, 3), [0.9, 0.6, 0.2]), np.full((h, w, 3), [0.1, 0.3, 0.8])
    else:  # smooth colour texture, so the colour-line model holds only approximately
        F = 0.5 * np.array([0.9, 0.6, 0.2]) + 0.5 * ndi.gaussian_filter(rng.random((h, w, 3)), (3, 3, 0))
        B = 0.5 * np.array([0.1, 0.3, 0.8]) + 0.5 * ndi.gaussian_filter(rng.random((h, w, 3)), (3, 3, 0))
    image = composite(F, B, alpha)
    unknown = ndi.binary_dilation((alpha > 0) & (alpha < 1), iterations=2)
    trimap = np.where(unknown, 128, np.round(alpha) * 255).astype(np.uint8)
    return image, alpha, F, trimap


def test_laplacian_equals_the_textbook_formula_and_is_a_laplacian():
    rng = np.random.default_rng(0)
    image = rng.random((6, 7, 3))
    known = np.zeros((6, 7), bool)
    known[:, :3] = True  # the windows centred in columns 1 (all known) are skipped
    for mask in (None, known):
        L = matting_laplacian(image, mask).toarray()
        ref = dense_laplacian(image, mask)
        scale = np.abs(ref).max()
        assert np.abs(L - ref).max() <= 1e-9 * scale
        assert np.abs(L - L.T).max() <= 1e-9 * scale  # symmetric
        assert np.abs(L.sum(axis=1)).max() <= 1e-9 * scale  # constants are in the null space
        assert np.linalg.eigvalsh(L).min() >= -1e-9 * scale  # positive semi-definite


def test_laplacian_equals_pymatting():
    from pymatting import cf_laplacian
    image, _, _, trimap = synthetic(40, 30)
    known = trimap != 128
    for mask in (None, known):
        ours = matting_laplacian(image, mask)
        ref = cf_laplacian(image, is_known=mask)
        # Both sum exactly the windows that touch an unknown pixel, so every entry matches, to
        # rounding: nearly flat windows have a covariance close to eps/9, whose inverse amplifies it.
        assert abs(ours - ref).max() <= 1e-6 * abs(ref).max()


def test_alpha_recovered_when_it_is_linear_in_colour():
    # With constant F and B every pixel lies on the segment F-B, so alpha is exactly an affine
    # function of colour: its colour-line cost is zero up to the eps-term (eps |a|^2 per window,
    # |a| ~ 1 / |F - B|), so the hard-constrained minimum is the truth to well within 1e-3.
    image, alpha, _, trimap = synthetic(48, 40, constant_colours=True)
    assert (trimap == 128).mean() > 0.2
    est = estimate_alpha(image, trimap)
    assert np.abs(est - alpha).max() < 1e-3
    assert np.array_equal(est[trimap == 255], np.ones((trimap == 255).sum()))


def test_alpha_equals_pymatting_on_a_textured_composite():
    from pymatting import estimate_alpha_cf
    image, alpha, _, trimap = synthetic(48, 40, seed=1)
    ours = estimate_alpha(image, trimap)
    ref = estimate_alpha_cf(image, trimap / 255.0)  # same hard-constrained system, CG to rtol 1e-7
    assert np.abs(ours - ref).max() < 1e-4
    # Textured colours break the colour-line model a little: close to the truth, not equal to it.
    assert np.abs(ours - alpha).mean() < 0.02


def test_trimap_without_unknown_pixels_is_the_alpha_and_without_known_pixels_is_an_error():
    image, alpha, _, _ = synthetic(16, 16)
    hard = np.where(alpha > 0.5, 255, 0).astype(np.uint8)
    assert np.array_equal(estimate_alpha(image, hard), hard / 255.0)
    assert np.array_equal(estimate_alpha(image, hard / 255.0), hard / 255.0)  # float {0, 1} trimap
    with pytest.raises(ValueError, match="no known pixels"):
        estimate_alpha(image, np.full((16, 16), 128, np.uint8))


def test_composite_endpoints():
    rng = np.random.default_rng(0)
    fg, bg = rng.random((5, 4, 3)), rng.random((5, 4, 3))
    assert np.array_equal(composite(fg, bg, np.ones((5, 4))), fg)
    assert np.array_equal(composite(fg, bg, np.zeros((5, 4))), bg)
    assert np.allclose(composite(fg, bg, np.full((5, 4), 0.5)), (fg + bg) / 2)


def test_foreground_recovers_the_subject_colours():
    image, alpha, F, _ = synthetic(96, 80, seed=2)
    est = estimate_foreground(image, alpha)
    soft = (alpha > 0.1) & (alpha < 0.9)
    assert soft.sum() > 500
    # Where alpha > 0.1 the colours are well determined: mean error ~0.002 observed, bound 0.01.
    assert np.abs(est - F)[alpha > 0.1].mean() < 0.01
    # On soft edges the raw image carries the old background (error ~0.14); the estimate removes
    # most of it (~0.006 observed, bound 0.02).
    assert np.abs(est - F)[soft].mean() < 0.02 < 0.1 < np.abs(image - F)[soft].mean()


def test_trimap_thresholds():
    p = np.array([[0.0, 0.05, 0.1, 0.3, 0.59, 0.6, 0.9, 1.0]])
    expected = np.array([[0, 0, 128, 128, 128, 255, 255, 255]], np.uint8)
    assert np.array_equal(trimap_from_confidence(p), expected)
    assert np.array_equal(trimap_from_confidence(p, high=0.9, low=0.3)[0], [0, 0, 0, 128, 128, 128, 255, 255])


def test_trimap_band_around_the_foreground_edge():
    p = np.zeros((20, 20))
    p[:, :10] = 1.0  # foreground: columns 0-9, touching the image's top, bottom and left borders
    trimap = trimap_from_confidence(p, band=2)
    # Unknown: the 2 columns each side of the edge; the image border is not an edge.
    assert np.array_equal(trimap[0], [255] * 8 + [128] * 4 + [0] * 8)
    assert (trimap == trimap[:1]).all()
    assert np.array_equal(trimap_from_confidence(p, band=0), np.where(p == 1, 255, 0))


def run_cli(*args):
    return subprocess.run([sys.executable, "matting.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_writes_alpha_and_foreground(tmp_path):
    image, alpha, _, trimap = synthetic(40, 32, constant_colours=True)
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(trimap).save(tmp_path / "trimap.png")
    result = run_cli("--image", tmp_path / "image.png", "--trimap", tmp_path / "trimap.png",
                     "--out", tmp_path / "alpha.png", "--foreground", tmp_path / "fg.png")
    assert result.returncode == 0, result.stderr
    assert "alpha.png" in result.stdout.splitlines()[-1] and "fg.png" in result.stdout.splitlines()[-1]
    with Image.open(tmp_path / "alpha.png") as out:
        assert out.mode == "L" and out.size == (32, 40)
        # 8-bit image and alpha: within a few grey levels of the truth.
        assert np.abs(np.asarray(out) / 255.0 - alpha).max() < 0.05
    with Image.open(tmp_path / "fg.png") as fg:
        assert fg.mode == "RGB" and fg.size == (32, 40)
    assert sorted(os.listdir(tmp_path)) == ["alpha.png", "fg.png", "image.png", "trimap.png"]


def test_cli_trimap_without_unknown_pixels_is_the_alpha(tmp_path):
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "image.png")
    trimap = np.zeros((10, 12), np.uint8)
    trimap[:, 6:] = 255
    Image.fromarray(trimap).save(tmp_path / "trimap.png")
    result = run_cli("--image", tmp_path / "image.png", "--trimap", tmp_path / "trimap.png",
                     "--out", tmp_path / "alpha.png")
    assert result.returncode == 0, result.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "alpha.png")), trimap)


@pytest.mark.parametrize("case", ["different sizes", "no known pixels", "not an image"])
def test_cli_bad_input_is_one_line_error_and_writes_nothing(tmp_path, case):
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "image.png")
    trimap, message = {"different sizes": (np.zeros((11, 12), np.uint8), "12x10"),
                       "no known pixels": (np.full((10, 12), 128, np.uint8), "no known pixels"),
                       "not an image": (None, "not an image")}[case]
    if trimap is None:
        (tmp_path / "trimap.png").write_text("not a PNG")
    else:
        Image.fromarray(trimap).save(tmp_path / "trimap.png")
    result = run_cli("--image", tmp_path / "image.png", "--trimap", tmp_path / "trimap.png",
                     "--out", tmp_path / "alpha.png", "--foreground", tmp_path / "fg.png")
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["image.png", "trimap.png"]
