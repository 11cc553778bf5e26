"""Does a video show what its prompt says? A detector and a harness for the built-in model.

`detect(frames)` reads one video of the built-in model's language (wanfit.builtin.language): the
shape's colour (the median colour of what differs from the background, named by the nearest
palette colour), its motion (the centroid's path from the first frames to the last) and its shape
(how much of its bounding box it fills: square ~1, circle ~0.79, triangle ~0.5).

`evaluate(setting)` generates the attribute grid with the built-in model under a setting (plan
fields, call arguments, or a patch applied to the pipeline: a lossy speed-up, or a bug put in on
purpose) and returns the accuracy of each attribute, the PSNR against the exact default path and,
for a step cache (plan={"cache": ...}), the DiT evaluations it skipped. `calibrate_magcache`
measures MagCache's ratios for the model where `--cache magcache` finds them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from wanfit.builtin import SAMPLING
from wanfit.builtin.language import BACKGROUNDS, COLOURS, DIRECTIONS, MOTIONS, SHAPES, Scene, prompt

MASK_THRESHOLD = 60  # max channel difference from the background (0-255) that counts as the shape
MIN_AREA = 0.01  # of the frame: fewer pixels is no shape
# Speed, in shorter sides per frame, under which a shape stands still: half the slowest it is trained to move.
STILL_SPEED = 0.009
# Fill of the bounding box: above SQUARE_FILL a square, below TRIANGLE_FILL a triangle, else a circle.
SQUARE_FILL = 0.89
TRIANGLE_FILL = 0.65


@dataclass(frozen=True)
class Detection:
    colour: str | None
    shape: str | None
    direction: str | None

    def matches(self, scene: Scene) -> dict[str, bool]:
        return {
            "colour": self.colour == scene.colour,
            "shape": self.shape == scene.shape,
            "direction": self.direction == scene.direction,
        }


NOTHING = Detection(None, None, None)


def detect(frames: np.ndarray) -> Detection:
    """Colour, shape and direction of the one shape in uint8 frames [F, H, W, 3] (None: not found)."""
    video = frames.astype(np.int16)
    _, h, w, _ = video.shape
    border = np.concatenate(
        [video[:, 0].reshape(-1, 3), video[:, -1].reshape(-1, 3), video[:, :, 0].reshape(-1, 3),
         video[:, :, -1].reshape(-1, 3)]
    )  # fmt: skip
    background = np.median(border, axis=0)
    mask = np.abs(video - background).max(axis=-1) > MASK_THRESHOLD  # [F, H, W]
    # Drop specks: keep pixels with at least two of their four neighbours set.
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    neighbours = (
        padded[:, :-2, 1:-1].astype(np.int8)
        + padded[:, 2:, 1:-1]
        + padded[:, 1:-1, :-2]
        + padded[:, 1:-1, 2:]
    )
    mask &= neighbours >= 2
    areas = mask.sum(axis=(1, 2))
    found = areas >= MIN_AREA * h * w
    if found.sum() < 2:
        return NOTHING

    colour = _nearest(np.median(video[mask], axis=0), COLOURS)
    # The colour mask: pixels whose nearest colour (of the palette and the background) is the shape's.
    # Smudges of other colours are left out; so is the anti-aliased rim, the same for every shape.
    references = np.array([*COLOURS.values(), background], dtype=np.float32)
    nearest = np.argmin(((video[..., None, :] - references) ** 2).sum(-1), axis=-1)
    mask &= nearest == list(COLOURS).index(colour)
    areas = mask.sum(axis=(1, 2))
    if (areas >= MIN_AREA * h * w).sum() < 2:
        return NOTHING

    ys, xs = np.arange(h), np.arange(w)
    fills, centres, times = [], [], []
    for t, (frame, area) in enumerate(zip(mask, areas)):
        if area < MIN_AREA * h * w:
            continue
        times.append(t)
        rows, cols = np.flatnonzero(frame.any(axis=1)), np.flatnonzero(frame.any(axis=0))
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        fills.append(area / box)
        centres.append((frame.sum(axis=0) @ xs / area, frame.sum(axis=1) @ ys / area))
    fill = float(np.median(fills))
    shape = "square" if fill > SQUARE_FILL else "triangle" if fill < TRIANGLE_FILL else "circle"

    ends = max(1, len(centres) // 4)  # mean position over the first and the last quarter of the frames
    travel = np.mean(centres[-ends:], axis=0) - np.mean(centres[:ends], axis=0)
    frames_apart = np.mean(times[-ends:]) - np.mean(times[:ends])
    if np.abs(travel).max() / min(h, w) < STILL_SPEED * frames_apart:
        direction = "still"
    else:
        axis = int(np.argmax(np.abs(travel)))
        step = [0, 0]
        step[axis] = int(np.sign(travel[axis]))
        direction = next(d for d, m in MOTIONS.items() if list(m) == step)
    return Detection(colour, shape, direction)


def _nearest(rgb: np.ndarray, table: Mapping[str, tuple[int, int, int]]) -> str:
    return min(table, key=lambda name: float(np.sum((rgb - np.asarray(table[name])) ** 2)))


# -- the harness ---------------------------------------------------------------------------------


def attribute_grid(backgrounds: Sequence[str] = tuple(BACKGROUNDS)) -> tuple[Scene, ...]:
    """Every colour x shape x direction, the backgrounds taken in turn."""
    combos = itertools.product(COLOURS, SHAPES, DIRECTIONS)
    return tuple(
        Scene(shape, colour, direction, backgrounds[i % len(backgrounds)])
        for i, (colour, shape, direction) in enumerate(combos)
    )


GRID = attribute_grid()
# Every seventh cell (7 is prime to 2, 3 and 5): each colour, shape, direction and background, in 11 videos.
GRID_SAMPLE = GRID[::7]
# The grid's default video: small enough for CI, the size the model was trained at.
GRID_SIZE = {"height": 64, "width": 64, "num_frames": 9}


@dataclass(frozen=True)
class Setting:
    """A way to run the built-in pipeline: plan fields, call arguments, and/or a patch of the pipeline."""

    name: str = "default"
    plan: Mapping = field(default_factory=dict)  # Plan fields over the default plan
    call: Mapping = field(default_factory=dict)  # pipeline call arguments (num_inference_steps, ...)
    patch: Callable | None = None  # called with the pipeline before the grid runs

    @property
    def is_default(self) -> bool:
        return not self.plan and not self.call and self.patch is None


@dataclass
class Report:
    setting: str
    scenes: tuple[Scene, ...]
    detections: list[Detection]
    frames: list[np.ndarray]
    psnr: float | None = None  # dB against the default path's frames, pooled over the grid
    cache_reports: list[dict | None] = field(default_factory=list)  # pipe.step_cache_report per video

    def skipped(self) -> tuple[int, int] | None:
        """(DiT evaluations the step cache skipped, all there were), over the videos; an evaluation
        is one stream (cond or uncond) at one step. None: no step cache."""
        runs = [r for r in self.cache_reports if r is not None]
        if not runs:
            return None
        done = sum(len(steps) for r in runs for steps in r["skipped"].values())
        return done, sum(r["settings"]["steps"] * len(r["skipped"]) for r in runs)

    def accuracy(self, attribute: str) -> float:
        """Share of videos whose `attribute` (colour, shape, direction, or 'all' three) is right."""
        hits = [d.matches(s) for d, s in zip(self.detections, self.scenes)]
        if attribute == "all":
            return float(np.mean([all(h.values()) for h in hits]))
        return float(np.mean([h[attribute] for h in hits]))

    def summary(self) -> dict:
        accuracies = {a: round(self.accuracy(a), 3) for a in ("colour", "shape", "direction", "all")}
        psnr = None if self.psnr is None else round(self.psnr, 2)
        skipped = self.skipped()
        return {"setting": self.setting, "videos": len(self.scenes), **accuracies, "psnr_db": psnr,
                "skipped": None if skipped is None else list(skipped)}  # fmt: skip


def evaluate(
    setting: Setting = Setting(),
    *,
    scenes: Sequence[Scene] = GRID,
    height: int = GRID_SIZE["height"],
    width: int = GRID_SIZE["width"],
    num_frames: int = GRID_SIZE["num_frames"],
    device: str = "cpu",
    reference: Report | None = None,
    psnr: bool = True,
    model_dir=None,
) -> Report:
    """Generate `scenes` (seeds: scene_seed) under `setting`; detect, and compare with the default path.

    reference: the default setting's report over the same scenes (computed here when needed and
    not given); psnr=False skips the comparison. model_dir: another folder of the built-in model.
    """
    pipe = _pipeline(setting, height=height, width=width, num_frames=num_frames, device=device,
                     model_dir=model_dir)  # fmt: skip
    frames, cache_reports = [], []
    for i, scene in enumerate(scenes):
        frames.append(
            pipe(prompt(scene), height=height, width=width, num_frames=num_frames, seed=scene_seed(scene, i),
                 progress=False, **setting.call)
        )  # fmt: skip
        cache_reports.append(pipe.step_cache_report)
    report = Report(
        setting.name, tuple(scenes), [detect(f) for f in frames], frames, cache_reports=cache_reports
    )
    if psnr:
        if setting.is_default:
            reference = report
        elif reference is None:
            size = {"height": height, "width": width, "num_frames": num_frames}
            reference = evaluate(scenes=scenes, device=device, psnr=False, model_dir=model_dir, **size)
        report.psnr = grid_psnr(report.frames, reference.frames)
    return report


def _pipeline(setting: Setting, *, height: int, width: int, num_frames: int, device: str, model_dir):
    """The built-in pipeline as the planner plans this machine for the grid, with the setting's plan
    fields and patch; the text encoder kept for the whole grid."""
    from dataclasses import replace

    from wanfit.builtin import MODEL_DIR, builtin_pipeline
    from wanfit.plan.planning import Constraints, model_request, plan_for

    model_dir = model_dir or MODEL_DIR
    guidance = setting.call.get("guidance_scale", SAMPLING.guidance_scale) != 1.0
    request = model_request(model_dir, width=width, height=height, frames=num_frames, guidance=guidance)
    planned = plan_for(request, Constraints(device=device)).plan
    plan = replace(planned, free_text_encoder=False, **setting.plan)
    pipe = builtin_pipeline(plan=plan, model_dir=model_dir, progress=False)
    if setting.patch is not None:
        setting.patch(pipe)
    return pipe


def calibrate_magcache(
    steps: int = SAMPLING.num_inference_steps,
    *,
    height: int = GRID_SIZE["height"],
    width: int = GRID_SIZE["width"],
    num_frames: int = GRID_SIZE["num_frames"],
    device: str = "cpu",
    model_dir=None,
):
    """Measure MagCache's ratios of the built-in model at `steps` (its default prompt, seed 0, the
    grid's size, its guidance and shift), as `wanfit calibrate-cache` does, and store them where
    `--cache magcache` looks for this model: under $WANFIT_CACHE_DIR (point it at a temporary
    folder to leave the user's cache alone). Returns the file written."""
    from wanfit.builtin import DEFAULT_PROMPT
    from wanfit.sampling.step_cache import calibrator
    from wanfit.sampling.step_cache.tables import save_ratios

    pipe = _pipeline(Setting(), height=height, width=width, num_frames=num_frames, device=device,
                     model_dir=model_dir)  # fmt: skip
    cache = calibrator(steps)
    size = {"height": height, "width": width, "num_frames": num_frames}
    pipe(DEFAULT_PROMPT, **size, num_inference_steps=steps, seed=0, progress=False, step_cache=cache)
    about = {"prompt": DEFAULT_PROMPT, "size": f"{width}x{height}", "frames": num_frames, "steps": steps,
             "guidance": SAMPLING.guidance_scale, "shift": SAMPLING.shift, "seed": 0, "loras": []}  # fmt: skip
    return save_ratios(pipe.step_cache_key, cache.policy.measured(cache), about)


def scene_seed(scene: Scene, position: int) -> int:
    """A grid scene's seed is its place in GRID (so a subset draws the same videos); others, their position."""
    return GRID.index(scene) if scene in GRID else position


def grid_psnr(frames: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """PSNR in dB of all videos against their references, pooled (inf when identical)."""
    errors = [np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2) for a, b in zip(frames, reference)]
    mse = float(np.mean(errors))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


# -- negative controls: the sampler broken on purpose ----------------------------------------------


def _flipped_velocity(pipe) -> None:
    """The sampler reads the DiT's velocity with the wrong sign."""
    predict = pipe.predict_noise
    pipe.predict_noise = lambda *args, **kwargs: -predict(*args, **kwargs)


def _swapped_guidance(pipe) -> None:
    """Classifier-free guidance pushes away from the prompt: cond and uncond swapped."""
    predict = pipe.predict_noise
    pipe.predict_noise = lambda x, t, cond, uncond, *rest, **kw: predict(x, t, uncond, cond, *rest, **kw)


def _unshifted_timesteps(pipe) -> None:
    """The solver steps along the shifted sigmas, but the DiT is told the unshifted timestep."""
    predict, shift = pipe.predict_noise, pipe.defaults.shift

    def told_unshifted(x, t, *rest, **kw):
        sigma = t / 1000
        return predict(x, 1000 * sigma / (shift - (shift - 1) * sigma), *rest, **kw)

    pipe.predict_noise = told_unshifted


def _raw_latents(pipe) -> None:
    """The VAE decodes the DiT's normalised latent without denormalising it."""
    pipe.vae.denormalize = lambda z: z


def broken_samplers(shift: float) -> dict[str, Setting]:
    """Classic sampler bugs, each a Setting: a harness that cannot tell them from the real one is no use."""
    return {
        "velocity sign": Setting("velocity sign flipped", patch=_flipped_velocity),
        "guidance": Setting("guidance swapped", patch=_swapped_guidance),
        "shift (timesteps)": Setting("timesteps unshifted", patch=_unshifted_timesteps),
        "latent normalisation": Setting("latents not denormalised", patch=_raw_latents),
    }
