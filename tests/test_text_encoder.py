"""umT5 text encoder: loaders for every layout against diffusers' WanPipeline prompt encoding, prompt
cleaning, zeroed padding rows, the fp16 guard, the prompt cache and the error paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import tiny_text
from wanfit.errors import CheckpointError, ConfigError
from wanfit.models import text_encoder as te
from wanfit.models.text_cache import PromptCache
from wanfit.weights import t5_keys
from wanfit.weights import text_encoder_loader as loader

MANIFESTS = Path(__file__).parent / "data" / "manifests"
PROMPTS = [
    "A cat walks on the grass in the soft morning light.",
    "  Two dogs &amp;amp; a ball \n\t in a   park  ",
    tiny_text.CORPUS[12],  # the official negative prompt: longer than MAX_LEN tokens, so truncated
    "",
]
MAX_LEN = 40


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """One trained tokenizer and one tiny model, saved in both layouts (built once per session)."""
    root = tmp_path_factory.mktemp("tiny_text")
    tokenizer = tiny_text.train_tokenizer(root / "tokenizer_src")
    model = tiny_text.make_umt5(seed=0)
    return SimpleNamespace(
        tokenizer=tokenizer,
        model=model,
        diffusers=tiny_text.save_diffusers_layout(model, tokenizer, root / "diffusers"),
        official=tiny_text.save_official_layout(model, tokenizer, root / "official"),
        single=_single_file(model, root / "single" / "umt5-xxl-enc.safetensors"),
    )


def _single_file(model, path: Path) -> Path:
    """One safetensors file in transformers names, as ComfyUI users keep it (tokenizer elsewhere)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(state, str(path))
    return path


@pytest.fixture(scope="session")
def reference(tiny):
    """diffusers' WanPipeline._get_t5_prompt_embeds on transformers' from_pretrained model, fp32."""
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    pipe = SimpleNamespace(
        tokenizer=AutoTokenizer.from_pretrained(str(tiny.diffusers / "tokenizer")),
        text_encoder=UMT5EncoderModel.from_pretrained(str(tiny.diffusers / "text_encoder")).eval(),
    )

    def embeds(prompts, max_length=MAX_LEN):
        with torch.no_grad():
            return WanPipeline._get_t5_prompt_embeds(
                pipe,
                prompt=prompts,
                max_sequence_length=max_length,
                device=torch.device("cpu"),
                dtype=torch.float32,
            )

    return embeds


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls on a busy 2-core machine: 2 threads make each ~1000x slower (barrier waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("WANFIT_PROMPT_CACHE", raising=False)


def token_lengths(tiny, prompts, max_length=MAX_LEN):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny.tokenizer))
    cleaned = [te.clean_prompt(p) for p in prompts]
    return tok(cleaned, max_length=max_length, truncation=True, padding="max_length").attention_mask


# -- tokenizer and cleaning ----------------------------------------------------------------------


def test_tiny_tokenizer_follows_t5_conventions(tiny):
    from transformers import AutoTokenizer, T5Tokenizer

    files = {p.name for p in tiny.tokenizer.iterdir()}
    assert {"spiece.model", "tokenizer.json", "tokenizer_config.json"} <= files
    for cls in (AutoTokenizer, T5Tokenizer):
        tok = cls.from_pretrained(str(tiny.tokenizer))
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
        assert len(tok) == tiny_text.TOKENIZER_VOCAB
        ids = tok("A cat walks").input_ids
        assert ids[-1] == 1 and 2 not in ids


def test_prompt_cleaning_matches_diffusers():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    tricky = [
        "  A cat &amp; a dog \n\t walking  ",
        "&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt; &quot;quoted&quot; &#39;x&#39;",
        "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
        "cafÃ© crÃ¨me",
        "\u3000full-width\u3000space and\u00a0nbsp",
        "ctrl\x1cchar\x1dmore",
        "line1\r\nline2\x0bline3",
        "emoji 🎬   clapper",
        "",
        "   ",
    ]
    for text in tricky:
        assert te.clean_prompt(text) == prompt_clean(text), repr(text)
    assert te.clean_prompt(tricky[1]) == "<b>bold</b> \"quoted\" 'x'"
    assert te.clean_prompt(tricky[2]) == "The Mona Lisa doesn't have eyebrows."


# -- agreement with the reference ----------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    ["diffusers root", "text_encoder folder", "official root", "official .pth", "index file", "single file"],
)
def test_every_layout_matches_the_diffusers_pipeline(tiny, reference, where):
    path = {
        "diffusers root": tiny.diffusers,
        "text_encoder folder": tiny.diffusers / "text_encoder",
        "official root": tiny.official,
        "official .pth": tiny.official / tiny_text.OFFICIAL_FILE,
        "index file": tiny.diffusers / "text_encoder" / "model.safetensors.index.json",
        "single file": tiny.single,
    }[where]
    tokenizer = tiny.tokenizer if where == "single file" else None
    encoder = loader.load_text_encoder(path, tokenizer=tokenizer, prompt_cache=False)
    got = encoder.encode(PROMPTS, max_length=MAX_LEN)
    want = reference(PROMPTS)
    err = rel_l2(got, want)
    print(f"text encoder, {where}: relative L2 vs diffusers = {err:.2e}")
    assert got.shape == (len(PROMPTS), MAX_LEN, tiny_text.TINY_UMT5["d_model"])
    assert got.dtype == torch.float32
    assert err <= 1e-4


def test_rows_past_each_prompt_are_exactly_zero(tiny):
    encoder = loader.load_text_encoder(tiny.diffusers, prompt_cache=False)
    out = encoder.encode(PROMPTS, max_length=MAX_LEN)
    masks = token_lengths(tiny, PROMPTS)
    lengths = [sum(m) for m in masks]
    assert lengths[2] == MAX_LEN and lengths[3] == 1  # truncated prompt; "" is just </s>
    assert len(set(lengths)) == len(lengths)
    for row, n in zip(out, lengths):
        assert torch.all(row[n:] == 0)
        assert torch.all(row[:n].abs().sum(-1) > 0)


def test_a_batch_equals_its_prompts_one_by_one(tiny):
    encoder = loader.load_text_encoder(tiny.official, prompt_cache=False)
    batch = encoder.encode(PROMPTS, max_length=MAX_LEN)
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(
            encoder.encode(prompt, max_length=MAX_LEN)[0], batch[i], rtol=1e-5, atol=1e-6
        )


def test_default_length_is_512_and_output_dtype_can_be_chosen(tiny, reference):
    encoder = loader.load_text_encoder(tiny.diffusers, prompt_cache=False)
    out = encoder.encode(PROMPTS[0])
    assert out.shape == (1, 512, 32)
    assert rel_l2(out, reference(PROMPTS[:1], max_length=512)) <= 1e-4
    assert encoder.encode(PROMPTS[0], max_length=8, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_bf16_weights_computed_in_fp32_block_by_block(tiny, tmp_path):
    """The policy for fp16-only cards and the CPU: bf16 storage, fp32 arithmetic."""
    from transformers import UMT5Config, UMT5EncoderModel

    tiny_text.save_official_layout(tiny.model, tiny.tokenizer, tmp_path, dtype=torch.bfloat16)
    encoder = loader.load_text_encoder(tmp_path, compute_dtype=torch.float32, prompt_cache=False)
    assert encoder.storage_dtype == torch.bfloat16
    got = encoder.encode(PROMPTS, max_length=MAX_LEN)
    assert got.dtype == torch.float32
    # Same arithmetic as a plain fp32 model holding the bf16-rounded weights.
    rounded = UMT5EncoderModel(UMT5Config(**tiny_text.TINY_UMT5)).eval()
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in tiny.model.state_dict().items()})
    want = te.WanTextEncoder(rounded, encoder.tokenizer).encode(PROMPTS, max_length=MAX_LEN)
    err = rel_l2(got, want)
    print(f"text encoder, bf16 weights / fp32 compute vs fp32 model on the same weights: {err:.2e}")
    assert err <= 1e-6
    assert {p.dtype for p in encoder.model.parameters()} == {torch.bfloat16}  # weights restored
    plain_bf16 = loader.load_text_encoder(tmp_path, prompt_cache=False).encode(PROMPTS, max_length=MAX_LEN)
    assert plain_bf16.dtype == torch.bfloat16
    assert rel_l2(plain_bf16, want) > err  # bf16 arithmetic is measurably coarser


# -- precision -----------------------------------------------------------------------------------


def test_precision_policy():
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert te.text_encoder_precision(bf16, "cuda") == (bf16, bf16)
    assert te.text_encoder_precision(fp16, "cuda") == (bf16, fp32)
    assert te.text_encoder_precision(fp32, "cuda") == (bf16, fp32)
    for compute in (bf16, fp16, fp32):
        assert te.text_encoder_precision(compute, "cpu") == (bf16, fp32)


def _overflowing_model():
    """The tiny model with FFN input weights scaled so the gated product passes fp16's 65504."""
    model = tiny_text.make_umt5(seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "wi_0" in name or "wi_1" in name:
                p.mul_(400.0)
    return model


def test_fp16_overflow_is_caught_and_redone_in_fp32(tiny, tmp_path):
    from transformers import UMT5Config, UMT5EncoderModel

    tiny_text.save_official_layout(_overflowing_model(), tiny.tokenizer, tmp_path)
    encoder = loader.load_text_encoder(tmp_path, dtype=torch.float16, prompt_cache=False)
    # What fp16 does unguarded: transformers' own forward on the same fp16 weights.
    batch = encoder.tokenizer(
        [te.clean_prompt(p) for p in PROMPTS], padding="max_length", max_length=MAX_LEN, truncation=True,
        return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        plain = encoder.model(batch.input_ids, batch.attention_mask).last_hidden_state
    exact = UMT5EncoderModel(UMT5Config(**tiny_text.TINY_UMT5)).eval()
    exact.load_state_dict({k: v.float() for k, v in encoder.model.state_dict().items()})
    with torch.no_grad():
        want = exact(batch.input_ids, batch.attention_mask).last_hidden_state
    mask = batch.attention_mask.bool()
    plain_ok = bool(torch.isfinite(plain[mask]).all())
    plain_err = rel_l2(plain[mask].float(), want[mask]) if plain_ok else float("nan")
    print(f"text encoder, unguarded fp16 on large weights: finite={plain_ok}, relative L2 {plain_err:.2e}")
    assert not plain_ok or plain_err > 0.05

    with pytest.warns(UserWarning, match="overflowed in float16"):
        got = encoder.encode(PROMPTS, max_length=MAX_LEN)
    assert encoder.compute_dtype == torch.float32 and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    got_rows = torch.cat([got[i, : int(m.sum())] for i, m in enumerate(batch.attention_mask)])
    assert rel_l2(got_rows, want[mask]) <= 1e-5
    assert {p.dtype for p in encoder.model.parameters()} == {torch.float16, torch.float32}  # wo in fp32


def test_fp16_without_overflow_stays_fp16(tiny, reference, recwarn):
    encoder = loader.load_text_encoder(tiny.official, dtype=torch.float16, prompt_cache=False)
    got = encoder.encode(PROMPTS, max_length=MAX_LEN)
    assert not [w for w in recwarn if "overflowed" in str(w.message)]
    assert got.dtype == torch.float16 and encoder.compute_dtype == torch.float16
    err = rel_l2(got, reference(PROMPTS))
    print(f"text encoder, fp16 (no overflow) vs fp32 reference: relative L2 {err:.2e}")
    assert 0 < err < 1e-2


def test_compute_below_storage_precision_is_refused(tiny):
    with pytest.raises(ConfigError, match="cannot compute in bfloat16"):
        te.WanTextEncoder(tiny.model, None, compute_dtype=torch.bfloat16)


# -- the real layouts (manifests) ----------------------------------------------------------------


def _manifest(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((MANIFESTS / f"{name}.json").read_text())["tensors"].items()}


def test_real_umt5_xxl_config_has_the_diffusers_names_and_shapes():
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**te.UMT5_XXL))
    names = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert names == _manifest("diffusers_umt5_xxl_text_encoder")


def test_official_manifest_converts_to_the_diffusers_manifest():
    official = _manifest("official_umt5_xxl_encoder")
    mapping = t5_keys.official_to_transformers(official)
    converted = {hf: official[src] for hf, src in mapping.items()}
    assert converted == _manifest("diffusers_umt5_xxl_text_encoder")
    assert t5_keys.umt5_config_from_shapes(converted) == te.UMT5_XXL
    assert t5_keys.detect_t5_format(official) == "official"
    assert t5_keys.detect_t5_format(converted) == "transformers"


def test_loader_builds_umt5_xxl_from_the_official_layout_on_meta():
    state = {
        k: torch.empty(s, dtype=torch.bfloat16, device="meta")
        for k, s in _manifest("official_umt5_xxl_encoder").items()
    }
    model = loader.build_umt5(state, device="meta")
    assert (model.config.d_model, model.config.num_layers, model.config.num_heads) == (4096, 24, 64)
    assert model.shared.weight.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == 5680910336  # the official file's count
    del state["blocks.23.ffn.fc2.weight"]
    with pytest.raises(CheckpointError, match=r"missing: encoder\.block\.23\.layer\.1\.DenseReluDense\.wo"):
        loader.build_umt5(state, device="meta")


# -- prompt cache --------------------------------------------------------------------------------


def _count_forwards(encoder) -> list[int]:
    calls: list[int] = []
    encoder.model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(len(kwargs.get("input_ids") if "input_ids" in kwargs else kwargs["inputs_embeds"])),
        with_kwargs=True,
    )  # fmt: skip
    return calls


def test_prompt_cache_hits_skip_the_encoder(tiny, tmp_path):
    cache_dir = tmp_path / "prompts"
    encoder = loader.load_text_encoder(tiny.diffusers, prompt_cache=cache_dir)
    calls = _count_forwards(encoder)
    negative = tiny_text.CORPUS[12]
    first = encoder.encode(["A cat walks", negative], max_length=MAX_LEN)
    assert calls == [2]
    again = encoder.encode(["  A   cat walks ", negative], max_length=MAX_LEN)  # same after cleaning
    assert calls == [2]
    assert torch.equal(first, again)
    encoder.encode(["A dog runs", negative], max_length=MAX_LEN)  # only the new prompt is encoded
    assert calls == [2, 1]
    encoder.encode(["A cat walks"], max_length=MAX_LEN + 1)  # another length is another entry
    assert calls == [2, 1, 1]
    entries = list(cache_dir.rglob("*"))
    assert len([p for p in entries if p.suffix == ".safetensors"]) == 4
    assert not [p for p in entries if p.name.startswith(".tmp-")]

    fresh = loader.load_text_encoder(tiny.diffusers, prompt_cache=cache_dir)  # same files: same fingerprint
    fresh_calls = _count_forwards(fresh)
    torch.testing.assert_close(
        fresh.encode(["A cat walks", negative], max_length=MAX_LEN), first, rtol=0, atol=0
    )
    assert fresh_calls == []
    fresh.release()  # cached prompts need no weights
    torch.testing.assert_close(
        fresh.encode("A dog runs", max_length=MAX_LEN)[0], encoder.encode("A dog runs", max_length=MAX_LEN)[0]
    )
    with pytest.raises(ConfigError, match="released"):
        fresh.encode("A prompt never seen", max_length=MAX_LEN)


def test_prompt_cache_keys_on_weights_and_precision(tiny, tmp_path):
    cache_dir = tmp_path / "prompts"

    def calls_for(**kwargs) -> list[int]:
        encoder = loader.load_text_encoder(tiny.diffusers, prompt_cache=cache_dir, **kwargs)
        calls = _count_forwards(encoder)
        encoder.encode("A cat walks", max_length=MAX_LEN)
        return calls

    assert calls_for(dtype=torch.bfloat16) == [1]
    assert calls_for(dtype=torch.bfloat16) == []  # same files, same precision: a hit
    assert calls_for(dtype=torch.bfloat16, compute_dtype=torch.float32) == [1]  # other compute dtype
    assert calls_for(dtype=torch.float32) == [1]  # other storage dtype
    assert calls_for(dtype=torch.float32) == []
    tokenizer = loader.load_text_encoder(tiny.diffusers, prompt_cache=False).tokenizer
    for seed, expected in ((5, [1]), (5, []), (6, [1])):  # encoders built in memory: weights sampled
        in_memory = te.WanTextEncoder(tiny_text.make_umt5(seed=seed), tokenizer, cache=PromptCache(cache_dir))
        calls = _count_forwards(in_memory)
        in_memory.encode("A cat walks", max_length=MAX_LEN)
        assert calls == expected


def test_prompt_cache_can_be_turned_off(tiny, monkeypatch, tmp_path):
    assert loader.load_text_encoder(tiny.diffusers, prompt_cache=False).cache is None
    monkeypatch.setenv("WANFIT_PROMPT_CACHE", "0")
    encoder = loader.load_text_encoder(tiny.diffusers)
    assert encoder.cache is None
    calls = _count_forwards(encoder)
    encoder.encode("A cat walks", max_length=8)
    encoder.encode("A cat walks", max_length=8)
    assert calls == [1, 1]
    monkeypatch.delenv("WANFIT_PROMPT_CACHE")
    assert loader.load_text_encoder(tiny.diffusers).cache.directory == tmp_path / "cache" / "prompts"


def test_a_damaged_cache_entry_is_a_miss(tiny, tmp_path):
    encoder = loader.load_text_encoder(tiny.diffusers, prompt_cache=tmp_path)
    first = encoder.encode("A cat walks", max_length=MAX_LEN)
    (entry,) = tmp_path.rglob("*.safetensors")
    entry.write_bytes(b"not a safetensors file")
    calls = _count_forwards(encoder)
    assert torch.equal(encoder.encode("A cat walks", max_length=MAX_LEN), first)
    assert calls == [1]


# -- errors a user can cause ---------------------------------------------------------------------


def test_missing_tokenizer_says_where_it_looked(tiny, tmp_path):
    shutil.copy(tiny.official / tiny_text.OFFICIAL_FILE, tmp_path / tiny_text.OFFICIAL_FILE)
    with pytest.raises(CheckpointError, match=r"No tokenizer found.*google/umt5-xxl"):
        loader.load_text_encoder(tmp_path, prompt_cache=False)
    with pytest.raises(CheckpointError, match="not a tokenizer folder"):
        loader.load_text_encoder(tmp_path, tokenizer=tmp_path, prompt_cache=False)
    encoder = loader.load_text_encoder(tmp_path, tokenizer=tiny.tokenizer, prompt_cache=False)
    assert encoder.encode("A cat", max_length=8).shape == (1, 8, 32)


def _official_file_with(tiny, tmp_path, edit) -> Path:
    state = tiny_text.official_state_dict(tiny.model)
    edit(state)
    tiny_text.save_official_layout(tiny.model, tiny.tokenizer, tmp_path)
    torch.save(state, tmp_path / tiny_text.OFFICIAL_FILE)
    return tmp_path


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s: s.pop("blocks.1.norm2.weight"),
            r"missing: encoder\.block\.1\.layer\.1\.layer_norm\.weight",
        ),
        (
            lambda s: s.update({"blocks.0.attn.extra.weight": torch.zeros(2)}),
            r"unexpected: blocks\.0\.attn\.extra",
        ),
        (
            lambda s: s.update({"blocks.1.ffn.fc1.weight": torch.zeros(48, 32)}),
            r"wrong shape: encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1\.weight \(file \[48, 32\], model \[64, 32\]\)",
        ),
    ],
)
def test_weights_that_do_not_fit_name_what_is_wrong(tiny, tmp_path, edit, message):
    path = _official_file_with(tiny, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        loader.load_text_encoder(path, prompt_cache=False)


def test_other_mistakes_are_clear_errors(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        loader.load_text_encoder(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="holds no umT5 text encoder"):
        loader.load_text_encoder(tmp_path)
    folder = tmp_path / "te"
    shutil.copytree(tiny.diffusers / "text_encoder", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(CheckpointError, match="'t5' model, not the umT5"):
        loader.load_text_encoder(folder, tokenizer=tiny.tokenizer)
    small = tiny_text.make_umt5(vocab_size=200)
    tiny_text.save_official_layout(small, tiny.tokenizer, tmp_path / "small")
    with pytest.raises(CheckpointError, match="256 tokens but the text encoder only 200"):
        loader.load_text_encoder(tmp_path / "small")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="not a umT5 text encoder"):
        loader.load_text_encoder(tmp_path / "x.pth", tokenizer=tiny.tokenizer)


# -- the GPU benchmark's CPU side ----------------------------------------------------------------


def test_benchmark_script_runs_tiny_on_cpu(tmp_path):
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "bench_text_encoder.py"
    spec = importlib.util.spec_from_file_location("bench_text_encoder", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    argv = [
        "--tiny",
        "--device",
        "cpu",
        "--tokens",
        "16",
        "--warmup",
        "1",
        "--repeat",
        "1",
        "--out",
        str(out),
    ]
    assert bench.main([*argv, "--modes", "bf16-w/fp32,fp16,hf-bf16"]) == 0
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["results"]] == ["bf16-w/fp32", "fp16", "hf-bf16"]
    for r in report["results"]:
        assert "error" not in r and r["finite"] and r["ms_median"] > 0
    assert report["results"][0]["compute_dtype"] == "float32"
