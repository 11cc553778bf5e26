"""The Wan2.1 text-to-video diffusion transformer (DiT).

Module and parameter names are the official Wan2.1 key names, so official checkpoints load without
renaming. Precision rule (as the official model computes it): the residual stream, the norms, the
modulation arithmetic and RoPE run in fp32 whatever the weights' dtype; every Linear/Conv runs in
the dtype of its own weight (its input is cast to it), and so does attention. A runtime may keep
some modules (e.g. the time embedding) in fp32 storage and the math follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from wanfit.attention import attention
from wanfit.models.configs import DiTConfig

Rope = torch.Tensor  # complex64 [L, 1, head_dim // 2]: one unit rotation per token and channel pair


@dataclass
class DiTInputs:
    """What every block reads, made once per forward by WanDiT.embed (see WanBlock for shapes).

    A step cache skips run_blocks and reuses a residual; sequence parallelism shards `tokens` and
    `rope` by token before the blocks and gathers after them.
    """

    tokens: torch.Tensor  # [B, L, dim] fp32, the patch embeddings (the residual stream's start)
    e: torch.Tensor  # [B, 6, dim] fp32, the time projection
    t_emb: torch.Tensor  # [B, dim] fp32, the time embedding (the head's modulation)
    context: torch.Tensor  # [B, text_len, dim], the embedded text
    rope: Rope
    grid: tuple[int, int, int]  # patch grid (F, H, W)


class Linear(nn.Linear):
    """A block's nn.Linear with two runtime slots, model-level settings like the attention dispatcher:
    gemm      a callable replacing the product, holding this layer's weight in another form (the fast
              tier's fp8 GEMM, wanfit.runtime.fp8_linear); None: the layer's own weight.
    low_rank  a callable `low_rank(layer, x)` computing the whole forward with a LoRA's update (beside
              the product, or merged into a per-call copy of the weight: wanfit.runtime.lora), whose
              `merged_weight(layer)` gives that copy where it makes one (else None); None: the
              product alone.
    Separate slots, so either may be set or cleared whatever the other holds."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self.gemm = None
        self.low_rank = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x) if self.low_rank is None else self.low_rank(self, x)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b, by `gemm` where one is set."""
        return F.linear(x, self.weight, self.bias) if self.gemm is None else self.gemm(x)


def eager_kernels(slot):
    """A module's `elementwise` slot where its fused kernels may run: eager, no autograd (the kernels
    have no backward; a compiled graph keeps the torch ops, which Inductor fuses itself); else None."""
    if slot is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    return slot


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a Linear (or Sequential starting with one) in its weights' dtype; returns that dtype."""
    weight = next(layer.parameters())
    return layer(x.to(weight.dtype))


def gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU_tanh(x W^T + b) by one GEMM whose epilogue applies the GELU (torch._addmm_activation; on
    CUDA, cuBLASLt's GELU_BIAS epilogue, from the fp32 accumulator). CPU builds apply the erf GELU:
    the runtime sets WanBlock.ffn_gelu_epilogue only where wanfit.runtime.gemm_epilogue found tanh."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(bias, rows, weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


def run_in_chunks(fn, x: torch.Tensor, chunk: int | None, dim: int = 1) -> torch.Tensor:
    """fn(x) over slices of at most `chunk` along `dim`, written into one output (same result, less memory).

    fn must treat each position of `dim` independently (an FFN over tokens, attention over queries).
    """
    length = x.shape[dim]
    if not chunk or length <= chunk:
        return fn(x)
    out = None
    for start in range(0, length, chunk):
        size = min(chunk, length - start)
        y = fn(x.narrow(dim, start, size))
        if out is None:
            shape = list(y.shape)
            shape[dim] = length
            out = y.new_empty(shape)
        out.narrow(dim, start, size).copy_(y)
    return out


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, L, C] fp32 normalised; shift/scale [B, C] fp32. One fused pass: shift + x * (1 + scale)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (weights upcast); returns fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32; returns fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, L, H, D] by the grid's angles, in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        # Inductor cannot generate code for complex numbers; in real arithmetic it fuses the rotation.
        cos, sin = rope.real, rope.imag
        even, odd = pairs[..., 0], pairs[..., 1]
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    # Eager: one complex multiply is a single kernel.
    return torch.view_as_real(torch.view_as_complex(pairs) * rope).flatten(-2)


def rope_frequencies(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> Rope:
    """Rotations [F*H*W, 1, head_dim/2] for a latent grid: head dim split into time, height, width parts.

    Angles are computed in float64 on the CPU (as the official model does), stored as complex64.
    The rotations are taken per axis ([n, d/2] each) and only then spread over the grid: the same
    values as rotating the whole table, without float64 trigonometry for every token.
    """
    hw_dim = 2 * (head_dim // 6)
    axis_dims = (head_dim - 2 * hw_dim, hw_dim, hw_dim)
    rotations = []
    for axis, (n, d) in enumerate(zip(grid, axis_dims)):
        inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        a = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)  # [n, d/2]
        r = torch.polar(torch.ones_like(a), a).to(torch.complex64)
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        rotations.append(r.view(shape).expand(*grid, d // 2))
    return torch.cat(rotations, dim=-1).reshape(math.prod(grid), 1, head_dim // 2)


class Projections(nn.Module):
    """q, k, v, o projections with RMSNorm on q and k (official names), shared by both attentions."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(dim, dim)
        self.k = Linear(dim, dim)
        self.v = Linear(dim, dim)
        self.o = Linear(dim, dim)
        # RMSNorm over the whole dim (all heads together), before the split into heads.
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        # The attention dispatcher (a model-level setting: WanDiT.set_attention_dispatchers); None:
        # the process-wide one.
        self.dispatcher = None
        # Fused kernels for the q/k norms (and self-attention's RoPE): wanfit.runtime.fused_elementwise,
        # set by the runtime; None: the torch ops. Used only as WanBlock.elementwise is.
        self.elementwise = None


class SelfAttention(Projections):
    # Linears that read one and the same tensor in a forward (a runtime may share work on that input:
    # wanfit.runtime.lora computes their LoRA down-projections in one GEMM).
    shared_input_linears = ("q", "k", "v")

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.attention_chunk: int | None = None  # query rows per attention call (set by the runtime)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """x [B, L, C] (any dtype) -> [B, L, C] in the weights' dtype (the block adds it in fp32)."""
        dtype = self.q.weight.dtype
        x = x.to(dtype)
        fused = eager_kernels(self.elementwise)
        if fused is not None and isinstance(self.norm_q, RMSNorm) and isinstance(self.norm_k, RMSNorm):
            q, k = (
                fused.rms_norm_rope(proj(x).to(dtype), norm.weight, rope, self.num_heads, norm.eps)
                for proj, norm in ((self.q, self.norm_q), (self.k, self.norm_k))
            )
        else:
            q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
            k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
            q, k = apply_rope(q, rope).to(dtype), apply_rope(k, rope).to(dtype)
        v = self.v(x).unflatten(-1, (self.num_heads, -1)).to(dtype)
        out = run_in_chunks(
            lambda rows: attention(rows, k, v, dispatcher=self.dispatcher), q, self.attention_chunk
        ).flatten(2)
        return self.o(out.to(dtype))


class CrossAttention(Projections):
    shared_input_linears = ("k", "v")  # both read the context (as SelfAttention's)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, L, C], context [B, Lc, C] embedded text -> [B, L, C] in the weights' dtype."""
        dtype = self.q.weight.dtype
        x, context = x.to(dtype), context.to(dtype)
        fused = eager_kernels(self.elementwise)
        if fused is not None and isinstance(self.norm_q, RMSNorm):  # the video's tokens (k: the text's)
            q = fused.rms_norm(self.q(x).to(dtype), self.norm_q.weight, self.norm_q.eps)
            q = q.unflatten(-1, (self.num_heads, -1))
        else:
            q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1)).to(dtype)
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1)).to(dtype)
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        out = attention(q, k, v, dispatcher=self.dispatcher).flatten(2)
        return self.o(out.to(dtype))


class WanBlock(nn.Module):
    """One transformer block: modulated self-attention with RoPE, cross-attention, modulated FFN.

    Call: ``block(x, e, context, rope) -> x``
      x        [B, L, dim] fp32, the residual stream (L = F*H*W patches);
      e        [B, 6, dim] fp32, the time projection (WanDiT.time_projection output);
      context  [B, Lc, dim], the embedded text (WanDiT.text_embedding output);
      rope     the grid's rotations, from WanDiT.rope(grid, device).
    Returns the new residual stream [B, L, dim] fp32. Blocks hold no state between calls. With
    `residual_in_place` (set by the runtime; inference only) the block writes the new stream over x
    and returns x itself: its caller must not need the input afterwards.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, config.num_heads, config.qk_norm, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, config.num_heads, config.qk_norm, eps)
        self.norm2 = LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), Linear(config.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.ffn_chunk: int | None = None  # tokens per FFN call (set by the runtime to bound memory)
        # Inference: the GELU overwrites ffn.0's output, one [B, L, ffn_dim] tensor less at the FFN's
        # peak (the same values; set by the runtime).
        self.ffn_gelu_in_place = False
        # Inference: the GELU inside ffn.0's GEMM (gelu_linear), no pass of its own over the hidden
        # tensor (set by the runtime where the op gives the tanh GELU; see gelu_linear).
        self.ffn_gelu_epilogue = False
        # Inference: the residual updates overwrite the block's input, so one fp32 [B, L, dim] stream
        # lives at a time instead of the input, its update and the caller's copies (set by the runtime).
        self.residual_in_place = False
        # Fused kernels for the modulated norms (wanfit.runtime.fused_elementwise, set by the runtime):
        # used eagerly and without autograd only; None: the torch ops.
        self.elementwise = None
        # A callable `ffn_low_rank(block, h)` computing the whole FFN with the LoRA branches of both its
        # Linears in one pass over the hidden tensor (wanfit.runtime.lora, set by the runtime), used
        # without autograd; it returns None where it does not apply. None: Linear by Linear.
        self.ffn_low_rank = None

    def forward(self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor, rope: Rope) -> torch.Tensor:
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e).unbind(1)
        fused = eager_kernels(self.elementwise)
        in_place = self.residual_in_place and not torch.is_grad_enabled()

        # Residual updates stay in fp32; addcmul and add read the half-precision branch outputs directly
        # (type promotion), one pass each instead of an upcast, a multiply and an add.
        if fused is None:
            h = modulate(self.norm1(x), shift_sa, scale_sa)
        else:  # written in the dtype self_attn casts its input to, in the same pass
            h = fused.layer_norm_modulate(
                x, shift_sa, scale_sa, self.norm1.eps, self.self_attn.q.weight.dtype
            )
        y = self.self_attn(h, rope)
        del h  # not held through the cross-attention (nor, compiled, passed across the graph break)
        # In place as statements: a name bound to the op's result would be a new tensor to dynamo.
        if in_place:
            x.addcmul_(y, gate_sa.unsqueeze(1))
        else:
            x = torch.addcmul(x, y, gate_sa.unsqueeze(1))

        norm3 = self.norm3
        if fused is None or not isinstance(norm3, LayerNorm) or norm3.weight is None:
            y = self.cross_attn(norm3(x), context)
        else:  # in the dtype cross_attn casts its input to (no name holds it past the call)
            dtype = self.cross_attn.q.weight.dtype
            y = self.cross_attn(
                fused.layer_norm_affine(x, norm3.weight, norm3.bias, norm3.eps, dtype), context
            )
        if in_place:
            x.add_(y)
        else:
            x = x + y
        del y
        if in_place and torch.compiler.is_compiling():
            # The FFN in a graph of its own: in one graph the input would stay beside its updated copy
            # (an input's update is written back at the graph's end), and a graph taking h would keep it
            # (its caller holds it) past ffn.0; this one frees h for ffn.2's output.
            torch._dynamo.graph_break()

        if fused is None:  # cast here, so the fp32 product is freed now (and no graph passes it on)
            h = modulate(self.norm2(x), shift_ff, scale_ff).to(self.ffn[0].weight.dtype)
        else:  # in the dtype the FFN's first linear casts its input to
            h = fused.layer_norm_modulate(x, shift_ff, scale_ff, self.norm2.eps, self.ffn[0].weight.dtype)
        ffn = run_in_chunks(self.feed_forward, h, self.ffn_chunk)
        del h
        if not in_place:
            return torch.addcmul(x, ffn, gate_ff.unsqueeze(1))
        x.addcmul_(ffn, gate_ff.unsqueeze(1))
        return x

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        """ffn.2(GELU(ffn.0(h))) in the weights' dtype; without autograd, with ffn_gelu_epilogue the GELU
        runs in ffn.0's GEMM, else with ffn_gelu_in_place it writes over ffn.0's output (autograd's GELU
        backward needs its input)."""
        if self.ffn_low_rank is not None and not torch.is_grad_enabled():
            out = self.ffn_low_rank(self, h)
            if out is not None:
                return out
        first, gelu, second = self.ffn
        if (
            self.ffn_gelu_epilogue
            and not torch.is_grad_enabled()
            and first.gemm is None
            and first.bias is not None
            and gelu.approximate == "tanh"
        ):  # a LoRA branch or an fp8 GEMM adds to or replaces the product: the GELU then runs apart
            weight = first.weight if first.low_rank is None else first.low_rank.merged_weight(first)
            if weight is not None:
                return second(gelu_linear(h.to(weight.dtype), weight, first.bias))
        if not self.ffn_gelu_in_place or torch.is_grad_enabled():
            return linear(self.ffn, h)
        hidden = linear(first, h)
        torch.ops.aten.gelu_(hidden, approximate=gelu.approximate)
        return second(hidden)


class Head(nn.Module):
    """Final modulated LayerNorm and projection to patch pixels."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.dim
        self.norm = LayerNorm(dim, config.eps, elementwise_affine=False)
        self.head = nn.Linear(dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim] fp32, t_emb [B, dim] fp32 (time embedding) -> [B, L, out*prod(patch)] fp32."""
        shift, scale = (self.modulation.float() + t_emb.unsqueeze(1)).unbind(1)
        return linear(self.head, modulate(self.norm(x), shift, scale)).float()


class WanDiT(nn.Module):
    """Wan2.1 T2V DiT: ``dit(x, timestep, context)``, which is ``unembed(run_blocks(embed(...)))``.

    x [B, in_dim, F, H, W] latents, timestep [B] float in [0, 1000], context [B, L, text_dim]
    (shorter contexts are zero-padded to config.text_len, as the official model does)
    -> [B, out_dim, F, H, W] fp32.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = Head(config)
        self._rope_cache: dict[tuple, Rope] = {}
        # Block matrices kept in float8 as their file has them (load_dit(keep_fp8=True)): parameter
        # name -> fp32 scale (weight = stored * scale). Only a placement that streams with fp8 storage
        # runs them (it upcasts each block before it runs); empty: every weight in a compute dtype.
        self.fp8_scales: dict[str, torch.Tensor] = {}

    def set_attention_dispatchers(self, self_attention=None, cross_attention=None) -> None:
        """Route the blocks' self- and cross-attention through these Dispatchers (None: the
        process-wide one), as a pipeline does from its Plan."""
        for block in self.blocks:
            block.self_attn.dispatcher = self_attention
            block.cross_attn.dispatcher = cross_attention

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> Rope:
        """RoPE cos/sin for a patch grid (F, H, W), computed once per grid and device."""
        key = (tuple(grid), torch.device(device))
        if key not in self._rope_cache:
            if len(self._rope_cache) >= 8:
                self._rope_cache.clear()
            self._rope_cache[key] = rope_frequencies(key[0], self.config.head_dim).to(device)
        return self._rope_cache[key]

    def embed_time(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        """Sinusoidal embedding of float timesteps [B] (cos half first) -> time_embedding, [B, dim] fp32."""
        t = torch.as_tensor(timestep, device=self.patch_embedding.weight.device).float().reshape(-1)
        t = t.expand(batch) if t.numel() == 1 else t
        half = self.config.freq_dim // 2
        freqs = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t[:, None] * freqs[None, :]
        sinusoid = torch.cat([angles.cos(), angles.sin()], dim=1)
        return linear(self.time_embedding, sinusoid).float()

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """[B, L, text_dim] -> [B, max(L, text_len), dim] in the text embedding's dtype."""
        missing = self.config.text_len - context.shape[1]
        if missing > 0:
            context = F.pad(context, (0, 0, 0, missing))
        return linear(self.text_embedding, context)

    def patch_grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        _, _, f, h, w = x.shape
        pt, ph, pw = self.config.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"Latent size {f}x{h}x{w} is not a multiple of the patch size {pt}x{ph}x{pw}.")
        return f // pt, h // ph, w // pw

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, F*H*W, pt*ph*pw*C] -> [B, C, F*pt, H*ph, W*pw]."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, self.config.out_dim)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], self.config.out_dim, f * pt, h * ph, w * pw)

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> DiTInputs:
        """The first step of a forward: patchify the latents, embed time and text, the grid's RoPE."""
        grid = self.patch_grid(x)
        tokens = linear(self.patch_embedding, x).flatten(2).transpose(1, 2).float().contiguous()
        t_emb = self.embed_time(timestep, x.shape[0])
        e = linear(self.time_projection, t_emb).float().unflatten(1, (6, self.config.dim))
        return DiTInputs(tokens, e, t_emb, self.embed_text(context), self.rope(grid, tokens.device), grid)

    def run_blocks(
        self, inputs: DiTInputs, tokens: torch.Tensor | None = None, start: int = 0, end: int | None = None
    ) -> torch.Tensor:
        """Blocks start..end over `tokens` (default: the embedded ones) -> the residual stream, fp32."""
        tokens = inputs.tokens if tokens is None else tokens
        for block in self.blocks[start:end]:
            tokens = block(tokens, inputs.e, inputs.context, inputs.rope)
        return tokens

    def unembed(self, tokens: torch.Tensor, inputs: DiTInputs) -> torch.Tensor:
        """The last step: the head and unpatchify -> [B, out_dim, F, H, W] fp32."""
        return self.unpatchify(self.head(tokens, inputs.t_emb), inputs.grid)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        inputs = self.embed(x, timestep, context)
        return self.unembed(self.run_blocks(inputs), inputs)
