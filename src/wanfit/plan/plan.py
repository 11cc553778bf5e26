"""The Plan: every device-dependent decision of a run, as data.

Made by the planner (wanfit.plan.planning.plan_for), printed by `wanfit plan`, stored with each
output, overridable by flags (`--set NAME=VALUE`). Model code never reads it; the pipeline and the
runtime do. Each field declares what it accepts (its `setting` metadata): `--set` is checked
against that, so the Plan's own definition is the one list of allowed values.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields

import torch

from wanfit.errors import ConfigError
from wanfit.precision import COMPUTE_DTYPES, dtype_name

# The dtype names each field takes, from the one dtype table (wanfit.precision).
COMPUTE_DTYPE_NAMES = tuple(dtype_name(d) for d in COMPUTE_DTYPES)
# Weights at rest (the DiT's, umT5's): upcast per block to the compute dtype. umT5 computes in bf16 or
# fp32 whatever its storage (it overflows in fp16).
STORAGE_DTYPE_NAMES = (*COMPUTE_DTYPE_NAMES, "float8_e4m3fn")
# Where streamed blocks come from: pinned host copies of every block (fastest), or the memory-mapped
# checkpoint through a small ring of pinned staging buffers (the least host RAM).
STREAM_SOURCES = ("pinned", "mmap")
ATTENTION_KINDS = ("self", "cross", "vae")  # the DiT's self- and cross-attention, the VAE's
DIT_SHARDINGS = ("none", "fsdp")  # the DiT whole on every process, or its blocks sharded (FSDP2)
# How LoRAs reach the DiT (wanfit.runtime.lora): merged into its weights once, merged into a copy of
# each block Linear's weight at each call (the stored weights untouched), or a low-rank branch beside
# each block Linear.
LORA_MODES = ("merge", "merge_per_call", "runtime")
# Where the base weights a merge overwrites are kept, so unload_loras restores them bit for bit: a copy
# beside them on the device (a device-to-device copy each way), on the host (a round trip over PCIe),
# or nowhere (a run that never unloads: an unload subtracts the deltas, exact to a rounding).
LORA_BASE_COPIES = ("device", "host", "none")


def _setting(kind: str, help: str, **rules) -> dict:
    """A Plan field's metadata: how `--set` reads it (kind), what it accepts, and a line of help."""
    return {"setting": {"kind": kind, "help": help, **rules}}


@dataclass(frozen=True)
class Plan:
    device: str = field(default="cpu", metadata=_setting("device", "where the DiT and VAE run"))
    compute_dtype: str = field(
        default="float32",
        metadata=_setting("dtype", "activations and matmuls of the DiT and VAE", choices=COMPUTE_DTYPE_NAMES),
    )
    # None: same as compute; "float8_e4m3fn": stored in fp8, upcast per block
    storage_dtype: str | None = field(
        default=None,
        metadata=_setting(
            "dtype",
            "the DiT's weights at rest",
            choices=STORAGE_DTYPE_NAMES,
            optional=True,
            none="same as compute",
        ),
    )
    # The attention backend the user forced (None: the planner's choice per kind, below).
    attention: str | None = field(
        default=None,
        metadata=_setting("backend", "an attention backend to force", optional=True, none="auto"),
    )
    # The backend the planner chose for each kind of attention call; the pipeline's dispatchers
    # use it (falling back, with a warning and a record, if it fails at run time).
    self_attention: str | None = field(
        default=None,
        metadata=_setting("backend", "the DiT's self-attention backend", optional=True, none="auto"),
    )
    cross_attention: str | None = field(
        default=None,
        metadata=_setting("backend", "the DiT's cross-attention backend", optional=True, none="auto"),
    )
    vae_attention: str | None = field(
        default=None, metadata=_setting("backend", "the VAE's attention backend", optional=True, none="auto")
    )
    text_encoder_device: str = field(
        default="cpu", metadata=_setting("device", "where umT5 runs (cpu, or the plan's device)")
    )
    text_encoder_dtype: str = field(
        default="float32",
        metadata=_setting(
            "dtype", "umT5's weights at rest (computed in bf16 or fp32)", choices=STORAGE_DTYPE_NAMES
        ),
    )
    free_text_encoder: bool = field(
        default=True, metadata=_setting("bool", "drop umT5 once the prompts are encoded")
    )
    # None: whole DiT on the device; k: stream blocks, k resident
    dit_blocks_resident: int | None = field(
        default=None,
        metadata=_setting(
            "int", "DiT blocks kept on the device", minimum=0, optional=True, none="all (not streamed)"
        ),
    )
    # None: the whole text encoder on text_encoder_device; k: stream its blocks, k resident
    text_encoder_blocks_resident: int | None = field(
        default=None,
        metadata=_setting(
            "int", "umT5 blocks kept on the device", minimum=0, optional=True, none="all (not streamed)"
        ),
    )
    dit_stream_source: str = field(
        default="pinned",
        metadata=_setting(
            "choice",
            "where streamed DiT blocks come from: pinned host copies, or the mapped file via staging buffers",
            choices=STREAM_SOURCES,
        ),
    )
    text_encoder_stream_source: str = field(
        default="pinned",
        metadata=_setting(
            "choice",
            "where streamed umT5 blocks come from: pinned host copies, or the mapped file via staging buffers",
            choices=STREAM_SOURCES,
        ),
    )
    offload_dit_before_decode: bool = field(
        default=False, metadata=_setting("bool", "move the DiT off the device before the VAE decode")
    )
    cfg_batch: bool = field(default=True, metadata=_setting("bool", "cond and uncond in one batch"))
    # A batch job's compatible prompts (same size, steps, guidance, ...) denoised together: the DiT
    # runs this many samples (twice as many with cfg_batch) per forward. The planner: 1 unless the
    # job has several prompts and the larger pass fits (see batching_blocker for what cannot batch).
    prompts_per_pass: int = field(
        default=1,
        metadata=_setting("int", "prompts of a batch job denoised in one DiT pass", minimum=1),
    )
    # decode tile core in latent pixels (h, w), None: untiled; exact
    vae_tile: tuple[int, int] | None = field(
        default=None,
        metadata=_setting(
            "size",
            "VAE decode tile in latent pixels, e.g. 32x32",
            minimum=4,
            parts=2,
            optional=True,
            none="untiled",
        ),
    )
    compile_dit: bool = field(
        default=False, metadata=_setting("bool", "torch.compile the DiT's blocks (resident DiT on CUDA)")
    )
    # None: the allocator as the process has it (a CPU, or PYTORCH_CUDA_ALLOC_CONF set by the user).
    cuda_expandable_segments: bool | None = field(
        default=None,
        metadata=_setting(
            "bool",
            "the CUDA caching allocator grows segments in place instead of fragmenting fixed ones",
            optional=True,
            none="as configured",
        ),
    )
    # The fast tier (--fast): lossy, opt-in, sm_89+; wanfit.runtime.fp8_linear.
    fp8_gemm: bool = field(
        default=False,
        metadata=_setting(
            "bool", "the DiT blocks' linears as fp8 GEMMs, per-row scales (lossy: the fast tier)"
        ),
    )
    attention_chunk: int | None = field(
        default=None,
        metadata=_setting(
            "int", "query rows per attention call", minimum=16, optional=True, none="whole sequence"
        ),
    )
    ffn_chunk: int | None = field(
        default=None,
        metadata=_setting("int", "tokens per FFN call", minimum=16, optional=True, none="whole sequence"),
    )
    # Exact (the same bits), so on by default: measured on an H200 (bench_dit.py --ffn-gelu-in-place,
    # 1.3B, 32,760 tokens, eager batch 1) it took the forward's peak from 4.66 to 4.23 GiB, level with
    # diffusers', at the same speed (561.9 vs 565.5 ms). Off under autograd whatever this says.
    ffn_gelu_in_place: bool = field(
        default=True,
        metadata=_setting(
            "bool", "the FFN's GELU written over ffn.0's output: one [tokens, ffn_dim] tensor less"
        ),
    )
    # wanfit.runtime.gemm_epilogue: ffn.0's GELU computed in its GEMM's epilogue (cuBLASLt, from the fp32
    # accumulator), so the separate GELU pass over the [tokens, ffn_dim] tensor (read and written once:
    # 1.2 GB a 1.3B block at 480p) is gone. The planner: on CUDA in bf16/fp16; the runtime keeps it only
    # where its smoke test finds the tanh GELU. A rounding fewer than GEMM-then-GELU, so not bit for bit
    # the same: within bf16 rounding of it. Linears with a runtime LoRA branch or an fp8 GEMM keep the
    # separate pass. Off under autograd whatever this says. Measured (benchmarks/bench_gelu_epilogue.py,
    # 2026-12-05, flash_attn4): the eager 1.3B forward 473.9 -> 462.9 ms on an H200 (batch 2: 959.6 ->
    # 945.3), 476.8 -> 464.2 on an H100; ffn.0 + GELU against fp32 math 1.7e-3 relative L2 (apart 2.6e-3).
    ffn_gelu_epilogue: bool = field(
        default=False,
        metadata=_setting("bool", "the FFN's GELU in ffn.0's GEMM epilogue (cuBLASLt): one pass fewer"),
    )
    # Exact (the same bits eagerly; compiled, Inductor's own rounding either way), so on by default: the
    # blocks' three residual updates write over their input, so one fp32 [B, L, dim] stream is alive at
    # the FFN's peak instead of the block's input, its update and the embedded tokens. Off under
    # autograd whatever this says. Compiled blocks run as two graphs per block with it (wanfit.models.dit).
    # Measured on an H200 (benchmarks/memory_peak.py, 1.3B, 32,760 tokens): the forward's peak over its
    # weights 1.298 -> 0.923 GiB eager, 1.204 -> 0.829 GiB compiled (diffusers compiled: 0.845).
    residual_in_place: bool = field(
        default=True,
        metadata=_setting(
            "bool", "the DiT blocks' residual updates written over their input: one fp32 [tokens, dim] stream"
        ),
    )
    # wanfit.runtime.fused_elementwise: eager blocks' LayerNorm + modulation and RMSNorm + RoPE as one
    # Triton kernel each. The planner: on CUDA sm_80+ with Triton when the kernels pass their smoke test
    # and the blocks run eagerly (compiled blocks fuse the torch ops themselves). Off under autograd.
    fused_elementwise: bool = field(
        default=False,
        metadata=_setting("bool", "the eager DiT blocks' norms, modulation and RoPE as fused Triton kernels"),
    )
    # (width, height, frames) when the planner had to lower the request (--allow-downscale only)
    output_size: tuple[int, int, int] | None = field(
        default=None,
        metadata=_setting(
            "size",
            "WIDTHxHEIGHTxFRAMES actually generated",
            minimum=1,
            parts=3,
            optional=True,
            none="as asked",
        ),
    )
    # Several processes, one per GPU (wanfit.plan.parallel chooses; --parallel, not --set, sets them):
    # cond and uncond on two groups of processes (CFG-parallel, 2), and the processes sharing each DiT
    # forward by token (Ulysses). Every other field is per process (per GPU).
    cfg_parallel: int = field(
        default=1, metadata=_setting("int", "CFG-parallel degree, 1 or 2 (set by --parallel)", minimum=1)
    )
    ulysses: int = field(
        default=1,
        metadata=_setting("int", "Ulysses degree, a divisor of the heads (set by --parallel)", minimum=1),
    )
    # "fsdp": each DiT block's weights sharded over every process (FSDP2), gathered block by block
    # for its forward; chosen when the DiT does not fit a GPU whole (wanfit.runtime.parallel.sharding).
    dit_sharding: str = field(
        default="none",
        metadata=_setting("choice", "the DiT's blocks sharded over the processes", choices=DIT_SHARDINGS),
    )
    # The one process that loads umT5 and encodes the prompts; it broadcasts the embeddings, the others
    # never load umT5 (None: every process encodes for itself). The planner: 0 on several processes.
    text_encoder_rank: int | None = field(
        default=None,
        metadata=_setting(
            "int", "the process that runs umT5 on several", minimum=0, optional=True, none="every process"
        ),
    )

    # None: the job has no LoRA (or none is known yet: the pipeline asks the planner's rule,
    # wanfit.plan.lora, when one is loaded).
    lora_mode: str | None = field(
        default=None,
        metadata=_setting(
            "choice",
            "how LoRAs are applied: merged into the weights once, merged into a copy of each block "
            "Linear's weight at each call, or a low-rank branch beside each block Linear",
            choices=LORA_MODES,
            optional=True,
            none="no LoRA",
        ),
    )

    # None: no LoRA, or none known yet (the pipeline then keeps the base on the host).
    lora_base_copy: str | None = field(
        default=None,
        metadata=_setting(
            "choice",
            "where the base weights of the tensors a LoRA changes are kept for unloading: the device, "
            "the host, or nowhere (the CLI never unloads)",
            choices=LORA_BASE_COPIES,
            optional=True,
            none="no LoRA",
        ),
    )

    # wanfit.runtime.lora_ffn: with the runtime branch, each FFN's two LoRA branches inside its GELU
    # pass, one Triton kernel (three passes over the [tokens, ffn_dim] tensor fewer). Off unless set
    # (CUDA sm_80+ with Triton): measured on an H200 (bench_lora.py --ffn-tiles, 2026-12-03) it saved
    # 0.15-0.19 ms of a 1.3B FFN's 0.52 ms branch alone, but no whole forward ran faster beyond the
    # noise (the kernel runs at about half its memory bound: its small dots are not hidden).
    lora_fused_ffn: bool = field(
        default=False,
        metadata=_setting(
            "bool", "the runtime LoRA branches of each FFN inside its GELU pass, one Triton kernel"
        ),
    )

    # A step cache (wanfit.sampling.step_cache): "NAME[:THRESHOLD][,OPTION=VALUE...]". Lossy, opt-in.
    cache: str | None = field(
        default=None,
        metadata=_setting(
            "cache", "skip DiT work between similar steps (lossy), e.g. magcache", optional=True, none="off"
        ),
    )

    def __post_init__(self):
        if self.cache is not None:  # one spelling in plans and metadata: 'MagCache:0.10' -> 'magcache:0.1'
            from wanfit.sampling.step_cache import canonical_spec

            object.__setattr__(self, "cache", canonical_spec(self.cache))

    @property
    def world_size(self) -> int:
        """Processes (GPUs) the plan runs on."""
        return self.cfg_parallel * self.ulysses

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        from wanfit.precision import parse_dtype

        return parse_dtype(self.compute_dtype)

    @property
    def torch_text_encoder_dtype(self) -> torch.dtype:
        from wanfit.precision import parse_dtype

        return parse_dtype(self.text_encoder_dtype)

    @property
    def fast_tier_in_place(self) -> bool:
        """Whether the fast tier's fp8 GEMMs run: asked for (fp8_gemm), with the DiT resident, whole and
        not fp8 at rest. Streamed, fp8-stored or sharded blocks run exact: their weights come and go
        per block (the streamer's or FSDP's hooks), so there are no weights to keep fp8 copies of."""
        return (
            self.fp8_gemm
            and self.dit_blocks_resident is None
            and not (self.storage_dtype or "").startswith("float8")
            and self.dit_sharding == "none"
        )

    @property
    def tier(self) -> str:
        """The speed tier: fast with the fp8 GEMMs in place, else exact (the step cache, lossy too, is
        named on its own)."""
        return "fast" if self.fast_tier_in_place else "exact"

    @property
    def batching_blocker(self) -> str | None:
        """Why this plan cannot denoise several prompts in one pass (None: it can). The step cache
        keeps one state per stream, streamed blocks and several processes are kept to one sample."""
        if self.cache is not None:
            return "a step cache is on"
        if self.dit_blocks_resident is not None:
            return "the DiT is streamed"
        if self.world_size > 1 or self.dit_sharding != "none":
            return "the run is on several processes"
        return None

    @property
    def samples_per_pass(self) -> int:
        """Prompts the pipeline denoises together under this plan (1 where batching_blocker says no)."""
        return self.prompts_per_pass if self.batching_blocker is None else 1

    def attention_for(self, kind: str) -> str | None:
        """The planned backend of one kind of attention ("self", "cross", "vae")."""
        return getattr(self, f"{kind}_attention")

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("vae_tile", "output_size"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        for name in ("vae_tile", "output_size"):
            if d.get(name) is not None:
                d[name] = tuple(d[name])
        return cls(**d)


PLAN_FIELDS = {f.name: f for f in fields(Plan)}


def _accepts(name: str) -> str:
    """What field `name` accepts, in words (for error messages and `--set` help)."""
    spec = PLAN_FIELDS[name].metadata.get("setting", {})
    kind = spec.get("kind")
    none = " or none" if spec.get("optional") and "none" not in spec.get("choices", ()) else ""
    if kind == "bool":
        return f"true or false{none}"
    if kind == "int":
        return f"a whole number of at least {spec.get('minimum', 0)}{none}"
    if kind == "size":
        example = "32x32" if spec.get("parts") == 2 else "320x192x17"
        return f"a size like {example} (each at least {spec.get('minimum', 1)}){none}"
    if kind in ("dtype", "choice"):
        return f"one of {', '.join(spec['choices'])}{none}"
    if kind == "backend":
        from wanfit.attention.backends import default_registry

        return f"auto or one of {', '.join(default_registry().names())}"
    if kind == "device":
        return "cpu, cuda, cuda:N or mps"
    if kind == "cache":
        from wanfit.sampling.step_cache import POLICIES

        return f"NAME[:THRESHOLD] with NAME one of {', '.join(POLICIES)}{none}"
    return "a value"


def parse_setting(name: str, text: str):
    """One `--set NAME=VALUE`, read and checked by the field's declared rules; ConfigError otherwise."""
    spec = PLAN_FIELDS[name].metadata.get("setting", {})
    kind = spec.get("kind")
    raw = str(text).strip()
    low = raw.lower()

    def bad() -> ConfigError:
        return ConfigError(f"Plan setting {name} takes {_accepts(name)}, got {raw!r}.")

    if kind == "choice" and low in spec["choices"]:
        return low  # before the unset words: lora_base_copy's choice "none" (keep no copy) is not unset
    if low in ("none", "null", "") or (kind == "backend" and low == "auto"):
        if spec.get("optional"):
            return None
        raise bad()
    if kind == "bool":
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise bad()
    if kind == "int":
        if not low.isdigit() or int(low) < spec.get("minimum", 0):
            raise bad()
        return int(low)
    if kind == "size":
        parts = re.split(r"[x,]", low)
        want = spec.get("parts", 2)
        if not all(p.isdigit() for p in parts) or len(parts) not in (1, want):
            raise bad()
        values = tuple(int(p) for p in parts)
        if len(values) == 1:
            if want != 2:
                raise bad()
            values = values * 2
        if min(values) < spec.get("minimum", 1):
            raise bad()
        return values
    if kind == "dtype":
        from wanfit.precision import parse_dtype

        try:
            value = dtype_name(parse_dtype(low))
        except ConfigError:
            raise bad() from None
        if value not in spec["choices"]:
            raise bad()
        return value
    if kind == "choice":
        raise bad()  # not one of its choices (those returned above)
    if kind == "backend":
        from wanfit.attention.backends import default_registry

        if low not in default_registry():
            raise bad()
        return low
    if kind == "device":
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", low):
            raise bad()
        return low
    if kind == "cache":
        from wanfit.sampling.step_cache import canonical_spec

        return canonical_spec(raw)  # its own sentence for a bad policy, threshold or option
    return raw


def parse_plan_overrides(items) -> dict:
    """['cfg_batch=false', 'vae_tile=32x32', 'dit_blocks_resident=4'] -> checked Plan field values."""
    out = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in PLAN_FIELDS:
            raise ConfigError(
                f"--set takes NAME=VALUE with NAME one of {', '.join(sorted(PLAN_FIELDS))}; got {item!r}."
            )
        out[name] = parse_setting(name, value)
    return out


def describe_setting(name: str, value) -> str:
    """A field's value for people: what None means, sizes as 32x32, booleans as true/false."""
    if value is None:
        return PLAN_FIELDS[name].metadata.get("setting", {}).get("none", "none")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return str(value)


def settings_help() -> str:
    """Every Plan field with what it accepts, for `--set` help."""
    lines = []
    for name, f in PLAN_FIELDS.items():
        spec = f.metadata.get("setting", {})
        lines.append(f"{name}: {spec.get('help', '')} ({_accepts(name)})")
    return "\n".join(lines)
