"""Synthetic training clips: one flat shape moving over a plain background, and its caption.

Everything is drawn from (seed, step), so a run is reproducible and a resumed run sees the same
data it would have seen uninterrupted. Shapes are rendered from signed distances with one pixel
of anti-aliasing, on whatever device the tensors live on.
"""

from __future__ import annotations

import random

import torch

from wanfit.builtin.language import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, Scene, all_scenes, paraphrase

SIZE_RANGE = (0.30, 0.40)  # shape width over the frame's shorter side
TRAVEL_RANGE = (0.30, 0.45)  # distance moved in 16 frames, over the frame's shorter side


def batch_rng(seed: int, step: int, stream: str = "data") -> random.Random:
    """The random source of one training step (string seeds hash the same on every machine)."""
    return random.Random(f"{seed}/{stream}/{step}")


def layout(scene: Scene, rng: random.Random, height: int, width: int, frames: int) -> tuple[float, ...]:
    """(size, x0, y0, vx, vy) in pixels: the shape stays whole inside the frame for all frames."""
    short = min(height, width)
    size = rng.uniform(*SIZE_RANGE) * short
    half = size / 2
    dx, dy = MOTIONS[scene.direction]
    speed = rng.uniform(*TRAVEL_RANGE) * short / 16
    path = speed * (frames - 1)

    def start(extent: int, d: int) -> float:
        room = extent - size - (path if d else 0.0)
        lo = half + (path if d < 0 else 0.0)
        return lo + rng.uniform(0.0, max(room, 0.0))

    return size, start(width, dx), start(height, dy), speed * dx, speed * dy


def render(
    scenes: list[Scene], layouts: list[tuple[float, ...]], height: int, width: int, frames: int, device="cpu"
) -> torch.Tensor:
    """Videos [B, 3, F, H, W] in [-1, 1]."""
    p = torch.tensor(layouts, dtype=torch.float32, device=device)
    size, x0, y0, vx, vy = p.unbind(1)
    t = torch.arange(frames, dtype=torch.float32, device=device)
    cx = (x0[:, None] + vx[:, None] * t)[:, :, None, None]  # [B, F, 1, 1]
    cy = (y0[:, None] + vy[:, None] * t)[:, :, None, None]
    dx = torch.arange(width, dtype=torch.float32, device=device).add_(0.5).view(1, 1, 1, -1) - cx
    dy = torch.arange(height, dtype=torch.float32, device=device).add_(0.5).view(1, 1, -1, 1) - cy
    half = (size / 2).view(-1, 1, 1, 1)
    root5 = 5**0.5
    distances = torch.stack(
        [
            torch.sqrt(dx**2 + dy**2) - half,  # circle
            torch.maximum(dx.abs(), dy.abs()) - half,  # square
            # triangle pointing up, its box the same as the square's: base edge and two sloped edges
            torch.maximum(dy - half, torch.maximum(-2 * dx - dy - half, 2 * dx - dy - half) / root5),
        ]
    )  # [3, B, F, H, W]
    which = torch.tensor([SHAPES.index(s.shape) for s in scenes], device=device)
    sdf = distances[which, torch.arange(len(scenes), device=device)]
    alpha = (0.5 - sdf).clamp(0, 1).unsqueeze(1)  # [B, 1, F, H, W], one pixel of anti-aliasing

    def rgb(table: dict, names: list[str]) -> torch.Tensor:
        values = torch.tensor([table[n] for n in names], dtype=torch.float32, device=device)
        return (values / 127.5 - 1).view(-1, 3, 1, 1, 1)

    colour = rgb(COLOURS, [s.colour for s in scenes])
    background = rgb(BACKGROUNDS, [s.background for s in scenes])
    return background + alpha * (colour - background)


def sample_scenes(
    rng: random.Random, batch: int, height: int, width: int, frames: int
) -> tuple[list[Scene], list[tuple[float, ...]]]:
    """`batch` scenes drawn uniformly from all the model can draw, and where each shape goes."""
    scenes = [rng.choice(ALL_SCENES) for _ in range(batch)]
    return scenes, [layout(s, rng, height, width, frames) for s in scenes]


def sample_batch(
    seed: int, step: int, batch: int, height: int, width: int, frames: int, device="cpu"
) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """(videos [B, 3, F, H, W], captions, scenes) of one training step, from (seed, step) alone."""
    rng = batch_rng(seed, step)
    scenes, layouts = sample_scenes(rng, batch, height, width, frames)
    captions = [paraphrase(s, rng) for s in scenes]
    return render(scenes, layouts, height, width, frames, device), captions, scenes


ALL_SCENES = all_scenes()
