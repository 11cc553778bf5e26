"""The planner: the fastest Plan whose every phase fits the memory budget.

Input: a DeviceBudget (what the probe found; built by the caller), the Request (model, size,
frames, guidance) and the user's overrides. It starts from the fastest plan (everything resident,
the text encoder kept, cond and uncond in one batch) and gives things up in a fixed order until
each phase's estimated peak fits:

  1. the text encoder is freed after encoding (the embeddings are kept)
  2. the text encoder streams its blocks from host memory (CUDA; bf16 instead of fp32 on a CPU)
  3. classifier-free guidance runs cond and uncond one after the other
  4. the DiT leaves the device before the VAE decode
  5. an fp8 DiT file: its weights stay in fp8 as the file has them (nothing lost against the file;
     one upcast per block and call), instead of being upcast on load
  6. several processes: the DiT's blocks are sharded over them (FSDP2; then never streamed)
  7. the DiT's blocks stream from pinned host memory, k resident (k as large as the budget allows)
  8. the text encoder runs on the CPU (minutes instead of a second: a last resort)
  9. the VAE decodes in spatial tiles, smaller and smaller
  10. attention queries and FFN tokens are processed in chunks
  11. only with allow_downscale: fewer frames or a smaller size, said loudly

Each step is taken only if it lowers the estimate of a phase that does not fit. The fast tier's fp8
copies (fp8_gemm) count like any other bytes; where they would push the DiT off the device, the exact
tier's plan is taken instead, with a note (streamed or sharded blocks run exact anyway). `step_down`
gives the next notch for one phase: the OOM guard's move when a run hits out-of-memory anyway.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace

from wanfit.attention.backends import default_registry
from wanfit.errors import ConfigError, PlanError
from wanfit.models.configs import DiTConfig
from wanfit.plan.estimates import (
    GIB,
    PHASES,
    PhaseEstimate,
    Request,
    dit_file_is_fp8,
    dit_streams_from_file,
    estimate_phases,
    peak_bytes,
    text_encoder_streamed,
)
from wanfit.plan.host_estimates import HostEstimate, host_bytes, host_phases
from wanfit.plan.lora import (
    describe_lora_mode,
    device_base_copy_possible,
    lora_base_copy_rule,
    lora_mode_rule,
)
from wanfit.plan.plan import Plan, describe_setting
from wanfit.precision import compute_dtype_for, dtype_name

MIB = 1024**2
# Kept free on a CUDA card besides the estimate: the caching allocator's fragmentation, cuBLAS and
# cuDNN workspaces, and kernels' scratch, none of which max_memory_allocated shows.
CUDA_MARGIN_MIN = 512 * MIB
CUDA_MARGIN_FRACTION = 0.05  # of the card's total memory
# Kept free in host RAM (and on a CPU-only run): the OS, the Python process, the page cache.
HOST_MARGIN_MIN = 1 * GIB
HOST_MARGIN_FRACTION = 0.10  # of the free host memory

VAE_TILE_LADDER = (64, 48, 32, 24, 16, 12, 8)  # decode tile cores, latent pixels (8 video pixels each)
ATTENTION_CHUNK_LADDER = (8192, 4096, 2048, 1024, 512, 256)  # query rows per attention call
FFN_CHUNK_LADDER = (16384, 8192, 4096, 2048, 1024, 512)  # tokens per FFN call
FP8_STORAGE = "float8_e4m3fn"


class NoPlanError(PlanError):
    """No plan fits: the message names the smallest budget; the numbers are kept for --json."""

    def __init__(self, message: str, *, min_budget_bytes: int, host_bytes_needed: int, short: str):
        super().__init__(message)
        self.min_budget_bytes = min_budget_bytes
        self.host_bytes_needed = host_bytes_needed
        self.short = short


@dataclass(frozen=True)
class DeviceBudget:
    """What the planner needs to know about the machine (built by the caller from the probe)."""

    kind: str  # "cuda" | "cpu" | "mps"
    name: str
    compute_capability: tuple[int, int] | None
    total_bytes: int
    free_bytes: int
    host_free_bytes: int
    bf16_native: bool
    device: str | None = None  # the torch device string; default: kind
    attention_backend: str | None = None  # what the dispatcher picks for the DiT's self-attention
    fp16_native: bool = True  # fast fp16 (CUDA sm_70+); with bf16_native it sets the compute dtype
    compilable: bool = False  # a real CUDA device with Triton: the DiT's blocks may be compiled
    host_source: str = "MemAvailable"  # where host_free_bytes comes from (a cgroup limit, ...)
    host_self_bytes: int = 0  # this process's own memory, in use already: the estimates count it
    # What compiling cost and saved on this card, job key -> entry (wanfit.plan.compile_costs).
    compile_measured: dict | None = None
    allocator_conf: str | None = None  # PYTORCH_CUDA_ALLOC_CONF as the user set it
    # Why the fused elementwise kernels (Plan.fused_elementwise) cannot run here, None: they can;
    # fused_elementwise_declared: judged from an emulated card's declarations, not run.
    fused_elementwise_refused: str | None = "the device was not probed for them"
    fused_elementwise_declared: bool = False

    @property
    def torch_device(self) -> str:
        return self.device or self.kind

    def describe(self) -> str:
        cc = (
            f", sm_{self.compute_capability[0]}{self.compute_capability[1]}"
            if self.compute_capability
            else ""
        )
        return f"{self.name} ({self.kind}{cc}), {fmt_bytes(self.total_bytes)} total, {fmt_bytes(self.free_bytes)} free"

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.compute_capability is not None:
            d["compute_capability"] = list(self.compute_capability)
        return d


def budget_from_probe(hw, attention_backend: str | None = None) -> DeviceBudget:
    """The planner's view of a HardwareProbe (a real machine or an emulated card).

    attention_backend: what the attention dispatcher selects for the DiT's self-attention (it sets
    the workspace estimate); the caller asks the dispatcher, the planner does not.
    """
    host_free = hw.host_ram_available if hw.host_ram_available is not None else hw.free_memory
    device = hw.device_type if hw.device_index is None else f"{hw.device_type}:{hw.device_index}"
    from wanfit.runtime import fused_elementwise

    compilable = False
    if hw.device_type == "cuda" and hw.device_present and not hw.emulated:
        import importlib.util

        compilable = importlib.util.find_spec("triton") is not None
    compile_measured = None
    if compilable:
        from wanfit.plan.compile_costs import load_measured

        compile_measured = load_measured(hw)
    return DeviceBudget(
        kind=hw.device_type,
        name=hw.device_name,
        compute_capability=hw.compute_capability,
        total_bytes=hw.total_memory,
        free_bytes=hw.free_memory,
        host_free_bytes=host_free,
        bf16_native=hw.bf16_native,
        device=device if hw.device_present else hw.device_type,
        attention_backend=attention_backend,
        fp16_native=hw.fp16_native,
        compilable=compilable,
        host_source=hw.host_ram_source if hw.host_ram_available is not None else "free memory",
        host_self_bytes=hw.process_rss or 0,
        compile_measured=compile_measured,
        allocator_conf=getattr(hw, "allocator_conf", None),
        fused_elementwise_refused=fused_elementwise.status(hw),
        fused_elementwise_declared=bool(hw.emulated) or not hw.device_present,
    )


@dataclass(frozen=True)
class Budget:
    """Bytes the plan may use on the device and in host RAM, and where each number came from."""

    device_bytes: int
    host_bytes: int
    source: str
    margin_bytes: int = 0  # subtracted from free memory (0 with --vram)
    host_source: str = ""
    host_margin_bytes: int = 0  # subtracted from the free host RAM (0 with --ram)


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


# ----------------------------------------------------------------------------- user input

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": MIB,
    "mib": MIB,
    "mb": 1000**2,
    "g": GIB,
    "gib": GIB,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}


def parse_bytes(text: str, option: str = "--vram") -> int:
    """'4GiB', '6000MiB', '12GB', '1.5G', '4294967296' -> bytes. K/M/G/T alone are binary (GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"{option} must be a size like 4GiB, 6000MiB, 12GB or a number of bytes, got {text!r}."
        )
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < MIB:
        raise ConfigError(f"{option} must be at least 1MiB, got {text!r}.")
    return value


# ----------------------------------------------------------------------------- policies


def make_budget(device: DeviceBudget, vram: int | None = None, ram: int | None = None) -> Budget:
    """Free memory minus a margin (see CUDA_MARGIN_* / HOST_MARGIN_*), or the user's --vram / --ram as is.

    Host RAM: what the process may use (MemAvailable, or what a cgroup's limit leaves) plus what the
    process already holds (the host estimates count the whole process), minus a margin."""
    free = device.host_free_bytes + device.host_self_bytes
    host_margin = max(HOST_MARGIN_MIN, int(HOST_MARGIN_FRACTION * free))
    if ram is not None:
        host, host_margin, host_source = ram, 0, f"--ram {fmt_bytes(ram)}"
    else:
        host = max(0, free - host_margin)
        host_source = f"{device.host_source}, minus a {fmt_bytes(host_margin)} margin"
    hosts = {"host_source": host_source, "host_margin_bytes": host_margin}
    if vram is not None:
        host_bytes = vram if device.kind == "cpu" and ram is None else host
        return Budget(vram, host_bytes, f"--vram {fmt_bytes(vram)}", **hosts)
    if device.kind == "cpu":  # the device is the host: one budget for both
        cpu_margin = max(HOST_MARGIN_MIN, int(HOST_MARGIN_FRACTION * device.free_bytes))
        cpu = ram if ram is not None else max(0, device.free_bytes - cpu_margin)
        source = (
            host_source
            if ram is not None
            else f"free RAM {fmt_bytes(device.free_bytes)} minus a {fmt_bytes(cpu_margin)} margin"
        )
        return Budget(
            cpu, cpu, source, 0 if ram is not None else cpu_margin, source, hosts["host_margin_bytes"]
        )
    margin = max(CUDA_MARGIN_MIN, int(CUDA_MARGIN_FRACTION * device.total_bytes))
    return Budget(
        max(0, device.free_bytes - margin),
        host,
        f"free memory {fmt_bytes(device.free_bytes)} minus a {fmt_bytes(margin)} margin",
        margin,
        **hosts,
    )


def fastest_plan(device: DeviceBudget, request: Request, *, fp8: bool = False) -> Plan:
    """Everything resident, the text encoder kept on the device, CFG batched, nothing tiled."""
    dtype = dtype_name(compute_dtype_for(device.kind, device.bf16_native, device.fp16_native))
    dev = device.torch_device
    plan = Plan(
        device=dev,
        compute_dtype=dtype,
        storage_dtype=FP8_STORAGE if fp8 else None,
        text_encoder_device=dev,
        text_encoder_dtype=_text_encoder_storage(device, request),
        free_text_encoder=False,
        cfg_batch=request.guidance,
        compile_dit=False,  # decided once the plan is known (compile_decision): when it pays
        cuda_expandable_segments=expandable_segments_for(device),
    )
    # Decided again once the plan is known (a user's dtype may refuse it): see plan_run.
    return replace(plan, ffn_gelu_epilogue=gelu_epilogue_refused(device, plan) is None)


def expandable_segments_for(device: DeviceBudget) -> bool | None:
    """On CUDA, the caching allocator's expandable segments, unless the user configured the allocator:
    with fixed segments the blocks freed by one phase (umT5's, streamed) and by each step's
    differently sized activations fragment the cache, and a plan that fits by its allocated bytes runs
    out of reserved memory (H200, --emulate rtx3060-laptop: out of memory at step 0 with 4.9 GiB
    allocated of 5.8; t4 14B: 10.9 GiB allocated, 14.4 reserved; none with expandable segments)."""
    if device.kind != "cuda" or device.allocator_conf is not None:
        return None
    return True


def _text_encoder_storage(device: DeviceBudget, request: Request) -> str:
    """umT5's weights as its file has them when that is half precision or fp8 (nothing converted, nothing
    lost: it computes in bf16 or fp32 whatever they are), else bf16: half the 22.7 GB of fp32. On a CPU,
    fp32 (its fast kernels) unless the file is smaller."""
    file_dtype = request.text_encoder_file_dtype
    if file_dtype in ("float16", FP8_STORAGE):
        return file_dtype
    return "float32" if device.kind == "cpu" else "bfloat16"


def compile_decision(device: DeviceBudget, request: Request, plan: Plan, *, fused_eager: bool = False):
    """(compile the DiT's blocks?, the CompileCosts it rests on or None): only a resident DiT on a
    compilable card; the fast tier always (its quantisation is fused only when compiled); otherwise
    when steps x the saving per step beats the compile (wanfit.plan.compile_costs). fused_eager: the
    eager blocks would run the fused elementwise kernels, which leave compiling less to save."""
    from wanfit.plan import compile_costs

    resident = plan.dit_blocks_resident is None and plan.storage_dtype is None and plan.dit_sharding != "fsdp"
    if not (device.compilable and resident):
        return False, None
    if plan.fp8_gemm:
        return True, None
    key, work = compile_costs.job(
        request.config,
        request.tokens,
        guidance=request.guidance,
        cfg_batch=plan.cfg_batch,
        dtype=plan.compute_dtype,
    )
    costs = compile_costs.costs_for(device.compile_measured, key, work, fused_eager=fused_eager)
    return costs.pays(request_steps(request)), costs


def fused_elementwise_decision(device: DeviceBudget, plan: Plan) -> bool:
    """The fused elementwise kernels where they run (device.fused_elementwise_refused is None) and the
    blocks run eagerly: compiled blocks get the same fusion from Inductor, from the torch ops."""
    return device.fused_elementwise_refused is None and not plan.compile_dit


def gelu_epilogue_refused(device: DeviceBudget, plan: Plan) -> str | None:
    """Why ffn.0's GEMM cannot apply the GELU here (Plan.ffn_gelu_epilogue), None: it can. cuBLASLt's
    epilogue is CUDA's; on the CPU the same op applies the erf GELU, not Wan's tanh one."""
    if device.kind != "cuda":
        return f"the GELU epilogue is cuBLASLt's, and this plan runs on {device.kind}"
    if plan.compute_dtype not in ("bfloat16", "float16"):
        return f"the GELU epilogue is planned for bf16/fp16 GEMMs, and this plan computes in {plan.compute_dtype}"
    return None


def request_steps(request: Request) -> int:
    """The job's denoising steps: as asked, else the sampler's default."""
    from wanfit.pipeline import SamplingDefaults

    return request.steps if request.steps is not None else SamplingDefaults.num_inference_steps


# ----------------------------------------------------------------------------- notches


@dataclass(frozen=True)
class Knob:
    """One thing the planner can give up, as successive plans from the current setting downward."""

    name: str
    fields: frozenset[str]
    candidates: Callable[[Plan, Request], list[Plan]]
    opt_in: str | None = None  # a lossy step taken only when the user set this field (their opt-in)

    def usable(self, frozen: frozenset[str]) -> bool:
        """Whether the planner may take this step: no user-set field of it, the user's opt-in if it needs one."""
        return not self.fields & frozen and (self.opt_in is None or self.opt_in in frozen)


def _is_cuda(plan: Plan) -> bool:
    return plan.device.startswith("cuda")


def _free_text_encoder(plan: Plan, request: Request) -> list[Plan]:
    return [] if plan.free_text_encoder else [replace(plan, free_text_encoder=True)]


def _text_encoder_bf16(plan: Plan, request: Request) -> list[Plan]:
    """A CPU run: bf16 halves the encoder's 22.7 GB of fp32 (umT5 overflows in fp16)."""
    if plan.device == "cpu" and plan.text_encoder_dtype == "float32":
        return [replace(plan, text_encoder_dtype="bfloat16")]
    return []


def _stream_text_encoder(plan: Plan, request: Request) -> list[Plan]:
    if (
        not _is_cuda(plan)
        or plan.text_encoder_device == "cpu"
        or plan.text_encoder_blocks_resident is not None
    ):
        return []
    return [replace(plan, text_encoder_blocks_resident=0)]


def _text_encoder_on_cpu(plan: Plan, request: Request) -> list[Plan]:
    if plan.device == "cpu" or plan.text_encoder_device == "cpu":
        return []
    return [replace(plan, text_encoder_device="cpu", text_encoder_blocks_resident=None)]


def _sequential_cfg(plan: Plan, request: Request) -> list[Plan]:
    return [replace(plan, cfg_batch=False)] if plan.cfg_batch else []


def _offload_dit(plan: Plan, request: Request) -> list[Plan]:
    return [] if plan.offload_dit_before_decode else [replace(plan, offload_dit_before_decode=True)]


def _lora_base_to_host(plan: Plan, request: Request) -> list[Plan]:
    """The LoRAs' base copy moved off the GPU (unloading then copies it back over PCIe)."""
    return [replace(plan, lora_base_copy="host")] if plan.lora_base_copy == "device" else []


def _exact_tier(plan: Plan, request: Request) -> list[Plan]:
    """The fast tier's fp8 copies of the block weights given back (exact GEMMs). Before streaming or
    sharding, which would take the tier out of place anyway and cost more."""
    return [replace(plan, fp8_gemm=False)] if plan.fast_tier_in_place else []


def _dit_fp8_as_file(plan: Plan, request: Request) -> list[Plan]:
    """An fp8 DiT file: keep its weights in fp8 (1 byte per weight on the host and the device, the
    file's own bytes and scales) rather than upcast them on load; lossless against the file, and
    cheaper than sharding or streaming the blocks (an upcast per block and call)."""
    if not dit_file_is_fp8(request) or plan.storage_dtype is not None or plan.dit_sharding != "none":
        return []
    return [replace(plan, storage_dtype=FP8_STORAGE)]


def _shard_dit(plan: Plan, request: Request) -> list[Plan]:
    """Several processes: each keeps 1/world of the blocks (FSDP2), faster than streaming them from
    the host (an all-gather over NVLink per block against a copy over PCIe). Not with LoRAs, which a
    sharded DiT cannot take yet (it streams instead)."""
    if (
        request.loras is not None
        or plan.world_size == 1
        or plan.dit_sharding != "none"
        or plan.dit_blocks_resident is not None
        or plan.storage_dtype is not None
    ):
        return []
    return [replace(plan, dit_sharding="fsdp")]


def _stream_dit(plan: Plan, request: Request) -> list[Plan]:
    if not _is_cuda(plan) or plan.dit_sharding != "none":  # a sharded DiT is not streamed too
        return []
    n = request.config.num_layers
    k = plan.dit_blocks_resident
    ladder = []
    k = n if k is None else k
    while k > 0:
        k //= 2
        ladder.append(replace(plan, dit_blocks_resident=k))
    return ladder


def _text_encoder_fp8(plan: Plan, request: Request) -> list[Plan]:
    """With fp8 DiT storage (--fp8, the user's opt-in to its small loss: the knob's opt_in), umT5 may
    be stored in fp8 too."""
    if plan.storage_dtype == FP8_STORAGE and plan.text_encoder_dtype != FP8_STORAGE:
        return [replace(plan, text_encoder_dtype=FP8_STORAGE)]
    return []


def _text_encoder_from_file(plan: Plan, request: Request) -> list[Plan]:
    if text_encoder_streamed(plan) and plan.text_encoder_stream_source != "mmap":
        return [replace(plan, text_encoder_stream_source="mmap")]
    return []


def _dit_from_file(plan: Plan, request: Request) -> list[Plan]:
    candidate = replace(plan, dit_stream_source="mmap")
    return [candidate] if plan.dit_stream_source != "mmap" and dit_streams_from_file(candidate) else []


def _vae_tiles(plan: Plan, request: Request) -> list[Plan]:
    current = min(plan.vae_tile) if plan.vae_tile else math.inf
    return [replace(plan, vae_tile=(t, t)) for t in VAE_TILE_LADDER if t < current]


def _attention_chunks(plan: Plan, request: Request) -> list[Plan]:
    current = plan.attention_chunk or math.inf
    return [replace(plan, attention_chunk=c) for c in ATTENTION_CHUNK_LADDER if c < current]


def _ffn_chunks(plan: Plan, request: Request) -> list[Plan]:
    current = plan.ffn_chunk or math.inf
    return [replace(plan, ffn_chunk=c) for c in FFN_CHUNK_LADDER if c < current]


_TEXT_ENCODER_FIELDS = frozenset(
    {"text_encoder_device", "text_encoder_blocks_resident", "text_encoder_dtype"}
)

# The give-up order (see the module docstring); the CPU text encoder comes after DiT streaming
# because streaming umT5 costs about a second and running it on a CPU minutes.
KNOBS: tuple[Knob, ...] = (
    Knob("free_text_encoder", frozenset({"free_text_encoder"}), _free_text_encoder),
    Knob("stream_text_encoder", _TEXT_ENCODER_FIELDS, _stream_text_encoder),
    Knob("text_encoder_bf16", _TEXT_ENCODER_FIELDS, _text_encoder_bf16),
    Knob("text_encoder_fp8", _TEXT_ENCODER_FIELDS, _text_encoder_fp8, opt_in="storage_dtype"),
    Knob("sequential_cfg", frozenset({"cfg_batch"}), _sequential_cfg),
    Knob("offload_dit_before_decode", frozenset({"offload_dit_before_decode"}), _offload_dit),
    Knob("dit_fp8_as_file", frozenset({"storage_dtype"}), _dit_fp8_as_file),
    Knob("shard_dit", frozenset({"dit_sharding"}), _shard_dit),
    Knob("stream_dit_blocks", frozenset({"dit_blocks_resident"}), _stream_dit),
    Knob("text_encoder_on_cpu", _TEXT_ENCODER_FIELDS, _text_encoder_on_cpu),
    Knob("vae_tiling", frozenset({"vae_tile"}), _vae_tiles),
    Knob("attention_chunking", frozenset({"attention_chunk"}), _attention_chunks),
    Knob("ffn_chunking", frozenset({"ffn_chunk"}), _ffn_chunks),
)


# Out-of-memory recovery's notches: the planner's, with the fast tier given up before the DiT is
# kept in fp8, sharded or streamed (which would take it out of place anyway, and cost more). The
# planner's search does not need it: it plans the tier only where its copies fit (_search_tiers). No
# user field guards it: --fast asks for the tier where it fits.
def _recovery_knobs() -> tuple[Knob, ...]:
    # The LoRAs' base copy leaves the GPU first: it costs nothing per step.
    knobs = [Knob("lora_base_to_host", frozenset({"lora_base_copy"}), _lora_base_to_host), *KNOBS]
    # fp8 storage takes the tier out of place too: the tier goes first.
    at = next(i for i, knob in enumerate(knobs) if knob.name in ("dit_fp8_as_file", "shard_dit"))
    knobs.insert(at, Knob("exact_tier", frozenset(), _exact_tier))
    return tuple(knobs)


RECOVERY_KNOBS = _recovery_knobs()


# What the planner gives up for host RAM alone (when pinned copies of streamed blocks do not fit):
# streaming umT5 from its mapped file costs a little once per prompt; freeing it, a reload for the
# next prompt; streaming the DiT from its file, host reads every step.
HOST_KNOBS: tuple[Knob, ...] = (
    Knob("text_encoder_from_file", frozenset({"text_encoder_stream_source"}), _text_encoder_from_file),
    Knob("free_text_encoder", frozenset({"free_text_encoder"}), _free_text_encoder),
    Knob("dit_from_file", frozenset({"dit_stream_source"}), _dit_from_file),
)
_SOURCE_KNOBS = {"text_encoder_from_file": "text_encoder_stream_source", "dit_from_file": "dit_stream_source"}


def _lowers(before: dict[str, PhaseEstimate], after: dict[str, PhaseEstimate], phase: str | None) -> bool:
    names = PHASES if phase is None else (phase,)
    return any(after[p].peak < before[p].peak for p in names)


def step_down(
    plan: Plan,
    request: Request | None = None,
    phase: str | None = None,
    *,
    frozen: Iterable[str] = (),
    host_budget: int | None = None,
) -> Plan | None:
    """The next notch down for `phase` (or any phase): the first give-up step, in the planner's order,
    that lowers that phase's estimated peak, leaving the `frozen` (user-set) fields alone; None when
    nothing is left to give up. The attention workspace is the plan's own backends'. With
    `host_budget` (bytes), a notch must fit the host RAM too (streaming from the mapped files, or
    freeing umT5, where pinned copies would not).

    Streaming halves the resident block count each notch (None -> n/2 -> ... -> 0).
    """
    request = request or default_request()
    backend = planned_backend(plan)
    frozen = frozenset(frozen)
    before = estimate_phases(request, plan, backend)
    for knob in RECOVERY_KNOBS:
        if not knob.usable(frozen):
            continue
        for candidate in knob.candidates(plan, request):
            if _lowers(before, estimate_phases(request, candidate, backend), phase):
                if host_budget is None:
                    return _exact_attention_off_the_fast_tier(candidate, frozen)
                budget = Budget(1 << 62, host_budget, "")  # the device: the notch already lowers it
                fitted = _host_fit(request, candidate, budget, backend, frozen)
                if fitted is not None:
                    return _exact_attention_off_the_fast_tier(fitted[0], frozen)
                break  # this knob costs host RAM that is not there: try the next one
    return None


def _exact_attention_off_the_fast_tier(plan: Plan, frozen: frozenset[str]) -> Plan:
    """A lossy self-attention belongs to the fast tier only: a notch that takes the tier out of place
    (streamed blocks, fp8 storage) hands the self-attention back to the exact ranking ("auto"),
    unless the user chose that backend."""
    name = plan.self_attention
    registry = default_registry()
    if plan.fast_tier_in_place or name is None or "self_attention" in frozen or name not in registry:
        return plan
    return plan if registry[name].exact else replace(plan, self_attention=None)


def blocking_setting(plan: Plan, request: Request, phase: str | None, frozen: Iterable[str]) -> str | None:
    """When nothing but a user-set field could lower `phase`: the first such field, else None."""
    if step_down(plan, request, phase, frozen=frozen) is not None:
        return None
    freed = step_down(plan, request, phase)
    if freed is None:
        return None
    before, after = plan.to_dict(), freed.to_dict()
    return next((name for name in sorted(frozenset(frozen)) if before[name] != after[name]), None)


def planned_backend(plan: Plan) -> str:
    """The self-attention backend the plan's estimates assume (unknown: a fused, linear-memory kernel)."""
    return plan.self_attention or plan.attention or "sdpa_flash"


def default_request(config: DiTConfig | None = None) -> Request:
    from wanfit.models.configs import WAN_T2V_1_3B

    return Request(config or WAN_T2V_1_3B)


# ----------------------------------------------------------------------------- the search


@dataclass(frozen=True)
class PlanResult:
    """The chosen plan with its predicted peaks, the budget it was made for and why."""

    plan: Plan
    request: Request
    device: DeviceBudget
    budget: Budget
    phases: dict[str, PhaseEstimate]
    host_bytes: int
    attention_backend: str
    notes: tuple[str, ...] = ()
    host_phases: dict[str, HostEstimate] = field(default_factory=dict)  # each phase's host RAM
    requested: Request | None = None  # the original request when it was downscaled
    steps: tuple[str, ...] = field(default_factory=tuple)  # what was given up, in order
    frozen: frozenset[str] = frozenset()  # the fields the user set: never given up, also on OOM
    hardware: object = (
        None  # the HardwareProbe planned for (plan_for sets it; the pipeline's dispatchers use it)
    )
    lora_summary: str | None = None  # how the job's LoRAs are applied and why (None: no LoRA)

    @property
    def peak_bytes(self) -> int:
        return peak_bytes(self.phases)

    def to_dict(self) -> dict:
        req = self.request
        return {
            "feasible": True,
            "peak_bytes": self.peak_bytes,
            "budget_bytes": self.budget.device_bytes,
            "budget_source": self.budget.source,
            "host_bytes": self.host_bytes,
            "host_budget_bytes": self.budget.host_bytes,
            "host_budget_source": self.budget.host_source,
            "host_phases": {name: p.to_dict() for name, p in self.host_phases.items()},
            "phases": {name: p.to_dict() for name, p in self.phases.items()},
            "settings": self.plan.to_dict(),
            "attention_backend": self.attention_backend,
            "request": {
                "model": req.model_name,
                "width": req.width,
                "height": req.height,
                "frames": req.num_frames,
                "guidance": req.guidance,
                "tokens": req.tokens,
                "loras": None if req.loras is None else req.loras.to_dict(),
            },
            "downscaled": self.requested is not None,
            "gave_up": list(self.steps),
            "user_set": sorted(self.frozen),
            "device": self.device.to_dict(),
            "notes": list(self.notes),
            "lora_summary": self.lora_summary,
        }

    def summary(self) -> str:
        lines = [
            f"plan for {self.request.describe()}",
            f"device: {self.device.describe()}",
            f"budget: {fmt_bytes(self.budget.device_bytes)} ({self.budget.source})",
            f"host RAM: needs {fmt_bytes(self.host_bytes)} of {fmt_bytes(self.budget.host_bytes)} "
            f"({self.budget.host_source})",
            f"compute dtype {self.plan.compute_dtype}; attention: self {self.plan.self_attention or self.attention_backend}, "
            f"cross {self.plan.cross_attention or self.attention_backend}, VAE {self.plan.vae_attention or self.attention_backend}",
            *([self.lora_summary] if self.lora_summary else []),
            "",
            f"{'phase':<14}{'weights':>12}{'activations':>13}{'workspace':>12}{'cache':>12}{'peak':>12}",
        ]
        for name, p in self.phases.items():
            lines.append(
                f"{name:<14}{fmt_bytes(p.weights):>12}{fmt_bytes(p.activations):>13}"
                f"{fmt_bytes(p.workspace):>12}{fmt_bytes(p.cache):>12}{fmt_bytes(p.peak):>12}"
            )
        if self.host_phases:
            lines += [
                "",
                f"{'host RAM':<14}{'process':>12}{'pinned':>12}{'other':>12}{'mapped':>12}{'needed':>12}"
                f"{'+ cache':>12}",
            ]
            for name, h in self.host_phases.items():
                lines.append(
                    f"{name:<14}{fmt_bytes(h.process):>12}{fmt_bytes(h.pinned):>12}{fmt_bytes(h.anon):>12}"
                    f"{fmt_bytes(h.mapped):>12}{fmt_bytes(h.needed):>12}{fmt_bytes(h.peak):>12}"
                )
        lines += self._fast_tier_lines()
        lines += ["", f"predicted peak {fmt_bytes(self.peak_bytes)} of {fmt_bytes(self.budget.device_bytes)}"]
        lines.append("gave up: " + (", ".join(self.steps) if self.steps else "nothing (fastest plan)"))
        lines.append("settings (* set by you):")
        lines += [
            f"  {k}: {describe_setting(k, v)}{' *' if k in self.frozen else ''}"
            for k, v in self.plan.to_dict().items()
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _fast_tier_lines(self) -> list[str]:
        """Where the fast tier's bytes sit in the table above (none when it is not in place)."""
        held = [name for name, p in self.phases.items() if p.detail.get("fp8_gemms")]
        if not held:
            return []
        denoise = self.phases["denoise"].detail
        how = "compiled" if self.plan.compile_dit else "eager"
        return [
            "",
            f"fast tier: the fp8 copies of the DiT blocks' linears and their scales add "
            f"{fmt_bytes(denoise['fp8_gemms'])} to the weights of {', '.join(held)}; its GEMMs' buffers "
            f"({how}) raise a DiT forward's peak by {fmt_bytes(denoise['fp8_gemm_buffers'])}",
        ]


def _fits(phases: dict[str, PhaseEstimate], budget: Budget) -> str | None:
    """The first phase over budget, or None."""
    return next((name for name in PHASES if phases[name].peak > budget.device_bytes), None)


def _host_fit(
    request: Request, plan: Plan, budget: Budget, backend: str, frozen: frozenset[str]
) -> tuple[Plan, list[str]] | None:
    """`plan`, or its nearest variant that fits the host RAM (HOST_KNOBS in order, each only if it
    lowers the need and raises no device phase above the budget and its peak before), with the knobs
    taken; None if none fits."""
    need, taken = host_bytes(request, plan), []
    phases = estimate_phases(request, plan, backend)
    for knob in HOST_KNOBS:
        if need <= budget.host_bytes:
            break
        if not knob.usable(frozen):
            continue
        for candidate in knob.candidates(plan, request):
            cand_need = host_bytes(request, candidate)
            cand_phases = estimate_phases(request, candidate, backend)
            worse = any(cand_phases[p].peak > max(phases[p].peak, budget.device_bytes) for p in PHASES)
            if cand_need < need and not worse:
                plan, need, phases = candidate, cand_need, cand_phases
                taken.append(knob.name)
                break
    return (plan, taken) if need <= budget.host_bytes else None


def _faster_sources(
    request: Request, plan: Plan, budget: Budget, backend: str, frozen: frozenset[str]
) -> Plan:
    """Pinned copies again where the host RAM allows (the DiT first: it streams every step)."""
    for name in ("dit_stream_source", "text_encoder_stream_source"):
        if name in frozen or getattr(plan, name) == "pinned":
            continue
        candidate = replace(plan, **{name: "pinned"})
        if host_bytes(request, candidate) <= budget.host_bytes:
            if _fits(estimate_phases(request, candidate, backend), budget) is None:
                plan = candidate
    return plan


def _best_resident_count(
    plan: Plan, request: Request, backend: str, budget: Budget, low: int, frozen: frozenset[str] = frozenset()
) -> tuple[Plan, list[str]] | None:
    """The plan with the most resident DiT blocks (>= low) that fits the device and the host (with the
    host knobs it takes), or None.

    Moving the DiT off the device before the decode (a one-time copy) is allowed when it lets more
    blocks stay resident through all the denoising steps.
    """
    n = request.config.num_layers
    variants = [plan]
    if not plan.offload_dit_before_decode and "offload_dit_before_decode" not in frozen:
        variants.append(replace(plan, offload_dit_before_decode=True))
    for k in range(n - 3, low - 1, -1):  # k + 2 < n, else streaming saves nothing
        for variant in variants:
            candidate = replace(variant, dit_blocks_resident=k)
            if _fits(estimate_phases(request, candidate, backend), budget) is None:
                return _host_fit(request, candidate, budget, backend, frozen)
    return None


def _search(
    request: Request, base: Plan, budget: Budget, backend: str, frozen: frozenset[str]
) -> tuple[Plan, dict[str, PhaseEstimate], list[str], bool]:
    """Give things up until every phase fits: (plan, phases, steps, fits).

    A step is taken only if it lowers the first failing phase and its host RAM need fits (streaming
    from the mapped files, or freeing umT5, where the pinned copies would not).
    """
    plan = base
    phases = estimate_phases(request, plan, backend)
    taken: list[str] = []
    while (failing := _fits(phases, budget)) is not None:
        nxt = None
        for knob in KNOBS:
            if not knob.usable(frozen):
                continue
            for candidate in knob.candidates(plan, request):
                cand_phases = estimate_phases(request, candidate, backend)
                if not _lowers(phases, cand_phases, failing):
                    continue
                fitted = None
                if knob.name == "stream_dit_blocks" and plan.dit_blocks_resident is None:
                    # k from the budget: the most resident blocks that fit, else all streamed.
                    fitted = _best_resident_count(candidate, request, backend, budget, 0, frozen)
                    if fitted is None:
                        candidate = replace(candidate, dit_blocks_resident=0)
                if fitted is None:
                    fitted = _host_fit(request, candidate, budget, backend, frozen)
                if fitted is None:
                    break  # this knob costs host RAM that is not there: try the next one
                candidate, host_steps = fitted
                nxt = (knob.name, candidate, estimate_phases(request, candidate, backend), host_steps)
                break
            if nxt:
                break
        if nxt is None:
            return plan, phases, [], False
        name, plan, phases, host_steps = nxt
        taken += [n for n in (name, *host_steps) if n not in taken]
    if plan.dit_blocks_resident is not None and "dit_blocks_resident" not in frozen:
        better = _best_resident_count(plan, request, backend, budget, plan.dit_blocks_resident + 1, frozen)
        if better is not None:
            plan = better[0]
            taken += [n for n in better[1] if n not in taken]
    fitted = _host_fit(request, plan, budget, backend, frozen)
    if fitted is None:
        return plan, phases, [], False
    plan = _faster_sources(request, fitted[0], budget, backend, frozen)
    taken += [n for n in fitted[1] if n not in taken]
    taken = [n for n in taken if n not in _SOURCE_KNOBS or getattr(plan, _SOURCE_KNOBS[n]) == "mmap"]
    phases = estimate_phases(request, plan, backend)
    if plan.offload_dit_before_decode and not base.offload_dit_before_decode:
        if "offload_dit_before_decode" not in taken:  # chosen with the resident block count
            taken.append("offload_dit_before_decode")
    order = [knob.name for knob in KNOBS + HOST_KNOBS]
    return plan, phases, sorted(taken, key=order.index), True


def _search_tiers(
    request: Request, base: Plan, budget: Budget, backend: str, frozen: frozenset[str]
) -> tuple[Plan, dict[str, PhaseEstimate], list[str], bool, str | None]:
    """_search, with the fast tier's fp8 copies counted; where they would push the DiT off the device
    (streamed or sharded, whose blocks run exact anyway), the exact tier's plan instead: resident, with
    a note saying why the fast tier was declined, or streamed or sharded as well, the fast tier still
    asked for (the plan's notes say its blocks run exact). (plan, phases, steps, fits, note)."""
    plan, phases, steps, fits = _search(request, base, budget, backend, frozen)
    if not base.fast_tier_in_place or (fits and plan.fast_tier_in_place):
        return plan, phases, steps, fits, None
    exact_plan, exact_phases, exact_steps, exact_fits = _search(
        request, replace(base, fp8_gemm=False), budget, backend, frozen
    )
    if not exact_fits:
        return plan, phases, steps, fits, None
    if not replace(exact_plan, fp8_gemm=True).fast_tier_in_place:
        return replace(exact_plan, fp8_gemm=True), exact_phases, exact_steps, True, None
    fast = estimate_phases(request, replace(exact_plan, fp8_gemm=True), backend)["denoise"].detail
    note = (
        f"the fast tier's fp8 copies of the DiT blocks' linears ({fmt_bytes(fast['fp8_gemms'])}) and its GEMM "
        f"buffers ({fmt_bytes(fast['fp8_gemm_buffers'])}) do not fit beside the resident DiT in "
        f"{fmt_bytes(budget.device_bytes)} (streamed blocks would run exact anyway): running exact."
    )
    return exact_plan, exact_phases, exact_steps, True, note


def _text_encoder_rank(plan: Plan, user_set: bool) -> Plan:
    """On several processes umT5 runs on one (rank 0, which decodes too), the others receive the
    embeddings and never load it; ConfigError for a rank the run does not have."""
    rank = plan.text_encoder_rank
    if rank is not None and rank >= plan.world_size:
        raise ConfigError(
            f"text_encoder_rank {rank} is not a process of this run of {plan.world_size}; give 0 to "
            f"{plan.world_size - 1} or none."
        )
    if plan.world_size > 1 and not user_set:
        return replace(plan, text_encoder_rank=0)
    return plan


def _check_sharding(plan: Plan) -> None:
    """ConfigError for a sharded DiT this plan cannot run (one process; fp8 storage or streaming)."""
    if plan.dit_sharding == "none":
        return
    if plan.world_size == 1:
        raise ConfigError(
            "dit_sharding=fsdp shards the DiT over the processes of a run on several GPUs; give --gpus N "
            "or --parallel."
        )
    if plan.storage_dtype is not None or plan.dit_blocks_resident is not None:
        raise ConfigError(
            "dit_sharding=fsdp keeps the DiT's blocks sharded in the compute dtype; it does not combine "
            "with fp8 storage or dit_blocks_resident (streaming)."
        )


def _check_loras(plan: Plan, request: Request) -> None:
    """ConfigError for LoRAs on a DiT the user had sharded (the runtime cannot apply them there)."""
    if request.loras is not None and plan.dit_sharding == "fsdp":
        raise ConfigError(
            "LoRAs cannot be applied to a DiT sharded across processes (dit_sharding=fsdp) yet; drop --lora "
            "or dit_sharding=fsdp (the planner then streams the DiT's blocks where it does not fit a GPU)."
        )


def _with_lora_mode(plan: Plan, request: Request, frozen: frozenset[str]) -> Plan:
    """The plan with its LoRA mode recorded: the user's (every mode runs on every plan that takes
    LoRAs: a merge writes into the streamer's or the fp8 copies), else the rule's; None without LoRAs."""
    if request.loras is None or "lora_mode" in frozen:
        return plan
    return replace(plan, lora_mode=lora_mode_rule(plan)[0])


def _check_lora_fused_ffn(plan: Plan, device: DeviceBudget) -> None:
    """Plan.lora_fused_ffn is the user's alone (off unless set: on the H200 it did not pay, see the
    field); a `true` where the kernels cannot run is refused in one sentence."""
    refused = device.fused_elementwise_refused
    if plan.lora_fused_ffn and refused is not None:
        raise ConfigError(
            f"--set lora_fused_ffn=true was asked for, but {refused.replace('elementwise kernels', 'kernels')}."
        )
    if plan.lora_fused_ffn and plan.lora_mode not in (None, "runtime"):
        raise ConfigError(
            "--set lora_fused_ffn=true fuses the runtime LoRA branches, but this plan applies the LoRAs "
            f"as {plan.lora_mode}; add --set lora_mode=runtime to run the branches."
        )


def lora_base_copy_choice(request: Request, plan: Plan, budget: Budget, backend: str) -> str:
    """Where `plan` keeps the base weights its LoRAs change (Plan.lora_base_copy): the rule's answer,
    the GPU only where the plan's phases still fit `budget` with that copy there."""
    fits = device_base_copy_possible(plan) and (
        _fits(estimate_phases(request, replace(plan, lora_base_copy="device"), backend), budget) is None
    )
    return lora_base_copy_rule(request, plan, fits)


def _with_lora_base_copy(
    plan: Plan, request: Request, budget: Budget, backend: str, frozen: frozenset[str]
) -> Plan:
    if request.loras is None or "lora_base_copy" in frozen:
        return plan
    return replace(plan, lora_base_copy=lora_base_copy_choice(request, plan, budget, backend))


def _leanest(request: Request, base: Plan, backend: str, frozen: frozenset[str]) -> Plan:
    """Everything given up that lowers some phase: the smallest plan there is."""
    plan = base
    while (nxt := step_down(plan, request, None, frozen=frozen)) is not None:
        plan = nxt
    return plan


def _downscaled_requests(request: Request) -> list[Request]:
    """Smaller videos, largest first: fewer latent frames (halving) and sizes down to a quarter."""
    frames = []
    t = request.latent_frames
    while t >= 1:
        frames.append(4 * (t - 1) + 1)
        t = t // 2 if t > 1 else 0
    sizes = []
    for scale in (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25):
        w = max(16, int(request.width * scale) // 16 * 16)
        h = max(16, int(request.height * scale) // 16 * 16)
        if (w, h) not in sizes:
            sizes.append((w, h))
    out = [request.resized(w, h, f) for (w, h) in sizes for f in frames]
    out = [
        r
        for r in out
        if (r.width, r.height, r.num_frames) != (request.width, request.height, request.num_frames)
    ]
    return sorted(out, key=lambda r: -(r.width * r.height * r.num_frames))


def plan_run(
    device: DeviceBudget,
    request: Request,
    *,
    vram: int | None = None,
    overrides: dict | None = None,
    allow_downscale: bool = False,
    fp8: bool = False,
    attention: dict[str, str] | None = None,
    ram: int | None = None,
) -> PlanResult:
    """The fastest plan that fits; PlanError naming the smallest budget that would work otherwise.

    overrides: user-set Plan fields (frozen: never given up); attention: the backend the dispatcher
    selected for each kind ("self", "cross", "vae"), which sets the workspace estimates; vram / ram:
    the device and host budgets to use instead of what is free.
    """
    overrides = dict(overrides or {})
    unknown = set(overrides) - {f.name for f in fields(Plan)}
    if unknown:
        raise ConfigError(f"Unknown plan settings: {', '.join(sorted(unknown))}.")
    attention = dict(attention or {})
    if device.attention_backend and "self" not in attention:
        attention["self"] = device.attention_backend
    budget = make_budget(device, vram, ram)
    chosen_backends = {f"{kind}_attention": name for kind, name in attention.items() if name}
    base = replace(fastest_plan(device, request, fp8=fp8), **{**chosen_backends, **overrides})
    base = _text_encoder_rank(base, "text_encoder_rank" in overrides)
    _check_sharding(base)
    _check_loras(base, request)
    frozen = frozenset(overrides) | ({"storage_dtype"} if fp8 else frozenset())
    if base.fp8_gemm and "compile_dit" not in frozen:
        # Whether the fast tier's blocks compile sets its GEMMs' buffers (the quantisation fused or not).
        base = replace(base, compile_dit=compile_decision(device, request, base)[0])
    backend = planned_backend(base)
    notes = _notes(device, budget, base, vram)

    plan, phases, steps, fits, tier_note = _search_tiers(request, base, budget, backend, frozen)
    chosen, requested = request, None
    if not fits and allow_downscale:
        for smaller in _downscaled_requests(request):
            plan, phases, steps, fits, tier_note = _search_tiers(smaller, base, budget, backend, frozen)
            if fits:
                chosen, requested = smaller, request
                plan = replace(plan, output_size=(smaller.width, smaller.height, smaller.num_frames))
                notes.insert(
                    0,
                    f"DOWNSCALED: {request.width}x{request.height}x{request.num_frames} does not fit "
                    f"{fmt_bytes(budget.device_bytes)}; planning {smaller.width}x{smaller.height}x"
                    f"{smaller.num_frames} instead (--allow-downscale).",
                )
                break
    if not fits:
        raise _no_plan_error(request, base, budget, backend, frozen, allow_downscale)
    if tier_note:
        notes.append(tier_note)
    compile_costs = None
    if "compile_dit" not in frozen:
        # Eager, the blocks would run the fused kernels unless they cannot here or the user said no.
        fused_eager = device.fused_elementwise_refused is None and (
            "fused_elementwise" not in frozen or plan.fused_elementwise
        )
        compile_dit, compile_costs = compile_decision(device, chosen, plan, fused_eager=fused_eager)
        plan = replace(plan, compile_dit=compile_dit)
    if "fused_elementwise" not in frozen:
        plan = replace(plan, fused_elementwise=fused_elementwise_decision(device, plan))
    elif plan.fused_elementwise and device.fused_elementwise_refused is not None:
        raise ConfigError(
            f"--set fused_elementwise=true was asked for, but {device.fused_elementwise_refused}."
        )
    refused = gelu_epilogue_refused(device, plan)
    if "ffn_gelu_epilogue" not in frozen:
        plan = replace(plan, ffn_gelu_epilogue=refused is None)
    elif plan.ffn_gelu_epilogue and refused is not None:
        raise ConfigError(f"--set ffn_gelu_epilogue=true was asked for, but {refused}.")
    plan = _with_lora_mode(plan, chosen, frozen)
    _check_lora_fused_ffn(plan, device)
    plan, phases, batching_note = _prompts_per_pass(plan, chosen, budget, backend, frozen, phases)
    if batching_note:
        notes.append(batching_note)
    plan = _with_lora_base_copy(plan, chosen, budget, backend, frozen)
    if plan.lora_base_copy == "device":
        phases = estimate_phases(chosen, plan, backend)
    host = host_phases(chosen, plan)
    notes += _plan_notes(plan, device, chosen, compile_costs)
    storage_note = _dit_storage_note(plan, chosen, frozen)
    if storage_note:
        notes.append(storage_note)
    return PlanResult(
        plan=plan,
        request=chosen,
        device=device,
        budget=budget,
        phases=phases,
        host_bytes=max(p.needed for p in host.values()),
        host_phases=host,
        attention_backend=backend,
        notes=tuple(notes),
        requested=requested,
        steps=tuple(steps),
        frozen=frozen,
        lora_summary=describe_lora_mode(chosen, plan, "lora_mode" in frozen),
    )


# The most prompts one DiT pass takes: beyond it a pass gains little (the GPU is busy already) and
# delays every video of the group.
MAX_PROMPTS_PER_PASS = 8


def _prompts_per_pass(
    plan: Plan,
    request: Request,
    budget: Budget,
    backend: str,
    frozen: frozenset[str],
    phases: dict[str, PhaseEstimate],
) -> tuple[Plan, dict[str, PhaseEstimate], str | None]:
    """The most prompts of a batch job (request.prompts, at most MAX_PROMPTS_PER_PASS) whose one DiT
    pass fits the budget, with the phases and a note; unchanged for one prompt or a user-set value."""
    blocker = plan.batching_blocker
    if "prompts_per_pass" in frozen:
        note = None
        if plan.prompts_per_pass > 1 and blocker is not None:
            note = f"prompts_per_pass={plan.prompts_per_pass} is set, but {blocker}: one prompt per pass."
        return plan, phases, note
    if request.prompts < 2:
        return plan, phases, None
    if blocker is not None:
        return plan, phases, f"one prompt per DiT pass: {blocker}."
    for n in range(min(request.prompts, MAX_PROMPTS_PER_PASS), 1, -1):
        candidate = replace(plan, prompts_per_pass=n)
        cand_phases = estimate_phases(request, candidate, backend)
        if _fits(cand_phases, budget) is None:
            peak = fmt_bytes(cand_phases["denoise"].peak)
            return candidate, cand_phases, f"{n} prompts per DiT pass (the denoising peaks at about {peak})."
    return plan, phases, "one prompt per DiT pass: two would not fit the memory budget."


def _leanest_on_host(
    request: Request, base: Plan, budget: Budget, backend: str, frozen: frozenset[str]
) -> tuple[Plan, int]:
    """The plan that fits the device with the least host RAM, and that need: among the fastest plan
    that fits the device (host RAM aside), the leanest plan, and the leanest with umT5 streamed rather
    than on the CPU, each with every host knob that lowers it."""
    leanest = _leanest(request, base, backend, frozen)
    roomy = replace(budget, host_bytes=1 << 62)
    fastest, _, _, fits = _search(request, base, roomy, backend, frozen)
    candidates = [fastest, leanest] if fits else [leanest]
    if leanest.text_encoder_device == "cpu" and not _TEXT_ENCODER_FIELDS & frozen and base.device != "cpu":
        candidates.append(replace(leanest, text_encoder_device=base.device, text_encoder_blocks_resident=0))
    best = None
    for plan in candidates:
        for knob in HOST_KNOBS:
            if not knob.usable(frozen):
                continue
            for candidate in knob.candidates(plan, request):
                if host_bytes(request, candidate) < host_bytes(request, plan):
                    plan = candidate
        fits = _fits(estimate_phases(request, plan, backend), budget) is None
        need = host_bytes(request, plan)
        if best is None or (fits, -need) > (best[2], -best[1]):
            best = (plan, need, fits)
    return best[0], best[1]


def _no_plan_error(
    request: Request, base: Plan, budget: Budget, backend: str, frozen: frozenset[str], allow_downscale: bool
) -> NoPlanError:
    """One sentence: the smallest budget that would work (or the smallest host RAM)."""
    leanest = _leanest(request, base, backend, frozen)
    need = peak_bytes(estimate_phases(request, leanest, backend))
    where = f"{request.describe()} in {fmt_bytes(budget.device_bytes)} ({budget.source})"
    if need <= budget.device_bytes:
        _, need_host = _leanest_on_host(request, base, budget, backend, frozen)
        # The free RAM whose budget (plus this process, minus the margin) holds need_host.
        smallest = (
            need_host
            if not budget.host_margin_bytes
            else max(need_host + HOST_MARGIN_MIN, math.ceil(need_host / (1 - HOST_MARGIN_FRACTION)))
        )
        lean = base.storage_dtype is not None or dit_file_is_fp8(request)  # fp8 already in the leanest
        fp8 = "" if lean else "; --fp8 stores the weights in half the bytes"
        message = (
            f"No plan fits {where}: the plan that fits the device with the least host RAM needs "
            f"{fmt_bytes(need_host)} of it, and {fmt_bytes(budget.host_bytes)} may be used "
            f"({budget.host_source}), so this run needs at least {fmt_bytes(smallest)} of free RAM{fp8}."
        )
        short = f"needs ~{fmt_bytes(need_host)} of host RAM"
        return NoPlanError(message, min_budget_bytes=need, host_bytes_needed=need_host, short=short)
    free_note = (
        f", i.e. {fmt_bytes(need + budget.margin_bytes)} free with the {fmt_bytes(budget.margin_bytes)} margin"
        if budget.margin_bytes
        else ""
    )
    hint = "" if allow_downscale else "; pass --allow-downscale to accept fewer frames or a smaller size"
    message = f"No plan fits {where}: the smallest plan needs a budget of {fmt_bytes(need)}{free_note}{hint}."
    short = f"needs a budget of {fmt_bytes(need)}"
    need_host = host_bytes(request, leanest)
    return NoPlanError(message, min_budget_bytes=need, host_bytes_needed=need_host, short=short)


def _notes(device: DeviceBudget, budget: Budget, plan: Plan, vram: int | None) -> list[str]:
    notes = []
    if vram is not None and device.kind != "cpu" and vram > device.free_bytes:
        notes.append(
            f"--vram {fmt_bytes(vram)} is more than the {fmt_bytes(device.free_bytes)} free on the device."
        )
    return notes


def _fused_elementwise_note(plan: Plan, device: DeviceBudget) -> str:
    what = "the DiT blocks' norms, modulation and RoPE"
    if plan.fused_elementwise and not plan.compile_dit:
        how = (
            "judged from the card's declared capability (emulated: not run)"
            if device.fused_elementwise_declared
            else "they passed their smoke test"
        )
        return f"{what} run as fused Triton kernels in the eager blocks, off under autograd; {how}."
    if plan.compile_dit:
        why = "the compiled blocks fuse them already"
    elif device.fused_elementwise_refused is not None:
        why = device.fused_elementwise_refused
    else:
        why = "--set fused_elementwise=false"
    return f"{what} run as torch ops: {why}."


def _plan_notes(plan: Plan, device: DeviceBudget, request: Request, compile_costs=None) -> list[str]:
    notes = []
    if plan.text_encoder_dtype == FP8_STORAGE:
        notes.append("the text encoder's matrices are stored in fp8 (per-tensor scaled, upcast per block).")
    if plan.text_encoder_dtype == "bfloat16" and device.kind == "cuda" and not device.bf16_native:
        notes.append(
            "the text encoder keeps bf16 weights and computes in fp32 one block at a time "
            "(no native bf16 here, and umT5 overflows in fp16); it runs once."
        )
    if compile_costs is not None:
        what = "compiles the DiT's blocks" if plan.compile_dit else "runs the DiT eagerly"
        notes.append(f"the plan {what}: {compile_costs.describe(request_steps(request))}.")
    if device.kind == "cuda":
        notes.append(_fused_elementwise_note(plan, device))
    if plan.fp8_gemm and not plan.fast_tier_in_place:
        notes.append(
            "the fast tier's fp8 GEMMs need the DiT resident, whole and unquantised at rest; this plan "
            "streams, shards or fp8-stores it, so its blocks run exact."
        )
    elif plan.fast_tier_in_place:
        notes.append(
            "fast tier: the DiT blocks' linears run as fp8 e4m3 GEMMs with per-row scales (lossy; "
            "bench_speed.py measures the error against the exact tier)."
        )
        if not plan.compile_dit:
            notes.append(
                "the fast tier's activation quantisation is fused only in compiled blocks (Triton); run "
                "eagerly, as here, it costs more than the fp8 GEMMs save."
            )
    if plan.text_encoder_device == "cpu" and device.kind != "cpu":
        notes.append("the text encoder runs on the CPU: expect minutes for the prompt encoding.")
    if plan.dit_blocks_resident is not None:
        source = (
            "from the memory-mapped checkpoint through pinned staging buffers"
            if dit_streams_from_file(plan)
            else "from pinned host memory"
        )
        notes.append(
            f"DiT blocks stream {source}, {plan.dit_blocks_resident} resident, "
            "the next block copied while the current one computes."
        )
    if text_encoder_streamed(plan) and plan.text_encoder_stream_source == "mmap":
        notes.append(
            "the text encoder streams its blocks from the memory-mapped checkpoint (little host RAM)."
        )
    if plan.attention_chunk and default_registry().memory_class(planned_backend(plan)) == "linear":
        notes.append("attention chunking is set although the backend's workspace is already linear.")
    return notes


def _dit_storage_note(plan: Plan, request: Request, frozen: frozenset[str]) -> str | None:
    """Which storage the DiT's weights have under `plan`, and why (None: neither the file nor the
    storage is fp8, the weights are kept as they compute)."""
    file_fp8 = dit_file_is_fp8(request)
    if plan.storage_dtype == FP8_STORAGE:
        if file_fp8:
            why = (
                "you asked for it"
                if "storage_dtype" in frozen
                else f"in {plan.compute_dtype} the DiT would not fit the device budget without sharding "
                "or streaming its blocks"
            )
            return (
                f"DiT storage fp8: the file's own fp8 weights and scales, kept as they are (1 byte per "
                f"weight, nothing lost against the file, upcast per block; {why})."
            )
        return "DiT storage fp8 (per-tensor scaled, upcast per block; you asked for it): small quality loss."
    storage = plan.storage_dtype or plan.compute_dtype
    if file_fp8:
        why = "you set it" if "storage_dtype" in frozen else "it fits, and resident weights run fastest"
        return (
            f"DiT storage {storage}: the fp8 file's weights are upcast on load (2 bytes per weight; {why}; "
            "--fp8 keeps them in fp8)."
        )
    return None
