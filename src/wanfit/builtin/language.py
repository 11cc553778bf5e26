"""What the built-in model draws, and the caption language it was trained on.

A scene is one shape of one colour, moving in one direction (or standing still) over a plain
background. `prompt(scene)` is the canonical caption; `paraphrase(scene, rng)` is one of the many
wordings the model saw in training (synonyms, word orders, the background left out).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle")
# sRGB 0-255. Far apart from each other and from both backgrounds, so a mean colour names one.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 210, 40),
    "white": (240, 240, 240),
}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128)}
# Direction of travel in image coordinates (x right, y down).
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
DIRECTIONS = tuple(MOTIONS)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    direction: str
    background: str = "black"


def all_scenes() -> list[Scene]:
    """Every scene the model can draw (shape x colour x direction x background)."""
    return [Scene(*combo) for combo in itertools.product(SHAPES, COLOURS, DIRECTIONS, BACKGROUNDS)]


def prompt(scene: Scene) -> str:
    """The canonical caption: 'a red circle moving left on a black background'."""
    motion = "standing still" if scene.direction == "still" else f"moving {scene.direction}"
    return f"a {scene.colour} {scene.shape} {motion} on a {scene.background} background"


# -- paraphrases ---------------------------------------------------------------------------------

_NOUNS = {
    "circle": ("circle", "disc", "round dot", "ball"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangle shape"),
}
_MOVES = {
    "left": ("moving left", "moving to the left", "going left", "sliding left", "drifting left", "heading left"),
    "right": ("moving right", "moving to the right", "going right", "sliding right", "drifting right",
              "heading right"),
    "up": ("moving up", "moving upward", "going up", "rising", "floating up", "drifting up"),
    "down": ("moving down", "moving downward", "going down", "falling", "sinking", "dropping"),
    "still": ("standing still", "not moving", "staying still", "at rest", "motionless", "staying in place"),
}  # fmt: skip
_BACKGROUND_NAMES = {"black": ("black",), "gray": ("gray", "grey")}
_BACKGROUND_PHRASES = (
    "on a {} background",
    "over a {} background",
    "against a {} backdrop",
    "on {}",
    "with a {} background",
    "in front of a {} background",
)
_TEMPLATES = (
    "a {colour} {noun} {motion} {background}",
    "{colour} {noun} {motion}, {background}",
    "a {noun} in {colour} {motion} {background}",
    "there is a {colour} {noun} {motion} {background}",
    "{background}, a {colour} {noun} {motion}",
    "a {colour} {noun}, {motion}, {background}",
)
CANONICAL_SHARE = 0.3  # of training captions are the canonical one, as users will mostly type it
NO_BACKGROUND_SHARE = 0.15  # leave the background out: the model picks one


def paraphrase(scene: Scene, rng: random.Random) -> str:
    """One training caption for `scene`, drawn with `rng`."""
    if rng.random() < CANONICAL_SHARE:
        return prompt(scene)
    words = {
        "colour": scene.colour,
        "noun": rng.choice(_NOUNS[scene.shape]),
        "motion": rng.choice(_MOVES[scene.direction]),
        "background": rng.choice(_BACKGROUND_PHRASES).format(rng.choice(_BACKGROUND_NAMES[scene.background])),
    }
    text = rng.choice(_TEMPLATES)
    if rng.random() < NO_BACKGROUND_SHARE:
        text = text.replace(", {background}", "").replace(" {background}", "").replace("{background}, ", "")
    return text.format(**words)


def vocabulary_text() -> str:
    """What the model can draw, for `wanfit demo prompts` and the help text."""
    return (
        f"shapes: {', '.join(SHAPES)}\n"
        f"colours: {', '.join(COLOURS)}\n"
        f"motion: moving {', '.join(d for d in DIRECTIONS if d != 'still')}, or standing still\n"
        f"backgrounds: {', '.join(BACKGROUNDS)}\n"
        f"e.g. '{prompt(Scene('circle', 'red', 'right'))}', "
        "'yellow box falling, against a grey backdrop'"
    )
