"""A batch of prompts from a file (`wanfit generate --prompts FILE`): one prompt a line, or JSON lines
carrying per-prompt settings.

    a red fox running through fresh snow
    {"prompt": "two dogs play on a beach", "seed": 7, "size": "480x320", "frames": 33, "out": "dogs.mp4"}

Blank lines and lines starting with # are skipped. A JSON line takes the keys of BATCH_KEYS; a
malformed line becomes a LineError naming its line number, and the other lines still run. A file
that is missing, empty or not UTF-8 is a ConfigError (nothing runs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from wanfit.errors import ConfigError

# Settings a JSON line may carry (the rest come from the command line).
BATCH_KEYS = ("prompt", "negative_prompt", "seed", "size", "frames", "steps", "guidance", "shift", "out")


@dataclass(frozen=True)
class BatchItem:
    """One prompt of a batch: its line number and the settings it sets."""

    line: int
    prompt: str
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LineError:
    """A line that could not be read, with why (one sentence)."""

    line: int
    message: str


def read_prompts_file(path: str | Path) -> list[BatchItem | LineError]:
    """Every prompt line of `path` in order (LineError for a malformed one); ConfigError when the file
    itself is unusable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"The prompts file {path} does not exist.") from None
    except IsADirectoryError:
        raise ConfigError(
            f"The prompts file {path} is a folder; give a text file, one prompt a line."
        ) from None
    except OSError as err:
        raise ConfigError(f"Could not read the prompts file {path}: {err.strerror or err}.") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"The prompts file {path} is not UTF-8 text (line {line}); save it as UTF-8."
        ) from None
    items = [_item(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)]
    items = [item for item in items if item is not None]
    if not items:
        raise ConfigError(f"The prompts file {path} holds no prompt (one a line, or JSON lines).")
    return items


def _item(number: int, line: str) -> BatchItem | LineError | None:
    if not line or line.startswith("#"):
        return None
    if not line.startswith("{"):
        return BatchItem(number, line)
    try:
        values = json.loads(line)
    except ValueError as err:
        return LineError(number, f"line {number} is not valid JSON ({err.msg} at column {err.colno}).")
    if not isinstance(values, dict):
        return LineError(number, f"line {number} is JSON but not an object of settings.")
    unknown = sorted(set(values) - set(BATCH_KEYS))
    if unknown:
        return LineError(
            number,
            f"line {number} has unknown settings {', '.join(unknown)}; a line takes {', '.join(BATCH_KEYS)}.",
        )
    prompt = values.pop("prompt", None)
    if not isinstance(prompt, str):
        return LineError(number, f'line {number} needs a "prompt" string.')
    return BatchItem(number, prompt, values)
