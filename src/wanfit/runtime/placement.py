"""Where each model lives under a Plan, and the run-time state that goes with it, in one place.

One placement object per component, owned by the pipeline:
    DiTPlacement          device; blocks streamed (k resident), sharded (FSDP2) or not; fp8 storage;
                          compiled blocks; the fast tier's fp8 GEMMs; chunking
    TextEncoderPlacement  device; blocks streamed or not; compute dtype
    VAEPlacement          device; decode tiling
Each holds a frozen layout derived from a Plan (what it has put in place) and the live objects that
go with it: the BlockStreamer, the compiled block callables. `apply(plan)` moves, streams, compiles
and chunks only what differs between the layout in place and the plan's. Nothing is written onto the
modules but their weights, the streamer's hooks and the settings the models declare (chunk sizes).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from wanfit.errors import PlanError
from wanfit.runtime.chunking import apply_chunking
from wanfit.runtime.compile import CompiledBlocks, compile_blocks
from wanfit.runtime.offload import BlockStreamer

HOST = "cpu"


class InputOverwritten(RuntimeError):
    """Compiled blocks that write their residual updates over their input failed part way (the compile
    was given up): the tokens they were given may have changed, so the forward starts again from
    embed, eagerly."""


def _device_name(device: str | torch.device) -> str:
    return str(torch.device(device))


# ----------------------------------------------------------------------------------- the DiT


@dataclass(frozen=True)
class DiTLayout:
    """Where the DiT lives under a plan."""

    device: str
    blocks_resident: int | None  # None: every block on the device; k: blocks streamed, k kept there
    fp8: bool  # blocks stored as scaled float8, upcast per call (through the streamer)
    compiled: bool  # blocks run through torch.compile'd callables
    attention_chunk: int | None
    ffn_chunk: int | None
    ffn_gelu_in_place: bool = False
    ffn_gelu_epilogue: bool = False  # the FFN's GELU in ffn.0's GEMM (after its smoke test)
    residual_in_place: bool = False  # the blocks overwrite their input (see InputOverwritten)
    source: str = "pinned"  # where streamed blocks come from (offload.SOURCES)
    dtype: torch.dtype | None = None  # the compute dtype a streamed DiT is converted to when placed
    sharded: bool = False  # blocks sharded over the run's processes (Plan.dit_sharding "fsdp")
    fp8_gemm: bool = False  # the blocks' linears run as fp8 GEMMs (the fast tier; resident, unsharded)
    fused_elementwise: bool = False  # eager blocks' norms/modulation/RoPE as fused Triton kernels

    @classmethod
    def from_plan(cls, plan) -> DiTLayout:
        fp8 = plan.storage_dtype is not None and plan.storage_dtype.startswith("float8")
        streamed = plan.dit_blocks_resident is not None or fp8
        sharded = plan.dit_sharding == "fsdp"
        # Compiled blocks would trace the streamer's (or FSDP's) hooks: compile only a resident DiT.
        compiled = plan.compile_dit and not streamed and not sharded
        return cls(
            device=_device_name(plan.device),
            blocks_resident=plan.dit_blocks_resident,
            fp8=fp8,
            compiled=compiled,
            attention_chunk=plan.attention_chunk,
            ffn_chunk=plan.ffn_chunk,
            ffn_gelu_in_place=plan.ffn_gelu_in_place,
            ffn_gelu_epilogue=plan.ffn_gelu_epilogue,
            residual_in_place=plan.residual_in_place,
            source=plan.dit_stream_source,
            dtype=plan.torch_compute_dtype,
            sharded=sharded,
            fp8_gemm=plan.fast_tier_in_place,
            # Inductor fuses the compiled blocks' torch ops itself: the kernels serve eager blocks.
            fused_elementwise=plan.fused_elementwise and not compiled,
        )

    @property
    def streamed(self) -> bool:
        return self.blocks_resident is not None or self.fp8

    @property
    def load_device(self) -> str:
        """Where a loader should put the weights: the host for a streamed or sharded DiT (placed block
        by block)."""
        return HOST if self.streamed or self.sharded else self.device

    @property
    def load_dtype(self) -> torch.dtype | None:
        """The dtype a loader should give the weights: the file's for a streamed DiT (mapped, nothing
        converted on the host; the placement converts as it streams), else the compute dtype."""
        return None if self.streamed else self.dtype

    @property
    def where(self) -> tuple:
        return self.device, self.blocks_resident, self.fp8, self.source, self.sharded


class DiTPlacement:
    """The DiT's placement: a model with an nn.ModuleList `blocks` (anything else is only called).

    The DiT is placed when a denoising phase starts (`place`) and may be released to the host before
    the VAE decode (`release`); in between, `apply` follows plan changes. Call the placement, not the
    model, to run the DiT as placed: `placement(x, timestep, context)`.
    compile_options: passed to torch.compile for each block (e.g. a test's backend).
    A compile that fails, or an fp8 GEMM that fails its smoke test, leaves the blocks eager or exact
    for the rest of the process, with one warning; `failures` says why.
    """

    def __init__(
        self, dit: nn.Module, *, pin_memory: bool | None = None, compile_options: dict | None = None
    ):
        self.dit = dit
        self.pin_memory = pin_memory
        self.compile_options = {"dynamic": False, **(compile_options or {})}
        self.layout: DiTLayout | None = None  # None: not placed (as loaded, or released to the host)
        self.streamer: BlockStreamer | None = None
        self.compiled_blocks: CompiledBlocks | None = None
        self.fp8_gemm_bytes: int | None = None  # the fp8 weights' bytes while the fast tier is in place
        self.failures: dict[str, str] = {}  # "compile" / "fp8_gemm" -> why it was given up

    @property
    def tier(self) -> str:
        """What runs now: "fast" (fp8 GEMMs in place) or "exact"."""
        return "fast" if self.fp8_gemm_bytes is not None else "exact"

    @property
    def placeable(self) -> bool:
        return isinstance(getattr(self.dit, "blocks", None), nn.ModuleList)

    def place(self, plan) -> None:
        """Put the DiT where `plan` says, changing only what differs from the layout in place."""
        if not self.placeable:
            return
        old, new = self.layout, DiTLayout.from_plan(plan)
        if old is None or old.where != new.where:
            self._move(new)
        elif self.streamer is not None:
            self.streamer.reset()  # drop the copies a call that raised left behind, and the prefetch
        new = self._checked_gelu_epilogue(new)
        switches = (
            "attention_chunk", "ffn_chunk", "ffn_gelu_in_place", "ffn_gelu_epilogue", "residual_in_place"
        )
        if old is None or any(getattr(old, s) != getattr(new, s) for s in switches):
            apply_chunking(self.dit.blocks, **{s: getattr(new, s) for s in switches})
        self._place_fp8_gemms(new)
        self._place_fused_elementwise(new)
        if new.compiled and self.compiled_blocks is None and "compile" not in self.failures:
            self.compiled_blocks = compile_blocks(self.dit.blocks, **self.compile_options)
        elif not new.compiled:
            self.compiled_blocks = None  # the blocks themselves were never changed: eager again
        self.layout = new

    def _checked_gelu_epilogue(self, layout: DiTLayout) -> DiTLayout:
        """The layout, with the GELU epilogue off where it failed its smoke test on the device (once,
        with a warning: the blocks then run the GELU as a pass of its own)."""
        if not layout.ffn_gelu_epilogue:
            return layout
        if "ffn_gelu_epilogue" not in self.failures:
            from wanfit.runtime import gemm_epilogue

            failure = gemm_epilogue.smoke_test(layout.device)
            if failure is None:
                return layout
            self._give_up(
                "ffn_gelu_epilogue", f"the GELU epilogue failed its smoke test ({failure}); the GELU runs apart"
            )
        return replace(layout, ffn_gelu_epilogue=False)

    def _place_fp8_gemms(self, layout: DiTLayout) -> None:
        """Quantise the block linears for the fast tier (after a smoke test), or put them back."""
        from wanfit.runtime import fp8_linear

        want = layout.fp8_gemm and "fp8_gemm" not in self.failures
        if want and self.fp8_gemm_bytes is None:
            failure = fp8_linear.smoke_test(layout.device)
            if failure is not None:
                self._give_up(
                    "fp8_gemm", f"the fp8 GEMM failed its smoke test ({failure}); the blocks run exact"
                )
                return
            self.fp8_gemm_bytes = fp8_linear.install(
                self.dit.blocks, row_multiple=fp8_linear.row_multiple(layout.device)
            )
            self.compiled_blocks = None  # graphs traced through the exact linears
        elif not want and self.fp8_gemm_bytes is not None:
            self._drop_fp8_gemms()

    def _place_fused_elementwise(self, layout: DiTLayout) -> None:
        """Set the blocks' fused-kernel slots (after a smoke test on the device), or clear them."""
        from wanfit.runtime import fused_elementwise

        want = layout.fused_elementwise and "fused_elementwise" not in self.failures
        if want:
            failure = fused_elementwise.runtime_failure(layout.device)
            if failure is not None:
                self._give_up("fused_elementwise", f"{failure}; the blocks run the torch ops")
                want = False
        kernels = None
        if want:
            kernels = fused_elementwise.GuardedKernels(
                on_failure=lambda why: self._give_up(
                    "fused_elementwise", f"{why}; the blocks run the torch ops for the rest of the process"
                )
            )
        fused_elementwise.install(self.dit.blocks, kernels)

    def _drop_fp8_gemms(self) -> None:
        if self.fp8_gemm_bytes is not None:
            from wanfit.runtime import fp8_linear

            fp8_linear.uninstall(self.dit.blocks)
            self.fp8_gemm_bytes = None
            self.compiled_blocks = None

    def weights_changed(self) -> None:
        """The blocks' weights were rewritten (a LoRA merged or removed): quantised copies are stale,
        so they are made again when the DiT is next placed."""
        self._drop_fp8_gemms()

    def give_up(self, what: str, why: str) -> None:
        """Give `what` up for the rest of the process (a runtime part that failed: LoRA's fused FFN
        kernel), with one warning; `failures` says why."""
        self._give_up(what, why)

    def _give_up(self, what: str, why: str) -> None:
        import warnings

        from wanfit.errors import WanfitWarning

        self.failures[what] = why
        warnings.warn(f"wanfit: {why}.", WanfitWarning, stacklevel=3)

    def apply(self, plan) -> None:
        """Follow a plan change mid-run; a DiT not placed stays on the host until `place`."""
        if self.layout is not None:
            self.place(plan)

    def release(self) -> None:
        """Move the whole DiT to host memory (before the VAE decode); `place` puts it back. Sharded
        blocks keep their shards where they are (1/world of the blocks each)."""
        self._unstream()
        self._drop_fp8_gemms()
        if self.placeable:  # host blocks run the torch ops; `place` sets the kernels again
            from wanfit.runtime import fused_elementwise

            fused_elementwise.install(self.dit.blocks, None)
        if self.layout is not None and self.layout.sharded:
            for child in self.dit.children():
                if child is not self.dit.blocks:
                    child.to(HOST)
            _move_own_tensors(self.dit, torch.device(HOST))
        elif isinstance(self.dit, nn.Module):
            self.dit.to(HOST)
        self.layout = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The DiT's forward as placed (through the compiled blocks when compiled)."""
        if self.compiled_blocks is None:
            return self.dit(x, timestep, context)
        inputs = self.dit.embed(x, timestep, context)
        try:
            return self.dit.unembed(self.run_blocks(inputs), inputs)
        except InputOverwritten:  # the compile was given up: the whole forward again, eagerly
            return self.dit(x, timestep, context)

    # The forward's parts as placed, for a step cache (wanfit.sampling.step_cache) that runs some blocks.

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor):
        return self.dit.embed(x, timestep, context)

    def run_blocks(self, inputs, tokens: torch.Tensor | None = None, start: int = 0, end: int | None = None):
        """WanDiT.run_blocks through the compiled blocks when compiled; a compile that fails runs them
        eagerly from then on (blocks that keep their input: the slice is simply run again; blocks
        that overwrite it raise InputOverwritten, for the caller to start again from embed)."""
        if self.compiled_blocks is None:
            return self.dit.run_blocks(inputs, tokens, start, end)
        try:
            return self.compiled_blocks.run(inputs.tokens if tokens is None else tokens, inputs, start, end)
        except torch.OutOfMemoryError:
            raise  # memory is the OOM guard's to handle
        except Exception as err:  # a compiler error; a real model error raises again just below
            cause = (
                getattr(err, "inner_exception", None) or err.__cause__ or err
            )  # dynamo wraps the backend's
            lines = str(cause).strip().splitlines()
            what = f"{type(cause).__name__}: {lines[0][:200]}" if lines else type(cause).__name__
            self._give_up("compile", f"compiling the DiT's blocks failed ({what}); they run eagerly")
            self.compiled_blocks = None
            if self.layout is not None and self.layout.residual_in_place:
                raise InputOverwritten(
                    "the DiT's compiled blocks failed after they may have overwritten their input"
                ) from err
            return self.dit.run_blocks(inputs, tokens, start, end)

    def unembed(self, tokens: torch.Tensor, inputs) -> torch.Tensor:
        return self.dit.unembed(tokens, inputs)

    def _move(self, layout: DiTLayout) -> None:
        from wanfit.runtime.parallel.sharding import is_sharded, shard_blocks

        self._unstream()
        self._drop_fp8_gemms()  # quantised on the old device
        device = torch.device(layout.device)
        blocks = self.dit.blocks
        if is_sharded(blocks) and not layout.sharded:
            raise PlanError(
                "The DiT's blocks are sharded over the run's processes; they cannot be unsharded."
            )
        # A streamed DiT (or one kept in fp8 from its file) was loaded in its file's dtypes: what lives
        # on the device is converted here.
        kept_fp8 = bool(_file_fp8_scales(self.dit))
        dtype = layout.dtype if layout.streamed or kept_fp8 else None
        if not layout.fp8:
            _upcast_file_fp8(self.dit, layout.dtype)  # kept in fp8 for a plan that stored it so
        for child in self.dit.children():
            if child is not blocks:
                child.to(device=device, dtype=dtype)
        _move_own_tensors(self.dit, device, dtype)
        if layout.sharded:
            if not is_sharded(blocks):
                shard_blocks(blocks, device)
            return
        if not layout.streamed:
            blocks.to(device) if dtype is None else blocks.to(device, dtype)
            return
        k = len(blocks) if layout.blocks_resident is None else layout.blocks_resident
        self.streamer = BlockStreamer(
            blocks,
            device,
            resident=k,
            fp8=layout.fp8,
            source=layout.source,
            dtype=dtype,
            pin_memory=self.pin_memory,
            scales={self.dit.get_parameter(n): s for n, s in _file_fp8_scales(self.dit).items()},
        )

    def _unstream(self) -> None:
        if self.streamer is not None:
            self.streamer.detach(HOST)
            self.streamer = None
            # What came back upcast (merged, or moved off the host) is no fp8 file weight any more.
            scales = _file_fp8_scales(self.dit)
            for name in [n for n in scales if self.dit.get_parameter(n).dtype.itemsize != 1]:
                del scales[name]


def _file_fp8_scales(dit: nn.Module) -> dict[str, torch.Tensor]:
    """The DiT's weights kept in fp8 as their file has them, name -> scale (WanDiT.fp8_scales)."""
    return getattr(dit, "fp8_scales", None) or {}


def _upcast_file_fp8(dit: nn.Module, dtype: torch.dtype) -> None:
    """Weights kept in fp8 from their file, dequantised to `dtype` (a plan that does not store fp8)."""
    scales = _file_fp8_scales(dit)
    for name, scale in list(scales.items()):
        param = dit.get_parameter(name)
        param.data = (param.data.to(torch.float32) * scale.to(param.device)).to(dtype)
        del scales[name]


def _move_own_tensors(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """The parameters and buffers of `model` itself (not of its children); floating ones to `dtype`."""

    def moved(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype if dtype is not None and t.is_floating_point() else t.dtype)

    for p in model.parameters(recurse=False):
        p.data = moved(p.data)
    for name, b in model.named_buffers(recurse=False):
        setattr(model, name, moved(b))


# ------------------------------------------------------------------------------ the text encoder


def text_encoder_compute_dtype(plan, storage_dtype: torch.dtype | None = None) -> torch.dtype:
    """umT5's compute dtype over weights stored in `storage_dtype` (default: the plan's): the text
    encoder's policy when the weights are already in that dtype, else fp32 (never fp16)."""
    from wanfit.models.text_encoder import text_encoder_compute

    storage = storage_dtype or plan.torch_text_encoder_dtype
    device_type = torch.device(plan.text_encoder_device).type
    return text_encoder_compute(plan.torch_compute_dtype, device_type, storage)


@dataclass(frozen=True)
class TextEncoderLayout:
    """Where umT5 lives under a plan, and what it computes in."""

    device: str
    blocks_resident: int | None  # None: the whole encoder on the device; k: blocks streamed, k kept
    compute_dtype: torch.dtype
    source: str = "pinned"  # where streamed blocks come from (offload.SOURCES)
    storage_dtype: torch.dtype | None = None  # the plan's dtype for the weights at rest

    @classmethod
    def from_plan(cls, plan, storage_dtype: torch.dtype | None = None) -> TextEncoderLayout:
        streamed = plan.text_encoder_blocks_resident is not None
        source = plan.text_encoder_stream_source if streamed else "pinned"
        if storage_dtype is None and source == "pinned":
            storage_dtype = plan.torch_text_encoder_dtype
        return cls(
            device=_device_name(plan.text_encoder_device),
            blocks_resident=plan.text_encoder_blocks_resident,
            compute_dtype=text_encoder_compute_dtype(plan, storage_dtype),
            source=source,
            storage_dtype=storage_dtype,
        )

    @property
    def load_device(self) -> str:
        """Where a loader should put the weights: the host for a streamed encoder."""
        return HOST if self.blocks_resident is not None else self.device

    @property
    def load_dtype(self) -> torch.dtype | None:
        """The dtype a loader should give the weights: the plan's, or the file's (None) for blocks that
        stream from the mapped file (nothing is converted on the host)."""
        return None if self.source == "mmap" else self.storage_dtype


class TextEncoderPlacement:
    """A WanTextEncoder's placement (anything else, or a released encoder, is left alone).

    Streamed: the blocks go through the device (k resident), the final norm sits there, and the
    token embedding (a 1 GB lookup in bf16) stays on the host, so only the hidden states move.
    The encoder's weights are referenced weakly: releasing them (WanTextEncoder.release) frees the
    streamer's host copies too, and a reloaded model is placed afresh.
    """

    def __init__(self, text_encoder):
        self.text_encoder = text_encoder
        self._layout: TextEncoderLayout | None = None
        # Weak references (a callable giving the object or None): the model the layout was applied
        # to, and its streamer.
        self._model: Callable[[], nn.Module | None] = lambda: None
        self._streamer: Callable[[], BlockStreamer | None] = lambda: None

    @property
    def layout(self) -> TextEncoderLayout | None:
        """The layout in place; None before the first apply, and once the weights were released."""
        model = self._model()
        return (
            self._layout if model is not None and model is getattr(self.text_encoder, "model", None) else None
        )

    @property
    def streamer(self) -> BlockStreamer | None:
        return self._streamer()

    @property
    def placeable(self) -> bool:
        return isinstance(getattr(self.text_encoder, "model", None), nn.Module)

    def apply(self, plan) -> None:
        """Put the encoder where `plan` says, changing only what differs from the layout in place."""
        if not self.placeable:
            return
        te, model, old = self.text_encoder, self.text_encoder.model, self.layout
        new = TextEncoderLayout.from_plan(plan, te.storage_dtype)
        if old == new:
            return
        where = (new.device, new.blocks_resident, new.source)
        if old is None or (old.device, old.blocks_resident, old.source) != where:
            streamer = self.streamer if old is not None else None
            if streamer is not None:
                streamer.detach(HOST)
            if new.blocks_resident is None:
                model.to(new.device)
                streamer = None
            else:
                model.to(HOST)
                # Run once per prompt: nothing is prefetched past the last block.
                streamer = BlockStreamer(
                    te.blocks,
                    new.device,
                    resident=new.blocks_resident,
                    source=new.source,
                    move_inputs=True,
                    prefetch_first=False,
                )
                te.final_norm.to(new.device)
            # The streamer lives as long as the blocks it hooks; the placement only looks at it.
            self._streamer = weakref.ref(streamer) if streamer is not None else (lambda: None)
        te.compute_dtype = new.compute_dtype
        self._layout, self._model = new, weakref.ref(model)

    def release(self) -> None:
        """Drop the encoder's weights (prompts already in the cache still encode): its streamer's
        copies go now, pinned and device memory alike, not at the next garbage collection."""
        streamer = self.streamer
        if hasattr(self.text_encoder, "release"):
            self.text_encoder.release()
        if streamer is not None:
            streamer.close()
        self._layout, self._streamer = None, (lambda: None)


# ------------------------------------------------------------------------------------------ the VAE


@dataclass(frozen=True)
class VAELayout:
    device: str
    tile: tuple[int, int] | None  # decode tile core in latent pixels, None: untiled

    @classmethod
    def from_plan(cls, plan) -> VAELayout:
        return cls(device=_device_name(plan.device), tile=plan.vae_tile)


class VAEPlacement:
    """The VAE's placement: its device (a module is moved there) and how its decode is tiled."""

    def __init__(self, vae):
        self.vae = vae
        self.layout: VAELayout | None = None

    def apply(self, plan) -> None:
        new = VAELayout.from_plan(plan)
        if isinstance(self.vae, nn.Module) and (self.layout is None or self.layout.device != new.device):
            self.vae.to(new.device)
        self.layout = new

    @property
    def tile(self) -> tuple[int, int] | None:
        return self.layout.tile if self.layout is not None else None


# ------------------------------------------------------------------------------------ all three


@dataclass
class Placements:
    """The pipeline's three placements; `apply(plan)` follows a plan change in each."""

    dit: DiTPlacement
    text_encoder: TextEncoderPlacement
    vae: VAEPlacement

    @classmethod
    def of(cls, dit, vae, text_encoder) -> Placements:
        return cls(DiTPlacement(dit), TextEncoderPlacement(text_encoder), VAEPlacement(vae))

    def apply(self, plan) -> None:
        from wanfit.runtime.allocator import apply_allocator

        apply_allocator(plan)  # before anything is moved: new segments follow the plan
        self.text_encoder.apply(plan)
        self.dit.apply(plan)
        self.vae.apply(plan)
