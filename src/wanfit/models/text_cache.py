"""A disk cache of prompt embeddings, so a repeated prompt (and the fixed negative prompt) never runs
the 5.7B-parameter text encoder again.

One safetensors file per entry holds the prompt's unpadded rows [seq_len, dim] (a few hundred KB
rather than the 4 MB of a padded [512, 4096] bf16 tensor). Entries are keyed by a fingerprint of the
model and tokenizer, the cleaned prompt, max_length and the dtype the encoder computed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

CACHE_DIR_ENV = "WANFIT_CACHE_DIR"  # wanfit's cache root; prompts live in its prompts/ folder
DISABLE_ENV = "WANFIT_PROMPT_CACHE"  # "0", "off", "false" or "no" turns the cache off


def default_cache_dir() -> Path:
    root = os.environ.get(CACHE_DIR_ENV)
    if root:
        return Path(root).expanduser() / "prompts"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "wanfit" / "prompts"


def cache_enabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def files_fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    """A cheap fingerprint of model files: names, sizes and modification times (no data is read)."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


class PromptCache:
    """Prompt embeddings on disk, written atomically (temp file + rename) so a crash never leaves a
    half-written entry, and read back as a miss if a file is unreadable."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    @staticmethod
    def key(fingerprint: str, prompt: str, max_length: int, compute_dtype: torch.dtype) -> str:
        fields = {
            "model": fingerprint,
            "prompt": prompt,
            "max_length": max_length,
            "dtype": str(compute_dtype),
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> torch.Tensor | None:
        """The cached rows [seq_len, dim] on the CPU, or None on a miss."""
        path = self.path(key)
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(path))["embeds"]
        except Exception:  # a damaged entry is a miss; the next store replaces it
            return None

    def store(self, key: str, rows: torch.Tensor, prompt: str = "") -> None:
        from safetensors.torch import save

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = save({"embeds": rows.detach().to("cpu").contiguous()}, metadata={"prompt": prompt})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
