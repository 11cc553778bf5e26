"""Streaming from the mapped checkpoint through staging buffers: the same outputs as resident and as
pinned copies, the file never written, exact-size pinned buffers, and a text encoder that lets go."""

import copy
import gc
import weakref

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import tiny_text
from tests.test_offload import ToyModel
from tests.test_text_streaming import tokenizer  # noqa: F401 (a fixture)
from wanfit.models.configs import WAN_TINY
from wanfit.models.dit import WanDiT
from wanfit.models.text_encoder import WanTextEncoder
from wanfit.plan.plan import Plan
from wanfit.runtime import pinned
from wanfit.runtime.offload import STAGING_BUFFERS, BlockStreamer
from wanfit.runtime.placement import DiTPlacement, TextEncoderPlacement
from wanfit.weights.dit_loader import load_dit


def _model(n=6):
    torch.manual_seed(0)
    return ToyModel(n=n)


def test_streaming_from_the_source_tensors_equals_resident_and_keeps_the_fetch_order():
    model, reference = _model(), None
    reference = copy.deepcopy(model)
    sources = {id(p): p.data for p in model.blocks[0].parameters()}
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = reference(x, ctx)
        streamer = BlockStreamer(model.blocks, "cpu", resident=2, source="mmap", record=True)
        first, second = model(x, ctx), model(x, ctx)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    # The streamed blocks' tensors are the loaded ones, untouched (no host copy); staging: a ring.
    slots = streamer._slots[0]
    assert all(s.stored.data_ptr() == sources[id(s.get())].data_ptr() for s in slots if s.is_param)
    assert len(streamer._staging) == STAGING_BUFFERS and not streamer._buffers
    assert streamer.max_streamed_on_device <= 2
    cycle = [("use", 0), ("release", 0)]
    for i in (2, 3, 5):
        cycle += [("fetch", i), ("use", i), ("release", i)]
    assert streamer.events == [("fetch", 0)] + cycle + [("fetch", 0)] + cycle + [("fetch", 0)]
    streamer.detach("cpu")  # back on the host: the source tensors themselves
    assert all(p.data.data_ptr() == sources[id(p)].data_ptr() for p in model.blocks[0].parameters())


def test_pinned_copies_are_packed_per_block_and_converted_to_the_compute_dtype():
    model = _model().to(torch.bfloat16)
    reference = copy.deepcopy(model).float()
    streamer = BlockStreamer(model.blocks, "cpu", resident=1, dtype=torch.float32)
    block = streamer._slots[0]
    assert all(s.stored.dtype == torch.float32 for s in block)
    buffer = streamer._buffers[0]
    # One buffer per streamed block: every stored tensor views it.
    assert {s.stored.untyped_storage().data_ptr() for s in block} == {buffer.untyped_storage().data_ptr()}
    model.embed.float(), model.head.float()
    x, ctx = torch.randn(1, 4, 16), torch.randn(1, 2, 16)
    with torch.no_grad():
        assert torch.equal(model(x, ctx), reference(x, ctx))


def test_a_prefetch_stops_at_the_last_block_when_asked():
    model = _model()
    streamer = BlockStreamer(
        model.blocks, "cpu", resident=0, source="mmap", prefetch_first=False, record=True
    )
    with torch.no_grad():
        model(torch.randn(1, 3, 16), torch.randn(1, 2, 16))
    assert streamer.events[-1] == ("release", 5) and not streamer._pending


def test_close_drops_every_copy_and_hook():
    model = _model()
    streamer = BlockStreamer(model.blocks, "cpu", resident=2)
    streamer.close()
    gc.collect()
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in model.blocks)
    assert all(p.numel() == 0 for p in model.blocks.parameters()) and not streamer._buffers


def test_a_lora_write_never_touches_the_mapped_source():
    model = _model()
    streamer = BlockStreamer(model.blocks, "cpu", resident=0, source="mmap")
    i, slot = streamer.find_slot(model.blocks[2].fc1, "weight")
    before = slot.source.clone()
    streamer.replace_stored(i, slot, torch.zeros_like(before))
    assert torch.equal(slot.source if slot.source is not None else before, before)
    assert torch.count_nonzero(slot.stored) == 0
    with torch.no_grad():
        model(torch.randn(1, 3, 16), torch.randn(1, 2, 16))  # streams the new value


@pytest.mark.parametrize("source", ["pinned", "mmap"])
def test_a_dit_loaded_from_a_bf16_file_streams_to_the_same_output_as_loaded_resident(tmp_path, source):
    torch.manual_seed(0)
    dit = WanDiT(WAN_TINY).eval()
    path = tmp_path / "dit.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in dit.state_dict().items()}, str(path))
    resident = load_dit(path, config=WAN_TINY, dtype=torch.float32)  # converted on load
    mapped = load_dit(path, config=WAN_TINY)  # the file's dtype: the tensors view the mapped file
    assert {p.dtype for p in mapped.parameters()} == {torch.bfloat16}
    x = torch.randn(1, WAN_TINY.in_dim, 1, 8, 8)
    t = torch.tensor([500.0])
    context = torch.randn(1, WAN_TINY.text_len, WAN_TINY.text_dim)
    placement = DiTPlacement(mapped)
    placement.place(
        Plan(device="cpu", compute_dtype="float32", dit_blocks_resident=1, dit_stream_source=source)
    )
    assert placement.streamer.source == source
    with torch.no_grad():
        assert torch.equal(placement(x, t, context), resident(x, t, context))
        assert torch.equal(placement(x, t, context), resident(x, t, context))
    placement.release()
    assert {p.dtype for p in mapped.blocks.parameters()} == {
        torch.bfloat16 if source == "mmap" else torch.float32
    }


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32])
def test_the_text_encoder_streams_from_its_file_to_the_same_context(tokenizer, compute):  # noqa: F811
    prompts = ["a red fox runs through snow", "boats"]
    expected, te = (
        WanTextEncoder(
            tiny_text.make_umt5(0).to(torch.bfloat16), tokenizer, cache=None, compute_dtype=compute
        )
        for _ in range(2)
    )
    expected = expected.encode(prompts, max_length=16)
    placement = TextEncoderPlacement(te)
    placement.apply(
        Plan(text_encoder_blocks_resident=0, text_encoder_dtype="bfloat16", text_encoder_stream_source="mmap")
    )
    assert placement.streamer.source == "mmap"
    te.compute_dtype = compute  # the CPU policy would pick fp32; the dtype under test is set back
    assert torch.equal(te.encode(prompts, max_length=16), expected)
    assert not placement.streamer._pending  # nothing prefetched for a next prompt
    streamer = weakref.ref(placement.streamer)
    placement.release()
    assert te.released and streamer() is None  # gone at once: no reference cycle left for the GC
    assert placement.layout is None


class FakeCudart:
    """Records cudaHostRegister / cudaHostUnregister calls (no GPU needed)."""

    def __init__(self):
        self.registered, self.unregistered = [], []

    def cudaHostRegister(self, address, size, flags):
        self.registered.append((address, size))
        return 0

    def cudaHostUnregister(self, address):
        self.unregistered.append(address)
        return 0


def test_pinned_host_buffers_are_exactly_registered_and_let_go_with_their_last_view(monkeypatch):
    import mmap

    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    buffer = pinned.host_buffer(80 * 1024**2 + 5, pin=True)
    assert buffer.numel() == 80 * 1024**2 + 5  # not rounded up to 128 MiB
    ((address, size),) = fake.registered
    assert address == buffer.data_ptr() and address % mmap.PAGESIZE == 0 and size % mmap.PAGESIZE == 0
    assert size - buffer.numel() < mmap.PAGESIZE
    view = buffer[1000:2000].view(torch.int16)
    del buffer
    gc.collect()
    assert fake.unregistered == []  # a view still uses it
    del view
    gc.collect()
    assert fake.unregistered == [address]
    assert pinned.host_buffer(10, pin=False).numel() == 10


def test_a_pipeline_streaming_both_models_from_their_files_makes_the_same_video(tmp_path):
    import numpy as np

    from tests.helpers.tiny_model_dir import save_demo_official_layout
    from wanfit.pipeline import WanPipeline

    root = save_demo_official_layout(tmp_path / "model")
    job = dict(height=32, width=48, num_frames=5, num_inference_steps=2, seed=3, progress=False)
    resident = WanPipeline.from_pretrained(root, plan=Plan(free_text_encoder=False), progress=False)
    expected = resident("a fox", **job)
    from_files = Plan(
        dit_blocks_resident=1,
        dit_stream_source="mmap",
        text_encoder_blocks_resident=0,
        text_encoder_stream_source="mmap",
        free_text_encoder=True,
        offload_dit_before_decode=True,
    )
    pipe = WanPipeline.from_pretrained(root, plan=from_files, progress=False)
    assert pipe.placement.text_encoder.streamer.source == "mmap"
    frames = pipe("a fox", **job)
    assert np.array_equal(frames, expected)
    assert pipe.text_encoder.released  # freed after the encoding, as planned
    again = pipe("a fox", **job)  # reloaded for the second prompt
    assert np.array_equal(again, expected)
