"""Reading checkpoint files: lazy safetensors (single or sharded), pickled .pth with weights_only.

Every failure a user can cause (missing file, truncated or corrupt file, a pickle that holds code)
ends in CheckpointError that says which.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from wanfit.errors import CheckpointError
from wanfit.paths import user_path
from wanfit.weights.file_names import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


class LazyStateDict(Mapping):
    """A read-only mapping of tensor name -> tensor that reads each tensor only when asked.

    safetensors files are opened once and tensors are read on access, so loading a model tensor
    by tensor never holds a second full copy of the weights in RAM. Pickled files are memory
    mapped where their format allows it.
    """

    def __init__(self, files: Sequence[str | os.PathLike]):
        self.files = [Path(f) for f in files]
        self._where: dict[str, tuple[int, str]] = {}
        self._handles: list = []
        self._pickled: list[dict | None] = []
        for i, path in enumerate(self.files):
            if not path.is_file():
                raise CheckpointError(f"Checkpoint file not found: {path}.")
            if path.suffix == ".safetensors":
                handle = _open_safetensors(path)
                self._handles.append(handle)
                self._pickled.append(None)
                names = handle.keys()
            else:
                state = _load_pickled(path)
                self._handles.append(None)
                self._pickled.append(state)
                names = state.keys()
            for name in names:
                self._where[name] = (i, name)

    def __getitem__(self, key: str) -> torch.Tensor:
        i, name = self._where[key]
        handle = self._handles[i]
        if handle is None:
            return self._pickled[i][name]
        try:
            return handle.get_tensor(name)
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(
                f"Could not read tensor {name!r} from {self.files[i]}: the file looks truncated or corrupt ({err})."
            ) from err

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of a tensor without reading its data."""
        i, name = self._where[key]
        handle = self._handles[i]
        if handle is None:
            return tuple(self._pickled[i][name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def dtype_name(self, key: str) -> str:
        """The stored dtype of a tensor (e.g. 'BF16', 'F8_E4M3', or a torch dtype name)."""
        i, name = self._where[key]
        handle = self._handles[i]
        if handle is None:
            return str(self._pickled[i][name].dtype).replace("torch.", "")
        return handle.get_slice(name).get_dtype()


def stored_dtype_name(state: LazyStateDict, names=None) -> str | None:
    """The float dtype most elements of `state` (or of `names`) are stored in, canonical ("bfloat16",
    "float8_e4m3fn"); None when there is no float tensor. Headers only."""
    from wanfit.precision import dtype_name, parse_stored_dtype

    counts: dict[str, int] = {}
    for name in state if names is None else names:
        dtype = parse_stored_dtype(state.dtype_name(name))
        if dtype is not None:
            key = dtype_name(dtype)
            counts[key] = counts.get(key, 0) + math.prod(state.shape(name))
    return max(counts, key=counts.get) if counts else None


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        # Touch the header's last tensor so a file cut short fails here, not mid-load.
        keys = list(handle.keys())
        if keys:
            handle.get_slice(keys[-1]).get_shape()
        return handle
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt?){load_error_detail(err)}."
        ) from err


def _load_pickled(path: Path) -> dict:
    """A flat dict of tensors from a .pth, memory mapped if possible; never runs code from the file."""
    state = load_tensors_only(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dictionary of tensors.")
    return state


def load_tensors_only(path: Path, *, what: str = "PyTorch checkpoint", mmap: bool = True):
    """torch.load with weights_only=True (memory mapped where the format allows it).

    CheckpointError says why a file was refused: it holds code or objects other than tensors (the
    pickle is whole, but names functions or classes weights_only does not allow), or it is not a
    readable `what` (truncated or corrupt), so nobody downloads 17 GB again for the wrong reason.
    """
    try:
        with warnings.catch_warnings():
            # torch warns of any pickle protocol but 2 before it reads or refuses one: the error says enough.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as err:
                if not mmap or "mmap" not in str(err):
                    raise
                # Old (non-zip) pickles cannot be memory mapped.
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch and pickle raise many types for a bad file; none may escape
        refused = _refused_globals(path, err)
        if refused is not None:
            raise CheckpointError(
                f"{path} holds code or objects other than tensors ({short_list(refused, 3)}) and was not "
                "loaded: wanfit reads only tensors from a checkpoint and never runs code in it."
            ) from err
        raise CheckpointError(
            f"{path} is not a readable {what} (truncated or corrupt?){load_error_detail(err)}."
        ) from err


# The pickles at the start of a legacy (non-zip) torch file: magic, version, sys info, data, keys.
_LEGACY_PICKLES = 5
_SCAN_BYTES = 64 * 1024**2  # those pickles are small; the tensor bytes come after them
_STRING_OPS = {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
               "SHORT_BINSTRING"}  # fmt: skip


def _refused_globals(path: Path, err: BaseException) -> list[str] | None:
    """The globals weights_only refused, when that is why `err` happened and the pickle is whole.

    None when the file is rather truncated or corrupt: its pickle does not parse to the end. The
    pickle is only read (pickletools), never run.
    """
    if "Weights only load failed" not in str(err):
        return None
    names = _pickle_globals(path)
    if names is None:
        return None
    allowed = _weights_only_globals()
    refused = [n for n in dict.fromkeys(names) if not allowed(n)]
    return refused or None


def _weights_only_globals():
    """A test: would torch's weights_only unpickler accept this global? (its own list where it has one)"""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        known = set(_get_allowed_globals())
        return lambda name: name in known
    except (ImportError, AttributeError, TypeError):  # a torch without it: tensor machinery only
        return lambda name: name.startswith("torch.") or name == "collections.OrderedDict"


def _pickle_globals(path: Path) -> list[str] | None:
    """Every module.name a pickle file imports, in order; None if its pickle does not parse to the end."""
    import io
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                if len(pickles) != 1:
                    return None
                return _globals_in(io.BytesIO(archive.read(pickles[0])), 1)
        with open(path, "rb") as f:
            return _globals_in(io.BytesIO(f.read(_SCAN_BYTES)), _LEGACY_PICKLES)
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):
        return None


def _globals_in(stream, max_pickles: int) -> list[str] | None:
    """The globals of up to `max_pickles` consecutive pickles in `stream`; None if the first is broken."""
    import pickletools

    names: list[str] = []
    for i in range(max_pickles):
        try:
            ops = list(pickletools.genops(stream))
        except Exception:  # noqa: BLE001  (genops raises ValueError, struct.error, UnicodeError, ...)
            if i == 0:
                return None
            break  # a legacy file's tensor bytes, or the end of the file
        names += _op_globals(ops)
    return names


def _op_globals(ops) -> list[str]:
    strings: list[str] = []  # the strings pushed so far, for STACK_GLOBAL (module, name)
    memo: dict = {}
    names = []
    for op, arg, _ in ops:
        if op.name in ("GLOBAL", "INST"):
            names.append(_global_name(*str(arg).split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            names.append(_global_name(*strings[-2:]) if len(strings) >= 2 else "an unnamed global")
        elif op.name in _STRING_OPS:
            strings.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE") and strings:
            memo[len(memo) if op.name == "MEMOIZE" else arg] = strings[-1]
        elif op.name in ("GET", "BINGET", "LONG_BINGET") and arg in memo:
            strings.append(memo[arg])
    return names


def _global_name(module: str, name: str = "") -> str:
    """'module.name' as Python 3 knows it (protocol-2 pickles say __builtin__ for builtins)."""
    import _compat_pickle

    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def load_error_detail(err: BaseException) -> str:
    """': <first sentence of err>' for an error message, or '' when it says nothing useful.

    torch.load wraps every unpickling failure of a weights_only load in the same multi-line advice
    (which even suggests weights_only=False): the user gets none of it. A long message is cut at the
    end of a sentence, never in the middle of one.
    """
    if isinstance(err, OSError) and err.strerror:
        return f": {err.strerror}"
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines or lines[0].startswith("Weights only load failed"):
        return ""
    first = lines[0]
    if len(first) > 200:
        first = first[: first.find(". ") + 1 if 0 <= first.find(". ") < 200 else 200]
        if not first.endswith("."):
            return ""  # no sentence short enough to quote
    return f": {first.rstrip('.')}"


def shard_files_from_index(index_path: Path) -> list[Path]:
    """The shard files named by a `*.safetensors.index.json`, in a stable order."""
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{index_path} is not a valid shard index: {err}.") from err
    names = sorted(set(weight_map.values()))
    files = [index_path.parent / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"Shards named by {index_path.name} are missing: {', '.join(missing)}.")
    return files


def find_weight_files(
    folder: Path, stems: Sequence[str] = (DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS)
) -> list[Path]:
    """The weight files of a model folder: an index's shards, or the one file named by a stem."""
    folder = user_path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Model folder not found: {folder}.")
    for stem in stems:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            return shard_files_from_index(index)
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single]
        # Shards whose index went missing: stem-00001-of-00003.safetensors, ...
        shards = sorted(p for p in folder.glob(f"{stem}-*-of-*.safetensors") if p.is_file())
        if shards:
            return shards
    found = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(found) == 1:
        return found
    if found:
        names = ", ".join(p.name for p in found[:5]) + (" ..." if len(found) > 5 else "")
        raise CheckpointError(
            f"{folder} holds several unrelated weight files ({names}); pass the path of the one to load."
        )
    raise CheckpointError(f"No weight files (*.safetensors) found in {folder}.")


def resolve_weight_files(path: str | os.PathLike, stems: Sequence[str] = (DIFFUSERS_WEIGHTS,)) -> list[Path]:
    """A file, a shard index or a folder -> the list of weight files to read."""
    path = user_path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint path not found: {path}.")
    if path.is_dir():
        return find_weight_files(path, stems)
    if path.name.endswith(".index.json"):
        return shard_files_from_index(path)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{path} is not a weight file (expected one of {', '.join(WEIGHT_SUFFIXES)}).")
    return [path]


def strip_prefix(keys: Sequence[str], prefixes: Sequence[str]) -> str:
    """The first prefix every key starts with ('' if none), e.g. ComfyUI's 'model.diffusion_model.'."""
    for prefix in prefixes:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def short_list(items: Sequence[str], limit: int = 10) -> str:
    """'a, b, c and 7 more': names for an error sentence, never a wall of text."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except OSError as err:
        raise CheckpointError(f"Could not read {path}: {err.strerror}.") from err
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}.") from err
