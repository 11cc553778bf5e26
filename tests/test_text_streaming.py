"""umT5 streamed block by block (the planner's text_encoder_blocks_resident), with and without the
fp32-over-bf16 compute that fp16-only cards use."""

import pytest
import torch

from tests.helpers import tiny_text
from wanfit.models.text_encoder import WanTextEncoder
from wanfit.runtime.offload import stream_text_encoder


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
    stream_text_encoder(streamed, "cpu", resident=1)
    assert torch.equal(streamed.encode(prompts, max_length=16), expected)
    blocks = streamed.model.encoder.block
    # Block 0 is resident (k=1 keeps an evenly spread one); every other block's weights were released
    # after use: with the fp32 upcast too (its restore hook must run before the streamer frees them).
    sizes = [sum(p.numel() for p in block.parameters()) for block in blocks]
    assert sizes.count(0) == len(blocks) - 1
