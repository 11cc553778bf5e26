"""Frame similarity: PSNR and SSIM of a video against a reference (e.g. cached vs uncached frames).

Both take uint8 frames [F, H, W, C] (or one frame [H, W, C]) as wanfit's pipeline returns them.
PSNR is over the whole video (one mean squared error), as EasyCache's and TeaCache's evaluations
report it. SSIM is Wang et al. (2004): an 11 x 11 Gaussian window of sigma 1.5, K1 = 0.01,
K2 = 0.03, computed per frame and channel over the window positions that fit inside the frame
(no padding), then averaged.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _frames(video: np.ndarray) -> torch.Tensor:
    """[F, H, W, C] or [H, W, C] -> float64 [F * C, 1, H, W]."""
    v = torch.as_tensor(np.asarray(video), dtype=torch.float64)
    if v.ndim == 3:
        v = v.unsqueeze(0)
    if v.ndim != 4:
        raise ValueError(f"expected frames [F, H, W, C] or [H, W, C], got shape {tuple(v.shape)}")
    return v.permute(0, 3, 1, 2).reshape(-1, 1, v.shape[1], v.shape[2])


def _check(a: np.ndarray, b: np.ndarray) -> None:
    if np.shape(a) != np.shape(b):
        raise ValueError(f"the videos differ in shape: {np.shape(a)} vs {np.shape(b)}")


def psnr(video: np.ndarray, reference: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over the whole video; inf when identical."""
    _check(video, reference)
    mse = float(np.mean((np.asarray(video, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian weights SSIM's window is the outer product of (float64)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(video: np.ndarray, reference: np.ndarray, data_range: float = 255.0) -> float:
    """Mean structural similarity (1.0 when identical) over frames, channels and window positions."""
    _check(video, reference)
    x, y = _frames(video), _frames(reference)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels")
    w = gaussian_window()

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable: rows, then columns
        t = F.conv2d(t, w.view(1, 1, 1, -1))
        return F.conv2d(t, w.view(1, 1, -1, 1))

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def compare_videos(video: np.ndarray, reference: np.ndarray) -> dict:
    """{"psnr_db", "ssim", "mean_abs_diff"} of a video against its reference (JSON-ready)."""
    value = psnr(video, reference)
    return {
        "psnr_db": None if math.isinf(value) else value,  # None: identical (infinite PSNR)
        "ssim": ssim(video, reference),
        "mean_abs_diff": float(
            np.mean(np.abs(np.asarray(video, np.float64) - np.asarray(reference, np.float64)))
        ),
    }
