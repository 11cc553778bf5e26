"""umT5 streamed block by block (the planner's text_encoder_blocks_resident), with and without the
fp32-over-bf16 compute that fp16-only cards use."""

import pytest
import torch

from tests.helpers import tiny_text
from wanfit.models.text_encoder import WanTextEncoder
from wanfit.plan.plan import Plan
from wanfit.runtime.placement import TextEncoderPlacement


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_text.train_tokenizer(tmp_path_factory.mktemp("tok"))))


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32])
def test_streamed_encoder_gives_the_same_context_and_frees_its_blocks(tokenizer, compute):
    prompts = ["a red fox runs through snow", "boats"]
    whole = WanTextEncoder(
        tiny_text.make_umt5(0).to(torch.bfloat16), tokenizer, cache=None, compute_dtype=compute
    )
    expected = whole.encode(prompts, max_length=16)
    streamed = WanTextEncoder(
        tiny_text.make_umt5(0).to(torch.bfloat16), tokenizer, cache=None, compute_dtype=compute
    )
    TextEncoderPlacement(streamed).apply(Plan(text_encoder_blocks_resident=1, text_encoder_dtype="bfloat16"))
    # The placement set the plan's compute dtype, the CPU policy (fp32 over bf16 weights); bf16
    # compute is a GPU plan's, so the dtype under test is set back by hand.
    assert streamed.compute_dtype == torch.float32
    streamed.compute_dtype = compute
    assert torch.equal(streamed.encode(prompts, max_length=16), expected)
    blocks = streamed.blocks
    # Block 0 is resident (k=1 keeps an evenly spread one); every other block's weights were released
    # after use: with the fp32 upcast too (its restore hook must run before the streamer frees them).
    sizes = [sum(p.numel() for p in block.parameters()) for block in blocks]
    assert sizes.count(0) == len(blocks) - 1


def test_the_pipeline_moves_the_text_encoder_when_the_plan_changes(tokenizer):
    from wanfit.pipeline import WanPipeline

    te = WanTextEncoder(tiny_text.make_umt5(0).to(torch.bfloat16), tokenizer, cache=None)
    expected = te.encode(["a fox"], max_length=16)
    pipe = WanPipeline(torch.nn.Module(), None, te, plan=Plan())
    pipe.apply_plan(Plan(text_encoder_blocks_resident=1))  # the OOM guard's notch: stream umT5
    assert pipe.placement.text_encoder.streamer is not None and te.compute_dtype == torch.float32
    streamed = te.encode(["a fox"], max_length=16)  # fp32 compute now, over the same bf16 weights
    torch.testing.assert_close(streamed, expected.float(), atol=3e-2, rtol=3e-2)
    pipe.apply_plan(Plan(text_encoder_device="cpu"))  # and the next: whole on the CPU, unstreamed
    assert pipe.placement.text_encoder.streamer is None
    assert all(p.numel() > 0 for p in te.model.parameters())
