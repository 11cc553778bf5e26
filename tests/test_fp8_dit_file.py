"""An fp8 DiT file (ComfyUI's e4m3fn, with and without scale_weight): kept in fp8 as the file has it
under fp8 storage (its bytes and scales, no bf16 copy), upcast on load otherwise; the planner's choice,
the estimates' bytes, a LoRA merge on it, and the frames of both."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers.tiny_comfy import COMFY_TINY, DIT_NAME, TE_FP8_NAME, VAE_NAME, save_comfy_models
from tests.helpers.tiny_dit import COMFY_PREFIX, to_fp8
from tests.test_lora_runtime import inputs, make_lora
from wanfit.cli import main
from wanfit.models.configs import WAN_T2V_1_3B, WAN_TINY
from wanfit.models.dit import WanDiT
from wanfit.plan import host_estimates as H
from wanfit.plan import planner as P
from wanfit.plan.estimates import (
    Request,
    dit_block_params,
    dit_device_weights,
    dit_nonblock_params,
    dit_params,
)
from wanfit.plan.plan import Plan
from wanfit.runtime.lora import DiTLoras
from wanfit.runtime.placement import DiTPlacement
from wanfit.weights.dit_loader import load_dit

FP8 = torch.float8_e4m3fn
FP8_CPU = Plan(device="cpu", storage_dtype="float8_e4m3fn")  # fp32 compute, every block resident
GIB = 1024**3


def fp8_file(tmp_path, scaled: bool, seed: int = 0):
    """A tiny DiT saved as a ComfyUI fp8 file; (path, the file's tensors under official names)."""
    torch.manual_seed(seed)
    stored, _ = to_fp8(WanDiT(WAN_TINY).state_dict(), scaled=scaled)
    path = tmp_path / f"wan_tiny_fp8{'_scaled' if scaled else ''}.safetensors"
    save_file(stored, str(path))
    return path, {k.removeprefix(COMFY_PREFIX): v for k, v in stored.items()}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def file_scale(state: dict, name: str) -> torch.Tensor:
    key = name.removesuffix("weight") + "scale_weight"
    return state[key].float().reshape(()) if key in state else torch.ones(())


def block_matrices(model) -> list[str]:
    return [n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2]


@pytest.mark.parametrize("scaled", [False, True])
def test_keep_fp8_holds_the_files_bytes_and_scales(tmp_path, scaled):
    path, state = fp8_file(tmp_path, scaled)
    model = load_dit(path, config=WAN_TINY, keep_fp8=True)
    names = block_matrices(model)
    assert names and sorted(model.fp8_scales) == sorted(names)
    for name in names:
        assert same_bytes(model.get_parameter(name), state[name])
        assert torch.equal(model.fp8_scales[name], file_scale(state, name))
    # The rest in the file's other dtype (fp16 here), its other fp8 matrices dequantised in fp32:
    # nothing rounded through bf16.
    assert model.blocks[0].norm3.weight.dtype == torch.float16
    assert model.text_embedding[0].weight.dtype == torch.float32
    upcast = load_dit(path, config=WAN_TINY)
    assert upcast.fp8_scales == {} and upcast.blocks[0].self_attn.q.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("resident", [None, 0])
def test_fp8_storage_streams_the_files_bytes_and_computes_as_the_upcast_load(tmp_path, scaled, resident):
    path, state = fp8_file(tmp_path, scaled)
    dit = load_dit(path, config=WAN_TINY, keep_fp8=True)
    placement = DiTPlacement(dit, pin_memory=False)
    placement.place(replace(FP8_CPU, dit_blocks_resident=resident))
    for i, slots in enumerate(placement.streamer._slots):
        for slot in (s for s in slots if s.scale is not None):
            name = f"blocks.{i}." + next(n for n, p in dit.blocks[i].named_parameters() if p is slot.get())
            assert same_bytes(slot.stored, state[name]) and torch.equal(slot.scale, file_scale(state, name))
    upcast = load_dit(path, config=WAN_TINY, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(placement(*inputs()), upcast(*inputs()))  # the same dequantised values
    # Back on the host the file's own tensors return, scales and all, ready to be placed again.
    placement.release()
    assert all(same_bytes(dit.get_parameter(n), state[n]) for n in dit.fp8_scales)
    assert len(dit.fp8_scales) == len(block_matrices(dit))


def test_a_plan_without_fp8_storage_upcasts_a_kept_fp8_dit(tmp_path):
    path, _ = fp8_file(tmp_path, scaled=True)
    dit = load_dit(path, config=WAN_TINY, keep_fp8=True)
    placement = DiTPlacement(dit, pin_memory=False)
    placement.place(Plan(device="cpu"))
    assert dit.fp8_scales == {} and dit.blocks[0].ffn[0].weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(placement(*inputs()), load_dit(path, config=WAN_TINY, dtype="fp32")(*inputs()))


def test_a_lora_merge_on_a_kept_fp8_dit_requantises_and_unloads_to_the_files_bytes(tmp_path):
    path, state = fp8_file(tmp_path, scaled=True)
    lora = make_lora()
    reference = load_dit(path, config=WAN_TINY, dtype=torch.float32)
    DiTLoras(reference).apply([(lora, 0.8)], "merge")
    with torch.no_grad():
        expected = reference(*inputs())
    dit = load_dit(path, config=WAN_TINY, keep_fp8=True)
    placement = DiTPlacement(dit, pin_memory=False)
    placement.place(FP8_CPU)
    loras = DiTLoras(dit, placement)
    loras.apply([(lora, 0.8)], "merge")
    merged = [s for s in placement.streamer._slots[0] if s.scale is not None]
    assert merged and all(s.stored.dtype == FP8 for s in merged)  # re-quantised, still fp8
    with torch.no_grad():
        error = (placement(*inputs()) - expected).abs().mean() / expected.abs().mean()
    assert 0 < error < 0.08, float(error)  # fp8's own error on the tiny model
    loras.remove()
    for i, slots in enumerate(placement.streamer._slots):
        for slot in (s for s in slots if s.scale is not None):
            name = f"blocks.{i}." + next(n for n, p in dit.blocks[i].named_parameters() if p is slot.get())
            assert same_bytes(slot.stored, state[name]) and torch.equal(slot.scale, file_scale(state, name))


# ----------------------------------------------------------------------------- the planner

FP8_FILE = Request(WAN_T2V_1_3B, dit_file_dtype="float8_e4m3fn")
BF16_FILE = Request(WAN_T2V_1_3B, dit_file_dtype="bfloat16")


def test_the_planner_keeps_an_fp8_file_in_fp8_where_the_card_needs_it():
    from tests.test_planner import H100

    tight = P.plan_run(H100, FP8_FILE, vram=4 * GIB)
    assert tight.plan.storage_dtype == "float8_e4m3fn" and "dit_fp8_as_file" in tight.steps
    assert any("the file's own fp8 weights" in n and "would not fit" in n for n in tight.notes)
    assert tight.plan.text_encoder_dtype == "bfloat16"  # no lossy umT5 fp8 without the user's --fp8
    # The same card with a bf16 file: today's choice (its blocks stream, nothing quantised).
    bf16 = P.plan_run(H100, BF16_FILE, vram=4 * GIB)
    assert bf16.plan.storage_dtype is None and bf16.plan.dit_blocks_resident is not None
    assert tight.plan.dit_blocks_resident is None
    # Tighter still: fp8 and streamed, more blocks resident than the bf16 file's plan keeps.
    tighter, bf16_tighter = (P.plan_run(H100, r, vram=3 * GIB).plan for r in (FP8_FILE, BF16_FILE))
    assert tighter.storage_dtype == "float8_e4m3fn"
    assert tighter.dit_blocks_resident > bf16_tighter.dit_blocks_resident
    # Room to spare: upcast on load, resident (the fastest), and the plan says so.
    roomy = P.plan_run(H100, FP8_FILE)
    assert roomy.plan.storage_dtype is None and roomy.steps == ()
    assert any("upcast on load" in n and "fits" in n for n in roomy.notes)
    asked = P.plan_run(H100, FP8_FILE, fp8=True)
    assert asked.plan.storage_dtype == "float8_e4m3fn"
    assert any("the file's own fp8 weights" in n and "you asked for it" in n for n in asked.notes)


def test_wanfit_plan_says_which_storage_and_why(tmp_path, capsys):
    models = save_comfy_models(tmp_path, others=False)
    dit = models / "diffusion_models" / DIT_NAME
    stored, _ = to_fp8(WanDiT(COMFY_TINY).state_dict(), scaled=True)
    save_file(stored, str(dit))
    assert main(["plan", "--model", str(models), "--size", "48x32", "--frames", "5", "--fp8"]) == 0
    out = capsys.readouterr().out
    assert "DiT storage fp8: the file's own fp8 weights" in out and "you asked for it" in out


def test_the_estimates_count_one_byte_per_kept_fp8_weight():
    cfg = WAN_T2V_1_3B
    matrices, other = dit_block_params(cfg)
    fp8 = Plan(device="cuda", compute_dtype="bfloat16", storage_dtype="float8_e4m3fn", dit_blocks_resident=10)
    upcast = replace(fp8, storage_dtype=None)
    # Loading: the upcast copy of the file (2 bytes per weight) is gone but for the few other tensors.
    assert H.dit_converted_on_load(FP8_FILE, upcast) == dit_params(cfg) * 2
    assert H.dit_converted_on_load(FP8_FILE, fp8) == (dit_params(cfg) - cfg.num_layers * matrices) * 4
    assert H.dit_converted_on_load(FP8_FILE, fp8) < 0.05 * H.dit_converted_on_load(FP8_FILE, upcast)
    # Streamed: pinned copies of 1 byte per matrix element, none quantised on the host first.
    host = H.dit_host(FP8_FILE, fp8)
    assert host.pinned == (cfg.num_layers - 10) * (matrices + 2 * other) and host.anon == 0
    assert H.dit_host(BF16_FILE, fp8).anon == matrices + 2 * other  # a bf16 file is quantised there
    # The device: resident blocks and the two streaming slots at 1 byte per matrix element.
    device = dit_device_weights(cfg, fp8, FP8_FILE.dit_file_dtype)
    assert device == dit_nonblock_params(cfg) * 2 + 12 * (matrices + 2 * other) + (matrices + other) * 2


def test_generated_frames_equal_with_fp8_storage_and_with_the_upcast_load(tmp_path, capsys):
    models = save_comfy_models(tmp_path, others=False)
    dit = models / "diffusion_models" / DIT_NAME
    stored, _ = to_fp8(WanDiT(COMFY_TINY).state_dict(), scaled=True)
    save_file(stored, str(dit))
    run = [
        "generate", "--size", "48x32", "--frames", "5", "--steps", "2", "--no-progress", "--prompt", "a fox",
        "--dit", str(dit), "--vae", str(models / "vae" / VAE_NAME),
        "--text-encoder", str(models / "text_encoders" / TE_FP8_NAME),
    ]  # fmt: skip
    kept, upcast = tmp_path / "kept", tmp_path / "upcast"
    assert main([*run, "--fp8", "--out", str(kept)]) == 0
    assert main([*run, "--out", str(upcast)]) == 0
    capsys.readouterr()
    from wanfit.video import sidecar_path

    assert json.loads(sidecar_path(kept).read_text())["plan"]["storage_dtype"] == "float8_e4m3fn"
    assert json.loads(sidecar_path(upcast).read_text())["plan"]["storage_dtype"] is None
    frames = sorted(p.name for p in kept.glob("*.png"))
    assert len(frames) == 5 and frames == sorted(p.name for p in upcast.glob("*.png"))
    assert all((kept / f).read_bytes() == (upcast / f).read_bytes() for f in frames)


def test_a_wrong_fp8_file_is_refused_as_before(tmp_path):
    from wanfit.errors import CheckpointError

    torch.manual_seed(0)
    stored, _ = to_fp8(WanDiT(WAN_TINY).state_dict(), scaled=True)
    del stored[COMFY_PREFIX + "blocks.1.ffn.0.weight"]
    save_file(stored, str(tmp_path / "cut.safetensors"))
    for keep in (False, True):
        with pytest.raises(CheckpointError, match=r"1 missing: blocks\.1\.ffn\.0\.weight"):
            load_dit(tmp_path / "cut.safetensors", config=WAN_TINY, keep_fp8=keep)
