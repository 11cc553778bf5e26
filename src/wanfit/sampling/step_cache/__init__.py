"""Step caches: skip DiT work between similar denoising steps (lossy, opt-in, named in the metadata).

A cache is chosen by a spec, `NAME[:THRESHOLD][,OPTION=VALUE...]` (`--cache`, the Plan's `cache`),
e.g. "teacache:0.08", "magcache", "magcache:0.2,K=3", "teacache:0.1,ret=true". POLICIES is the one
registry of names, default thresholds and options; policies.py holds the rules, engine.py the
per-stream state a resume file carries, tables.py the published coefficients and ratios.
docs/step_cache.md describes each policy and how to calibrate MagCache for a new model.
"""

from __future__ import annotations

from dataclasses import dataclass

from wanfit.errors import ConfigError
from wanfit.sampling.step_cache.engine import STREAMS, StepCache, StepCacheState, StreamState
from wanfit.sampling.step_cache.policies import (
    MIN_STEPS,
    CachePolicy,
    EasyCache,
    FirstBlockCache,
    MagCache,
    MagCalibration,
    TeaCache,
)

POLICIES: dict[str, type[CachePolicy]] = {
    cls.name: cls for cls in (TeaCache, MagCache, EasyCache, FirstBlockCache)
}

__all__ = [
    "MIN_STEPS",
    "POLICIES",
    "STREAMS",
    "CacheSpec",
    "StepCache",
    "StepCacheState",
    "StreamState",
    "build",
    "calibrator",
    "held_bytes",
    "parse_spec",
]


@dataclass(frozen=True)
class CacheSpec:
    """A parsed spec: the policy name, the threshold if given, the options given (typed)."""

    name: str
    threshold: float | None
    options: tuple[tuple[str, object], ...] = ()

    def __str__(self) -> str:
        text = self.name if self.threshold is None else f"{self.name}:{self.threshold:g}"
        return ",".join([text, *(f"{k}={_format(v)}" for k, v in self.options)])


def _format(value) -> str:
    return (
        str(value).lower()
        if isinstance(value, bool)
        else f"{value:g}"
        if isinstance(value, float)
        else str(value)
    )


def parse_spec(text: str) -> CacheSpec:
    """'magcache:0.2,K=3' -> CacheSpec; ConfigError naming what is wrong."""
    head, *items = [part.strip() for part in str(text).split(",")]
    name, _, threshold_text = head.partition(":")
    name = name.strip().lower().replace("_", "")
    if name not in POLICIES:
        raise ConfigError(
            f"Unknown step cache {name!r} in --cache {text!r}; choose one of: {', '.join(POLICIES)}."
        )
    threshold = None
    if threshold_text.strip():
        try:
            threshold = float(threshold_text)
        except ValueError:
            threshold = float("nan")
        if not threshold >= 0 or threshold == float("inf"):
            raise ConfigError(f"The {name} threshold must be a number of at least 0, got {threshold_text!r}.")
    types = POLICIES[name].options
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in types:
            known = ", ".join(f"{k}=" for k in types) or "none"
            raise ConfigError(f"--cache {name} takes the options {known}; got {item!r}.")
        options[key] = _option_value(name, key, value.strip(), types[key])
    return CacheSpec(name, threshold, tuple(sorted(options.items())))


def _option_value(policy: str, key: str, text: str, kind: type):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
    else:
        try:
            return kind(text)
        except ValueError:
            pass
    what = {bool: "true or false", int: "a whole number", float: "a number", str: "a value"}[kind]
    raise ConfigError(f"--cache {policy} option {key}= takes {what}, got {text!r}.")


def canonical_spec(text: str | None) -> str | None:
    """The spec as the Plan stores it ('MagCache : 0.20' -> 'magcache:0.2'); None or 'none' -> None."""
    if text is None or str(text).strip().lower() in ("", "none", "off"):
        return None
    return str(parse_spec(text))


def build(
    spec: str,
    config,
    steps: int,
    *,
    model_key: str | None = None,
    state: StepCacheState | None = None,
    world_size: int = 1,
):
    """The StepCache a run with this spec uses; ConfigError where the policy cannot apply to it.

    config: the DiT's DiTConfig (picks published tables); steps: the run's step count; model_key:
    where calibrations of this model are stored (None: none); state: a resumed run's cache;
    world_size: the run's processes (refuse_parallel).
    """
    parsed = parse_spec(spec)
    refuse_parallel(spec, world_size)
    policy = POLICIES[parsed.name].create(
        str(parsed), parsed.threshold, dict(parsed.options), config=config, steps=steps, model_key=model_key
    )
    return StepCache(policy, state)


def refuse_parallel(spec: str, world_size: int) -> None:
    """A cache runs on one process: processes that hold a share of the tokens or one stream each would
    have to make the same decisions, which they are not made to yet."""
    if world_size > 1:
        raise ConfigError(
            f"--cache {parse_spec(spec).name} runs on one GPU for now; drop --cache, or --gpus / --parallel."
        )


def calibrator(steps: int) -> StepCache:
    """A cache that skips nothing and measures MagCache's ratios (`wanfit calibrate-cache`)."""
    return StepCache(MagCalibration(MagCalibration.name, 0.0, steps))


def held_bytes(spec: str, *, tokens: int, dim: int, latent_elements: int, streams: int) -> int:
    """Device memory a cache keeps between steps: its fp32 residuals and latent copies per stream."""
    policy = POLICIES[parse_spec(spec).name]
    return 4 * streams * (policy.token_tensors * tokens * dim + policy.latent_tensors * latent_elements)
