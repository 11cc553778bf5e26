"""Host RAM of each phase of a run (text encoding, denoising, VAE decode), in bytes.

Each estimate is split the way the kernel sees the memory:
    process  Python, torch, the CUDA context and libraries (a measured constant)
    pinned   page-locked buffers: host copies of streamed blocks, or staging buffers
    anon     ordinary allocations: weights converted on the host, upcast copies, CPU-side activations
    mapped   pages of memory-mapped weights a phase reads again and again (the kernel may drop them,
             but they would be read back at once: counted as needed)
    cache    file pages read once (loading, a placement); the kernel keeps them only while memory
             allows, so they count toward an uncapped run's memory.peak but need no budget
`needed` (all but the page cache) is what the planner fits into the host budget; `peak` adds the page
cache. The weights' bytes come from the same counts as the device estimates (estimates.py); the
runtime's rules are wanfit.runtime.offload's (a pinned copy per streamed block, in one exact-size
buffer; or STAGING_BUFFERS buffers of one block each, filled from the mapped file).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from wanfit.plan.estimates import (
    GIB,
    Request,
    dit_block_bytes,
    dit_block_params,
    dit_keeps_file_fp8,
    dit_params,
    dit_streams_from_file,
    estimate_phases,
    text_encoder_activations,
    text_encoder_bytes,
    text_encoder_compute_dtype,
    text_encoder_sizes,
    text_encoder_storage,
    text_encoder_streamed,
    vae_params,
)
from wanfit.plan.lora import lora_memory
from wanfit.plan.plan import Plan
from wanfit.precision import dtype_bytes
from wanfit.runtime.offload import STAGING_BUFFERS

# The process beside its weights and buffers: the interpreter, torch, transformers and, on CUDA, the
# context and the cuBLAS/cuDNN libraries' resident pages, and what a whole run adds to them. Measured on
# the H200 of 2026-12-02 (benchmarks/bench_host_ram.py, cgroup memory.stat anon): 0.53 GiB for the
# process alone (the "baseline" case: one matmul, convolution and attention call); 2.56 GiB at the peak
# of a whole capped t4-colab run, of which 0.72 pinned staging and 0.54 the video, leaving 1.3; and with
# that, the t4-16gb plan's load phase is predicted at 9.93 GiB against 9.14 measured (+9%).
HOST_PROCESS_CUDA = int(1.3 * GIB)

HOST_PHASES = ("text_encoder", "denoise", "vae_decode")
# Bytes per VAE parameter in its file (the official Wan2.1_VAE.pth is fp32): only the page cache.
VAE_FILE_BYTES = 4


@dataclass(frozen=True)
class HostEstimate:
    """Predicted host RAM of one phase, in bytes, with what makes it up."""

    name: str
    process: int
    pinned: int = 0
    anon: int = 0
    mapped: int = 0
    cache: int = 0
    detail: dict[str, int] = field(default_factory=dict)

    @property
    def needed(self) -> int:
        """What must fit: everything but the page cache."""
        return self.process + self.pinned + self.anon + self.mapped

    @property
    def peak(self) -> int:
        """What an uncapped run holds, page cache included (a cgroup's memory.peak)."""
        return self.needed + self.cache

    def to_dict(self) -> dict:
        return {**asdict(self), "needed": self.needed, "peak": self.peak}


@dataclass
class _Part:
    pinned: int = 0
    anon: int = 0
    mapped: int = 0
    cache: int = 0

    def total(self) -> int:
        return self.pinned + self.anon + self.mapped


def _file_bytes(dtype: str | None, plan_dtype: str) -> int:
    return dtype_bytes(dtype or plan_dtype)


def dit_host(request: Request, plan: Plan) -> _Part:
    """The DiT while it is placed: pinned copies of its streamed blocks, or the staging ring and the
    mapped pages it reads from; a resident DiT leaves only the page cache of its file."""
    cfg = request.config
    file_b = _file_bytes(request.dit_file_dtype, plan.compute_dtype)
    file_total = dit_params(cfg) * file_b
    if plan.dit_blocks_resident is None:
        return _Part(cache=file_total)
    block_file = sum(dit_block_params(cfg)) * file_b
    if dit_streams_from_file(plan):
        ring = STAGING_BUFFERS * block_file
        # Streamed from what was loaded: the mapped file, or an fp8 file's upcast copy.
        converted = dit_converted_on_load(request, plan)
        return _Part(pinned=ring, anon=converted, mapped=0 if converted else ring, cache=file_total)
    streamed = max(0, cfg.num_layers - plan.dit_blocks_resident)
    block = dit_block_bytes(cfg, plan)
    # A block converted (or quantised) on the host before its pinned copy is made; an fp8 file's
    # matrices kept in fp8 are copied as they are (its few other tensors are converted on the device).
    changed = file_b != dtype_bytes(plan.compute_dtype) or plan.storage_dtype
    converted = block if changed and not dit_keeps_file_fp8(request, plan) else 0
    return _Part(pinned=streamed * block, anon=converted, cache=file_total)


def dit_converted_on_load(request: Request, plan: Plan) -> int:
    """A DiT loaded on the host (to be streamed, or quantised when placed) keeps its file's mapped
    tensors, except an fp8 file's, which the loader upcasts to bf16 (ordinary memory); under fp8
    storage it keeps the file's fp8 block matrices (mapped, 1 byte per weight) and converts only the
    rest (biases, norms, modulation, embeddings and head; counted in fp32, the most they take)."""
    on_host = plan.dit_blocks_resident is not None or plan.storage_dtype is not None
    fp8_file = request.dit_file_dtype is not None and dtype_bytes(request.dit_file_dtype) == 1
    if not (on_host and fp8_file):
        return 0
    cfg = request.config
    if dit_keeps_file_fp8(request, plan):
        return (dit_params(cfg) - cfg.num_layers * dit_block_params(cfg)[0]) * 4
    return dit_params(cfg) * 2


def text_encoder_host(request: Request, plan: Plan, *, encoding: bool) -> _Part:
    """umT5 on the host: its weights when it runs on the CPU, its pinned blocks (or the staging ring)
    when it streams, and nothing once it is freed. A resident encoder leaves its file's page cache."""
    if not encoding and plan.free_text_encoder:
        return _Part()
    te = request.text_encoder
    sizes = text_encoder_sizes(te)
    layer, norm, embedding = text_encoder_bytes(request, plan)
    storage = text_encoder_storage(request, plan)
    file_dtype = request.text_encoder_file_dtype or storage
    converted = file_dtype != storage
    file_total = sizes.params * dtype_bytes(file_dtype)
    cache = file_total if encoding else 0
    if plan.text_encoder_device == "cpu":
        weights = embedding + te.num_layers * layer + norm
        part = _Part(anon=weights, cache=cache) if converted else _Part(mapped=weights)
        if encoding:
            compute = text_encoder_compute_dtype(request, plan)
            if compute.itemsize != dtype_bytes(storage):
                part.anon += compute.itemsize * sizes.layer  # one block's upcast copy at a time
            part.anon += text_encoder_activations(request, plan)
        return part
    if not text_encoder_streamed(plan):
        return _Part(cache=cache)
    # The token embedding stays on the host: mapped from the file (only the rows looked up are read),
    # or converted into ordinary memory.
    part = _Part(anon=embedding if converted else 0, cache=cache)
    if plan.text_encoder_stream_source == "mmap":
        part.pinned = STAGING_BUFFERS * layer  # the blocks travel as the file has them
        part.mapped = part.pinned if encoding else 0
        return part
    resident = min(te.num_layers, plan.text_encoder_blocks_resident)
    part.pinned = (te.num_layers - resident) * layer
    if converted and encoding:
        part.anon += layer  # the block being pinned, converted on the host first
    return part


def video_host(request: Request) -> int:
    """The decoded video on the host: fp32 [3, F, H, W] and its uint8 frames (two while reordered)."""
    elements = 3 * request.num_frames * request.height * request.width
    return elements * (4 + 2)


def host_phases(request: Request, plan: Plan) -> dict[str, HostEstimate]:
    """Each phase's predicted host RAM. On a CPU the device is the host: its phases are the device
    estimates (the CPU budget's margin holds the process).

    The page cache adds up: the files read so far (loading reads the text encoder, the VAE and a
    resident DiT; a streamed DiT's file is read once its blocks are placed, when denoising starts)."""
    if plan.device == "cpu":  # the device budget is the host's (its margin holds the process)
        device = estimate_phases(request, plan)
        return {
            name: HostEstimate(name, 0, anon=device[name].peak, detail={"device": device[name].peak})
            for name in HOST_PHASES
        }
    dit = dit_host(request, plan)
    te_encoding = text_encoder_host(request, plan, encoding=True)
    te_after = text_encoder_host(request, plan, encoding=False)
    dit_in_decode = _Part() if plan.offload_dit_before_decode else dit
    vae_file = sum(vae_params(request.vae)) * VAE_FILE_BYTES
    read_at_load = te_encoding.cache + vae_file + (dit.cache if plan.dit_blocks_resident is None else 0)
    read_by_denoise = te_encoding.cache + vae_file + dit.cache

    def phase(name: str, parts: dict[str, _Part], cache: int, video: int = 0) -> HostEstimate:
        detail = {k: p.total() for k, p in parts.items()}
        if video:
            detail["video"] = video
        return HostEstimate(
            name,
            HOST_PROCESS_CUDA,
            pinned=sum(p.pinned for p in parts.values()),
            anon=sum(p.anon for p in parts.values()) + video,
            mapped=sum(p.mapped for p in parts.values()),
            cache=cache,
            detail=detail,
        )

    loaded = {"dit": _Part(anon=dit_converted_on_load(request, plan))}
    # The LoRAs' host copies from their loading on; a DiT loaded on the host is merged there too.
    lora = lora_memory(request, plan)
    lora_kept = _Part(anon=lora.host)
    lora_loading = _Part(anon=lora.host + (0 if lora.merge_on_device else lora.merge))
    return {
        "text_encoder": phase(
            "text_encoder", {"text_encoder": te_encoding, **loaded, "lora": lora_loading}, read_at_load
        ),
        "denoise": phase(
            "denoise", {"dit": dit, "text_encoder": te_after, "lora": lora_kept}, read_by_denoise
        ),
        "vae_decode": phase(
            "vae_decode",
            {"dit": dit_in_decode, "text_encoder": te_after, "lora": lora_kept},
            read_by_denoise,
            video_host(request),
        ),
    }


def host_bytes(request: Request, plan: Plan) -> int:
    """The host RAM the plan needs: the largest phase's `needed`."""
    return max(p.needed for p in host_phases(request, plan).values())
