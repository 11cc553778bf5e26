"""A run's step cache: one policy, one state per stream (cond, uncond), committed step by step.

The pipeline calls `begin_step(i)`, then `forward(...)` once per DiT call of that step (one call
with both streams in its batch for batched CFG, or one call per stream), then `end_step()`. A
stream's state is replaced, never changed in place, so a snapshot handed out after step i (the
DenoiseState a resume file is written from) stays the state after step i while step i + 1 runs.
One exception keeps memory flat: when a stream is about to recompute, its old residual is dropped
from the committed state too (`release`). A resume from that snapshot then finds no residual,
which every policy's rule answers with "compute", the decision the first run made anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from wanfit.errors import CheckpointError

STREAMS = ("cond", "uncond")  # the policies' stream order: MagCache counts calls as 2 * step + index


@dataclass
class StreamState:
    """One stream's cache: tensors (never modified in place), plain values, the steps it skipped."""

    tensors: dict[str, torch.Tensor | None] = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    skipped: tuple[int, ...] = ()

    def updated(
        self, *, skipped_step: int | None = None, tensors: dict | None = None, **values
    ) -> StreamState:
        """A new state: these tensors and values replaced, `skipped_step` appended to the skipped steps."""
        return StreamState(
            {**self.tensors, **(tensors or {})},
            {**self.values, **values},
            self.skipped if skipped_step is None else (*self.skipped, skipped_step),
        )

    def to_dict(self) -> dict:
        return {"tensors": dict(self.tensors), "values": dict(self.values), "skipped": list(self.skipped)}


@dataclass
class StepCacheState:
    """What a resume file carries: the policy (its canonical spec) and each stream's state."""

    spec: str
    streams: dict[str, StreamState] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"spec": self.spec, "streams": {name: s.to_dict() for name, s in self.streams.items()}}

    @classmethod
    def from_dict(cls, data, where: str = "the resume file") -> StepCacheState:
        """Parse what to_dict wrote; CheckpointError for anything else."""
        try:
            streams = {}
            for name, s in data["streams"].items():
                tensors, values, skipped = s["tensors"], s["values"], s["skipped"]
                if name not in STREAMS or not isinstance(tensors, dict) or not isinstance(values, dict):
                    raise TypeError(name)
                if not all(t is None or isinstance(t, torch.Tensor) for t in tensors.values()):
                    raise TypeError(name)
                streams[name] = StreamState(dict(tensors), dict(values), tuple(int(i) for i in skipped))
            if not isinstance(data["spec"], str):
                raise TypeError("spec")
            return cls(data["spec"], streams)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CheckpointError(
                f"{where} holds a damaged step-cache state; it cannot be resumed."
            ) from None

    def to(self, device: str | torch.device) -> StepCacheState:
        """A copy with every tensor on `device`."""
        moved = {
            name: replace(s, tensors={k: None if t is None else t.to(device) for k, t in s.tensors.items()})
            for name, s in self.streams.items()
        }
        return StepCacheState(self.spec, moved)


def select_rows(inputs, rows: list[int]):
    """The DiTInputs of some batch rows (RoPE and the grid are shared by all rows)."""
    index = torch.tensor(rows, device=inputs.tokens.device)
    return replace(
        inputs,
        tokens=inputs.tokens.index_select(0, index),
        e=inputs.e.index_select(0, index),
        t_emb=inputs.t_emb.index_select(0, index),
        context=inputs.context.index_select(0, index),
    )


class StepCache:
    """The cache of one denoising run under `policy` (see policies.py for the rules)."""

    def __init__(self, policy, state: StepCacheState | None = None):
        self.policy = policy
        if state is not None and state.spec != policy.spec:
            raise CheckpointError(
                f"The resume file's step cache is {state.spec!r}, but this run's is {policy.spec!r}; "
                "resume with the same --cache."
            )
        self.streams: dict[str, StreamState] = dict(state.streams) if state is not None else {}
        self.step = 0
        self._staged: dict[str, StreamState] = {}

    # -- the step protocol

    def begin_step(self, step: int) -> None:
        """Start (or, after an out-of-memory retry, restart) step `step`: nothing of it is kept yet."""
        self.step = step
        self._staged = {}

    def end_step(self) -> None:
        self.streams.update(self._staged)
        self._staged = {}

    def forward(
        self, dit, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, names
    ) -> torch.Tensor:
        """The DiT's prediction for a batch whose row b belongs to stream names[b]; [B, C, F, H, W] fp32."""
        from wanfit.runtime.placement import InputOverwritten

        try:
            return self.policy.forward(self, dit, x, timestep, context, tuple(names))
        except InputOverwritten:  # the compiled blocks were given up part way: once more, eagerly
            return self.policy.forward(self, dit, x, timestep, context, tuple(names))

    # -- for the policies

    def current(self, name: str) -> StreamState:
        """The stream's state as this step found it (or as an earlier call of this step left it)."""
        return self._staged.get(name) or self.streams.get(name) or StreamState()

    def stage(self, name: str, state: StreamState) -> None:
        self._staged[name] = state

    def release(self, name: str, keys: tuple[str, ...]) -> None:
        """Drop tensors a recomputing stream will replace, from the committed state as well (see above)."""
        for state in (self.streams.get(name), self._staged.get(name)):
            if state is not None:
                for key in keys:
                    if key in state.tensors:
                        state.tensors[key] = None

    # -- results

    def snapshot(self) -> StepCacheState:
        """The committed state (shares the tensors; see the module docstring)."""
        return StepCacheState(self.policy.spec, dict(self.streams))

    def skipped(self) -> dict[str, list[int]]:
        return {name: list(self.streams[name].skipped) for name in STREAMS if name in self.streams}

    def report(self) -> dict:
        """For the output's metadata: the policy, its resolved settings, the skipped steps per stream."""
        return {"policy": self.policy.spec, "settings": self.policy.settings(), "skipped": self.skipped()}
