"""LoRAs in the plan: how they reach the DiT (Plan.lora_mode, the planner's rule) and what they cost.

The job's LoRAs reach planning as LoraShapes (ranks and targets, no weights) on the Request. The rule
(`lora_mode_rule`) is the one place that decides merge against the runtime branch; the planner records
its answer in the plan, the pipeline and wanfit.runtime.lora obey it. `lora_memory` counts what each
mode costs, for the device and host estimates (estimates.py, host_estimates.py).

Checked against an H200 run of benchmarks/bench_lora.py (2026-12-02: 1.3B, 832x480x81, one sample, bf16,
rank 64 on every block Linear): the runtime branch raised the forward's peak by 0.20 GiB (4.65 -> 4.85),
estimated here at 0.175 (0.163 of factors, 0.012 of q/k/v's shared down-projection); a merge left it
unchanged (tests/test_lora_plan.py keeps the comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from wanfit.plan.plan import Plan
from wanfit.precision import dtype_bytes

# fp32 tensors of a weight's size alive at once while one is merged: its value and one LoRA's delta
# (wanfit.runtime.lora adds each delta in place; the rounded copy is written after the delta is freed).
MERGE_FP32_COPIES = 2
FP32 = 4


@dataclass(frozen=True)
class LoraShapes:
    """What planning needs of a job's LoRAs (no weights): each module's low-rank update with its rank
    summed over the files (the runtime stacks them into one branch), the parameters given a full
    delta, and the bytes of the converted LoRAs the pipeline keeps for the run."""

    ranks: tuple[tuple[str, int], ...]  # official module name -> rank, summed over the files
    diffs: tuple[str, ...] = ()  # official parameter names
    held_bytes: int = 0

    @classmethod
    def of(cls, loras) -> LoraShapes | None:
        """From converted LoRAs (wanfit.weights.lora_keys.LoraWeights, or (LoraWeights, strength)
        pairs as read_loras gives them); None for none."""
        items = [lora[0] if isinstance(lora, tuple) else lora for lora in loras or ()]
        if not items:
            return None
        ranks: dict[str, int] = {}
        diffs: set[str] = set()
        held = 0
        for lora in items:
            for module, update in lora.low_rank.items():
                ranks[module] = ranks.get(module, 0) + update.rank
                held += sum(t.numel() * t.element_size() for t in (update.down, update.up))
            for name, delta in lora.diffs.items():
                diffs.add(name)
                held += delta.numel() * delta.element_size()
        return cls(tuple(sorted(ranks.items())), tuple(sorted(diffs)), held)

    @property
    def max_rank(self) -> int:
        return max((rank for _, rank in self.ranks), default=0)

    def to_dict(self) -> dict:
        return {"low_rank_modules": len(self.ranks), "max_rank": self.max_rank, "diffs": len(self.diffs)}


# ----------------------------------------------------------------------------- the rule


def lora_mode_rule(plan: Plan) -> tuple[str, str]:
    """(mode, why): merge for a resident DiT in bf16/fp16/fp32; the per-call merge for streamed or
    fp8-stored blocks; the runtime branch beside the fast tier's fp8 GEMMs.

    The per-call merge moves each block Linear's weight twice a call, the branch the Linear's input and
    output a few times: at the tokens of any video job (a 480p 81-frame clip has 32,760) the weight is
    far the smaller (measured: docs/benchmarks.md, twelfth run), and at a few hundred tokens both are
    a small part of a forward made of kernel launches, so the rule does not weigh tokens."""
    if plan.fp8_gemm:
        return (
            "runtime",
            "the fast tier's fp8 GEMMs hold quantised copies of the weights a merge would outdate",
        )
    if plan.dit_blocks_resident is not None:
        return "merge_per_call", (
            "the DiT's blocks stream from host copies, which a merge would rewrite: each block Linear "
            "merges into the copy it computes with"
        )
    if plan.storage_dtype is not None and dtype_bytes(plan.storage_dtype) == 1:
        return "merge_per_call", (
            "the DiT's weights are stored in fp8, which a merge would round a second time: each block "
            "Linear merges into its upcast copy"
        )
    return "merge", f"the DiT is resident in {plan.compute_dtype}: merged once, nothing to pay per step"


def device_base_copy_possible(plan: Plan) -> bool:
    """Whether the base weights a merge overwrites can be kept beside them on the GPU: a merge into a
    DiT resident there for the whole run (not streamed, not in fp8, not sent to the host to decode)."""
    return (
        plan.device.startswith("cuda")
        and plan.lora_mode == "merge"
        and plan.dit_blocks_resident is None
        and not (plan.storage_dtype is not None and dtype_bytes(plan.storage_dtype) == 1)
        and plan.dit_sharding == "none"
        and not plan.offload_dit_before_decode
    )


def lora_base_copy_rule(request, plan: Plan, device_fits: bool) -> str:
    """Where the base weights are kept: nowhere for a run that never unloads its LoRAs; beside them
    on the GPU where that copy fits the budget (`device_fits`: the planner's estimate with it); else
    on the host."""
    if not request.lora_unloadable:
        return "none"
    return "device" if device_base_copy_possible(plan) and device_fits else "host"


def planned_lora_base_copy(request, plan: Plan) -> str | None:
    """Where the plan keeps the LoRAs' base weights: its own choice, or (before the planner records
    one) the host for a caller that may unload, nowhere for one that never does; None without LoRAs."""
    if request.loras is None:
        return None
    return plan.lora_base_copy or ("host" if request.lora_unloadable else "none")


def planned_lora_mode(request, plan: Plan) -> str | None:
    """The mode the plan applies LoRAs in: its own, or (while the planner searches, before it records
    one) the rule's for it; None without LoRAs."""
    if request.loras is None:
        return None
    return plan.lora_mode or lora_mode_rule(plan)[0]


# ----------------------------------------------------------------------------- geometry


@cache
def _parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    from wanfit.runtime.lora import parameter_shapes

    return parameter_shapes(config)


@cache
def _meta_block(config):
    """A DiT block of `config` on the meta device: its modules' names, types and declarations."""
    import torch

    from wanfit.models.dit import WanBlock

    with torch.device("meta"):
        return WanBlock(config)


@cache
def _block_linear_names(config) -> frozenset[str]:
    """The Linears of a DiT block, by name within the block (what the runtime branch sits beside)."""
    from torch import nn

    return frozenset(name for name, m in _meta_block(config).named_modules() if isinstance(m, nn.Linear))


@cache
def _shared_groups(config) -> tuple[frozenset[str], ...]:
    """The block's Linears that read one input and share the branch's down-projection (the model's
    `shared_input_linears`), by name within the block."""
    block = _meta_block(config)
    return tuple(
        frozenset(f"{prefix}.{name}" if prefix else name for name in m.shared_input_linears)
        for prefix, m in block.named_modules()
        if getattr(m, "shared_input_linears", ())
    )


def _shared_group(config, name: str) -> frozenset[str]:
    """The Linears whose down-projection is computed with `name`'s (itself alone if none)."""
    return next((g for g in _shared_groups(config) if name in g), frozenset({name}))


def _in_block(module: str) -> str | None:
    """'blocks.3.ffn.0' -> 'ffn.0'; None outside the blocks."""
    parts = module.split(".")
    return ".".join(parts[2:]) if len(parts) > 2 and parts[0] == "blocks" else None


@dataclass(frozen=True)
class _Branch:
    name: str  # within its block
    inputs: int
    outputs: int
    rank: int


def _split(config, shapes: LoraShapes, mode: str) -> tuple[list[_Branch], list[str]]:
    """(the block Linears' updates kept as factors, the merged parameter names) of `mode`: every block
    Linear's update is kept as factors in runtime and merge_per_call mode; everything else (and
    everything in merge mode) is merged."""
    params = _parameter_shapes(config)
    linears = _block_linear_names(config)
    branches, merged = [], list(shapes.diffs)
    for module, rank in shapes.ranks:
        inner = _in_block(module)
        if mode != "merge" and inner in linears:
            out, inp = params[f"{module}.weight"][:2]
            branches.append(_Branch(inner, inp, out, rank))
        else:
            merged.append(f"{module}.weight")
    return branches, merged


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def branch_elements(config, shapes: LoraShapes | None) -> int:
    """Elements of the runtime branch's factors: rank x (in + out) per block Linear a LoRA updates."""
    if shapes is None:
        return 0
    return sum(b.rank * (b.inputs + b.outputs) for b in _split(config, shapes, "runtime")[0])


def full_branch_elements(config, rank: int) -> int:
    """The same for a LoRA of `rank` on every block Linear (as benchmarks/bench_lora.py measures)."""
    params = _parameter_shapes(config)
    per_block = sum(sum(params[f"blocks.0.{name}.weight"][:2]) for name in _block_linear_names(config))
    return rank * per_block * config.num_layers


def per_call_merged_share(config, shapes: LoraShapes | None) -> float:
    """The share of the blocks' Linear weight elements a per-call merge rewrites at each call."""
    if shapes is None:
        return 0.0
    params = _parameter_shapes(config)
    every = config.num_layers * sum(_numel(params[f"blocks.0.{n}.weight"]) for n in _block_linear_names(config))
    branches = _split(config, shapes, "merge_per_call")[0]
    return sum(b.inputs * b.outputs for b in branches) / every


def merged_elements(config, shapes: LoraShapes | None, mode: str) -> int:
    """Elements of the weights a LoRA set merges in `mode` (all its targets, or the non-block ones)."""
    if shapes is None:
        return 0
    params = _parameter_shapes(config)
    return sum(_numel(params[name]) for name in _split(config, shapes, mode)[1])


# ----------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class LoraMemory:
    """What the plan's LoRAs cost, in bytes."""

    factors: int = 0  # runtime branch, per-call merge: the factors on the device (compute dtype), kept there
    branch: int = 0  # at the DiT's peak: the branch's activations, or the per-call merge's weight copy
    merge: int = 0  # a merge's fp32 temporaries: transient, before the denoising
    merge_on_device: bool = False  # the merge computes where the DiT was loaded: the device, or the host
    base_copy: int = 0  # on the device for the whole run: the base weights kept there (lora_base_copy)
    host: int = 0  # on the host for the whole run (the base weights kept there for unloading, ...)


def lora_memory(request, plan: Plan) -> LoraMemory:
    """The LoRAs' memory under `plan` (nothing without LoRAs).

    runtime branch: the factors on the device, rank x (in + out) per block Linear in the compute dtype;
    at each Linear call the branch holds x A^T [rows, rank] (for Linears sharing one input, e.g. q/k/v,
    their stacked ranks) and writes the Linear's output once, one GEMM adding into the other's
    result in place, so no second output is held (wanfit.runtime.lora, without autograd).
    per-call merge: the same factors; at each Linear call one merged copy of its weight (the largest
    Linear's at the peak, in the compute dtype), freed after the product.
    merge: MERGE_FP32_COPIES fp32 copies of the largest merged weight while it is merged, where the DiT
    was loaded (the device for a resident DiT, the host for a streamed or fp8 one); nothing after.
    Both keep the stored form of every tensor merged (the base weights `unload_loras` restores; in
    merge mode most of the DiT) where Plan.lora_base_copy says: on the device, on the host, or
    nowhere; on the host the converted LoRAs, and in runtime mode the branches' fp32 factors; a DiT
    streamed from its mapped file holds its merged blocks as private copies.
    """
    from wanfit.plan.estimates import dit_streams_from_file, rank_batch, rank_tokens

    mode = planned_lora_mode(request, plan)
    if mode is None:
        return LoraMemory()
    config, shapes = request.config, request.loras
    c = dtype_bytes(plan.compute_dtype)
    branches, merged = _split(config, shapes, mode)
    params = _parameter_shapes(config)
    batch, share = rank_batch(request, plan), rank_tokens(request, plan)
    ffn_rows = min(share, plan.ffn_chunk) if plan.ffn_chunk else share
    factor_elements = sum(b.rank * (b.inputs + b.outputs) for b in branches)
    ranks: dict[str, int] = {}
    for b in branches:
        ranks[b.name] = max(ranks.get(b.name, 0), b.rank)
    stacked = {  # the down-projection's width per call: a shared group's ranks stacked
        name: sum(ranks.get(member, 0) for member in _shared_group(config, name)) for name in ranks
    }
    if mode == "merge_per_call":
        branch = max((b.inputs * b.outputs for b in branches), default=0)
    else:
        rows = {name: ffn_rows if name.startswith("ffn.") else share for name in stacked}
        branch = max((batch * rows[name] * width for name, width in stacked.items()), default=0)
    largest = max((_numel(params[name]) for name in merged), default=0)
    streams_from_file = dit_streams_from_file(plan) and request.dit_file_dtype is not None
    stored = dtype_bytes(request.dit_file_dtype) if streams_from_file else c  # as loaded, before placing
    merged_numel = sum(_numel(params[name]) for name in merged)
    base_copy = planned_lora_base_copy(request, plan)
    private = (
        sum(_numel(params[n]) for n in merged if n.startswith("blocks.")) * stored if streams_from_file else 0
    )
    fp8 = plan.storage_dtype is not None and dtype_bytes(plan.storage_dtype) == 1
    placed_late = plan.dit_blocks_resident is not None or fp8  # loaded on the host, placed to denoise
    return LoraMemory(
        factors=factor_elements * c,
        branch=branch * c,
        merge=MERGE_FP32_COPIES * FP32 * largest,
        merge_on_device=plan.device == "cpu" or not placed_late,
        base_copy=merged_numel * c if base_copy == "device" else 0,
        host=shapes.held_bytes
        + (merged_numel * stored if base_copy == "host" else 0)
        + FP32 * factor_elements
        + private,
    )


def describe_lora_mode(request, plan: Plan, user_set: bool) -> str | None:
    """A line for `wanfit plan`: how the LoRAs are applied, where their base weights are kept, and
    why (None without LoRAs)."""
    mode = planned_lora_mode(request, plan)
    if mode is None:
        return None
    rule, why = lora_mode_rule(plan)
    what = _MODE_LINES[mode]
    if user_set and mode != rule:
        line = f"LoRAs: {what}, as set (lora_mode={mode}); the planner would choose {rule}: {why}."
    else:
        line = f"LoRAs: {what} ({why})."
    if mode == "runtime" and plan.lora_fused_ffn:
        line += " Each FFN's two branches run inside its GELU pass (one fused Triton kernel)."
    kept = planned_lora_base_copy(request, plan)
    return line + " " + _BASE_COPY_LINES[kept]


_MODE_LINES = {
    "merge": "merged into the weights",
    "merge_per_call": "merged into a copy of each block Linear's weight at each call",
    "runtime": "a low-rank branch beside each block Linear",
}

_BASE_COPY_LINES = {
    "device": "Base weights kept on the GPU for unloading (restored device to device).",
    "host": "Base weights kept on the host for unloading.",
    "none": "No copy of the base weights kept (the run never unloads its LoRAs).",
}
