"""The step-cache policies: when a stream may reuse its last computed step, and what it reuses.

Each rule follows its authors' code (read, not copied), per stream, step i of S (0-based):

- teacache (TeaCache4Wan2.1): the relative L1 change of the time embedding (`ret=true`: of the
  time projection) since the previous step, rescaled by the model's polynomial, accumulates; the
  blocks are skipped while the sum stays under the threshold (the sum restarts after a computed
  step). Steps i < 1 and i >= S - 1 are always computed (`ret=true`: i < 5; no forced last step).
  Skipped: tokens_out = tokens_in + the residual (out - in) of the stream's last computed step.
- magcache (MagCache4Wan2.1): from call 2i + s >= int(2S * retention) on (s = 0 cond, 1 uncond),
  multiply the calibrated magnitude ratio of step i into a running ratio, add |1 - ratio| to an
  accumulated error; skip the blocks while that error is under the threshold and at most K steps
  in a row, else compute and restart. Skipped as teacache.
- easycache (EasyCache4Wan2.1): the cond stream decides for both; after the first `ret` steps and
  before the last, the predicted change k * mean|x_i - x_i-1| / mean|last computed output|
  accumulates (k, the transformation rate: output change over input change between the last two
  computed steps); under the threshold the whole DiT is skipped: out = x + (out - x) of the
  stream's last computed step.
- firstblock (diffusers' FirstBlockCache, after ParaAttention): block 0 always runs; when its
  residual's relative mean absolute change against the last computed step's is at most the
  threshold, the other blocks are skipped: tokens_out = block-0 output + the cached residual of
  blocks 1..N.

wanfit adds two rules of its own: a threshold of 0 never skips (TeaCache's polynomials dip below
zero for tiny changes, so its rule could skip at 0), and a stream with no cached residual (the
first step, or one resumed where the residual was released) computes.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from wanfit.errors import ConfigError
from wanfit.sampling.step_cache.engine import STREAMS, StepCache, StreamState, select_rows
from wanfit.sampling.step_cache.tables import (
    MAGCACHE_RECOMMENDED,
    PUBLISHED_MAG_RATIOS,
    TEACACHE_COEFFICIENTS,
    MagRatios,
    find_calibration,
    load_ratios,
)

# Below this many steps no policy has similar neighbouring steps to skip (few-step samplers).
MIN_STEPS = 10


class CachePolicy:
    """A rule with its settings. Subclasses: name, summary, default threshold, options, memory held."""

    name: ClassVar[str]
    summary: ClassVar[str]
    default_threshold: ClassVar[float]
    options: ClassVar[dict[str, type]] = {}  # NAME=VALUE options after the threshold, and their types
    token_tensors: ClassVar[int] = 0  # [tokens, dim] fp32 tensors held per stream between steps
    latent_tensors: ClassVar[int] = 0  # latent-sized fp32 tensors held per stream between steps

    def __init__(self, spec: str, threshold: float, steps: int):
        self.spec, self.threshold, self.steps = spec, float(threshold), int(steps)

    @classmethod
    def create(cls, spec: str, threshold: float | None, options: dict, *, config, steps: int, model_key):
        """The policy for this model and step count; ConfigError where the rule cannot apply."""
        raise NotImplementedError

    def settings(self) -> dict:
        return {"threshold": self.threshold, "steps": self.steps}

    def may_skip(self, value: float) -> bool:
        """`value < threshold`, the published test, with wanfit's threshold-0-never-skips rule."""
        return self.threshold > 0 and value < self.threshold

    def forward(self, cache: StepCache, dit, x, timestep, context, names) -> torch.Tensor:
        raise NotImplementedError


def model_preset(config) -> str | None:
    """'1.3B' or '14B' when the DiT has that release's shape (the published tables are per model)."""
    from wanfit.models.configs import DIT_PRESETS

    return next((name for name, preset in DIT_PRESETS.items() if preset == config and name != "tiny"), None)


def check_steps(name: str, steps: int, first_skippable: int, last_skippable: int) -> None:
    if steps < MIN_STEPS:
        raise ConfigError(
            f"--cache {name} needs at least {MIN_STEPS} steps, got {steps}: a few-step run has no similar "
            "neighbouring steps to skip; drop --cache."
        )
    if first_skippable > last_skippable:
        raise ConfigError(
            f"--cache {name} can skip no step of a {steps}-step run (it always computes steps before "
            f"{first_skippable} and from {last_skippable + 1}); use more steps or drop --cache."
        )


# ----------------------------------------------------------------------------- skipping the blocks


class BlockSkipPolicy(CachePolicy):
    """Skips every block of a stream: tokens_out = tokens_in + the stream's cached residual."""

    token_tensors = 1
    keeps_residual = True

    def decide(self, step: int, name: str, state: StreamState, inputs, row: int) -> tuple[bool, dict, dict]:
        """(compute?, new values, new small tensors) for batch row `row` of stream `name`."""
        raise NotImplementedError

    def after_compute(self, state: StreamState, residual: torch.Tensor) -> tuple[dict, dict]:
        """(values, tensors) to add once a step was computed (the calibration measures here)."""
        return {}, {}

    def forward(self, cache, dit, x, timestep, context, names):
        inputs = dit.embed(x, timestep, context)
        decisions = [self.decide(cache.step, n, cache.current(n), inputs, b) for b, n in enumerate(names)]
        rows = [b for b, d in enumerate(decisions) if d[0]]
        for b in rows:
            cache.release(names[b], ("residual",))
        every = len(rows) == len(names)
        # The blocks may write over the tokens they are given (Plan.residual_in_place): a copy, since
        # the embedded tokens are the residual's base below (select_rows copies anyway).
        out = dit.run_blocks(inputs, inputs.tokens.clone()) if every else None
        out = dit.run_blocks(select_rows(inputs, rows)) if rows and not every else out
        pieces = []
        for b, (name, (compute, values, tensors)) in enumerate(zip(names, decisions)):
            state = cache.current(name)
            base = inputs.tokens[b : b + 1]
            if compute:
                y = out[b : b + 1] if every else out[rows.index(b)].unsqueeze(0)
                residual = y - base
                more_values, more_tensors = self.after_compute(state, residual)
                tensors = {**tensors, **more_tensors, "residual": residual if self.keeps_residual else None}
                cache.stage(name, state.updated(tensors=tensors, **values, **more_values))
            else:
                y = base + state.tensors["residual"]
                cache.stage(name, state.updated(skipped_step=cache.step, tensors=tensors, **values))
            pieces.append(y)
        tokens = out if every else torch.cat(pieces)
        return dit.unembed(tokens, inputs)


class TeaCache(BlockSkipPolicy):
    name = "teacache"
    summary = "TeaCache: accumulated rescaled change of the time embedding (published 1.3B/14B fits)"
    default_threshold = 0.08  # TeaCache4Wan2.1's README: 0.05 (slow) / 0.08 (fast) for T2V-1.3B
    options = {"ret": bool, "coefficients": str}

    def __init__(self, spec, threshold, steps, *, ret: bool, coefficients: tuple[float, ...], fit: str):
        super().__init__(spec, threshold, steps)
        self.ret, self.coefficients, self.fit = ret, coefficients, fit
        # TeaCache4Wan2.1: ret steps compute the first 5 steps and no forced last one; else the first and last.
        self.ret_steps = 5 if ret else 1
        self.cutoff = steps if ret else steps - 1

    @classmethod
    def create(cls, spec, threshold, options, *, config, steps, model_key):
        ret = options.get("ret", False)
        fit = options.get("coefficients") or model_preset(config)
        if fit is None:
            raise ConfigError(
                "TeaCache's polynomial is fitted per model and this DiT is neither T2V-1.3B nor T2V-14B; "
                "add coefficients=1.3B, coefficients=14B or coefficients=none (no rescaling) to --cache."
            )
        if fit == "none":
            coefficients = (1.0, 0.0)
        elif (fit, ret) in TEACACHE_COEFFICIENTS:
            coefficients = TEACACHE_COEFFICIENTS[(fit, ret)]
        else:
            raise ConfigError(f"teacache coefficients= takes 1.3B, 14B or none, got {fit!r}.")
        policy = cls(spec, cls.default_threshold if threshold is None else threshold, steps,
                     ret=ret, coefficients=coefficients, fit=fit)  # fmt: skip
        check_steps(cls.name, steps, policy.ret_steps, policy.cutoff - 1)
        return policy

    def settings(self):
        return {**super().settings(), "ret": self.ret, "coefficients": self.fit,
                "computed_before": self.ret_steps, "computed_from": self.cutoff}  # fmt: skip

    def decide(self, step, name, state, inputs, row):
        probe = (inputs.e if self.ret else inputs.t_emb)[row]
        previous = state.tensors.get("previous")
        accumulated = state.values.get("accumulated", 0.0)
        compute = True
        if step < self.ret_steps or step >= self.cutoff or previous is None:
            accumulated = 0.0
        else:
            change = ((probe - previous).abs().mean() / previous.abs().mean()).item()
            accumulated += float(np.polyval(self.coefficients, change))
            if self.may_skip(accumulated) and state.tensors.get("residual") is not None:
                compute = False
            else:
                accumulated = 0.0
        return compute, {"accumulated": accumulated}, {"previous": probe.clone()}


class MagCache(BlockSkipPolicy):
    name = "magcache"
    summary = "MagCache: accumulated error of the calibrated residual magnitude ratios, K skips at most"
    default_threshold = 0.12  # magcache_generate.py's default (and its README's for T2V-1.3B)
    options = {"K": int, "retention": float, "ratios": str}

    def __init__(self, spec, threshold, steps, *, K: int, retention: float, ratios: MagRatios):
        super().__init__(spec, threshold, steps)
        self.K, self.retention, self.ratios = K, retention, ratios.resampled(steps)
        # MagCache counts DiT calls, cond and uncond interleaved: call 2i + s of 2S.
        self.first_call = int(2 * steps * retention)

    @classmethod
    def create(cls, spec, threshold, options, *, config, steps, model_key):
        ratios, table = cls.find_ratios(options.get("ratios"), model_preset(config), model_key, steps)
        # Unset settings: the README's for a published table, else magcache_generate.py's defaults.
        recommended = MAGCACHE_RECOMMENDED.get(table, {})
        K = options.get("K", recommended.get("K", 2))
        retention = options.get("retention", recommended.get("retention", 0.2))
        if threshold is None:
            threshold = recommended.get("threshold", cls.default_threshold)
        if K < 1:
            raise ConfigError(f"magcache K= (the longest run of skipped steps) must be at least 1, got {K}.")
        if not 0 <= retention < 1:
            raise ConfigError(f"magcache retention= must be at least 0 and below 1, got {retention}.")
        policy = cls(spec, threshold, steps, K=K, retention=retention, ratios=ratios)
        check_steps(cls.name, steps, max(1, policy.first_call // 2), steps - 1)
        return policy

    @staticmethod
    def find_ratios(given, preset, model_key, steps) -> tuple[MagRatios, str | None]:
        """(ratios, the published table's name or None): ratios=FILE or =1.3B/14B; else this model's
        calibration; else the published table of its preset."""
        if given in PUBLISHED_MAG_RATIOS:
            return PUBLISHED_MAG_RATIOS[given], given
        if given:
            return load_ratios(given), None
        measured = find_calibration(model_key, steps)
        if measured is not None:
            return measured, None
        if preset in PUBLISHED_MAG_RATIOS:
            return PUBLISHED_MAG_RATIOS[preset], preset
        raise ConfigError(
            "MagCache needs this model's residual magnitude ratios, and none are published or measured "
            "for it: run `wanfit calibrate-cache` with the same --model once (or add ratios=FILE to --cache)."
        )

    def settings(self):
        return {**super().settings(), "K": self.K, "retention": self.retention,
                "ratios": self.ratios.source, "first_skippable_call": self.first_call}  # fmt: skip

    def decide(self, step, name, state, inputs, row):
        values = {}
        compute = True
        if 2 * step + STREAMS.index(name) >= self.first_call:
            ratio = state.values.get("ratio", 1.0) * self.ratios.stream(name)[step]
            skips = state.values.get("skips", 0) + 1
            error = state.values.get("error", 0.0) + abs(1.0 - ratio)
            if self.may_skip(error) and skips <= self.K and state.tensors.get("residual") is not None:
                compute = False
                values = {"ratio": ratio, "skips": skips, "error": error}
            else:
                values = {"ratio": 1.0, "skips": 0, "error": 0.0}
        return compute, values, {}


class MagCalibration(BlockSkipPolicy):
    """Computes every step and measures MagCache's ratios: mean over tokens of ||r_i|| / ||r_i-1||."""

    name = "magcache-calibration"
    summary = "measures MagCache's magnitude ratios (skips nothing)"
    default_threshold = 0.0
    token_tensors = 0  # keeps per-token norms only
    keeps_residual = False

    def decide(self, step, name, state, inputs, row):
        return True, {}, {}

    def after_compute(self, state, residual):
        norms = residual.float().norm(dim=-1)  # [1, tokens]
        previous = state.tensors.get("norms")
        ratios = list(state.values.get("ratios", []))
        # MagCache's calibration stores each ratio rounded to 5 decimals; the first step has none (1.0).
        ratios.append(1.0 if previous is None else round((norms / previous).mean().item(), 5))
        return {"ratios": ratios}, {"norms": norms}

    def measured(self, cache: StepCache) -> MagRatios:
        streams = {n: tuple(cache.streams[n].values["ratios"]) for n in STREAMS if n in cache.streams}
        return MagRatios(streams["cond"], streams.get("uncond"), f"measured, {self.steps} steps")


# ----------------------------------------------------------------------------- skipping the whole DiT


class EasyCache(CachePolicy):
    name = "easycache"
    summary = "EasyCache: online transformation rate, whole-DiT reuse (no calibration)"
    default_threshold = 0.05  # easycache_generate.py's default
    options = {"ret": int}
    latent_tensors = 4  # cond: input, previous input, output, residual (uncond: residual)

    def __init__(self, spec, threshold, steps, *, ret_steps: int):
        super().__init__(spec, threshold, steps)
        self.ret_steps = ret_steps

    @classmethod
    def create(cls, spec, threshold, options, *, config, steps, model_key):
        ret = options.get("ret", 10)  # EasyCache4Wan2.1 computes the first 10 steps
        if ret < 2:  # the rate k needs two computed steps before the first skip
            raise ConfigError(f"easycache ret= (steps always computed first) must be at least 2, got {ret}.")
        policy = cls(spec, cls.default_threshold if threshold is None else threshold, steps, ret_steps=ret)
        check_steps(cls.name, steps, ret, steps - 2)
        return policy

    def settings(self):
        return {**super().settings(), "ret": self.ret_steps}

    def decide_pair(self, step: int, state: StreamState, x: torch.Tensor) -> tuple[bool, dict]:
        """The cond stream's decision for this step (both streams follow it) and its new values."""
        accumulated = state.values.get("accumulated", 0.0)
        previous_input = state.tensors.get("previous_input")
        previous_output = state.tensors.get("previous_output")
        k = state.values.get("k")
        compute = True
        if step < self.ret_steps or step >= self.steps - 1:
            accumulated = 0.0
        elif previous_input is not None and previous_output is not None and k is not None:
            change = (x - previous_input).abs().mean() / previous_output.abs().mean()
            accumulated += k * change.item()
            if self.may_skip(accumulated) and state.tensors.get("residual") is not None:
                compute = False
            else:
                accumulated = 0.0
        return compute, {"accumulated": accumulated, "pair_compute": compute, "decided_at": step}

    def forward(self, cache, dit, x, timestep, context, names):
        inputs = x.float()
        decisions = []
        for b, name in enumerate(names):
            state = cache.current(name)
            if name == "cond":
                compute, values = self.decide_pair(cache.step, state, inputs[b : b + 1])
            else:  # uncond follows this step's cond decision: made just above, or by this step's cond call
                cond = cache.current("cond").values
                compute = cond.get("pair_compute", True) if cond.get("decided_at") == cache.step else True
                compute = compute or state.tensors.get("residual") is None
                values = {}
            decisions.append((compute, values))
            if name == "cond":
                cache.stage(name, state.updated(**values))  # the decision, for the uncond row or call
        rows = [b for b, d in enumerate(decisions) if d[0]]
        for b in rows:
            cache.release(names[b], ("residual",))
        every = len(rows) == len(names)
        if every:
            out = dit(x, timestep, context)
        elif rows:
            index = torch.tensor(rows, device=x.device)
            out = dit(
                x.index_select(0, index), timestep.index_select(0, index), context.index_select(0, index)
            )
        pieces = []
        for b, (name, (compute, values)) in enumerate(zip(names, decisions)):
            state = cache.current(name)
            x_b = inputs[b : b + 1].clone()  # kept: a copy, so no caller's tensor is held
            tensors = {"previous_input": x_b} if name == "cond" else {}
            if compute:
                y = out[b : b + 1] if every else out[rows.index(b)].unsqueeze(0)
                tensors["residual"] = y - x_b
                if name == "cond":
                    values.update(self.rate(state, x_b, y))
                    tensors.update(previous_output=y.clone(), previous_previous_input=x_b)
                cache.stage(name, state.updated(tensors=tensors, **values))
            else:
                y = x_b + state.tensors["residual"]
                cache.stage(name, state.updated(skipped_step=cache.step, tensors=tensors, **values))
            pieces.append(y)
        return out if every else torch.cat(pieces)

    @staticmethod
    def rate(state: StreamState, x: torch.Tensor, out: torch.Tensor) -> dict:
        """k = output change / input change between this and the last computed step (once there is one)."""
        previous_output = state.tensors.get("previous_output")
        previous_input = state.tensors.get("previous_previous_input")
        if previous_output is None or previous_input is None:
            return {}
        return {"k": ((out - previous_output).abs().mean() / (x - previous_input).abs().mean()).item()}


# ----------------------------------------------------------------------------- after the first block


class FirstBlockCache(CachePolicy):
    name = "firstblock"
    summary = "first-block cache: block 0's residual against the last computed step's (diffusers' rule)"
    default_threshold = 0.05  # diffusers' FirstBlockCacheConfig default
    token_tensors = 2  # block 0's residual and the residual of blocks 1..N

    @classmethod
    def create(cls, spec, threshold, options, *, config, steps, model_key):
        if config.num_layers < 2:
            raise ConfigError("--cache firstblock needs a DiT of at least 2 blocks.")
        check_steps(cls.name, steps, 1, steps - 1)
        return cls(spec, cls.default_threshold if threshold is None else threshold, steps)

    def decide(self, state: StreamState, first_residual: torch.Tensor) -> bool:
        previous = state.tensors.get("first_residual")
        if previous is None or state.tensors.get("rest_residual") is None:
            return True
        change = ((first_residual - previous).abs().mean() / previous.abs().mean()).item()
        # diffusers computes the rest when the change is above the threshold: equal skips.
        return not (self.threshold > 0 and change <= self.threshold)

    def forward(self, cache, dit, x, timestep, context, names):
        inputs = dit.embed(x, timestep, context)
        # Copies where the blocks' input is read after them (they may overwrite it: Plan.residual_in_place).
        first = dit.run_blocks(inputs, inputs.tokens.clone(), end=1)
        first_residuals = [first[b : b + 1] - inputs.tokens[b : b + 1] for b in range(len(names))]
        decisions = [self.decide(cache.current(n), first_residuals[b]) for b, n in enumerate(names)]
        rows = [b for b, compute in enumerate(decisions) if compute]
        for b in rows:
            cache.release(names[b], ("first_residual", "rest_residual"))
        every = len(rows) == len(names)
        out = None
        if every:
            out = dit.run_blocks(inputs, tokens=first.clone(), start=1)
        elif rows:
            index = torch.tensor(rows, device=first.device)
            out = dit.run_blocks(select_rows(inputs, rows), tokens=first.index_select(0, index), start=1)
        pieces = []
        for b, (name, compute) in enumerate(zip(names, decisions)):
            state = cache.current(name)
            base = first[b : b + 1]
            if compute:
                y = out[b : b + 1] if every else out[rows.index(b)].unsqueeze(0)
                tensors = {"first_residual": first_residuals[b], "rest_residual": y - base}
                cache.stage(name, state.updated(tensors=tensors))
            else:
                y = base + state.tensors["rest_residual"]
                cache.stage(name, state.updated(skipped_step=cache.step))
            pieces.append(y)
        return dit.unembed(out if every else torch.cat(pieces), inputs)
