"""PSNR and SSIM of frames (wanfit.metrics) against direct computations from their definitions."""

import math

import numpy as np
import pytest

from wanfit.metrics import compare_videos, psnr, ssim


def frames(seed: int, shape=(2, 16, 18, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def ssim_by_definition(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004, window by window: 11 x 11 Gaussian weights (sigma 1.5), valid positions only."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for f in range(a.shape[0]):
        for c in range(a.shape[3]):
            x, y = a[f, :, :, c].astype(np.float64), b[f, :, :, c].astype(np.float64)
            for i in range(x.shape[0] - 10):
                for j in range(x.shape[1] - 10):
                    px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
                    mx, my = (w * px).sum(), (w * py).sum()
                    vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                    cov = (w * (px - mx) * (py - my)).sum()
                    values.append(
                        ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
                    )
    return float(np.mean(values))


def test_ssim_matches_its_definition():
    a = frames(0)
    noisy = np.clip(a.astype(int) + np.random.default_rng(1).integers(-40, 41, a.shape), 0, 255).astype(
        np.uint8
    )
    assert ssim(noisy, a) == pytest.approx(ssim_by_definition(noisy, a), abs=1e-9)
    assert ssim(frames(2), a) == pytest.approx(ssim_by_definition(frames(2), a), abs=1e-9)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(frames(2), a) < ssim(noisy, a) < 1.0  # unrelated frames score far lower than noisy ones
    assert ssim(noisy[0], a[0]) == pytest.approx(ssim_by_definition(noisy[:1], a[:1]), abs=1e-9)  # one frame


def test_psnr_is_ten_log10_of_peak_over_mse():
    a = frames(3)
    b = a.copy()
    b[0, 0, 0, 0] = a[0, 0, 0, 0] ^ 0x10  # one value off by 16
    mse = 16**2 / a.size
    assert psnr(b, a) == pytest.approx(10 * math.log10(255**2 / mse))
    assert psnr(a, a) == math.inf
    report = compare_videos(b, a)
    assert report["psnr_db"] == pytest.approx(psnr(b, a)) and report["mean_abs_diff"] == pytest.approx(
        16 / a.size
    )
    assert compare_videos(a, a)["psnr_db"] is None and compare_videos(a, a)["ssim"] == pytest.approx(1.0)


def test_mismatched_or_tiny_frames_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(frames(0), frames(0, (2, 16, 17, 3)))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(frames(0, (1, 8, 8, 3)), frames(1, (1, 8, 8, 3)))
