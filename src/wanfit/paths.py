"""Paths the user gives (CLI flags and Python arguments), read the way a shell would read them."""

from __future__ import annotations

import os
from pathlib import Path


def user_path(path: str | os.PathLike) -> Path:
    """`path` with `~` and environment variables expanded.

    A shell expands them only unquoted; Python never does, so `from_pretrained("~/models/X")` or
    `--out "$HOME/v.mp4"` would otherwise name a folder called `~` or `$HOME`.
    """
    return Path(os.path.expandvars(os.path.expanduser(os.fspath(path))))
