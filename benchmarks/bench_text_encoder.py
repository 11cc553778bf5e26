"""umT5-XXL prompt encoding (512 tokens) per precision mode: time and peak memory on this GPU.

    python3 benchmarks/bench_text_encoder.py --out $OUT/bench_text_encoder.json
    python3 benchmarks/bench_text_encoder.py --modes bf16,bf16-w/fp32 --batch 2 --out ...
    python3 benchmarks/bench_text_encoder.py --tiny --device cpu --out /tmp/t.json   # CPU smoke run

Random weights (the real config; normal with transformers' init scales, never zero) stand in for
the release: they cost the same time and memory. Modes (weights/compute):
  bf16          bf16/bf16: sm_80+ cards, what wanfit plans there
  bf16-w/fp32   bf16/fp32 block by block: wanfit's plan for fp16-only cards (T4, V100) and the CPU
  fp32          fp32/fp32: the simple alternative, twice the memory
  fp16          fp16/fp16 with wanfit's overflow watch (falls back to fp32 if it overflows)
  hf-bf16       transformers' forward alone, bf16, no wanfit code: the reference cost
Times: CUDA events after warm-up, median of --repeat runs. Peak: max_memory_allocated during the
encode (weights included); "weights" is what the loaded model holds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

MODES = {  # name -> (weights dtype, compute dtype)
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16-w/fp32": (torch.bfloat16, torch.float32),
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "hf-bf16": (torch.bfloat16, torch.bfloat16),
}
TINY = {"vocab_size": 512, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4}


class RandomTokenizer:
    """Stands in for the google/umt5-xxl tokenizer (not needed for timing): every prompt fills
    `length` tokens of random ids, so the encoder sees full 512-token sequences."""

    def __init__(self, vocab: int, length: int):
        self.vocab, self.length = vocab, length

    def __len__(self) -> int:
        return self.vocab

    def __call__(self, texts, *, max_length, **kwargs):
        n = min(self.length, max_length)
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        ids[:, :n] = torch.randint(3, self.vocab, (len(texts), n))
        ids[:, n - 1] = 1  # </s>
        mask = torch.zeros_like(ids)
        mask[:, :n] = 1
        return {"input_ids": ids, "attention_mask": mask}


def random_state(config: dict, device: str, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official-layout tensors with transformers' init scales (embedding std 1, projections ~d^-1/2)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    d, dkv, heads, dff = config["d_model"], config["d_kv"], config["num_heads"], config["d_ff"]
    inner = dkv * heads

    def normal(shape, std):
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=gen)

    def norm(n):
        return 1.0 + normal((n,), 0.05)

    state = {"token_embedding.weight": normal((config["vocab_size"], d), 1.0), "norm.weight": norm(d)}
    for i in range(config["num_layers"]):
        b = f"blocks.{i}."
        state[b + "norm1.weight"] = norm(d)
        state[b + "attn.q.weight"] = normal((inner, d), (d * dkv) ** -0.5)
        state[b + "attn.k.weight"] = normal((inner, d), d**-0.5)
        state[b + "attn.v.weight"] = normal((inner, d), d**-0.5)
        state[b + "attn.o.weight"] = normal((d, inner), inner**-0.5)
        state[b + "pos_embedding.embedding.weight"] = normal(
            (config["relative_attention_num_buckets"], heads), d**-0.5
        )
        state[b + "norm2.weight"] = norm(d)
        state[b + "ffn.gate.0.weight"] = normal((dff, d), d**-0.5)
        state[b + "ffn.fc1.weight"] = normal((dff, d), d**-0.5)
        state[b + "ffn.fc2.weight"] = normal((d, dff), dff**-0.5)
    return state


class Timer:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)


def bench_mode(name: str, config: dict, args) -> dict:
    from wanfit.models.text_encoder import WanTextEncoder
    from wanfit.weights.text_encoder_loader import build_umt5

    weights_dtype, compute_dtype = MODES[name]
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    state = random_state(config, args.device, weights_dtype)
    model = build_umt5(state, config, device=args.device, dtype=weights_dtype)
    del state
    weights_mib = torch.cuda.memory_allocated() / 2**20 if cuda else None
    tokenizer = RandomTokenizer(config["vocab_size"], args.tokens)
    encoder = WanTextEncoder(model, tokenizer, compute_dtype=compute_dtype)
    prompts = [f"prompt {i}" for i in range(args.batch)]
    batch = tokenizer(prompts, max_length=args.tokens)
    ids, mask = batch["input_ids"].to(args.device), batch["attention_mask"].to(args.device)

    if name == "hf-bf16":

        def run():
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    else:

        def run():
            encoder.encode(prompts, max_length=args.tokens)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(args.warmup):
            run()
    overflowed = any("overflowed" in str(w.message) for w in caught)
    timer = Timer(args.device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = [timer(run) for _ in range(args.repeat)]
    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    out = encoder.encode(prompts, max_length=args.tokens)
    result = {
        "mode": name,
        "weights_dtype": str(weights_dtype).replace("torch.", ""),
        "compute_dtype": str(encoder.compute_dtype).replace("torch.", ""),
        "ms_median": statistics.median(times),
        "ms_all": times,
        "weights_mib": weights_mib,
        "peak_mib": peak_mib,
        "fp16_overflowed": overflowed if weights_dtype == torch.float16 else None,
        "finite": bool(torch.isfinite(out).all()),
    }
    return result  # the model goes with this frame; main() empties the CUDA cache


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--batch", type=int, default=1, help="prompts per encode (2 = prompt + negative)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny config: checks the script, times nothing real"
    )
    args = parser.parse_args(argv)

    from wanfit.models.text_encoder import UMT5_XXL

    config = {**UMT5_XXL, **TINY, "num_decoder_layers": TINY["num_layers"]} if args.tiny else dict(UMT5_XXL)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes: {', '.join(unknown)}")
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = []
    for name in modes:
        try:
            results.append(bench_mode(name, config, args))
        except torch.cuda.OutOfMemoryError as err:
            results.append({"mode": name, "error": f"out of memory: {str(err).splitlines()[0]}"})
        except Exception as err:  # one broken mode must not lose the others' numbers
            results.append({"mode": name, "error": f"{type(err).__name__}: {err}"})
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    report = {
        "benchmark": "text_encoder",
        "device": device_name,
        "config": "tiny" if args.tiny else "umT5-XXL",
        "batch": args.batch,
        "tokens": args.tokens,
        "torch": torch.__version__,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    print(f"umT5 ({report['config']}) on {device_name}, batch {args.batch} x {args.tokens} tokens")
    print(f"{'mode':<13}{'weights/compute':<20}{'ms':>10}{'weights MiB':>13}{'peak MiB':>10}  note")
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<13}{'':<20}{'-':>10}{'-':>13}{'-':>10}  {r['error']}")
            continue
        note = "fp16 overflowed -> fp32" if r["fp16_overflowed"] else ("" if r["finite"] else "NON-FINITE")
        dtypes = f"{r['weights_dtype']}/{r['compute_dtype']}"
        print(
            f"{r['mode']:<13}{dtypes:<20}{r['ms_median']:>10.1f}{_mib(r['weights_mib']):>13}"
            f"{_mib(r['peak_mib']):>10}  {note}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
