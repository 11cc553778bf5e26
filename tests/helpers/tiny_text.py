"""A tiny umT5 text encoder for tests: a sentencepiece tokenizer trained here, a random transformers
UMT5EncoderModel, and both saved in the diffusers layout and the official Wan2.1 layout.

The official-layout conversion below is written independently of wanfit.weights.t5_keys (block by
block, from the official module structure) so the loader is checked against a second reading.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import torch

OFFICIAL_FILE = "models_t5_umt5-xxl-enc-bf16.pth"

# Prompts in the style Wan is used with, in a few scripts, and the official negative prompt.
CORPUS = [
    "A cat walks on the grass in the soft morning light, realistic, close-up.",
    "A red sports car drives fast along a coastal road at sunset, cinematic, 4k.",
    "Two dogs play with a yellow ball in a city park while children laugh.",
    "An astronaut rides a horse across the surface of the moon, dramatic lighting.",
    "Waves crash against black rocks; spray glitters under a stormy grey sky.",
    "A chef slices fresh vegetables in a busy restaurant kitchen, steam rising.",
    "Slow motion: a hummingbird hovers near a purple flower, shallow depth of field.",
    "Aerial view of snowy mountains, a river winding through a pine forest valley.",
    "Un chat noir dort sur une chaise en bois près de la fenêtre, lumière douce.",
    "Ein alter Mann liest eine Zeitung in einem gemütlichen Café, Regen draußen.",
    "Una bailarina gira en un escenario vacío bajo un foco de luz blanca.",
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured.",
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走",
    "一只小猫在草地上奔跑，阳光明媚，高清画质。",
    "猫が桜の木の下で眠っている、春の午後。",
    "Numbers and signs: 1 2 3 4 5 6 7 8 9 0 & < > \" ' % $ # @ ! ? ( ) [ ] { } + - = / * ~",
]

TOKENIZER_VOCAB = 256  # sentencepiece pieces, T5 order: <pad>=0, </s>=1, <unk>=2
# The model's vocabulary is larger than the tokenizer's, as in umT5-XXL (256384 vs the tokenizer's).
TINY_UMT5 = {
    "vocab_size": 320,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.0,
}


def train_tokenizer(folder: Path) -> Path:
    """Train a unigram sentencepiece model on CORPUS and save it as a transformers T5 tokenizer folder
    shaped like google/umt5-xxl (spiece.model + tokenizer.json + tokenizer_config.json)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=model,
        vocab_size=TOKENIZER_VOCAB,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    T5Tokenizer.from_pretrained(str(folder), extra_ids=0).save_pretrained(str(folder))
    return folder


def make_umt5(seed: int = 0, **overrides):
    """A random tiny UMT5EncoderModel (fp32, eval). Norm weights are randomised too, so a loader that
    swapped two norms would be caught."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(**{**TINY_UMT5, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def save_diffusers_layout(model, tokenizer_dir: Path, root: Path, *, max_shard_size: str = "30KB") -> Path:
    """root/text_encoder (config.json + sharded safetensors with an index) and root/tokenizer."""
    root = Path(root)
    model.save_pretrained(str(root / "text_encoder"), max_shard_size=max_shard_size)
    shutil.copytree(tokenizer_dir, root / "tokenizer", dirs_exist_ok=True)
    return root


def official_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under the names of the official Wan2.1 T5Encoder (wan/modules/t5.py)."""
    sd = model.state_dict()
    out = {"token_embedding.weight": sd["encoder.embed_tokens.weight"]}
    for i in range(model.config.num_layers):
        attn = f"encoder.block.{i}.layer.0."
        ffn = f"encoder.block.{i}.layer.1."
        out[f"blocks.{i}.norm1.weight"] = sd[attn + "layer_norm.weight"]
        for proj in "qkvo":
            out[f"blocks.{i}.attn.{proj}.weight"] = sd[attn + f"SelfAttention.{proj}.weight"]
        out[f"blocks.{i}.norm2.weight"] = sd[ffn + "layer_norm.weight"]
        # official: fc2(fc1(x) * gelu(gate(x))); transformers: wo(gelu(wi_0(x)) * wi_1(x))
        out[f"blocks.{i}.ffn.gate.0.weight"] = sd[ffn + "DenseReluDense.wi_0.weight"]
        out[f"blocks.{i}.ffn.fc1.weight"] = sd[ffn + "DenseReluDense.wi_1.weight"]
        out[f"blocks.{i}.ffn.fc2.weight"] = sd[ffn + "DenseReluDense.wo.weight"]
        out[f"blocks.{i}.pos_embedding.embedding.weight"] = sd[
            attn + "SelfAttention.relative_attention_bias.weight"
        ]
    out["norm.weight"] = sd["encoder.final_layer_norm.weight"]
    return out


def save_official_layout(model, tokenizer_dir: Path, root: Path, *, dtype: torch.dtype | None = None) -> Path:
    """root/models_t5_umt5-xxl-enc-bf16.pth (official names) and root/google/umt5-xxl/ (tokenizer)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().to(dtype or v.dtype) for k, v in official_state_dict(model).items()}
    torch.save(state, root / OFFICIAL_FILE)
    shutil.copytree(tokenizer_dir, root / "google" / "umt5-xxl", dirs_exist_ok=True)
    return root
