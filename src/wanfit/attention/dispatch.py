"""The dispatcher: picks a backend per kind of call, runs it, and falls back when one fails.

Selection is the best-ranked backend that (1) declares it can serve the call on this device,
(2) imports, and (3) passes a tiny smoke test against a plain fp32 reference on the real device
(once per process). Selections are cached per (device, dtype, head dim, mask, whether full math
fits the budget), so a call costs a dictionary lookup. Under emulation of a card this machine does not have, step (3)
cannot run: selection then rests on the declared requirements alone.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from dataclasses import dataclass

import torch

from wanfit.attention.backends import AttentionBackend, AttentionCall, Registry, default_registry
from wanfit.attention.chunked import DEFAULT_BUDGET_BYTES, MIB, chunked_attention, reference_attention
from wanfit.attention.ranking import load_measured, rank
from wanfit.errors import AttentionUnavailableError, ConfigError, one_line
from wanfit.hardware.probe import HardwareProbe
from wanfit.hardware.profiles import GIB

MATH_BUDGET_BYTES = 256 * MIB
# Max abs error a kernel may show against the fp32 reference on the smoke test's unit-scale data.
SMOKE_TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}
LOSSY_TOLERANCE_FACTOR = 5.0
# Smoke-test results for this process (None: passed; else what went wrong), shared by every
# dispatcher: the planner's and a pipeline's test a backend once, not each before its first call.
_SMOKE_RESULTS: dict[tuple, str | None] = {}


class AttentionFallbackWarning(RuntimeWarning):
    """A backend failed at run time and was disabled for this process."""


@dataclass(frozen=True)
class Candidate:
    """One backend's answer for a call: can it serve it, in which dtype, and why (not)."""

    name: str
    available: bool
    reason: str
    kernel_dtype: torch.dtype | None
    exact: bool
    smoke_test: str  # "passed" | "failed" | "skipped (emulated card)" | "not run"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "available": self.available,
            "reason": self.reason,
            "kernel_dtype": _dtype_text(self.kernel_dtype),
            "exact": self.exact,
            "smoke_test": self.smoke_test,
        }


@dataclass(frozen=True)
class Selection:
    """What runs a kind of call: the backend, its kernel dtype, chunked's inner kernel, and why."""

    backend: str
    kernel_dtype: torch.dtype
    model_dtype: torch.dtype
    reason: str
    inner: str | None = None
    smoke_tested: bool = False

    @property
    def cast(self) -> bool:
        return self.kernel_dtype != self.model_dtype

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "kernel_dtype": _dtype_text(self.kernel_dtype),
            "model_dtype": _dtype_text(self.model_dtype),
            "cast": self.cast,
            "inner": self.inner,
            "reason": self.reason,
            "smoke_tested": self.smoke_tested,
        }


def _dtype_text(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


_live: weakref.WeakValueDictionary[int, Dispatcher] = weakref.WeakValueDictionary()
_next_key = itertools.count(1)  # 0 stands for the process-wide dispatcher


def live_dispatcher(key: int) -> Dispatcher | None:
    """The dispatcher whose `key` this is, while it lives."""
    return _live.get(key)


class Dispatcher:
    """Selection and fallback state for one process (or one test)."""

    def __init__(
        self,
        hw: HardwareProbe,
        *,
        forced: str | None = None,
        allow_lossy: bool = False,
        registry: Registry | None = None,
        math_budget_bytes: int = MATH_BUDGET_BYTES,
        chunk_budget_bytes: int = DEFAULT_BUDGET_BYTES,
        measured_ms: dict[str, float] | None = None,
        smoke_tests: bool = True,
        strict: bool = True,
        kind: str = "",
    ):
        """strict: a forced backend that cannot serve a call raises. strict=False (a pipeline's
        dispatchers, forced by the Plan): it falls back to the ranked choice with one warning, and
        the switch is recorded in `switches`. kind names the attention ("self", "cross", "vae")."""
        self.hw = hw
        self.strict = strict
        self.kind = kind
        # An int that compiled code carries to the attention op in its place (an op takes no Python
        # objects; wanfit.attention looks the dispatcher up by it when the op runs).
        self.key = next(_next_key)
        _live[self.key] = self
        self.served: dict[str, int] = {}  # backend -> calls it served (what actually ran)
        self.switches: list[dict] = []  # forced backend -> the one that took over, and why
        self.registry = registry if registry is not None else default_registry()
        self.allow_lossy = allow_lossy
        self.math_budget_bytes = math_budget_bytes
        self.chunk_budget_bytes = chunk_budget_bytes
        self.smoke_tests = smoke_tests
        self.measured_ms = load_measured(hw) if measured_ms is None else dict(measured_ms)
        self.ranking_source = "measured on this card" if self.measured_ms else "default table"
        versions = {p.module: p.version for p in hw.kernel_packages if p.installed}
        self.order = rank(self.registry, self.measured_ms, self.allow_lossy, versions)
        self.disabled: dict[str, str] = {}  # name -> why, for the rest of the process
        self._selections: dict[tuple, Selection] = {}
        self.forced = self._check_forced(forced)

    # --- describing calls -----------------------------------------------------------------------

    def call_for(
        self, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> AttentionCall:
        """The AttentionCall of real tensors. The probe's (maybe emulated) card speaks for its device type."""
        device_type = q.device.type
        cc, name = None, ""
        if device_type == self.hw.device_type:
            cc, name = self.hw.compute_capability, self.hw.device_name
        elif device_type == "cuda":
            cc = torch.cuda.get_device_capability(q.device)
        batch, q_len, heads, head_dim = q.shape
        return AttentionCall(
            device_type=device_type,
            compute_capability=cc,
            dtype=q.dtype,
            head_dim=head_dim,
            q_len=q_len,
            kv_len=k.shape[1],
            batch=batch,
            heads=heads,
            has_mask=attn_mask is not None,
            device_name=name,
        )

    def call_on_probe(
        self,
        dtype: torch.dtype,
        q_len: int,
        kv_len: int | None = None,
        heads: int = 12,
        head_dim: int = 128,
        batch: int = 1,
    ) -> AttentionCall:
        """An AttentionCall on the probed (maybe emulated) device, e.g. the default job's."""
        return AttentionCall(
            device_type=self.hw.device_type,
            compute_capability=self.hw.compute_capability,
            dtype=dtype,
            head_dim=head_dim,
            q_len=q_len,
            kv_len=q_len if kv_len is None else kv_len,
            batch=batch,
            heads=heads,
            device_name=self.hw.device_name,
            device_present=self.hw.device_present,
        )

    def probe_device(self) -> torch.device | None:
        """The real torch device behind the probe, or None when it is emulated and absent."""
        if not self.hw.device_present:
            return None
        if self.hw.device_type == "cuda":
            return torch.device("cuda", self.hw.device_index or 0)
        return torch.device(self.hw.device_type)

    # --- selection ------------------------------------------------------------------------------

    def candidate(
        self, name: str, call: AttentionCall, device: torch.device | None, *, auto: bool = True
    ) -> Candidate:
        """Whether backend `name` can serve `call` here; runs its smoke test on `device` if needed."""
        b = self.registry[name]
        if name in self.disabled:
            return Candidate(name, False, self.disabled[name], None, b.exact, "failed")
        kernel_dtype, reason = b.check(call)
        if reason is None and name == "sdpa_math" and auto and call.score_bytes > self.math_budget_bytes:
            reason = (
                f"its score matrix would need {_bytes_text(call.score_bytes)}, over the "
                f"{_bytes_text(self.math_budget_bytes)} budget for full-length math (chunked does this exactly in bounded memory)."
            )
        if reason is None and not b.exact and not self.allow_lossy and auto:
            reason = "is lossy (quantises q and k), so it is used only when asked for (--attention sage or allow_lossy)."
        if reason is None and b.named_only and auto:
            reason = f"runs only where named (--set self_attention={name}): {b.named_only}."
        if reason is not None:
            return Candidate(name, False, reason, None, b.exact, "not run")
        assert kernel_dtype is not None
        if device is None:
            smoke, failure = "skipped (emulated card)", None
        elif not self.smoke_tests:
            smoke, failure = "not run", None
        else:
            failure = self._smoke_test(b, kernel_dtype, call, device)
            smoke = "passed" if failure is None else "failed"
        if failure is not None:
            return Candidate(name, False, f"failed its smoke test: {failure}", None, b.exact, smoke)
        if name == "chunked":
            inner = self._inner_for(call, device)
            if inner is not None:
                return Candidate(
                    name, True, f"runs {inner.name} on query blocks.", inner.kernel_dtype, b.exact, smoke
                )
            how = "runs an online softmax over key blocks, accumulating in float32"
        else:
            how = f"runs in {_dtype_text(kernel_dtype)}"
        if kernel_dtype != call.dtype:
            how += f" (q/k/v cast from {_dtype_text(call.dtype)}: no {_dtype_text(call.dtype)} kernel on {call.where()})"
        return Candidate(name, True, how + ".", kernel_dtype, b.exact, smoke)

    def _inner_for(self, call: AttentionCall, device: torch.device | None) -> Candidate | None:
        """The best fused exact kernel (lossy too when allowed) chunked can run on query blocks."""
        for name in self.order:
            b = self.registry[name]
            if name in ("chunked", "sdpa_math") or (not b.exact and not self.allow_lossy):
                continue
            cand = self.candidate(name, call, device)
            if cand.available:
                return cand
        return None

    def candidates(self, call: AttentionCall, device: torch.device | None = None) -> list[Candidate]:
        """Every backend's answer for `call`, in rank order (smoke-testing each that qualifies)."""
        device = self.probe_device() if device is None else device
        return [self.candidate(name, call, device) for name in self.order]

    def select(self, call: AttentionCall, device: torch.device | None = None) -> Selection:
        """The backend for `call` (forced or best-ranked available); AttentionUnavailableError if none."""
        device = self.probe_device() if device is None and call.device_type == self.hw.device_type else device
        if self.forced is not None:
            cand = self.candidate(self.forced, call, device, auto=False)
            if not cand.available and not self.strict:
                selection = self._auto_select(call, device)
                self._record_switch(self.forced, selection.backend, f"{self.forced} {cand.reason}")
                return selection
            if not cand.available:
                raise AttentionUnavailableError(
                    f"The attention backend {self.forced} was asked for but {cand.reason}"
                )
            if self.forced == "sdpa_math" and call.score_bytes > self.math_budget_bytes:
                warnings.warn(
                    f"wanfit: sdpa_math was asked for; this call's score matrix needs {_bytes_text(call.score_bytes)}.",
                    ResourceWarning,
                    stacklevel=2,
                )
            return self._selection(
                cand, call, device, f"forced (--attention / WANFIT_ATTENTION={self.forced})"
            )
        return self._auto_select(call, device)

    def _auto_select(self, call: AttentionCall, device: torch.device | None) -> Selection:
        skipped = []
        for name in self.order:
            cand = self.candidate(name, call, device)
            if cand.available:
                why = f"best-ranked available backend ({self.ranking_source})"
                if skipped:
                    why += f"; ranked higher but unavailable here: {', '.join(skipped)}"
                unmeasured = self._unmeasured_kernels(name)
                if unmeasured:  # e.g. flash-attn-4 installed after the card's bench: ranked last until timed
                    why += (
                        f"; installed but not in this card's measurements, so ranked after them: "
                        f"{', '.join(unmeasured)} (`wanfit bench attention` times them)"
                    )
                return self._selection(cand, call, device, why)
            skipped.append(name)
        raise AttentionUnavailableError(
            f"No attention backend can serve this call on {call.where()}; the last one, {skipped[-1]}, {cand.reason}"
        )

    def _unmeasured_kernels(self, selected: str) -> list[str]:
        """Exact kernels ranked below `selected` only for want of a measurement here, whose package is
        installed (a measured ranking puts every measured kernel first)."""
        if not self.measured_ms or selected not in self.measured_ms:
            return []
        names = []
        for b in self.registry:
            if b.name in self.measured_ms or b.role != "kernel" or not b.exact or b.package is None:
                continue
            package = self.hw.package(b.package)  # as probed: nothing heavy is imported
            if package is not None and package.installed:
                names.append(b.name)
        return names

    def selection_for(
        self, name: str, call: AttentionCall, device: torch.device | None, *, auto: bool = True
    ) -> tuple[Selection | None, Candidate]:
        """Backend `name` as a Selection for `call` (None when it cannot serve it), with its Candidate.

        auto=False lifts the rules that apply to automatic choice only (math budget, lossy)."""
        cand = self.candidate(name, call, device, auto=auto)
        if not cand.available:
            return None, cand
        return self._selection(cand, call, device, "asked for by name"), cand

    def _selection(
        self, cand: Candidate, call: AttentionCall, device: torch.device | None, why: str
    ) -> Selection:
        inner = self._inner_for(call, device) if cand.name == "chunked" else None
        if cand.name == "chunked":
            why += f"; inner kernel: {inner.name if inner else 'online softmax over key blocks'}"
        kernel_dtype = inner.kernel_dtype if inner is not None else cand.kernel_dtype
        assert kernel_dtype is not None
        return Selection(
            backend=cand.name,
            kernel_dtype=kernel_dtype,
            model_dtype=call.dtype,
            reason=why,
            inner=inner.name if inner else None,
            smoke_tested=cand.smoke_test == "passed",
        )

    def explain(self, call: AttentionCall) -> dict:
        """The selection for `call` and every backend's answer, JSON-ready."""
        candidates = self.candidates(call)
        try:
            selection = self.select(call).to_dict()
            error = None
        except AttentionUnavailableError as err:
            selection, error = None, str(err)
        return {
            "call": call.to_dict(),
            "selected": selection["backend"] if selection else None,
            "selection": selection,
            "error": error,
            "forced": self.forced,
            "ranking": self.ranking_source,
            "candidates": [c.to_dict() for c in candidates],
        }

    # --- running --------------------------------------------------------------------------------

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, q_len, heads, head_dim = q.shape
        math_fits = batch * heads * q_len * k.shape[1] * 4 <= self.math_budget_bytes
        key = (q.device, q.dtype, head_dim, attn_mask is not None, math_fits)
        selection = self._selections.get(key)
        if selection is None:
            selection = self._selections[key] = self.select(self.call_for(q, k, attn_mask), q.device)
        try:
            out = self._run(selection, q, k, v, scale, attn_mask)
        except torch.OutOfMemoryError:
            raise  # memory is the runtime's to handle (step-down), not a broken kernel
        except Exception as err:
            failed = (
                selection.inner if selection.backend == "chunked" and selection.inner else selection.backend
            )
            if self.forced is not None and failed == self.forced:
                if self.strict:
                    raise AttentionUnavailableError(
                        f"The attention backend {failed} was asked for but failed here: {one_line(err)}."
                    ) from err
                self.forced = None  # the Plan's choice failed: the ranked choice takes over
                self._record_switch(failed, None, f"{failed} failed at run time ({one_line(err)})")
            self._disable(failed, err)
            return self(q, k, v, scale=scale, attn_mask=attn_mask)
        self.served[selection.backend] = self.served.get(selection.backend, 0) + 1
        return out

    def run_selection(
        self,
        selection: Selection,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale=None,
        attn_mask=None,
    ) -> torch.Tensor:
        """Run a given selection without fallback (the benchmark times backends this way)."""
        return self._run(selection, q, k, v, scale, attn_mask)

    def _run(self, selection: Selection, q, k, v, scale, attn_mask) -> torch.Tensor:
        model_dtype = q.dtype
        kd = selection.kernel_dtype
        if kd != model_dtype:
            q, k, v = q.to(kd), k.to(kd), v.to(kd)
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = attn_mask.to(kd)
        if selection.backend == "chunked":
            inner = self.registry[selection.inner].run if selection.inner else None
            out = chunked_attention(
                q, k, v, scale=scale, attn_mask=attn_mask, budget_bytes=self.chunk_budget_bytes, inner=inner
            )
        else:
            out = self.registry[selection.backend].run(q, k, v, scale=scale, attn_mask=attn_mask)
        return out if out.dtype == model_dtype else out.to(model_dtype)

    def _record_switch(self, planned: str, used: str | None, why: str) -> None:
        """Remember (once per planned/used pair) that the planned backend did not serve a call."""
        entry = {"kind": self.kind, "planned": planned, "used": used, "reason": why}
        if entry not in self.switches:
            self.switches.append(entry)
            if used is not None:
                warnings.warn(
                    f"wanfit: {self.kind + ' ' if self.kind else ''}attention: {why}; using {used} instead.",
                    AttentionFallbackWarning,
                    stacklevel=4,
                )

    def report(self) -> dict:
        """What ran: calls per backend and any switch away from the planned backend (JSON-ready)."""
        return {"served": dict(self.served), "switches": list(self.switches)}

    def reset_report(self) -> None:
        self.served = {}

    def _disable(self, name: str, err: Exception) -> None:
        self.disabled[name] = f"failed at run time and was disabled for this process ({one_line(err)})."
        self._selections.clear()
        warnings.warn(
            f"wanfit: attention backend {name} failed ({one_line(err)}); it is disabled for this process "
            "and calls go to the next backend.",
            AttentionFallbackWarning,
            stacklevel=3,
        )

    def _smoke_test(
        self, b: AttentionBackend, kernel_dtype: torch.dtype, call: AttentionCall, device
    ) -> str | None:
        """None when `b` matches the fp32 reference on a tiny cross-attention call; else what went wrong."""
        # The backend itself (its kernel function) is in the key: a registry's replacement is tested anew.
        key = (b, str(device), kernel_dtype, call.head_dim, call.has_mask)
        if key in _SMOKE_RESULTS:
            return _SMOKE_RESULTS[key]
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, n, 2, call.head_dim, generator=gen) for n in (77, 45, 45))
        mask = torch.rand(1, 1, 77, 45, generator=gen) > 0.2 if call.has_mask else None
        if mask is not None:
            mask[..., 0] = True  # no fully masked row: kernels disagree on what those return
        ref = reference_attention(q, k, v, attn_mask=mask)
        try:
            with torch.no_grad():
                qd, kd, vd = (t.to(device=device, dtype=kernel_dtype) for t in (q, k, v))
                out = b.run(qd, kd, vd, attn_mask=None if mask is None else mask.to(device))
            err = (out.float().cpu() - ref).abs().max().item()
            tol = SMOKE_TOLERANCE.get(kernel_dtype, 1e-2) * (1.0 if b.exact else LOSSY_TOLERANCE_FACTOR)
            failure = (
                None if err <= tol else f"max error {err:.3g} against the reference (tolerance {tol:.2g})."
            )
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            failure = f"raised {one_line(err)}."
        _SMOKE_RESULTS[key] = failure
        return failure

    def _check_forced(self, forced: str | None) -> str | None:
        if forced is None or forced in ("", "auto"):
            return None
        name = forced.strip().lower()
        if name not in self.registry:
            raise ConfigError(
                f"Unknown attention backend {forced!r}; choose one of: auto, {', '.join(self.registry.names())}."
            )
        where = (
            f"{self.hw.device_name} ({self.hw.sm})" if self.hw.sm else f"this {self.hw.device_type} device"
        )
        reason = self.registry[name].device_reason(
            self.hw.device_type, self.hw.compute_capability, where, check_build=self.hw.device_present
        )
        if reason:
            raise AttentionUnavailableError(f"The attention backend {name} was asked for but {reason}")
        return name


def _bytes_text(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"
