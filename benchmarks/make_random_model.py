"""Write a Wan2.1 T2V model folder in the official release layout, with random weights of the real
shapes, so `wanfit generate --model DIR` can be timed end to end on a GPU without downloading.

    python3 benchmarks/make_random_model.py --out /tmp/wan-random       # 1.3B: about 15 GB on disk
    python3 benchmarks/make_random_model.py --out /tmp/wan-14b --size 14B --share /tmp/wan-random
        # 14B: its 28 GB DiT, the VAE, umT5 and tokenizer linked from the 1.3B folder

DiT (bf16 safetensors + config.json), Wan2.1_VAE.pth (fp32), models_t5_umt5-xxl-enc-bf16.pth and a
google/umt5-xxl/ tokenizer folder. No real tokenizer can be fetched offline: wanfit's built-in
character tokenizer stands in (umT5 still sees 512 tokens). Random weights cost the same time and
memory as the real ones; the video is noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

try:
    import wanfit  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wanfit.models.configs import DIT_PRESETS  # noqa: E402
from wanfit.models.dit import WanDiT  # noqa: E402
from wanfit.models.vae import WAN21_VAE, WanVAE  # noqa: E402
from wanfit.weights.file_names import (  # noqa: E402
    DIFFUSERS_WEIGHTS,
    OFFICIAL_T5,
    OFFICIAL_TOKENIZER,
    OFFICIAL_VAE,
)


def _has_block(name: str, layers: int) -> bool:
    """Whether an official umT5 name belongs to a model of `layers` blocks."""
    parts = name.split(".")
    return parts[0] != "blocks" or int(parts[1]) < layers


def random_(module: torch.nn.Module, std: float = 0.02) -> None:
    """Fill every parameter with small random values (norm weights near 1), in place."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith("gamma")):
                p.normal_(1.0, 0.05)
            else:
                p.normal_(0.0, std)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", default="1.3B", choices=sorted(DIT_PRESETS))
    parser.add_argument("--layers", type=int, default=None, help="DiT blocks (default: the model's)")
    parser.add_argument(
        "--text-layers", type=int, default=24, help="umT5 blocks (default 24, the real model)"
    )
    parser.add_argument(
        "--share", type=Path, default=None, help="a folder whose VAE, umT5 and tokenizer to link, not write"
    )
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    torch.manual_seed(0)

    config = DIT_PRESETS[args.size]
    if args.layers:
        config = config.with_overrides(num_layers=args.layers)
    with torch.device(device):
        dit = WanDiT(config).to(torch.bfloat16)
    random_(dit)
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous().cpu() for k, v in dit.state_dict().items()},
        str(out / f"{DIFFUSERS_WEIGHTS}.safetensors"),
    )
    (out / "config.json").write_text(
        json.dumps({"_class_name": "WanModel", "model_type": "t2v", **config.to_dict()})
    )
    del dit
    print(f"DiT written after {time.perf_counter() - started:.0f} s", flush=True)
    if args.share is not None:
        for name in (OFFICIAL_VAE, OFFICIAL_T5, OFFICIAL_TOKENIZER.parts[0]):
            link = out / name
            if not link.exists():
                link.symlink_to((args.share / name).resolve())
        print(
            f"wrote {out} in {time.perf_counter() - started:.0f} s (VAE, umT5, tokenizer from {args.share})"
        )
        return

    with torch.device(device):
        vae = WanVAE(WAN21_VAE)
    random_(vae)
    torch.save({k: v.cpu() for k, v in vae.state_dict().items()}, out / OFFICIAL_VAE)
    del vae

    from transformers import UMT5Config, UMT5EncoderModel

    from wanfit.demo import tiny_tokenizer
    from wanfit.weights.t5_keys import official_to_transformers

    t5_config = UMT5Config(
        vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=args.text_layers, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device(device):
        t5 = UMT5EncoderModel(t5_config).to(torch.bfloat16)
    random_(t5, std=0.05)
    # Official names: wanfit's mapping (transformers name -> official name) over the release's key list.
    manifest = Path(__file__).resolve().parents[1] / "tests/data/manifests/official_umt5_xxl_encoder.json"
    official_names = json.loads(manifest.read_text())["tensors"]
    to_official = official_to_transformers(n for n in official_names if _has_block(n, args.text_layers))
    state = t5.state_dict()
    torch.save({off: state[hf].cpu() for hf, off in to_official.items()}, out / OFFICIAL_T5)
    del t5
    tiny_tokenizer().save_pretrained(str(out / OFFICIAL_TOKENIZER))
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
