"""Model configurations in official Wan2.1 names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class DiTConfig:
    """Shape of a Wan2.1 text-to-video DiT (official names)."""

    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    qk_norm: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            from wanfit.errors import ConfigError

            raise ConfigError(f"Unknown DiT config keys: {', '.join(unknown)}.")
        d = dict(d)
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)

    def with_overrides(self, **overrides) -> DiTConfig:
        return replace(self, **overrides)


@dataclass(frozen=True)
class TextEncoderConfig:
    """Shape of the umT5 text encoder, in transformers' UMT5Config names (default: the release's XXL).

    A prompt's length is the DiT's `text_len`: the pipeline tokenizes to it.
    """

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128

    def umt5_kwargs(self) -> dict:
        """UMT5Config arguments for this encoder: gated GELU, eps 1e-6, no dropout, as released."""
        return {
            **asdict(self),
            "num_decoder_layers": self.num_layers,
            "feed_forward_proj": "gated-gelu",
            "layer_norm_epsilon": 1e-6,
            "dropout_rate": 0.0,
        }

    @classmethod
    def from_umt5(cls, config: Mapping) -> TextEncoderConfig:
        """The shape fields of UMT5Config arguments or a config.json (the other keys are ignored)."""
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


# The Wan2.1 VAE compresses (frames, height, width) by these factors; it keeps the first frame alone.
VAE_STRIDE = (4, 8, 8)


def latent_shape(batch: int, channels: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
    """The latent [B, C, F', H/8, W/8] of a num_frames x height x width video."""
    return (
        batch,
        channels,
        (num_frames - 1) // VAE_STRIDE[0] + 1,
        height // VAE_STRIDE[1],
        width // VAE_STRIDE[2],
    )


WAN_T2V_1_3B = DiTConfig()
WAN_T2V_14B = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
# Tiny config for tests (wanfit.demo's random model; the built-in trained model is wanfit.builtin's).
WAN_TINY = DiTConfig(dim=64, ffn_dim=128, freq_dim=32, num_heads=4, num_layers=2, text_dim=32, text_len=16)

# umT5-XXL, the text encoder every Wan2.1 release ships.
WAN21_TEXT_ENCODER = TextEncoderConfig()

DIT_PRESETS = {"1.3B": WAN_T2V_1_3B, "14B": WAN_T2V_14B, "tiny": WAN_TINY}
