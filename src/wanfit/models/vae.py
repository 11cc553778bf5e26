"""The Wan2.1 causal 3D video VAE: 16 latent channels, 4x temporal and 8x8 spatial compression.

Convolutions are causal in time: an output frame sees only its own and earlier input frames. Video
is therefore encoded and decoded as a stream, a few frames at a time, each causal convolution
keeping the last two frames it was given in a per-call cache (`TimeCache`). Encode feeds the first
frame alone, then 4 frames per latent frame; decode feeds one latent frame at a time, and below
the first temporal upsampling one frame at a time, writing each finished frame into a
preallocated output. Nothing ever holds a full-resolution activation for all frames.

Spatial tiling (`decode(z, tile=...)`) is exact: the decoder's only non-local layer, the
attention of its middle block, runs untiled at latent resolution; everything after it is local
(3x3 convolutions, nearest upsampling), so each tile is decoded over its region plus a margin as
wide as the receptive field still ahead of it at that resolution, with its own time cache, and
only its core is kept. The margins shrink at every upsampling, so the extra work is small, and
the tiled output equals the untiled one up to float rounding (no seams, nothing to blend).

Parameter names are those of the official Wan2.1_VAE.pth, so that file loads without renaming.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from wanfit.attention import attention
from wanfit.errors import ConfigError

# Mean and std of each latent channel over the training data, from the Wan2.1 release.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# Per-call state of the causal layers of one stream (one video, or one tile of it): module -> frames.
TimeCache = dict


@dataclass(frozen=True)
class VAEConfig:
    """Shape of a Wan2.1 VAE. Field names follow diffusers' AutoencoderKLWan config."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # sic: the released spelling
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    def __post_init__(self):
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ConfigError(
                f"VAE config: temperal_downsample needs {len(self.dim_mult) - 1} flags "
                f"(one per downsampling), got {len(self.temperal_downsample)}."
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ConfigError(f"VAE config: latents_mean and latents_std need {self.z_dim} values each.")

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.temporal_stride

    def video_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal_stride

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"Unknown VAE config keys: {', '.join(unknown)}.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def with_overrides(self, **overrides) -> VAEConfig:
        return replace(self, **overrides)


WAN21_VAE = VAEConfig()
# Same topology as the release at 1/12 of the width: for tests.
WAN_VAE_TINY = VAEConfig(base_dim=8)


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """x / ||x|| * sqrt(C) * gamma over the channel axis (dim 1), summed in fp32."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        # [C,1,1] for 4D frames (attention), [C,1,1,1] for 5D video: the released shapes.
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # A plain sum of squares: on a CPU, vector_norm over dim 1 is 20-50x slower (forward and backward).
            norm = x.square().sum(dim=1, keepdim=True).sqrt_()
        else:
            # Half precision: accumulated in fp32 without making an fp32 copy of x.
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
        factor = (self.scale / norm.clamp_min(1e-12)).to(x.dtype)
        return (x * factor).mul_(self.gamma)


def norm_silu(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return F.silu(norm(x), inplace=True)


class CausalConv3d(nn.Conv3d):
    """A 3D convolution padded only on the past side in time, streaming through a TimeCache.

    `padding` = (pt, ph, pw) as in the release: 2*pt past frames, ph/pw on both spatial sides. The
    past frames come from the cache (the last inputs of this layer), zeros at the start.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size, stride=1, padding=0):
        kernel_size = _triple(kernel_size)
        pt, ph, pw = _triple(padding)
        super().__init__(in_dim, out_dim, kernel_size, stride=stride, padding=(0, ph, pw))
        self.past_frames = 2 * pt

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        need = self.past_frames
        if need == 0:
            if self.kernel_size[0] == 1:  # no mixing across time: a 2D conv over every frame
                weight = self.weight.squeeze(2)
                return _per_frame(
                    lambda f: F.conv2d(f, weight, self.bias, self.stride[1:], self.padding[1:]), x
                )
            return super().forward(x)
        past: tuple[torch.Tensor, ...] = cache.get(self, ()) if cache is not None else ()
        if cache is not None:
            # Keep references to the last input frames (never copies for one-frame steps).
            frames = [*past, *x.split(1, dim=2)][-need:]
            if x.shape[2] > need:  # views would keep the whole chunk alive
                frames = [f.clone() for f in frames]
            cache[self] = tuple(frames)
        if x.shape[2] == 1:
            return self._one_frame([*past, x])
        missing = need - len(past)
        if missing > 0:
            b, c, _, h, w = x.shape
            past = (x.new_zeros(b, c, missing, h, w), *past)
        return super().forward(torch.cat([*past, x], dim=2))

    def _one_frame(self, frames: list[torch.Tensor]) -> torch.Tensor:
        """One output frame from the last k input frames, as a 2D conv over them stacked on channels.

        Missing past frames are zeros, so their taps are simply left out. A 2D conv is the
        best-tuned kernel on every backend (and no copy of the input is made for the first frame).
        """
        taps = len(frames)
        weight = self.weight[:, :, self.kernel_size[0] - taps :]
        out_dim, in_dim, _, kh, kw = weight.shape
        weight = weight.transpose(1, 2).reshape(out_dim, taps * in_dim, kh, kw)  # [O, (t, I), kh, kw]
        stacked = torch.cat(frames, dim=1) if taps > 1 else frames[0]
        y = F.conv2d(stacked.squeeze(2), weight, self.bias, stride=self.stride[1:], padding=self.padding[1:])
        return y.unsqueeze(2)


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def _per_frame(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D (image) module to every frame of a [B, C, T, H, W] video."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.view(b, t, *y.shape[1:]).transpose(1, 2)


class ResidualBlock(nn.Module):
    """norm-silu-conv twice, plus a 1x1 shortcut when the width changes."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Identity(),  # dropout in training; kept so index 6 is the second conv, as released
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        # conv1's output is a temporary, freed before conv2 runs; each conv's input stays cached.
        h = norm_silu(norm2, conv1(norm_silu(norm1, x), cache))
        return conv2(h, cache).add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time)."""

    query_chunk = 16384  # queries per attention call: bounds memory if a backend falls back to math

    def __init__(self, dim: int):
        super().__init__()
        self.dispatcher = None  # set by WanVAE.set_attention_dispatcher; None: the process-wide one
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: TimeCache | None = None) -> torch.Tensor:
        return x + _per_frame(self._attend, x)

    def _attend(self, frames: torch.Tensor) -> torch.Tensor:
        n, c, h, w = frames.shape
        qkv = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2).contiguous()  # [N, HW, 3C]
        q, k, v = (t.unsqueeze(2) for t in qkv.chunk(3, dim=-1))  # [N, HW, 1, C]
        parts = [attention(qc, k, v, dispatcher=self.dispatcher) for qc in q.split(self.query_chunk, dim=1)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.proj(out.squeeze(2).transpose(1, 2).reshape(n, c, h, w))


class Resample(nn.Module):
    """2x spatial down/upsampling, with 2x in time as well for the '3d' modes.

    Temporal downsampling (encoder) passes the first frame through and then maps each pair of new
    frames to one (a stride-2 conv over the last old frame and the pair). Temporal upsampling
    (decoder) passes the first frame through and then turns each frame into two (a causal conv to
    twice the channels, split into two frames), so 1 + n latent frames become 1 + 2n.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
            )
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            if self in cache:
                b, c, t, h, w = x.shape
                # Each frame becomes two: the halves of the time conv's 2c channels, in that order.
                y = self.time_conv(x, cache).view(b, 2, c, t, h, w).permute(0, 3, 1, 2, 4, 5)
                y = self.resample(y.reshape(b * t * 2, c, h, w))  # a view when b * t == 1
                return y.view(b, 2 * t, *y.shape[1:]).transpose(1, 2)
            cache[self] = True  # the first frame is not doubled
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            last = cache.get(self)
            cache[self] = x[:, :, -1:].clone()
            if last is not None:
                x = self.time_conv(torch.cat([last, x], dim=2))
        return x


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


def _run_head(head: nn.Sequential, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
    norm, _, conv = head
    return conv(norm_silu(norm, x), cache)


# ----------------------------------------------------------------------------- encoder / decoder


class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        last = len(cfg.dim_mult) - 1
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level != last:
                mode = "downsample3d" if cfg.temperal_downsample[level] else "downsample2d"
                blocks.append(Resample(out_dim, mode))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = nn.Sequential(
            ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]), ResidualBlock(dims[-1], dims[-1])
        )
        self.head = _head(dims[-1], 2 * cfg.z_dim)

    def forward(self, x: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)
        return _run_head(self.head, x, cache)


class Decoder3d(nn.Module):
    """Decoder; `upsamples` is one flat list as released: per level num_res_blocks + 1 residual
    blocks, then a Resample except after the last level."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_up = tuple(reversed(cfg.temperal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])
        )
        blocks: list[nn.Module] = []
        self.level_blocks: list[range] = []  # indices into `upsamples`, per level
        self.level_resample: list[int | None] = []
        self.level_widths: list[int] = []  # the most channels a residual block of each level has
        last = len(cfg.dim_mult) - 1
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if level > 0:
                in_dim //= 2  # each Resample halved the width
            self.level_widths.append(max(in_dim, out_dim))
            start = len(blocks)
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            self.level_blocks.append(range(start, len(blocks)))
            if level != last:
                self.level_resample.append(len(blocks))
                blocks.append(Resample(out_dim, "upsample3d" if temporal_up[level] else "upsample2d"))
            else:
                self.level_resample.append(None)
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], 3)
        self.margins = self._tile_margins(cfg.num_res_blocks)

    def _tile_margins(self, num_res_blocks: int) -> list[int]:
        """Per level, how many pixels of context a tile needs so its core comes out exact.

        Walking back from the output: each 3x3 conv still ahead adds one pixel; a 2x upsampling
        halves the need, and the 3x3 conv right after it (at the finer level) adds one more.
        """
        convs_per_level = 2 * (num_res_blocks + 1)
        margins = [convs_per_level + 1]  # the last level, with the head's conv
        for _ in range(len(self.level_blocks) - 1):
            margins.insert(0, convs_per_level + math.ceil((margins[0] + 1) / 2))
        margins[0] += 2  # middle[2], the residual block after the attention, runs inside tiles
        return margins

    def causal_convs(self) -> list[tuple[int, CausalConv3d]]:
        """Every causal conv with the level it runs at (0: latent resolution, the stem included)."""

        def convs(module: nn.Module) -> list[CausalConv3d]:
            return [m for m in module.modules() if isinstance(m, CausalConv3d)]

        found = [(0, conv) for conv in convs(self.conv1) + convs(self.middle)]
        for level, (blocks, resample) in enumerate(zip(self.level_blocks, self.level_resample)):
            indices = [*blocks, *([] if resample is None else [resample])]
            found += [(level, conv) for i in indices for conv in convs(self.upsamples[i])]
        found += [(len(self.level_blocks) - 1, conv) for conv in convs(self.head)]
        return found

    def stem(self, z: torch.Tensor, cache: TimeCache) -> torch.Tensor:
        """Everything up to and including the middle attention: the part that needs whole frames."""
        x = self.conv1(z, cache)
        x = self.middle[0](x, cache)
        return self.middle[1](x)

    def tail(
        self, x: torch.Tensor, cache: TimeCache, tile: Tile, emit: Callable[[torch.Tensor], None]
    ) -> None:
        """Decode one stem frame of a tile; emit each finished output frame (cropped to the core)."""
        x = self.middle[2](x, cache)
        self._level(x, 0, cache, tile, emit)

    def _level(self, x, level: int, cache: TimeCache, tile: Tile, emit) -> None:
        for i in self.level_blocks[level]:
            x = self.upsamples[i](x, cache)
        resample = self.level_resample[level]
        if resample is None:
            emit(tile.core(_run_head(self.head, x, cache)))
            return
        x = self.upsamples[resample](x, cache)
        for frame in x.split(1, dim=2):  # the finer levels run one frame at a time
            self._level(tile.crop(frame, level + 1), level + 1, cache, tile, emit)


# ----------------------------------------------------------------------------- tiles


@dataclass(frozen=True)
class Span:
    """A tile's extent along one axis, in latent pixels: core [start, stop) of an axis of `size`."""

    start: int
    stop: int
    size: int

    def extended(self, scale: int, margin: int) -> tuple[int, int]:
        return max(0, self.start * scale - margin), min(self.size * scale, self.stop * scale + margin)


@dataclass(frozen=True)
class Tile:
    """One tile of a decode: its core in latent pixels and the context margin at every level.

    Level L of the decoder works at 2**L times the latent resolution (every upsampling is 2x).
    """

    rows: Span
    cols: Span
    margins: tuple[int, ...]  # per decoder level

    def region(self, level: int) -> tuple[int, int, int, int]:
        """The extended region computed at a level: (top, bottom, left, right) in that level's pixels."""
        scale = 2**level
        return (
            *self.rows.extended(scale, self.margins[level]),
            *self.cols.extended(scale, self.margins[level]),
        )

    def crop(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Cut the previous level's region, upsampled 2x, down to this level's region."""
        top, bottom, left, right = self.region(level)
        ptop, _, pleft, _ = self.region(level - 1)
        top, bottom, left, right = top - 2 * ptop, bottom - 2 * ptop, left - 2 * pleft, right - 2 * pleft
        return x[..., top:bottom, left:right]

    def core(self, x: torch.Tensor) -> torch.Tensor:
        """Cut the last level's region down to the tile's core: the pixels this tile outputs."""
        level = len(self.margins) - 1
        scale = 2**level
        top, _, left, _ = self.region(level)
        r0, c0 = self.rows.start * scale - top, self.cols.start * scale - left
        return x[
            ...,
            r0 : r0 + (self.rows.stop - self.rows.start) * scale,
            c0 : c0 + (self.cols.stop - self.cols.start) * scale,
        ]


def _split(size: int, tile: int) -> list[Span]:
    """Cut an axis into ceil(size / tile) near-equal spans."""
    n = max(1, math.ceil(size / max(1, tile)))
    bounds = [round(i * size / n) for i in range(n + 1)]
    return [Span(a, b, size) for a, b in zip(bounds[:-1], bounds[1:])]


def _plan_tiles(
    latent_hw: tuple[int, int], tile: int | tuple[int, int] | None, margins: tuple[int, ...]
) -> list[Tile]:
    h, w = latent_hw
    th, tw = (h, w) if tile is None else (tile, tile) if isinstance(tile, int) else tile
    return [Tile(rows, cols, margins) for rows in _split(h, th) for cols in _split(w, tw)]


# ----------------------------------------------------------------------------- the VAE


class WanVAE(nn.Module):
    """The Wan2.1 video VAE. encode: video -> raw latent mean; decode: raw latent -> video.

    Works in the dtype and on the device of its weights; call under no particular context.
    """

    def __init__(self, config: VAEConfig = WAN21_VAE):
        super().__init__()
        self.config = config
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)  # -> mean and log-variance
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        self.channels_last = False

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def set_attention_dispatcher(self, dispatcher=None) -> None:
        """Route the per-frame attention through this Dispatcher (None: the process-wide one)."""
        for module in self.modules():
            if isinstance(module, AttentionBlock):
                module.dispatcher = dispatcher

    def use_channels_last(self, enabled: bool = True) -> WanVAE:
        """Store convolution weights and activations channels-last (NDHWC), which cuDNN prefers."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                fmt = _memory_format(module.weight.dim(), enabled)
                module.weight.data = module.weight.data.contiguous(memory_format=fmt)
        self.channels_last = enabled
        return self

    # -- latent statistics (the convention of the official code and diffusers' WanPipeline)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent -> the normalised latent the DiT works in: (z - mean) / std."""
        mean, std = self._latent_stats(z)
        return ((z.float() - mean) / std).to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> raw latent for decode: z * std + mean."""
        mean, std = self._latent_stats(z)
        return (z.float() * std + mean).to(z.dtype)

    def _latent_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=z.device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=torch.float32, device=z.device).view(shape)
        return mean, std

    # -- encode

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [-1, 1] -> raw latent mean [B, z_dim, 1 + (F-1)//4, H/8, W/8].

        Frames past the last whole group of 4 are not encoded, as in the reference models.
        """
        cfg = self.config
        s, ts = cfg.spatial_stride, cfg.temporal_stride
        if video.dim() != 5 or video.shape[1] != 3:
            raise ConfigError(f"VAE encode expects a video [B, 3, F, H, W]; got shape {tuple(video.shape)}.")
        b, _, frames, h, w = video.shape
        if frames < 1 or h % s or w % s:
            raise ConfigError(
                f"Video height and width must be multiples of {s} (and frames >= 1); got {h}x{w}."
            )
        latent_frames = cfg.latent_frames(frames)
        out = torch.empty(b, cfg.z_dim, latent_frames, h // s, w // s, dtype=self.dtype, device=self.device)
        cache: TimeCache = {}
        # Only the mean half of conv1's output is needed: skip the log-variance channels.
        mean_w, mean_b = self.conv1.weight[: cfg.z_dim, :, 0], self.conv1.bias[: cfg.z_dim]
        for t in range(latent_frames):
            first, stop = (0, 1) if t == 0 else (1 + ts * (t - 1), 1 + ts * t)
            chunk = self._prepare(video[:, :, first:stop])
            out[:, :, t : t + 1] = _per_frame(
                lambda f: F.conv2d(f, mean_w, mean_b), self.encoder(chunk, cache)
            )
        return out

    # -- decode

    @torch.no_grad()
    def decode(
        self,
        z: torch.Tensor,
        tile: int | tuple[int, int] | None = None,
        *,
        output_device: torch.device | str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Raw latent [B, z_dim, T, h, w] -> video [B, 3, 1 + 4(T-1), 8h, 8w] in [-1, 1].

        tile: core size (rows, cols) in latent pixels, or one int for both; None decodes whole
        frames. Tiles are exact (see the module docstring), so only memory and time change.
        output_device: where the video is assembled (e.g. "cpu" to keep it off the card).
        progress(done, total): called after each latent frame of each tile.
        """
        cfg = self.config
        if z.dim() != 5 or z.shape[1] != cfg.z_dim or 0 in z.shape:
            raise ConfigError(f"VAE decode expects a latent [B, {cfg.z_dim}, T, h, w]; got {tuple(z.shape)}.")
        b, _, latent_frames, h, w = z.shape
        s = cfg.spatial_stride
        out = torch.empty(
            b,
            3,
            cfg.video_frames(latent_frames),
            h * s,
            w * s,
            dtype=self.dtype,
            device=output_device or self.device,
        )
        tiles = self.plan_tiles((h, w), tile)
        total = latent_frames * len(tiles)
        report = progress or (lambda done, total: None)
        if len(tiles) == 1:  # stream each latent frame straight through
            cache: TimeCache = {}
            emit = self._writer(out, tiles[0])
            for t in range(latent_frames):
                stem = self.decoder.stem(self.conv2(self._prepare(z[:, :, t : t + 1])), cache)
                self.decoder.tail(stem, cache, tiles[0], emit)
                report(t + 1, total)
            return out

        # The stem needs whole frames: run it once for all frames (latent resolution, small).
        width = cfg.base_dim * cfg.dim_mult[-1]
        stems = torch.empty(b, width, latent_frames, h, w, dtype=self.dtype, device=self.device)
        stems = stems.contiguous(memory_format=_memory_format(5, self.channels_last))
        cache = {}
        for t in range(latent_frames):
            stems[:, :, t : t + 1] = self.decoder.stem(self.conv2(self._prepare(z[:, :, t : t + 1])), cache)
        del cache
        for i, tile_ in enumerate(tiles):
            top, bottom, left, right = tile_.region(0)
            cache = {}
            emit = self._writer(out, tile_)
            for t in range(latent_frames):
                self.decoder.tail(stems[:, :, t : t + 1, top:bottom, left:right], cache, tile_, emit)
                report(i * latent_frames + t + 1, total)
        return out

    def plan_tiles(self, latent_hw: tuple[int, int], tile: int | tuple[int, int] | None) -> list[Tile]:
        """The tiles decode(z, tile) runs: cores of at most `tile` latent pixels, of near-equal size."""
        return _plan_tiles(latent_hw, tile, tuple(self.decoder.margins))

    def _writer(self, out: torch.Tensor, tile: Tile) -> Callable[[torch.Tensor], None]:
        """A function that writes a tile's output frames, one after another, into `out`."""
        s = self.config.spatial_stride
        rows = slice(tile.rows.start * s, tile.rows.stop * s)
        cols = slice(tile.cols.start * s, tile.cols.stop * s)
        frame = iter(range(out.shape[2]))

        def emit(x: torch.Tensor) -> None:
            t = next(frame)
            out[:, :, t : t + 1, rows, cols].copy_(x.clamp_(-1.0, 1.0))

        return emit

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=self.device, dtype=self.dtype)
        return x.contiguous(memory_format=_memory_format(5, self.channels_last))


def _memory_format(ndim: int, channels_last: bool) -> torch.memory_format:
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if ndim == 5 else torch.channels_last
