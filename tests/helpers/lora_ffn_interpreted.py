"""Runs wanfit.runtime.lora_ffn's Triton kernel under Triton's interpreter and prints what
tests/test_lora_fused_ffn.py checks, as JSON (fp16: the interpreter's bf16 dot is wrong). A process
of its own: TRITON_INTERPRET must be set before Triton is first imported."""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from wanfit.models.configs import WAN_TINY  # noqa: E402
from wanfit.models.dit import WanDiT  # noqa: E402
from wanfit.runtime import lora_ffn  # noqa: E402
from wanfit.runtime.lora import DiTLoras  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.test_lora_runtime import inputs, make_lora  # noqa: E402


def cases() -> list:
    """Rows and ffn_dim off the tiles, ranks below 16 and just above a power of two."""
    out = []
    shapes = ((70, 96, 8, 24), (66, 200, 64, 64), (5, 64, 130, 3), (129, 128, 16, 16))
    for rows, width, rank0, rank2 in shapes:
        g = torch.Generator().manual_seed(rows + width)
        hidden = (2 * torch.randn(1, rows, width, generator=g)).to(torch.float16)
        h0 = torch.randn(*hidden.shape[:-1], rank0, generator=g).to(torch.float16)
        up0 = (torch.randn(width, rank0, generator=g) / rank0**0.5).to(torch.float16)
        down2 = (torch.randn(rank2, width, generator=g) / width**0.5).to(torch.float16)
        want_g = torch.empty_like(hidden)
        want_h2 = lora_ffn.gelu_low_rank_torch(hidden, h0, up0, down2, want_g)
        got_g = torch.empty_like(hidden)
        got_h2 = lora_ffn.gelu_low_rank_triton(hidden, h0, up0, down2, got_g)
        in_place = hidden.clone()
        in_place_h2 = lora_ffn.gelu_low_rank_triton(in_place, h0, up0, down2, in_place)
        out.append({
            "case": [rows, width, rank0, rank2],
            "gelu_max_abs": (got_g.float() - want_g.float()).abs().max().item(),
            "gelu_max": want_g.float().abs().max().item(),
            "down_rel": ((got_h2.float() - want_h2.float()).norm() / want_h2.float().norm()).item(),
            "in_place_equal": bool(torch.equal(in_place, got_g) and torch.equal(in_place_h2, got_h2)),
        })  # fmt: skip
    return out


def model() -> dict:
    """The tiny DiT in fp16 with a runtime LoRA: the FFNs through the kernel vs the separate GEMMs."""
    outs, calls = {}, 0
    for fused in (False, True, None):
        torch.manual_seed(0)
        dit = WanDiT(WAN_TINY).to(torch.float16).eval()
        for block in dit.blocks:
            block.ffn_gelu_in_place = True
        state = DiTLoras(dit)
        if fused is not None:
            state.apply([(make_lora(), 0.8)], "runtime", fused_ffn=fused)
        with torch.no_grad():
            outs[fused] = dit(*inputs()).float()
        if fused:
            calls = sum(f.calls for f in state.fused_ffns.values())
    want = outs[False]
    return {
        "kernel_calls": calls,
        "rel_l2_vs_separate": ((outs[True] - want).norm() / want.norm()).item(),
        "lora_rel_l2": ((want - outs[None]).norm() / want.norm()).item(),
    }


if __name__ == "__main__":
    json.dump({"cases": cases(), "model": model()}, sys.stdout)
