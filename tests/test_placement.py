"""Placements: apply(new plan) on a placed model ends where placing it fresh under the new plan ends,
gives the same outputs, and leaves nothing stuck on the modules."""

import gc

import pytest
import torch

from tests.helpers import tiny_text
from tests.helpers.compile_backends import CountingBackend
from wanfit.models.configs import WAN_TINY
from wanfit.models.dit import WanDiT
from wanfit.models.text_encoder import WanTextEncoder
from wanfit.plan.plan import Plan
from wanfit.runtime.placement import (
    DiTLayout,
    DiTPlacement,
    TextEncoderLayout,
    TextEncoderPlacement,
    VAEPlacement,
)

RESIDENT = Plan()
STREAMED_2 = Plan(dit_blocks_resident=2)
STREAMED_1 = Plan(dit_blocks_resident=1)
CHUNKED = Plan(attention_chunk=7, ffn_chunk=11)  # 45 tokens: uneven chunks
GELU_OFF = Plan(ffn_gelu_in_place=False)  # the default writes it in place
FP8 = Plan(storage_dtype="float8_e4m3fn")
COMPILED = Plan(compile_dit=True)
STREAMED_NONE = Plan(dit_blocks_resident=4)  # all 4 blocks resident: a streamer that streams none


def nothing_stuck_on(model: torch.nn.Module) -> bool:
    """No wanfit state and no torch.compile state (Module.compile's private slot) on any module."""
    return not any(
        k.startswith("_wanfit") or k == "_compiled_call_impl" for m in model.modules() for k in vars(m)
    )


def make_dit(backend: CountingBackend | None = None) -> DiTPlacement:
    torch.compiler.reset()  # graphs cached for other tests' backends would count against the recompile limit
    torch.manual_seed(0)
    config = WAN_TINY.with_overrides(num_layers=4)
    dit = WanDiT(config).eval().requires_grad_(False)
    return DiTPlacement(dit, compile_options={"backend": backend or CountingBackend()})


@pytest.fixture(scope="module")
def dit_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 6, 10, generator=g)
    return x, torch.tensor([700.0]), torch.randn(1, 16, WAN_TINY.text_dim, generator=g)


def dit_state(placement: DiTPlacement) -> dict:
    dit = placement.dit
    return {
        "layout": placement.layout,
        "resident": None if placement.streamer is None else placement.streamer.resident,
        "compiled": placement.compiled_blocks is not None,
        "tensors": {n: (t.device, t.dtype, tuple(t.shape)) for n, t in dit.state_dict().items()},
        "chunks": [(b.ffn_chunk, b.self_attn.attention_chunk, b.ffn_gelu_in_place) for b in dit.blocks],
    }


TRANSITIONS = {
    "resident -> streamed 2": (RESIDENT, STREAMED_2),
    "streamed 2 -> resident": (STREAMED_2, RESIDENT),
    "streamed 2 -> streamed 1": (STREAMED_2, STREAMED_1),
    "resident -> chunked": (RESIDENT, CHUNKED),
    "chunked -> streamed 1": (CHUNKED, STREAMED_1),
    "resident -> GELU not in place": (RESIDENT, GELU_OFF),
    "GELU not in place -> chunked": (GELU_OFF, CHUNKED),
    "resident -> fp8": (RESIDENT, FP8),
    "resident -> compiled": (RESIDENT, COMPILED),
    "compiled -> resident": (COMPILED, RESIDENT),
    "compiled -> streamed 2": (COMPILED, STREAMED_2),
}


@pytest.mark.parametrize("old, new", list(TRANSITIONS.values()), ids=list(TRANSITIONS))
def test_dit_apply_ends_as_a_fresh_placement(old, new, dit_inputs):
    moved = make_dit()
    moved.place(old)
    with torch.no_grad():
        moved(*dit_inputs)  # run once under the old plan: prefetched copies, compiled graphs
    moved.apply(new)
    fresh = make_dit()
    fresh.place(new)
    assert dit_state(moved) == dit_state(fresh)
    assert moved.layout == DiTLayout.from_plan(new)
    with torch.no_grad():
        assert torch.equal(moved(*dit_inputs), fresh(*dit_inputs))
    assert nothing_stuck_on(moved.dit) and nothing_stuck_on(fresh.dit)


def test_dit_streamed_and_back_gives_the_untouched_model_exactly(dit_inputs):
    reference = make_dit().dit
    placement = make_dit()
    placement.place(RESIDENT)
    with torch.no_grad():
        expected = reference(*dit_inputs)
        for plan in (STREAMED_2, STREAMED_1, STREAMED_NONE, RESIDENT):
            placement.apply(plan)
            assert torch.equal(placement(*dit_inputs), expected), plan
    state = reference.state_dict()
    assert all(torch.equal(t, state[n]) for n, t in placement.dit.state_dict().items())
    assert placement.streamer is None and nothing_stuck_on(placement.dit)


def test_leaving_fp8_keeps_the_fp8_rounded_weights(dit_inputs):
    """fp8 storage is lossy: back to resident, the blocks hold the upcast fp8 values (what ran)."""
    placement = make_dit()
    placement.place(FP8)
    with torch.no_grad():
        fp8_out = placement(*dit_inputs)
        placement.apply(RESIDENT)
        assert placement.streamer is None
        assert torch.equal(placement(*dit_inputs), fp8_out)
        assert not torch.equal(fp8_out, make_dit().dit(*dit_inputs))


def test_compiling_runs_the_blocks_through_torch_compile_and_uncompiling_is_eager(dit_inputs):
    backend = CountingBackend()
    placement = make_dit(backend)
    attributes = [set(vars(m)) for m in placement.dit.modules()]
    with torch.no_grad():
        eager = placement.dit(*dit_inputs)
        placement.place(COMPILED)
        compiled = placement(*dit_inputs)
        assert backend.graphs > 0 and backend.runs > 0
        # Four blocks, one set of graphs: the blocks share them (compiled once per shape).
        graphs, runs = backend.graphs, backend.runs
        placement(*dit_inputs)
        assert backend.graphs == graphs and backend.runs == 2 * runs
        placement.apply(RESIDENT)
        again = placement(*dit_inputs)
    assert backend.runs == 2 * runs  # eager again: no compiled graph ran
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, eager)
    assert [set(vars(m)) for m in placement.dit.modules()] == attributes  # nothing added to any module
    assert nothing_stuck_on(placement.dit)


def test_a_streamed_plan_never_compiles():
    assert not DiTLayout.from_plan(Plan(compile_dit=True, dit_blocks_resident=1)).compiled
    assert not DiTLayout.from_plan(Plan(compile_dit=True, storage_dtype="float8_e4m3fn")).compiled
    assert DiTLayout.from_plan(Plan(compile_dit=True)).compiled


def test_release_moves_the_dit_to_the_host_and_apply_leaves_it_there(dit_inputs):
    placement = make_dit()
    placement.place(STREAMED_2)
    placement.release()
    assert placement.layout is None and placement.streamer is None
    assert all(p.numel() > 0 and p.device.type == "cpu" for p in placement.dit.parameters())
    placement.apply(STREAMED_1)  # a step-down during the decode: the DiT stays released
    assert placement.layout is None and placement.streamer is None
    placement.place(STREAMED_1)  # the next denoising places it
    assert placement.streamer.resident == [2]
    fresh = make_dit()
    fresh.place(STREAMED_1)
    assert dit_state(placement) == dit_state(fresh)
    with torch.no_grad():
        assert torch.equal(placement(*dit_inputs), fresh(*dit_inputs))


def test_a_model_without_blocks_is_only_called():
    calls = []

    class Fake(torch.nn.Module):
        def forward(self, x, t, context):
            calls.append(x)
            return x

    placement = DiTPlacement(Fake())
    placement.place(STREAMED_2)
    assert placement.layout is None and placement.streamer is None
    assert torch.equal(placement(torch.ones(1), None, None), torch.ones(1)) and len(calls) == 1


# -------------------------------------------------------------------------------- text encoder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_text.train_tokenizer(tmp_path_factory.mktemp("tok"))))


PROMPTS = ["a red fox runs through snow", "boats"]
TE_RESIDENT = Plan(text_encoder_dtype="bfloat16")
TE_STREAMED_1 = Plan(text_encoder_dtype="bfloat16", text_encoder_blocks_resident=1)
TE_STREAMED_0 = Plan(text_encoder_dtype="bfloat16", text_encoder_blocks_resident=0)
TE_FP32 = Plan(text_encoder_dtype="float32")


def loaded_for(plan: Plan, tokenizer) -> WanTextEncoder:
    """A text encoder loaded as from_pretrained loads it for `plan` (before its placement)."""
    layout = TextEncoderLayout.from_plan(plan)
    model = tiny_text.make_umt5(0).to(device=layout.load_device, dtype=plan.torch_text_encoder_dtype)
    return WanTextEncoder(model, tokenizer, cache=None, compute_dtype=layout.compute_dtype)


def te_state(placement: TextEncoderPlacement) -> dict:
    te = placement.text_encoder
    return {
        "layout": placement.layout,
        "compute": te.compute_dtype,
        "resident": None if placement.streamer is None else placement.streamer.resident,
        "tensors": {n: (t.device, t.dtype, tuple(t.shape)) for n, t in te.model.state_dict().items()},
    }


TE_TRANSITIONS = {
    "resident -> streamed 1": (TE_RESIDENT, TE_STREAMED_1),
    "streamed 1 -> resident": (TE_STREAMED_1, TE_RESIDENT),
    "streamed 1 -> streamed 0": (TE_STREAMED_1, TE_STREAMED_0),
}


@pytest.mark.parametrize("old, new", list(TE_TRANSITIONS.values()), ids=list(TE_TRANSITIONS))
def test_text_encoder_apply_ends_as_a_fresh_placement(old, new, tokenizer):
    moved = TextEncoderPlacement(loaded_for(old, tokenizer))
    moved.apply(old)
    moved.text_encoder.encode(PROMPTS, max_length=16)
    moved.apply(new)
    fresh = TextEncoderPlacement(loaded_for(new, tokenizer))
    fresh.apply(new)
    assert te_state(moved) == te_state(fresh)
    assert torch.equal(
        moved.text_encoder.encode(PROMPTS, max_length=16), fresh.text_encoder.encode(PROMPTS, max_length=16)
    )
    assert nothing_stuck_on(moved.text_encoder) and nothing_stuck_on(fresh.text_encoder)


def test_text_encoder_streamed_and_back_restores_every_weight(tokenizer):
    te = loaded_for(TE_RESIDENT, tokenizer)
    before = {n: t.clone() for n, t in te.model.state_dict().items()}
    expected = te.encode(PROMPTS, max_length=16)
    placement = TextEncoderPlacement(te)
    for plan in (TE_RESIDENT, TE_STREAMED_1, TE_STREAMED_0, TE_RESIDENT):
        placement.apply(plan)
        torch.testing.assert_close(te.encode(PROMPTS, max_length=16), expected, atol=0, rtol=0)
    assert all(torch.equal(t, before[n]) for n, t in te.model.state_dict().items())
    assert placement.streamer is None and nothing_stuck_on(te)


def test_a_released_text_encoder_holds_no_streamer(tokenizer):
    te = loaded_for(TE_STREAMED_1, tokenizer)
    placement = TextEncoderPlacement(te)
    placement.apply(TE_STREAMED_1)
    assert placement.streamer is not None
    te.release()
    gc.collect()  # the streamer and the blocks it hooks reference each other
    assert placement.streamer is None  # its host copies went with the weights
    placement.apply(TE_RESIDENT)  # nothing to place
    assert placement.layout is None and te.released


def test_the_text_encoder_compute_dtype_follows_device_and_weights():
    cuda_bf16 = dict(compute_dtype="bfloat16", text_encoder_device="cuda", text_encoder_dtype="bfloat16")
    assert TextEncoderLayout.from_plan(Plan(**cuda_bf16)).compute_dtype == torch.bfloat16
    # fp32 weights compute in fp32, and so does any encoder on the CPU or on an fp16-only card.
    assert TextEncoderLayout.from_plan(Plan(**cuda_bf16), torch.float32).compute_dtype == torch.float32
    assert TextEncoderLayout.from_plan(Plan(text_encoder_dtype="bfloat16")).compute_dtype == torch.float32
    fp16_card = {**cuda_bf16, "compute_dtype": "float16"}
    assert TextEncoderLayout.from_plan(Plan(**fp16_card)).compute_dtype == torch.float32
    assert TextEncoderLayout.from_plan(TE_STREAMED_1).load_device == "cpu"
    assert TextEncoderLayout.from_plan(Plan(**cuda_bf16)).load_device == "cuda"


def test_text_encoder_parts_are_the_models_own(tokenizer):
    te = loaded_for(TE_RESIDENT, tokenizer)
    assert te.blocks is te.model.encoder.block
    assert te.final_norm is te.model.encoder.final_layer_norm
    assert te.embedding is te.model.get_input_embeddings()


# ---------------------------------------------------------------------------------------- VAE


def test_the_vae_placement_holds_the_plans_tiling():
    vae = torch.nn.Linear(2, 2)
    placement = VAEPlacement(vae)
    placement.apply(Plan())
    assert placement.tile is None
    placement.apply(Plan(vae_tile=(16, 16)))
    assert placement.tile == (16, 16) and vae.weight.device.type == "cpu"
    assert nothing_stuck_on(vae)


# ------------------------------------------------------------------------------------ pipeline

PIPE_SIZE = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 3, "progress": False}


def test_the_pipeline_steps_down_to_streaming_and_gives_the_fresh_frames():
    """A step-down between runs (resident -> streamed DiT, streamed umT5) ends as a pipeline built
    with the lighter plan: same placement, same frames, no state on the modules."""
    from wanfit.demo import tiny_pipeline

    lighter = Plan(
        dit_blocks_resident=1, text_encoder_blocks_resident=1, cfg_batch=False, free_text_encoder=False
    )
    pipe = tiny_pipeline(device="cpu", plan=Plan(free_text_encoder=False))
    pipe("a fox", seed=2, **PIPE_SIZE)
    pipe.apply_plan(lighter)
    assert pipe.placement.text_encoder.streamer is not None
    stepped = pipe("a fox", seed=2, **PIPE_SIZE)

    fresh = tiny_pipeline(device="cpu", plan=lighter)
    expected = fresh("a fox", seed=2, **PIPE_SIZE)
    assert pipe.placement.dit.streamer.resident == fresh.placement.dit.streamer.resident
    assert pipe.placement.text_encoder.layout == fresh.placement.text_encoder.layout
    assert pipe.placement.text_encoder.streamer.resident == fresh.placement.text_encoder.streamer.resident
    assert (stepped == expected).all()
    for model in (pipe.dit, pipe.text_encoder, pipe.vae):
        assert nothing_stuck_on(model)


def test_a_text_encoder_loaded_again_is_placed_as_the_plan_says():
    """The plan freed umT5 after the first prompt; the next call loads it again and streams it."""
    from wanfit.demo import tiny_pipeline

    streamed = Plan(text_encoder_blocks_resident=1)
    pipe = tiny_pipeline(device="cpu", plan=streamed)
    first = pipe("a fox", seed=2, **PIPE_SIZE)
    assert pipe.text_encoder.released and pipe.placement.text_encoder.layout is None
    pipe.apply_plan(Plan.from_dict({**streamed.to_dict(), "free_text_encoder": False}))
    second = pipe("a fox", seed=2, **PIPE_SIZE)
    assert not pipe.text_encoder.released
    assert pipe.placement.text_encoder.layout == TextEncoderLayout.from_plan(streamed, torch.float32)
    assert pipe.placement.text_encoder.streamer.resident == [1]
    assert (first == second).all()
    assert nothing_stuck_on(pipe.text_encoder)
