"""Peak device memory of each phase of a run (text encoding, denoising, VAE decode), in bytes.

Every estimate is split into weights (parameters on the device), activations (working tensors),
workspace (attention kernels' scratch) and cache (tensors kept across steps or frames). The
predictions target `torch.cuda.max_memory_allocated`, not `memory_reserved`: the planner's margin
covers the caching allocator's fragmentation and the libraries' own workspaces.

The constants in CAPITALS marked "calibrate" count live tensors, read off the model code at its
peak; benchmarks/bench_memory.py measures the real peaks so they can be refit (goal: within 10%).
Everything else about the models (parameter counts, the VAE decoder's caches, widths and tile
margins) is read off the model classes themselves, built on the meta device once per config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from functools import cache

import torch
from torch import nn

from wanfit.attention.chunked import DEFAULT_BUDGET_BYTES
from wanfit.models.configs import VAE_STRIDE, WAN21_TEXT_ENCODER, DiTConfig, TextEncoderConfig
from wanfit.models.vae import WAN21_VAE, AttentionBlock, VAEConfig, WanVAE
from wanfit.plan.lora import LoraMemory, LoraShapes, lora_memory
from wanfit.plan.plan import Plan
from wanfit.precision import dtype_bytes

GIB = 1024**3


# --- DiT block (wanfit.models.dit.WanBlock; residual stream, norms, modulation, RoPE in fp32) ---
# Counts of [B, L, dim] tensors alive at each stage's peak: fp32 ones, compute-dtype ones, and
# compute-dtype casts that exist only when the compute dtype is not fp32 (x.to(dtype) is free in fp32).
# calibrated on the CPU (2026-11) by tracking live storages through WanBlock.forward at two sequence
# lengths (the slope per token), then on the H200 (2026-12-02, benchmarks/bench_host_ram.py --sweep,
# max_memory_allocated of each denoise phase, results/2026-12-02c-h200): the FFN side was one fp32
# [B, L, dim] low (the 1.3B, where it is the peak: 0.19 GiB per sample under, batch 1 and 2, bf16 and
# fp16): the block's input, which its caller still holds while the block has made two new residual
# streams. The RoPE side (the 14B's peak) was 2 bytes per token and dim high in half precision: 30
# measured (14B 480p, batch 2, fp16: 13.40 GiB), 32 counted on the CPU.
# RoPE, while k is rotated: x, modulated h, fp32 normed q and k, k's rotation (fp32); v and q's rotation
# (its cast; in fp32 the rotation itself); casts of the input, of k's rotation and a transient (half
# precision only; the last from the measurement).
ROPE_STAGE_FP32 = 5.0
ROPE_STAGE_COMPUTE = 2.0
ROPE_STAGE_CASTS = 3.0
# At the attention call: x, h (fp32); q, k, v (compute); plus the backend's workspace.
ATTN_STAGE_FP32 = 2.0
ATTN_STAGE_COMPUTE = 3.0
ATTN_STAGE_CASTS = 0.0
# Cross-attention: the block's input (its caller holds it), x, the norm3 output, q's fp32 RMSNorm
# (fp32); the input cast and q (compute).
CROSS_STAGE_FP32 = 4.0
CROSS_STAGE_COMPUTE = 2.0
CROSS_STAGE_CASTS = 0.0
# FFN at the GELU: the block's input, x, modulated h (fp32); h's cast (compute); ffn.0 and GELU
# outputs [B, T, ffn_dim].
FFN_STAGE_FP32 = 3.0
FFN_STAGE_COMPUTE = 1.0
FFN_STAGE_CASTS = 2.0
FFN_HIDDEN_TENSORS = 2.0
# Plan.ffn_gelu_in_place (the GELU writes over ffn.0's output) or ffn_gelu_epilogue (inside its GEMM)
FFN_HIDDEN_TENSORS_GELU_IN_PLACE = 1.0
# Plan.residual_in_place: the residual updates write over the block's input, so the cross-attention and
# FFN stages hold one fp32 stream fewer (the input and its update are one tensor; the embedded tokens,
# which the loop holds besides and which no count above has, are that tensor too).
RESIDUAL_IN_PLACE_SAVED_FP32 = 1.0
# With ffn_chunk, the chunks' outputs are gathered in one [B, L, dim] compute-dtype buffer.
FFN_CHUNK_OUTPUT_TENSORS = 1.0
# RoPE cos and sin tables: [L, head_dim/2] fp32 each -> 4 bytes x head_dim per token.
ROPE_TABLE_BYTES_PER_TOKEN_PER_HEAD_DIM = 4
# The pipeline's latents and the scheduler's history, fp32 [1, 16, F, H, W] each: latents, the
# cond/uncond/guided predictions, UniPC's two stored model outputs and last sample. calibrate.
LATENT_COPIES = 8.0

# --- several processes (Plan.cfg_parallel, Plan.ulysses; wanfit.runtime.parallel) ---
# Under Ulysses each process runs the blocks on its share of the tokens; during the exchange before the
# self-attention it holds, besides its share's q, k, v, their send buffer and the exchanged
# whole-sequence q, k, v of its heads (the same bytes again each). calibrate (on several GPUs:
# benchmarks/bench_parallel.py).
ULYSSES_EXCHANGE_TENSORS = 6.0
# Under FSDP (Plan.dit_sharding) each process keeps 1/world of every block's weights, and the
# gathered whole weights of the block running plus the next one, whose all-gather FSDP2 issues early
# (as streaming keeps two slots). calibrate (on several GPUs).
FSDP_GATHERED_BLOCKS = 2

# --- attention workspace per backend memory class (each backend's `memory` in the registry) ---
# "linear" (fused kernels: flash, cuDNN, memory-efficient, sage, xformers): O(L): an output in
# head-major layout plus its token-major copy (compute dtype), and the fp32 log-sum-exp per row. calibrate.
LINEAR_ATTN_OUTPUT_TENSORS = 2.0
# PyTorch's math path: fp32 scores, softmax and a compute-dtype copy of the L x L matrix per head.
# From DESIGN.md: 108 GiB peak for 12 heads x 32760^2 scores (bf16, H200) = 9.0 bytes per score.
MATH_BYTES_PER_SCORE = 9.0
# wanfit.attention.chunked: fp32 score blocks held within its budget.
CHUNKED_SCORE_BUDGET = DEFAULT_BUDGET_BYTES

# --- umT5-XXL text encoder (transformers' UMT5EncoderModel, as wanfit.models.text_encoder uses) ---
# Live tensors at its peak, in the encoder's dtype, for B prompts of text_len tokens: [B, L, dim]
# hidden-size tensors always, plus the larger of the attention scores (per B x heads x L x L,
# the position bias included) and the gated FFN's [B, L, ffn] tensors. calibrated on the CPU
# (2026-11, live storages of UMT5EncoderModel at two lengths, B = 2): 7 / 1.1 / 4 in fp32 and bf16
# alike; within about 30% at those toy sizes, where fixed CPU overheads weigh. The activations are
# ~0.2 GB next to 11.4 GB of weights at XXL size.
TE_HIDDEN_TENSORS = 7.0
TE_SCORE_TENSORS = 1.1
TE_FFN_TENSORS = 4.0

# --- VAE decoder (wanfit.models.vae: one frame at a time below the first temporal upsampling) ---
# Each causal conv keeps its last input frames (CausalConv3d.past_frames) at its level's resolution.
# Frames each decoder level handles at once (the stem takes one latent frame; finer levels split).
VAE_FRAMES_PER_CALL = 1
# Live one-frame tensors of the widest level (width x area) at the decoder's peak: the block input,
# the normed input, the conv's input with 2 cached frames concatenated (3), its output, the
# shortcut, and the conv's own scratch. First fitted on the CPU (about 8 units); calibrated
# 2026-11-26 on an H100 (bf16, 832x480x81): decode peaks 2.93 GiB above the weights in three runs
# (bench_vae untiled, the whole job resident, the whole job under --vram 4GiB) where 8 units gave
# 2.52 GiB; cuDNN's conv workspaces account for the rest. docs/benchmarks.md.
VAE_LIVE_UNITS = 13.5


# ----------------------------------------------------------------------------- model sizes
# Counted from the model classes themselves, built on the meta device (no memory), once per config.


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _matrix_params(module: nn.Module) -> int:
    """Elements of the nn.Linear weights: the 2-D matrices that fp8 storage keeps in one byte."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


@cache
def dit_block_params(config: DiTConfig) -> tuple[int, int]:
    """(matrix, other) parameter counts of one DiT block; matrices are what fp8 storage shrinks."""
    from wanfit.models.dit import WanBlock

    with torch.device("meta"):
        block = WanBlock(config)
    matrices = _matrix_params(block)
    return matrices, _params(block) - matrices


@cache
def dit_block_fp8_gemms(config: DiTConfig) -> tuple[int, int]:
    """(bytes, quantisation peak) of the fast tier in one DiT block: the fp8 copies of its linears with
    their scales, kept beside the bf16 weights (wanfit.runtime.fp8_linear.install itself, run on a meta
    block: nothing allocated), and the most the quantisation of its largest weight holds at once."""
    from wanfit.models.dit import WanBlock
    from wanfit.runtime import fp8_linear

    with torch.device("meta"):
        blocks = nn.ModuleList([WanBlock(config)])
    held = fp8_linear.install(blocks)
    peak = max(
        fp8_linear.quantize_peak_bytes(m.out_features, m.in_features)
        for m in fp8_linear.block_linears(blocks)
    )
    return held, peak


@cache
def dit_nonblock_params(config: DiTConfig) -> int:
    """Parameters outside the blocks: patch, text and time embeddings, time projection, head."""
    from wanfit.models.dit import WanDiT

    with torch.device("meta"):
        dit = WanDiT(config)
    return _params(dit) - _params(dit.blocks)


def dit_params(config: DiTConfig) -> int:
    return dit_nonblock_params(config) + config.num_layers * sum(dit_block_params(config))


@dataclass(frozen=True)
class TextEncoderSizes:
    """Parameter counts of a umT5 encoder (transformers' UMT5EncoderModel)."""

    params: int  # all of it, the token embedding once
    layer: int  # one block (each has its own relative position bias)
    final_norm: int  # what a streamed encoder keeps on the device beside its blocks
    layer_matrices: int = 0  # the nn.Linear weights of one block: what fp8 storage keeps in one byte
    embedding: int = 0  # the token embedding (a lookup; a streamed encoder keeps it on the host)


SIZES_FILE = "model_sizes.json"  # in the user cache dir: umT5's counts, per config and transformers version


@cache
def text_encoder_sizes(config: TextEncoderConfig) -> TextEncoderSizes:
    """The counts, read off transformers' UMT5EncoderModel built on the meta device, or from the user
    cache where an earlier process counted them for this config and transformers version: importing
    transformers' umT5 modules takes 3-9 s, which a plan alone (`wanfit plan`, `doctor`, a job whose
    prompts are cached) does not otherwise pay."""
    import json
    from importlib.metadata import PackageNotFoundError, version

    from wanfit.attention.ranking import cache_dir, write_json

    try:
        shape = json.dumps(config.umt5_kwargs(), sort_keys=True)
        key = f"umt5 {shape} transformers {version('transformers')}"
    except PackageNotFoundError:
        key = None  # the import below then says what is missing
    if key is None:
        return _count_text_encoder(config)
    path = cache_dir() / SIZES_FILE
    try:
        stored = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(stored, dict):
            stored = {}
        if key in stored:
            return TextEncoderSizes(**stored[key])
    except (OSError, ValueError, TypeError):
        stored = {}  # unreadable or of another shape: counted again and rewritten
    sizes = _count_text_encoder(config)
    try:
        write_json(path, {**stored, key: asdict(sizes)})
    except OSError:
        pass  # a read-only cache dir: counted again next time
    return sizes


def _count_text_encoder(config: TextEncoderConfig) -> TextEncoderSizes:
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**config.umt5_kwargs()))
    encoder = model.get_encoder()
    block = encoder.block[0]
    return TextEncoderSizes(
        _params(model),
        _params(block),
        _params(encoder.final_layer_norm),
        _matrix_params(block),
        _params(model.get_input_embeddings()),
    )


@dataclass(frozen=True)
class VAESizes:
    """What the estimates need of a VAE, read off its modules."""

    encoder: int  # parameters, the quant conv (conv1) included
    decoder: int  # parameters, the post-quant conv (conv2) included
    cached_convs: tuple[tuple[int, int, int], ...]  # (level, input channels, frames kept) per causal conv
    level_widths: tuple[int, ...]  # the widest residual block of each decoder level
    tile_margins: tuple[int, ...]  # context pixels a decode tile computes beyond its core, per level


@cache
def vae_sizes(config: VAEConfig) -> VAESizes:
    with torch.device("meta"):
        vae = WanVAE(config)
    decoder = vae.decoder
    return VAESizes(
        encoder=_params(vae.encoder) + _params(vae.conv1),
        decoder=_params(decoder) + _params(vae.conv2),
        cached_convs=tuple(
            (level, conv.in_channels, conv.past_frames)
            for level, conv in decoder.causal_convs()
            if conv.past_frames
        ),
        level_widths=tuple(decoder.level_widths),
        tile_margins=tuple(decoder.margins),
    )


def vae_params(vae: VAEConfig = WAN21_VAE) -> tuple[int, int]:
    """(encoder incl. quant conv, decoder incl. post-quant conv) parameter counts."""
    sizes = vae_sizes(vae)
    return sizes.encoder, sizes.decoder


# ----------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class Request:
    """What is asked of a run: the model and the video."""

    config: DiTConfig
    height: int = 480
    width: int = 832
    num_frames: int = 81
    guidance: bool = True
    model_name: str = "1.3B"
    text_encoder: TextEncoderConfig = WAN21_TEXT_ENCODER
    vae: VAEConfig = WAN21_VAE
    # The dtypes the checkpoint files hold (most of their elements); None: no files (the weights are
    # taken to be in the plan's dtypes). They decide what loading converts and what streams from a file.
    dit_file_dtype: str | None = None
    text_encoder_file_dtype: str | None = None
    steps: int | None = None  # denoising steps; None: the sampler's default (whether compiling pays)
    loras: LoraShapes | None = None  # the LoRAs the job applies (their ranks and targets), None: none
    # Whether the caller may unload the LoRAs (the Python API), so their base weights must be kept
    # (Plan.lora_base_copy); the CLI's jobs never unload them.
    lora_unloadable: bool = True
    # Prompts of this size a batch job has (the planner may denoise several in one pass: Plan.prompts_per_pass).
    prompts: int = 1

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // VAE_STRIDE[0] + 1

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // VAE_STRIDE[1], self.width // VAE_STRIDE[2]

    @property
    def tokens(self) -> int:
        """DiT sequence length: latent frames x height x width divided by the patch size."""
        pt, ph, pw = self.config.patch_size
        h, w = self.latent_hw
        return (self.latent_frames // pt) * (h // ph) * (w // pw)

    def resized(self, width: int, height: int, num_frames: int) -> Request:
        return replace(self, width=width, height=height, num_frames=num_frames)

    def describe(self) -> str:
        guidance = "guidance on" if self.guidance else "guidance off"
        return f"Wan2.1 {self.model_name}, {self.width}x{self.height}, {self.num_frames} frames, {guidance}"


# ----------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class PhaseEstimate:
    """Predicted peak of one phase, in bytes, with what makes it up."""

    name: str
    weights: int
    activations: int
    workspace: int
    cache: int
    detail: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return self.weights + self.activations + self.workspace + self.cache

    def to_dict(self) -> dict:
        d = asdict(self)
        d["peak"] = self.peak
        return d


PHASES = ("text_encoder", "denoise", "vae_decode")


def attention_workspace(
    backend: str,
    batch: int,
    heads: int,
    q_len: int,
    k_len: int,
    head_dim: int,
    dtype_bytes_: int,
    query_chunk: int | None = None,
) -> int:
    """Scratch memory of one attention call beyond q, k, v.

    By the backend's registry memory class: linear (fused kernels): O(L), the outputs and the
    log-sum-exp; quadratic (math): B*H*rows*Lk scores at MATH_BYTES_PER_SCORE, rows = query_chunk or
    Lq; bounded (chunked): its fixed score budget. Plus, for a kernel that quantises its inputs
    first, its registry's scratch_per_qkv times the bytes of q, k and v.
    """
    from wanfit.attention.backends import default_registry

    registry = default_registry()
    qkv = batch * (q_len + 2 * k_len) * heads * head_dim * dtype_bytes_
    common = LINEAR_ATTN_OUTPUT_TENSORS * batch * q_len * heads * head_dim * dtype_bytes_
    common += registry.scratch_per_qkv(backend) * qkv
    memory = registry.memory_class(backend)
    if memory == "linear":
        return int(common + batch * heads * q_len * 4)
    if memory == "bounded":
        return int(common + CHUNKED_SCORE_BUDGET)
    rows = min(q_len, query_chunk) if query_chunk else q_len
    return int(common + MATH_BYTES_PER_SCORE * batch * heads * rows * k_len)


def _dit_block_bytes(config: DiTConfig, compute: int, storage: str | None) -> int:
    matrices, other = dit_block_params(config)
    if storage is not None and dtype_bytes(storage) < compute:
        return matrices * dtype_bytes(storage) + other * compute
    return (matrices + other) * compute


def dit_device_weights(config: DiTConfig, plan: Plan, file_dtype: str | None = None) -> int:
    """DiT parameters on the device: resident blocks, the two streaming slots, the upcast copy.

    Streaming k blocks: k resident + the block in use + the next one being copied. fp8 storage keeps
    blocks in 1 byte per matrix element and upcasts the block in use to the compute dtype. Blocks
    streamed from the mapped file travel in the file's dtype (`file_dtype`) and are converted on the
    device: one raw copy besides the two slots.
    Sharded (FSDP): this process's 1/world of the blocks plus FSDP_GATHERED_BLOCKS gathered whole.
    """
    c = dtype_bytes(plan.compute_dtype)
    n = config.num_layers
    block = _dit_block_bytes(config, c, plan.storage_dtype)
    if plan.dit_sharding == "fsdp":  # no fp8 storage or streaming with it (the planner's rule)
        shards = -(-n * block // plan.world_size)
        return dit_nonblock_params(config) * c + shards + min(n, FSDP_GATHERED_BLOCKS) * block
    on_device = n if plan.dit_blocks_resident is None else min(n, plan.dit_blocks_resident + 2)
    full = sum(dit_block_params(config)) * c
    upcast = full if block < full else 0
    if dit_streams_from_file(plan) and file_dtype:
        if dtype_bytes(file_dtype) != c:
            upcast = max(upcast, sum(dit_block_params(config)) * dtype_bytes(file_dtype))
    return dit_nonblock_params(config) * c + on_device * block + upcast


def fast_tier_weights(config: DiTConfig, plan: Plan) -> int:
    """The fast tier's fp8 copies of every block's linears and their scales, on the device beside the
    DiT's own weights while the DiT is placed (0 unless the plan has it in place)."""
    return config.num_layers * dit_block_fp8_gemms(config)[0] if plan.fast_tier_in_place else 0


def dit_streams_from_file(plan: Plan) -> bool:
    """Whether streamed DiT blocks come from the mapped file (fp8 storage needs its own copies)."""
    fp8 = plan.storage_dtype is not None and dtype_bytes(plan.storage_dtype) == 1
    return plan.dit_blocks_resident is not None and plan.dit_stream_source == "mmap" and not fp8


def dit_file_is_fp8(request: Request) -> bool:
    """Whether the DiT's file holds its weights in the fp8 form fp8 storage keeps (float8_e4m3fn)."""
    return request.dit_file_dtype == "float8_e4m3fn"


def dit_keeps_file_fp8(request: Request, plan: Plan) -> bool:
    """Whether the DiT's block matrices stay as an fp8 file has them (fp8 storage of an fp8 file: no
    upcast on load, nothing quantised again; the loader's keep_fp8)."""
    fp8 = plan.storage_dtype is not None and dtype_bytes(plan.storage_dtype) == 1
    return fp8 and dit_file_is_fp8(request)


def dit_block_bytes(config: DiTConfig, plan: Plan) -> int:
    """One DiT block as the plan stores it (fp8 matrices in one byte, the rest in the compute dtype)."""
    return _dit_block_bytes(config, dtype_bytes(plan.compute_dtype), plan.storage_dtype)


def vae_device_weights(request: Request, plan: Plan) -> int:
    return sum(vae_params(request.vae)) * dtype_bytes(plan.compute_dtype)


def text_encoder_on_device(plan: Plan) -> bool:
    return plan.text_encoder_device != "cpu" or plan.device == "cpu"


def text_encoder_streamed(plan: Plan) -> bool:
    return plan.text_encoder_blocks_resident is not None and text_encoder_on_device(plan)


def text_encoder_storage(request: Request, plan: Plan) -> str:
    """The dtype umT5's weights are held in: the file's when its blocks stream from the mapped file
    (nothing is converted on the host), else the plan's."""
    if text_encoder_streamed(plan) and plan.text_encoder_stream_source == "mmap":
        return request.text_encoder_file_dtype or plan.text_encoder_dtype
    return plan.text_encoder_dtype


def text_encoder_compute_dtype(request: Request, plan: Plan) -> torch.dtype:
    """What umT5 computes in under this plan (wanfit.models.text_encoder's policy)."""
    from wanfit.models.text_encoder import text_encoder_compute
    from wanfit.precision import parse_dtype

    device_type = "cpu" if plan.text_encoder_device == "cpu" else plan.device.split(":")[0]
    storage = parse_dtype(text_encoder_storage(request, plan))
    return text_encoder_compute(plan.torch_compute_dtype, device_type, storage)


def text_encoder_bytes(request: Request, plan: Plan) -> tuple[int, int, int]:
    """(one block, the final norm, the token embedding) in bytes as stored.

    fp8 keeps the blocks' matrices in one byte (with a scale each) and the rest in bf16."""
    sizes = text_encoder_sizes(request.text_encoder)
    b = dtype_bytes(text_encoder_storage(request, plan))
    if b == 1:
        return (
            sizes.layer_matrices + 2 * (sizes.layer - sizes.layer_matrices),
            2 * sizes.final_norm,
            2 * sizes.embedding,
        )
    return sizes.layer * b, sizes.final_norm * b, sizes.embedding * b


def text_encoder_device_weights(request: Request, plan: Plan, *, during_encode: bool) -> int:
    """umT5 parameters on the device: all of it; or, streamed, k resident blocks plus the block in
    use and the next (the token embedding stays on the host: a gather, its output moves over); or
    none (on the CPU, or freed after encoding). A streamed encoder prefetches nothing past its last
    block, so between prompts only its resident blocks stay."""
    if not text_encoder_on_device(plan):
        return 0
    if not during_encode and plan.free_text_encoder:
        return 0
    layer, norm, embedding = text_encoder_bytes(request, plan)
    num_layers = request.text_encoder.num_layers
    if plan.text_encoder_blocks_resident is None:
        return embedding + num_layers * layer + norm
    k = plan.text_encoder_blocks_resident
    layers = min(num_layers, k + 2) if during_encode else min(num_layers, k)
    return norm + layers * layer


def text_encoder_activations(request: Request, plan: Plan) -> int:
    """Live tensors at umT5's peak, in its compute dtype (TE_* constants)."""
    te, text_len = request.text_encoder, request.config.text_len
    batch = 2 if request.guidance else 1
    tokens = batch * text_len
    b = text_encoder_compute_dtype(request, plan).itemsize
    hidden = TE_HIDDEN_TENSORS * tokens * te.d_model * b
    scores = TE_SCORE_TENSORS * batch * te.num_heads * text_len**2 * b
    ffn = TE_FFN_TENSORS * tokens * te.d_ff * b
    return int(hidden + max(scores, ffn))


def _embeddings_bytes(request: Request, plan: Plan) -> int:
    batch = (2 if request.guidance else 1) * plan.samples_per_pass
    return batch * request.config.text_len * request.text_encoder.d_model * dtype_bytes(plan.compute_dtype)


def estimate_text_encoder(request: Request, plan: Plan, *, others: bool = True) -> PhaseEstimate:
    """Encoding the prompt (and the negative prompt): umT5, plus (others=True) the DiT and VAE
    weights the pipeline has already placed on the device."""
    weights = text_encoder_device_weights(request, plan, during_encode=True)
    # A streamed (or fp8) DiT is loaded on the host and placed when denoising starts.
    dit_placed_late = plan.dit_blocks_resident is not None or plan.storage_dtype is not None
    dit = (
        dit_device_weights(request.config, plan, request.dit_file_dtype)
        if others and not dit_placed_late
        else 0
    )
    # A later prompt finds the DiT as the last denoising placed it, fp8 copies and all, unless it left.
    fp8_gemms = (
        fast_tier_weights(request.config, plan) if others and not plan.offload_dit_before_decode else 0
    )
    vae = vae_device_weights(request, plan) if others else 0
    on_device = text_encoder_on_device(plan)
    activations = text_encoder_activations(request, plan) if on_device else 0
    # Weights computed in another dtype than they are stored in (bf16 with no native bf16, fp16, fp8):
    # one block's upcast copy at a time.
    compute = text_encoder_compute_dtype(request, plan)
    upcast = dtype_bytes(text_encoder_storage(request, plan)) != compute.itemsize
    layer_params = text_encoder_sizes(request.text_encoder).layer
    workspace = compute.itemsize * layer_params if on_device and upcast else 0
    # LoRAs are merged before the prompts are encoded, with the same weights placed: the larger of the
    # merge's temporaries and the encoder's activations.
    lora = lora_memory(request, plan) if others else LoraMemory()
    merge = lora.merge if lora.merge_on_device else 0
    lora_host = _lora_host_on_device(plan, lora)
    return PhaseEstimate(
        "text_encoder",
        weights=weights + dit + fp8_gemms + vae + lora.base_copy + lora_host,
        activations=max(activations, merge),
        workspace=workspace,
        cache=_embeddings_bytes(request, plan),
        detail={"text_encoder": weights, "dit": dit, "fp8_gemms": fp8_gemms, "vae": vae, "lora_merge": merge,
                "lora_base_copy": lora.base_copy, "lora_host": lora_host},  # fmt: skip
    )


def _lora_host_on_device(plan: Plan, lora: LoraMemory) -> int:
    """What the LoRAs keep on the host counts on the device when the device is the host (a CPU run)."""
    return lora.host if plan.device == "cpu" else 0


def rank_batch(request: Request, plan: Plan) -> int:
    """Samples in one DiT forward of one process: the prompts of a pass, twice with batched guidance
    (once under CFG-parallel)."""
    cfg = 2 if request.guidance and plan.cfg_batch and plan.cfg_parallel == 1 else 1
    return cfg * plan.samples_per_pass


def rank_tokens(request: Request, plan: Plan) -> int:
    """Tokens one process runs the blocks on: the largest Ulysses share (all of them without Ulysses)."""
    return -(-request.tokens // plan.ulysses)


def dit_activations(request: Request, plan: Plan, backend: str) -> tuple[int, int, str]:
    """(activations, workspace, stage) at the peak of one DiT forward on one process, B = 2 with batched
    CFG (1 under CFG-parallel), over its Ulysses share of the L tokens (all of them without Ulysses).

    Per block, with n = B*L tokens, d = dim, c = compute-dtype bytes, k = c if c < 4 else 0 (casts):
      RoPE stage      n*d*(5*4 + 2*c + 3*k)
      attention stage n*d*(2*4 + 3*c) + workspace(self-attention over L keys)
      cross stage     n*d*(4*4 + 2*c) + workspace(cross-attention over text_len keys)
      FFN stage       n*d*(3*4 + 1*c + 2*k) + 2*c*B*T*ffn_dim   (T = ffn_chunk or L; + n*d*c output)
    (the counts are the CAPITAL constants above). Around the blocks: the text context
    [B, text_len, dim], and RoPE tables (L x head_dim x 4 bytes). Under Ulysses (U processes, n over
    the share) the self-attention runs H/U heads over all L queries (in query chunks) and keys, and
    its stage adds ULYSSES_EXCHANGE_TENSORS x n*d*c. Under the fast tier the FFN's 2*c*B*T*ffn_dim is
    at least fp8_ffn_bytes (its fp8 GEMMs' buffers), and placing it is a stage of its own (its largest
    weight being quantised).
    """
    cfg = request.config
    c = dtype_bytes(plan.compute_dtype)
    batch = rank_batch(request, plan)
    tokens, share, ulysses = request.tokens, rank_tokens(request, plan), plan.ulysses
    n, d = batch * share, cfg.dim
    chunk = plan.attention_chunk
    ws_self = attention_workspace(
        backend, batch, cfg.num_heads // ulysses, tokens, tokens, cfg.head_dim, c, chunk
    )
    ws_cross = attention_workspace(
        plan.cross_attention or backend, batch, cfg.num_heads, share, cfg.text_len, cfg.head_dim, c, chunk
    )
    ffn_rows = min(share, plan.ffn_chunk) if plan.ffn_chunk else share
    ffn_out = FFN_CHUNK_OUTPUT_TENSORS * n * d * c if plan.ffn_chunk and plan.ffn_chunk < share else 0
    one_hidden = plan.ffn_gelu_in_place or plan.ffn_gelu_epilogue
    hidden = FFN_HIDDEN_TENSORS_GELU_IN_PLACE if one_hidden else FFN_HIDDEN_TENSORS
    ffn_hidden = hidden * batch * ffn_rows * cfg.ffn_dim * c
    if plan.fast_tier_in_place:
        ffn_hidden = max(ffn_hidden, fp8_ffn_bytes(cfg, batch * ffn_rows, plan))
    k = c if c < 4 else 0
    exchange = ULYSSES_EXCHANGE_TENSORS * c if ulysses > 1 else 0
    saved = RESIDUAL_IN_PLACE_SAVED_FP32 if plan.residual_in_place else 0.0
    stages = {
        "rope": (n * d * (ROPE_STAGE_FP32 * 4 + ROPE_STAGE_COMPUTE * c + ROPE_STAGE_CASTS * k), 0),
        "self_attention": (
            n * d * (ATTN_STAGE_FP32 * 4 + ATTN_STAGE_COMPUTE * c + ATTN_STAGE_CASTS * k + exchange),
            ws_self,
        ),
        "cross_attention": (
            n * d * ((CROSS_STAGE_FP32 - saved) * 4 + CROSS_STAGE_COMPUTE * c + CROSS_STAGE_CASTS * k),
            ws_cross,
        ),
        "ffn": (
            n * d * ((FFN_STAGE_FP32 - saved) * 4 + FFN_STAGE_COMPUTE * c + FFN_STAGE_CASTS * k)
            + ffn_hidden
            + ffn_out,
            0,
        ),
    }
    if plan.fast_tier_in_place:  # placing it: the blocks' weights quantised one at a time
        stages["fp8_quantisation"] = (dit_block_fp8_gemms(cfg)[1], 0)
    stage = max(stages, key=lambda s: sum(stages[s]))
    act, ws = stages[stage]
    around = batch * cfg.text_len * d * c + tokens * cfg.head_dim * ROPE_TABLE_BYTES_PER_TOKEN_PER_HEAD_DIM
    return int(act + around), int(ws), stage


def fp8_ffn_bytes(config: DiTConfig, rows: int, plan: Plan) -> int:
    """The FFN's [rows, ffn_dim] part at its peak under the fast tier: the larger of ffn.0's fp8 GEMM
    (its output included) and ffn.2's beside its input, the GELU output (wanfit.runtime.fp8_linear's
    call_peak_bytes, compiled or eager as the plan runs the blocks). The attention side's fp8 GEMMs,
    eager too, stay below its RoPE stage: its peak is the same either way (tests/test_fast_tier_memory.py)."""
    from wanfit.runtime.fp8_linear import PADDED_ROW_MULTIPLE, call_peak_bytes

    c = dtype_bytes(plan.compute_dtype)
    # The planner cannot know whether the card's kernel takes any row count: padded, to be safe.
    gemm = dict(dtype_bytes=c, compiled=plan.compile_dit, row_multiple=PADDED_ROW_MULTIPLE)
    up = call_peak_bytes(config.dim, config.ffn_dim, rows, **gemm)
    down = call_peak_bytes(config.ffn_dim, config.dim, rows, **gemm)
    return max(up, rows * config.ffn_dim * c + down)


def _latent_bytes(request: Request) -> int:
    h, w = request.latent_hw
    return request.config.in_dim * request.latent_frames * h * w * 4


def estimate_denoise(request: Request, plan: Plan, backend: str, *, others: bool = True) -> PhaseEstimate:
    """One guided DiT prediction at the peak of the sampling loop; others=False leaves out the VAE and
    text encoder weights (a DiT forward alone, as benchmarks/bench_memory.py measures it)."""
    dit = dit_device_weights(request.config, plan, request.dit_file_dtype)
    fp8_gemms = fast_tier_weights(request.config, plan)
    te = text_encoder_device_weights(request, plan, during_encode=False) if others else 0
    vae = vae_device_weights(request, plan) if others else 0
    act, ws, stage = dit_activations(request, plan, backend)
    lora = lora_memory(request, plan)  # the runtime branch's factors and activations (part of the DiT)
    lora_host = _lora_host_on_device(plan, lora) if others else 0
    buffers = 0  # what the fp8 GEMMs' own buffers add to the peak of a forward
    if fp8_gemms:
        exact_act, exact_ws, _ = dit_activations(request, replace(plan, fp8_gemm=False), backend)
        buffers = act + ws - exact_act - exact_ws
    step_cache = step_cache_bytes(request, plan)
    latents = LATENT_COPIES * _latent_bytes(request) * plan.samples_per_pass  # each prompt's own
    cache = int(latents) + _embeddings_bytes(request, plan) + step_cache
    return PhaseEstimate(
        "denoise",
        weights=dit + fp8_gemms + te + vae + lora.factors + lora.base_copy + lora_host,
        activations=act + lora.branch,
        workspace=ws,
        cache=cache,
        detail={
            "dit": dit,
            "fp8_gemms": fp8_gemms,
            "fp8_gemm_buffers": buffers,
            "text_encoder": te,
            "vae": vae,
            f"peak_stage_{stage}": act + ws,
            "step_cache": step_cache,
            "lora_factors": lora.factors,
            "lora_base_copy": lora.base_copy,
            "lora_branch": lora.branch,
            "lora_host": lora_host,
        },
    )


def step_cache_bytes(request: Request, plan: Plan) -> int:
    """What a step cache keeps between steps: fp32 residuals [tokens, dim] (and latent copies) per stream."""
    if plan.cache is None:
        return 0
    from wanfit.sampling.step_cache import held_bytes

    return held_bytes(
        plan.cache,
        tokens=request.tokens,
        dim=request.config.dim,
        latent_elements=_latent_bytes(request) // 4,
        streams=2 if request.guidance else 1,
    )


def _split_core(size: int, tile: int) -> int:
    """Largest core span when an axis of `size` is cut into ceil(size / tile) near-equal spans."""
    n = max(1, math.ceil(size / max(1, tile)))
    return math.ceil(size / n)


def _vae_regions(request: Request, plan: Plan) -> list[tuple[int, int]]:
    """(rows, cols) computed at each decoder level (coarsest first) for the largest tile."""
    h, w = request.latent_hw
    margins = vae_sizes(request.vae).tile_margins
    if plan.vae_tile is None:
        return [(h * 2**lv, w * 2**lv) for lv in range(len(margins))]
    core_h, core_w = _split_core(h, plan.vae_tile[0]), _split_core(w, plan.vae_tile[1])
    regions = []
    for lv, m in enumerate(margins):
        s = 2**lv
        regions.append((min(h * s, core_h * s + 2 * m), min(w * s, core_w * s + 2 * m)))
    return regions


def estimate_vae_decode(request: Request, plan: Plan, backend: str, *, others: bool = True) -> PhaseEstimate:
    """Streaming causal decode: per-conv caches of past frames, one frame in flight per level.

    cache = sum over causal convs of kept frames (2) x C_in x (region at its level) x c; activations =
    VAE_LIVE_UNITS x the largest one-frame tensor (width x region) + the output video
    [1, 3, F, 8h, 8w] preallocated in the compute dtype; the stem's attention over the h x w pixels
    of a frame adds its workspace. Tiled: regions are a tile's core plus the decoder's margins, and the
    stems of all frames [1, 384, T, h, w] are kept. (The pipeline converts the video to uint8 on
    the host.) others=False: the VAE's own weights only.
    """
    c = dtype_bytes(plan.compute_dtype)
    vae = request.vae
    sizes = vae_sizes(vae)
    regions = _vae_regions(request, plan)
    cache = sum(frames * ch * regions[lv][0] * regions[lv][1] for lv, ch, frames in sizes.cached_convs) * c
    unit = max(width * rows * cols for width, (rows, cols) in zip(sizes.level_widths, regions))
    live = VAE_LIVE_UNITS * VAE_FRAMES_PER_CALL * unit * c
    h, w = request.latent_hw
    video = 3 * request.num_frames * request.height * request.width
    stems = 0
    if plan.vae_tile is not None and (regions[0][0] < h or regions[0][1] < w):
        stems = vae.base_dim * vae.dim_mult[-1] * request.latent_frames * h * w * c
    d0 = vae.base_dim * vae.dim_mult[-1]
    vae_backend = plan.vae_attention or backend
    ws = attention_workspace(vae_backend, 1, 1, h * w, h * w, d0, c, AttentionBlock.query_chunk)
    weights = vae_device_weights(request, plan)
    lora = lora_memory(request, plan) if others else LoraMemory()
    fp8_gemms = 0
    if others and not plan.offload_dit_before_decode:
        # The DiT with its fp8 copies and its LoRA branch's factors (released with it before the decode).
        fp8_gemms = fast_tier_weights(request.config, plan)
        weights += dit_device_weights(request.config, plan, request.dit_file_dtype) + fp8_gemms
        weights += lora.factors + lora.base_copy
    if others:
        weights += text_encoder_device_weights(request, plan, during_encode=False)
        weights += _lora_host_on_device(plan, lora)
    return PhaseEstimate(
        "vae_decode",
        weights=weights,
        activations=int(live + video * c),
        workspace=int(ws),
        cache=int(cache + stems),
        detail={"vae": vae_device_weights(request, plan), "fp8_gemms": fp8_gemms, "output_video": video * c},
    )


def estimate_phases(
    request: Request, plan: Plan, backend: str = "sdpa_efficient"
) -> dict[str, PhaseEstimate]:
    """Each phase's predicted peak on the plan's device. `backend`: the self-attention backend name
    when the plan names none (the planner's choice, else a forced one, wins)."""
    backend = plan.self_attention or plan.attention or backend
    return {
        "text_encoder": estimate_text_encoder(request, plan),
        "denoise": estimate_denoise(request, plan, backend),
        "vae_decode": estimate_vae_decode(request, plan, backend),
    }


def peak_bytes(phases: dict[str, PhaseEstimate]) -> int:
    return max(p.peak for p in phases.values())
