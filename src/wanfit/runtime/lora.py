"""Applying LoRAs to a DiT: merged into the weights once, merged into a copy at each call, or as a
low-rank branch beside each Linear.

merge           W' = W + sum_i strength_i * delta_i, computed in fp32 from the base weight and rounded
                once to the storage dtype (fp8 storage: re-quantised with a fresh scale). Writes go where
                the runtime keeps the weight: the parameter, or the block streamer's stored (host or fp8)
                copy, so a merge is neither lost when a streamer copies the weights nor undone by a
                prefetched copy.
merge_per_call  each block Linear merges W + U D into a temporary copy at each call (one GEMM over the
                weight, PerCallMerge) and multiplies by that; the stored weights are never written. Its
                cost follows the weight's size, the branch's the tokens': at a video's token counts
                it is the cheap way for weights a merge must not rewrite (streamed, fp8-stored).
runtime         y = x W^T + (x A^T) B^T beside each Linear of the blocks, B carrying strength * alpha /
                rank (several LoRAs: their factors stacked, one branch); the weights stay as stored.
                Without autograd the add is fused into a GEMM's epilogue (on the layer's own weight the
                base GEMM's, adding x W^T into b + h B^T), and Linears that read one input (q, k, v)
                share one down-projection GEMM.
In every mode, everything that is no block Linear (diffs, norms, modulation, embeddings) is merged.
Which one runs is the plan's (Plan.lora_mode; the planner's rule is wanfit.plan.lora.lora_mode_rule);
either runs on any placement. With Plan.lora_fused_ffn (off unless set) each FFN's two branches run
inside its GELU pass instead (FusedFeedForward, in the block's `ffn_low_rank` slot; wanfit.runtime.lora_ffn).
Every touched tensor's stored form is kept the first time where Plan.lora_base_copy says: beside it
on its device, or on the host, so `remove` restores the base weights bit for bit and a new LoRA set
is computed from the base; or nowhere (a run that never unloads), where `remove` subtracts the deltas
again (exact to the storage dtype's rounding). A merge reads the weight where it lives, so with the
copy on the device nothing crosses PCIe. The pipeline owns the state (DiTLoras); the model holds only
the branches (or per-call merges), in its block Linears' `low_rank` slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from wanfit.errors import one_line
from wanfit.plan.plan import LORA_BASE_COPIES
from wanfit.plan.plan import LORA_MODES as MODES
from wanfit.weights.lora_keys import LoraWeights, LowRank


@dataclass
class _Original:
    """A parameter's stored form before any LoRA: the tensor (and fp8 scale) as the runtime kept it."""

    tensor: torch.Tensor
    scale: torch.Tensor | None
    dtype: torch.dtype  # the parameter's compute dtype (an fp8 copy upcasts to it)

    def value(self, device: torch.device | str) -> torch.Tensor:
        """The base weight in fp32 on `device`: a new tensor (a merge adds to it in place)."""
        t = self.tensor.to(device, torch.float32, copy=True)
        return t.mul_(self.scale.to(device)) if self.scale is not None else t

    def move_to(self, device: torch.device | str) -> None:
        self.tensor = self.tensor.to(device)
        self.scale = None if self.scale is None else self.scale.to(device)


class _DeviceCopy:
    """A host fp32 tensor's copy on one device and dtype, made on first use (one kept at a time)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self._cached: tuple | None = None

    def on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self._cached is None or self._cached[0] != (device, dtype):
            self._cached = ((device, dtype), self.tensor.to(device, dtype))
        return self._cached[1]

    @property
    def held(self) -> bool:
        return self._cached is not None

    def release(self) -> None:
        self._cached = None


class SharedDownProjection:
    """The down-projections of sibling Linears that read one input tensor (a module's
    `shared_input_linears`, e.g. self-attention's q, k, v): one GEMM with their stacked factors
    [sum R, in], each Linear taking its columns of the result.

    The first member called with an input computes it for all; the others take their slice while the
    input is the same tensor object (held here, so its identity cannot be reused), unmodified since
    (its version, where it has one) and they have not taken theirs yet; once every member has, the
    result is dropped. So a result never outlives its forward, and a member called with another input,
    or a second time, computes afresh.
    """

    def __init__(self, branches: list[LowRankBranch]):
        self.members = branches
        self.down = _DeviceCopy(torch.cat([b.down for b in branches]))
        start = 0
        for branch in branches:
            branch.shared, branch.span = self, slice(start, start + branch.down.shape[0])
            start += branch.down.shape[0]
        self.computed = 0  # stacked GEMMs run eagerly (the tests count them; see project)
        self._clear()

    def _clear(self) -> None:
        self._input = self._result = None
        self._version: int | None = None
        self._pending: set[LowRankBranch] = set()

    def project(self, branch: LowRankBranch, x: torch.Tensor) -> torch.Tensor:
        """x A^T for `branch` (one member), from the shared GEMM."""
        fresh = x is self._input and branch in self._pending and _version(x) == self._version
        if not fresh:
            down = self.down.on(x.device, x.dtype)
            self._input, self._result = x, F.linear(x, down)
            self._version = _version(x)
            self._pending = set(self.members)
            # Counted eagerly only: dynamo guards on an int it reads, so a count bumped in the graph
            # would fail that guard at every forward (a recompile each, until the recompile limit
            # leaves the block eager).
            if not torch.compiler.is_compiling():
                self.computed += 1
        self._pending.discard(branch)
        h = self._result[..., branch.span]
        if not self._pending:
            self._clear()
        return h


def _version(x: torch.Tensor) -> int | None:
    """x's version counter (bumped by every in-place write), where there is one: inference tensors
    keep none, and under torch.compile it is data-dependent (a graph break per read); there the
    identity alone vouches, as the members read their input one after the other."""
    if torch.compiler.is_compiling() or x.is_inference():
        return None
    return x._version


class LowRankBranch:
    """A block Linear's forward with (x A^T) B^T beside its product (factors cached per device and
    dtype), set in the Linear's `low_rank` slot (wanfit.models.dit.Linear).

    Without autograd each add is fused into a GEMM with beta=1 (cuBLAS addmm_, accumulated in fp32
    and rounded once), so no [tokens, out] temporary is written and read again. On the layer's own
    weight (no `gemm`) the base GEMM goes last: y = b + h B^T by the small GEMM (K = rank, memory-bound:
    it writes the output once), then y += x W^T by the compute-bound base GEMM, whose epilogue reads y
    hidden under its compute (the other order reads and writes the whole output once more, ~29 ms of
    a 1.3B forward's 41 ms branch on an H200). Beside a replaced product (the fast tier's fp8 `gemm`)
    the up-projection adds into the product's output. The weight and bias are read at each call (the
    block streamer swaps their storage). With autograd on, or an output that is not a plain contiguous
    tensor of x's dtype, the add is out of place. Traced by torch.compile, the in-place GEMM runs as an
    opaque op that mutates its output (inductor keeps it in place).
    """

    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        self.down, self.up = down, up  # fp32 masters on the host: [R, in], [out, R] (scales folded into up)
        self.shared: SharedDownProjection | None = None  # set when siblings share the down-projection
        self.span = slice(0, down.shape[0])  # this branch's columns of the shared result
        self._down, self._up = _DeviceCopy(down), _DeviceCopy(up)  # the down one unused when shared

    @property
    def device_copies(self) -> list[_DeviceCopy]:
        return [self._up, self._down] + ([self.shared.down] if self.shared is not None else [])

    def release(self) -> None:
        for copy in self.device_copies:
            copy.release()

    def make_device_copies(self, device: torch.device, dtype: torch.dtype) -> None:
        """Copy the factors to `device` in `dtype` now, outside any compiled code (a copy made while
        dynamo traces is a step of that graph, and the next call traces again without it)."""
        for copy in (self._up, self._down if self.shared is None else self.shared.down):
            copy.on(device, dtype)

    def merged_weight(self, module: nn.Module) -> torch.Tensor | None:
        """The weight with the update in it, for a caller that multiplies by the weight itself (the
        FFN's GELU epilogue): None, the branch adds its update to the product."""
        return None

    def down_projection(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            return self.shared.project(self, x)
        return F.linear(x, self._down.on(x.device, x.dtype))

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        h = self.down_projection(x)
        up = self._up.on(x.device, x.dtype)
        if module.gemm is None and module.weight.dtype == x.dtype:
            # The base GEMM last, adding into the small one's output (see the class docstring).
            output, (a, b) = _product(h, up, module.bias), (x, module.weight)
        else:
            output, (a, b) = module.product(x), (h, up)
        if not torch.is_grad_enabled() and output.dtype == x.dtype and output.is_contiguous():
            # Traced, addmm_ would be functionalised into an out-of-place addmm reading a full
            # [tokens, out] input, which cuBLAS copies to the result first (two more passes over the
            # output than eager's); the opaque op that mutates stays in place (inductor re-inplaces it).
            add = _add_product_op if torch.compiler.is_compiling() else _add_product
            add(output, a, b)
            return output
        return output + F.linear(a, b).to(output.dtype)


class PerCallMerge(LowRankBranch):
    """A block Linear's forward with its LoRA update merged into a temporary copy of the weight at each
    call (Plan.lora_mode "merge_per_call"), set in the Linear's `low_rank` slot: W' = W + U D by one
    GEMM (addmm: W read once, W' written once, U D accumulated in fp32 and rounded once, as a merge
    rounds), then the layer's product with W'. The stored weight is never written: a streamed block's
    device copy and an fp8 weight's upcast, made for the call anyway, get the update, and unloading
    only clears the slot. Per call it moves the weight twice (1.3B, bf16: 5.6 GB a forward over 30
    blocks), where the branch moves activations: at 32,760 tokens several passes of 100-590 MB per
    Linear. Beside a replaced product (the fast tier's fp8 `gemm`, which holds its own copy of the
    weight) it runs as the branch does."""

    def merged_weight(self, module: nn.Module) -> torch.Tensor | None:
        if module.gemm is not None:
            return None
        weight = module.weight
        up = self._up.on(weight.device, weight.dtype)
        return torch.addmm(weight, up, self._down.on(weight.device, weight.dtype))

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        weight = self.merged_weight(module)
        if weight is None:
            return super().__call__(module, x)
        return F.linear(x, weight, module.bias)


class FusedFeedForward:
    """A block's FFN with runtime branches on both its Linears, through wanfit.runtime.lora_ffn's kernel
    (Plan.lora_fused_ffn), set in the block's `ffn_low_rank` slot: ffn.0's base product, then one pass
    adding ffn.0's up-projection, applying the GELU and taking ffn.2's down-projection, then ffn.2 as
    LowRankBranch runs it (up-projection into the output, base GEMM last). It returns None, and the
    block runs Linear by Linear, where the kernel does not apply: a replaced product (the fast tier's
    fp8 GEMMs), weights not in bf16/fp16, stacked ranks over lora_ffn.MAX_RANK, or after the kernel
    raised once (`on_failure(why)` is told, once, as the fused elementwise kernels' guard does)."""

    def __init__(self, first: LowRankBranch, second: LowRankBranch, on_failure=None):
        self.first, self.second, self.on_failure = first, second, on_failure
        self.failure: str | None = None
        self.calls = 0  # FFNs computed by the kernel, counted eagerly (the tests read it)

    def applies(self, first: nn.Module, second: nn.Module) -> bool:
        from wanfit.runtime import lora_ffn  # Triton's import (~0.5 s) only where the kernel is asked for

        return (
            self.failure is None
            and first.gemm is None
            and second.gemm is None
            and first.weight.dtype in (torch.bfloat16, torch.float16)
            and first.weight.dtype == second.weight.dtype
            and max(self.first.down.shape[0], self.second.down.shape[0]) <= lora_ffn.MAX_RANK
        )

    def check(self, device: torch.device) -> bool:
        """Whether the kernel passed its smoke test on `device` (once per process); a failure is
        told as one raised at a call is. Run eagerly: the pipeline's placement calls it before the
        blocks run (DiTLoras.make_device_copies), and the first eager call does where it did not."""
        from wanfit.runtime import lora_ffn

        if self.failure is None and device.type == "cuda":
            why = lora_ffn.smoke_test(str(device))
            if why is not None:
                self._fail(f"the fused LoRA FFN kernel failed its smoke test ({why})")
        return self.failure is None

    def _fail(self, why: str) -> None:
        self.failure = why
        if self.on_failure is not None:
            self.on_failure(why)

    def __call__(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
        from wanfit.runtime import lora_ffn

        first, _, second = block.ffn
        if not self.applies(first, second):
            return None
        if not torch.compiler.is_compiling() and not self.check(h.device):
            return None
        h = h.to(first.weight.dtype)  # as the block's Linears cast their input (wanfit.models.dit.linear)
        device, dtype = h.device, h.dtype
        try:
            h0 = self.first.down_projection(h)
            hidden = first.product(h)
            g, h2 = lora_ffn.gelu_low_rank(
                hidden,
                h0,
                self.first._up.on(device, dtype),
                self.second._down.on(device, dtype),
                in_place=block.ffn_gelu_in_place,
            )
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            if torch.compiler.is_compiling():
                raise
            self._fail(f"the fused LoRA FFN kernel raised {one_line(err)}")
            return None
        if not torch.compiler.is_compiling():
            self.calls += 1
        output = _product(h2, self.second._up.on(device, dtype), second.bias)
        add = _add_product_op if torch.compiler.is_compiling() else _add_product
        add(output, g, second.weight)
        return output


def _product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a b^T + bias by one GEMM over a's rows: a column slice (of a shared down-projection) stays a
    strided view, which F.linear would multiply batched and then add the bias in a pass of its own."""
    rows = a.reshape(-1, a.shape[-1])
    out = rows @ b.t() if bias is None else torch.addmm(bias, rows, b.t())
    return out.view(*a.shape[:-1], b.shape[0])


def _add_product(output: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """output += a b^T, in place by one GEMM with beta=1 (output contiguous; a may be a column slice)."""
    output.view(-1, output.shape[-1]).addmm_(a.reshape(-1, a.shape[-1]), b.t())


_add_product_op = torch.library.custom_op("wanfit::add_low_rank_product_", mutates_args=("output",))(
    _add_product
)


@_add_product_op.register_fake
def _(output: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    return None


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Official parameter name -> shape of a WanDiT with this config (built on the meta device)."""
    from wanfit.models.dit import WanDiT

    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in WanDiT(config).named_parameters()}


class DiTLoras:
    """The LoRAs applied to one DiT, owned by its pipeline (on the model: only the Linears' branches).

    placement: the DiT's runtime placement (wanfit.runtime.placement.DiTPlacement) or None for a bare
    model; its streamer, when there is one, holds the stored copies a merge must write into.
    """

    def __init__(self, dit: nn.Module, placement=None):
        self.dit = dit
        self.placement = placement
        self.loras: list[tuple[LoraWeights, float]] = []
        self.mode: str = "merge"
        self.base_copy: str = "host"  # where the originals are kept (Plan.lora_base_copy)
        self.originals: dict[str, _Original] = {}
        self.merged: dict[str, list[tuple[float, object]]] = {}  # parameter -> the updates merged into it
        self.branches: list[LowRankBranch] = []
        self.shared: list[SharedDownProjection] = []
        self.branch_modules: dict[LowRankBranch, str] = {}  # branch -> its Linear's name
        # Plan.lora_fused_ffn: the runtime branches of each FFN through the fused kernel, per block
        self.fused_ffn = False
        self.fused_ffns: dict[int, FusedFeedForward] = {}  # block index -> its FFN's

    @property
    def streamer(self):
        return getattr(self.placement, "streamer", None)

    def apply(
        self,
        loras: list[tuple[LoraWeights, float]],
        mode: str,
        base_copy: str | None = None,
        fused_ffn: bool | None = None,
    ) -> None:
        """Make `loras` (each with its strength) the DiT's LoRA set, computed from the base weights;
        base_copy: where to keep the base of each tensor merged (Plan.lora_base_copy; None: as now);
        fused_ffn: whether runtime branches of the FFNs run through the fused kernel
        (Plan.lora_fused_ffn; None: as now)."""
        # Checked before anything changes: a bad mode must not leave the DiT half patched.
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if base_copy is not None and base_copy not in LORA_BASE_COPIES:
            raise ValueError(f"base_copy must be one of {LORA_BASE_COPIES}, not {base_copy!r}")
        dit = self.dit
        self._restore()
        if base_copy is not None:
            self.keep_base(base_copy)
        self.loras, self.mode = list(loras), mode
        branch_modules = _block_linears(dit) if mode != "merge" else set()
        per_call = mode == "merge_per_call"

        merged: dict[str, list[tuple[float, object]]] = {}  # parameter -> [(strength, delta or LowRank)]
        branches: dict[str, list[tuple[float, object]]] = {}  # Linear module -> [(strength, LowRank)]
        for lora, strength in loras:
            for module, update in lora.low_rank.items():
                target = branches if module in branch_modules else merged
                key = module if module in branch_modules else f"{module}.weight"
                target.setdefault(key, []).append((strength, update))
            for name, delta in lora.diffs.items():
                merged.setdefault(name, []).append((strength, delta))

        originals = {}
        for name, updates in merged.items():
            original = self.originals.get(name)
            if original is None and self.base_copy != "none":
                original = _snapshot(dit, self.streamer, name, on_host=self.base_copy == "host")
            if original is not None:
                originals[name] = original
            device = _compute_device(dit, self.streamer, name)
            # In place: the value and one delta are the only fp32 copies alive (wanfit.plan.lora counts
            # MERGE_FP32_COPIES of the largest weight).
            value = _base_value(dit, self.streamer, name, original, device)
            _add_updates(value, updates, device, sign=1.0)
            _write(dit, self.streamer, name, value, _compute_dtype(dit, self.streamer, name))
        self.originals = originals  # tensors no LoRA touches any more were restored by _restore
        self.merged = merged

        by_module: dict[str, LowRankBranch] = {}
        for module_name, updates in branches.items():
            down = torch.cat([u.down.float().flatten(1) for _, u in updates])
            up = torch.cat([strength * u.scale * u.up.float().flatten(1) for strength, u in updates], dim=1)
            branch = by_module[module_name] = (PerCallMerge if per_call else LowRankBranch)(down, up)
            self.branches.append(branch)
            self.branch_modules[branch] = module_name  # named before set: _restore clears the named slots
            dit.get_submodule(module_name).low_rank = branch
        # A per-call merge takes no down-projection of the input, so nothing to share.
        self.shared = [] if per_call else [SharedDownProjection(g) for g in _shared_input_groups(dit, by_module)]
        if fused_ffn is not None:
            self.fused_ffn = fused_ffn
        self._install_fused_ffns(by_module)
        self._reset_streamer()
        self.make_device_copies()

    def set_fused_ffn(self, on: bool) -> None:
        """Run the FFNs' runtime branches through the fused kernel or not (Plan.lora_fused_ffn)."""
        self.fused_ffn = on
        by_module = {name: branch for branch, name in self.branch_modules.items()}
        self._install_fused_ffns(by_module)
        self.make_device_copies()

    def _install_fused_ffns(self, by_module: dict[str, LowRankBranch]) -> None:
        for index in self.fused_ffns:
            self.dit.blocks[index].ffn_low_rank = None
        self.fused_ffns = {}
        given_up = "lora_fused_ffn" in getattr(self.placement, "failures", {})
        if self.mode != "runtime" or not self.fused_ffn or given_up:
            return  # no branches to fuse, off, or given up in this process
        for index, block in enumerate(self.dit.blocks):
            first, second = by_module.get(f"blocks.{index}.ffn.0"), by_module.get(f"blocks.{index}.ffn.2")
            if first is None or second is None or not hasattr(block, "ffn_low_rank"):
                continue
            fused = FusedFeedForward(first, second, on_failure=self._fused_ffn_failed)
            self.fused_ffns[index] = block.ffn_low_rank = fused

    def _fused_ffn_failed(self, why: str) -> None:
        """One FFN's kernel failed: every block gives it up (they run one kernel), once said."""
        for fused in self.fused_ffns.values():
            fused.failure = fused.failure or why
        give_up = getattr(self.placement, "give_up", None)
        if give_up is not None:
            give_up("lora_fused_ffn", f"{why}; the FFNs' LoRA branches run as separate GEMMs")

    def make_device_copies(self) -> None:
        """Put the branches' factors where their Linears compute, in their compute dtype, before the
        (compiled) blocks run: on the DiT's device once placed (the pipeline calls this again after
        placing it), so the first compiled forward traces once, reading them as inputs."""
        for branch, module in self.branch_modules.items():
            weight = f"{module}.weight"
            device = _compute_device(self.dit, self.streamer, weight)
            branch.make_device_copies(device, _compute_dtype(self.dit, self.streamer, weight))
        for index, fused in self.fused_ffns.items():
            fused.check(_compute_device(self.dit, self.streamer, f"blocks.{index}.ffn.0.weight"))

    def remove(self) -> None:
        """Back to the base weights (bit for bit where a copy was kept): every touched tensor restored,
        every branch removed."""
        self._restore()
        self.loras, self.originals, self.merged = [], {}, {}

    def keep_base(self, where: str) -> None:
        """Keep the base copies `where` (Plan.lora_base_copy): beside their tensors on the device, on
        the host, or nowhere (dropped: a later restore subtracts the deltas). A copy dropped cannot
        be made again while the LoRAs are merged: "nowhere" stays."""
        if where not in LORA_BASE_COPIES:
            raise ValueError(f"base_copy must be one of {LORA_BASE_COPIES}, not {where!r}")
        if self.base_copy == "none" and self.merged:
            return
        if where == "none":
            self.originals = {}
        else:
            for name, original in self.originals.items():
                home = "cpu" if where == "host" else _stored_device(self.dit, self.streamer, name)
                original.move_to(home)
        self.base_copy = where

    def release_device_copies(self) -> None:
        """Drop the runtime branches' device copies of their factors (the DiT left the device); the
        next call copies them again."""
        for branch in self.branches:
            branch.release()

    def _restore(self) -> None:
        for module in self.branch_modules.values():
            self.dit.get_submodule(module).low_rank = None
        for index in self.fused_ffns:
            self.dit.blocks[index].ffn_low_rank = None
        self.fused_ffns = {}
        self.branches.clear()
        self.shared.clear()
        self.branch_modules.clear()
        for name, updates in self.merged.items():
            original = self.originals.get(name)
            if original is not None:
                _write_original(self.dit, self.streamer, name, original)
            else:  # no copy kept: the merged weight less its deltas
                device = _compute_device(self.dit, self.streamer, name)
                value = _current_value(self.dit, self.streamer, name, device)
                _add_updates(value, updates, device, sign=-1.0)
                _write(self.dit, self.streamer, name, value, _compute_dtype(self.dit, self.streamer, name))
        self.merged = {}
        self._reset_streamer()

    def _reset_streamer(self) -> None:
        if self.streamer is not None:
            self.streamer.reset()  # a prefetched device copy may predate the change
        if hasattr(self.placement, "weights_changed"):
            self.placement.weights_changed()  # quantised copies (the fast tier) may predate it too


def _block_linears(dit: nn.Module) -> set[str]:
    """The block Linears that take a branch: those with a `low_rank` slot (wanfit.models.dit.Linear)."""
    from wanfit.models.dit import Linear

    return {
        f"blocks.{i}.{name}"
        for i, block in enumerate(dit.blocks)
        for name, module in block.named_modules()
        if isinstance(module, Linear)
    }


def _shared_input_groups(dit: nn.Module, branches: dict[str, LowRankBranch]) -> list[list[LowRankBranch]]:
    """The branches of sibling Linears that read one input (a block module's `shared_input_linears`),
    two or more of them with a branch."""
    groups = []
    for i, block in enumerate(dit.blocks):
        for name, module in block.named_modules():
            prefix = f"blocks.{i}.{name}." if name else f"blocks.{i}."
            linears = getattr(module, "shared_input_linears", ())
            members = [branches[prefix + n] for n in linears if prefix + n in branches]
            if len(members) > 1:
                groups.append(members)
    return groups


# --- where a parameter's value lives --------------------------------------------------------------


def _locate(dit: nn.Module, streamer, name: str):
    """(module, leaf, streamer, (block index, slot) or None) for the parameter `name`."""
    module_name, _, leaf = name.rpartition(".")
    module = dit.get_submodule(module_name)
    found = streamer.find_slot(module, leaf) if streamer is not None else None
    return module, leaf, streamer, found


def _snapshot(dit: nn.Module, streamer, name: str, on_host: bool) -> _Original:
    """A copy of the parameter's stored form: on the host, or beside it on its own device."""
    module, leaf, _, found = _locate(dit, streamer, name)
    param = module._parameters[leaf]
    if found is not None:
        _, slot = found
        stored, scale, dtype = slot.stored, slot.scale, slot.dtype
    else:
        stored, scale, dtype = param, None, param.dtype
    home = "cpu" if on_host else stored.device
    scale = None if scale is None else scale.detach().to(home, copy=True)
    return _Original(stored.detach().to(home, copy=True), scale, dtype)


def _stored_device(dit: nn.Module, streamer, name: str) -> torch.device:
    """Where the parameter's stored form lives (a streamed block's: the host)."""
    module, leaf, _, found = _locate(dit, streamer, name)
    return found[1].stored.device if found is not None else module._parameters[leaf].device


def _current_value(dit: nn.Module, streamer, name: str, device: torch.device) -> torch.Tensor:
    """The parameter's value as now stored, in fp32 on `device`: a new tensor."""
    module, leaf, _, found = _locate(dit, streamer, name)
    if found is not None:
        slot = found[1]
        t = slot.stored.detach().to(device, torch.float32, copy=True)
        return t.mul_(slot.scale.to(device)) if slot.scale is not None else t
    return module._parameters[leaf].detach().to(device, torch.float32, copy=True)


def _base_value(dit: nn.Module, streamer, name: str, original: _Original | None, device) -> torch.Tensor:
    """The base weight in fp32 on `device`, read where it is cheapest: the kept copy when it is on
    that device or in another form than the parameter is now stored in (which _restore re-rounded),
    else the parameter itself (restored: the base, bit for bit), so a host copy is never read back."""
    if original is not None and (
        original.tensor.device == torch.device(device) or not _same_form(dit, streamer, name, original)
    ):
        return original.value(device)
    return _current_value(dit, streamer, name, device)


def _same_form(dit: nn.Module, streamer, name: str, original: _Original) -> bool:
    """Whether the parameter is stored now as it was when `original` was taken (dtype, shape, scale)."""
    module, leaf, _, found = _locate(dit, streamer, name)
    if found is not None:
        stored, scale = found[1].stored, found[1].scale
    else:
        stored, scale = module._parameters[leaf], None
    return (
        (scale is None) == (original.scale is None)
        and stored.dtype == original.tensor.dtype
        and stored.shape == original.tensor.shape
    )


def _add_updates(value: torch.Tensor, updates: list, device, sign: float) -> None:
    """value += sign * sum(strength * delta), one delta in fp32 alive at a time."""
    for strength, update in updates:
        delta = update.delta(device) if isinstance(update, LowRank) else update.to(device, torch.float32)
        value.add_(delta.reshape(value.shape), alpha=sign * strength)
        del delta


def _compute_device(dit: nn.Module, streamer, name: str) -> torch.device:
    """Where to compute a merge: the run's device (a streamed block's stored copy lives on the host)."""
    module, leaf, streamer, _ = _locate(dit, streamer, name)
    return streamer.device if streamer is not None else module._parameters[leaf].device


def _compute_dtype(dit: nn.Module, streamer, name: str) -> torch.dtype:
    """The dtype a parameter computes in (a Linear casts its input to it): a streamed one's copy's."""
    module, leaf, _, found = _locate(dit, streamer, name)
    return found[1].dtype if found is not None else module._parameters[leaf].dtype


def _write(dit: nn.Module, streamer, name: str, value: torch.Tensor, dtype: torch.dtype) -> None:
    """Store an fp32 value for parameter `name`, rounded (or re-quantised) as the runtime stores it."""
    module, leaf, streamer, found = _locate(dit, streamer, name)
    if found is not None:
        streamer.replace_stored(*found, value.to(dtype))
    else:
        param = module._parameters[leaf]
        param.data.copy_(value.to(param.dtype))


def _write_original(dit: nn.Module, streamer, name: str, original: _Original) -> None:
    """Put the base value back; bit for bit when the placement is the one the snapshot was taken in."""
    module, leaf, streamer, found = _locate(dit, streamer, name)
    if found is not None:
        _, slot = found
        if _same_form(dit, streamer, name, original):
            slot.stored.copy_(original.tensor)
            if slot.scale is not None:
                slot.scale.copy_(original.scale)
        else:  # the plan changed storage since (e.g. fp8 after an out-of-memory step-down)
            streamer.replace_stored(*found, original.value(streamer.device).to(original.dtype))
        return
    param = module._parameters[leaf]
    if original.scale is None and original.tensor.dtype == param.dtype:
        param.data.copy_(original.tensor)
    else:
        param.data.copy_(original.value(param.device).to(param.dtype))
