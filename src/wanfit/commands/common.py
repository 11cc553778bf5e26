"""Options and setup shared by the commands that touch the hardware (doctor, bench, plan, generate)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from wanfit.attention import ATTENTION_ENV, BACKEND_NAMES, Dispatcher, configure
from wanfit.hardware.probe import EMULATE_ENV, HardwareProbe, apply_emulation_limits, probe
from wanfit.hardware.profiles import PROFILES
from wanfit.models.configs import WAN_T2V_1_3B, latent_shape
from wanfit.precision import PrecisionPolicy, precision_policy


@dataclass(frozen=True)
class JobShape:
    """A text-to-video job's size, enough to derive the attention call."""

    model: str
    width: int
    height: int
    frames: int
    heads: int
    head_dim: int
    patch: tuple[int, int, int] = (1, 2, 2)

    @property
    def tokens(self) -> int:
        return latent_tokens(self.width, self.height, self.frames, self.patch)

    def describe(self) -> str:
        return (
            f"Wan2.1 {self.model}, {self.width}x{self.height}, {self.frames} frames: "
            f"{self.tokens:,} tokens, {self.heads} heads of {self.head_dim}"
        )


def latent_tokens(width: int, height: int, frames: int, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Tokens the DiT sees: the latent grid divided by the patch size."""
    _, _, latent_f, latent_h, latent_w = latent_shape(1, 1, height, width, frames)
    return (latent_f // patch[0]) * (latent_h // patch[1]) * (latent_w // patch[2])


DEFAULT_JOB = JobShape(
    model="1.3B",
    width=832,
    height=480,
    frames=81,
    heads=WAN_T2V_1_3B.num_heads,
    head_dim=WAN_T2V_1_3B.head_dim,
)


def add_hardware_options(parser: argparse.ArgumentParser) -> None:
    """--emulate, --attention, --allow-lossy-attention, --dtype."""
    group = parser.add_argument_group("hardware")
    group.add_argument(
        "--emulate",
        metavar="CARD",
        default=None,
        help=f"act as this card ({', '.join(sorted(PROFILES))}); also ${EMULATE_ENV}",
    )
    group.add_argument(
        "--attention",
        metavar="BACKEND",
        default=None,
        help=f"use this attention backend ({', '.join(BACKEND_NAMES)}); also ${ATTENTION_ENV}",
    )
    group.add_argument(
        "--allow-lossy-attention",
        action="store_true",
        help="let lossy kernels (sage) compete on speed with exact ones",
    )
    group.add_argument("--dtype", default=None, help="compute dtype (bf16, fp16, fp32); default: by card")


@dataclass(frozen=True)
class HardwareSetup:
    """The probe, the precision policy and the configured attention dispatcher."""

    probe: HardwareProbe
    precision: PrecisionPolicy
    dispatcher: Dispatcher


def hardware_from_args(args: argparse.Namespace, *, apply_limits: bool = False) -> HardwareSetup:
    """Probe (honouring --emulate), choose precision, configure wanfit.attention; cap memory if asked."""
    hw = probe(emulate=getattr(args, "emulate", None))
    precision = precision_policy(hw, compute=getattr(args, "dtype", None))
    dispatcher = configure(
        hw, forced=getattr(args, "attention", None), allow_lossy=getattr(args, "allow_lossy_attention", False)
    )
    if apply_limits:
        apply_emulation_limits(hw)
    return HardwareSetup(probe=hw, precision=precision, dispatcher=dispatcher)


def device_budget(setup: HardwareSetup, job: JobShape = DEFAULT_JOB):
    """The planner's view of this machine, with the attention backend the dispatcher picks for `job`."""
    from wanfit.errors import AttentionUnavailableError
    from wanfit.plan.planner import budget_from_probe

    call = setup.dispatcher.call_on_probe(
        setup.precision.compute, q_len=job.tokens, heads=job.heads, head_dim=job.head_dim
    )
    try:
        backend = setup.dispatcher.select(call).backend
    except AttentionUnavailableError:
        backend = None
    return budget_from_probe(setup.probe, backend)
