"""Ulysses sequence parallelism for the DiT, and CFG-parallel guidance, on torch.distributed.

Ulysses. The U processes of a group each hold a contiguous share of the tokens (shares differ by at
most one token, so any length works). Everything that works per token runs on the share: the norms,
the modulation, RoPE (with the share's rows of the table), the FFN, and the cross-attention, whose
keys are the whole text, which every process has (sharding its queries costs no communication,
where splitting its heads would need two exchanges). Self-attention needs every token: an all-to-all
before it trades the token split for a head split (each process then holds all tokens of H/U heads),
the model's own attention backend runs there, and an all-to-all after it trades back. The DiT's
output head works per token too, so it runs on the share and only its small output (out_dim x patch
values per token, against dim for the residual stream) is gathered for unpatchify.

The model is not edited: `DiTParallel.forward` drives its embed / run_blocks / head steps, and the
self-attention modules get a `UlyssesAttention` as their dispatcher (it wraps the one they had, and
takes over their query chunking).

CFG-parallel. With guidance, the processes form two groups: the first predicts the conditional
noise, the second the unconditional one, each as a batch of one; after every step each process gets
its partner's prediction and all combine them the same way, so every process keeps the same latents.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from wanfit.errors import ParallelError, PlanError
from wanfit.models.dit import run_in_chunks
from wanfit.runtime.parallel.session import Groups, transport


def token_shares(length: int, parts: int) -> list[int]:
    """Tokens of each of `parts` contiguous shares of a sequence: the first length % parts get one more."""
    base, extra = divmod(length, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class Ulysses:
    """One Ulysses group: the all-to-alls between token shares and head shares, and the token gather."""

    def __init__(self, group, rank: int, size: int):
        self.group = group
        self.rank = rank
        self.size = size
        self.shares: list[int] = [0] * size  # tokens per process of the forward in progress

    def split(self, length: int) -> tuple[int, int]:
        """Set the shares for a sequence of `length` tokens; this process's [start, end)."""
        if length < self.size:
            raise ParallelError(f"{length} tokens cannot be shared by {self.size} processes.")
        self.shares = token_shares(length, self.size)
        start = sum(self.shares[: self.rank])
        return start, start + self.shares[self.rank]

    def _exchange(self, send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]) -> torch.Tensor:
        out = send.new_empty(sum(recv_sizes))
        with transport("exchanging attention heads"):
            dist.all_to_all_single(out, send, recv_sizes, send_sizes, group=self.group)
        return out

    def heads_from_tokens(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[B, share, H, D] tensors (q, k, v) -> [B, L, H/U, D] each: every token, this process's heads.

        One all-to-all for all of them, through one send buffer [U, share, n, B, h, D] (the block for
        process j, its heads, first): a copy per tensor, as a contiguous() of each would be.
        """
        b, share, heads, d = xs[0].shape
        if heads % self.size:
            raise ParallelError(
                f"Ulysses over {self.size} processes needs a head count it divides, not {heads}."
            )
        h, n = heads // self.size, len(xs)
        send = xs[0].new_empty(self.size, share, n, b, h, d)
        for i, x in enumerate(xs):
            send[:, :, i].copy_(x.unflatten(2, (self.size, h)).permute(2, 1, 0, 3, 4))
        unit = n * b * h * d
        out = self._exchange(send.view(-1), [share * unit] * self.size, [s * unit for s in self.shares])
        # Blocks arrive in rank order, i.e. in token order: [L, n, B, h, D].
        out = out.view(sum(self.shares), n, b, h, d)
        return tuple(out[:, i].permute(1, 0, 2, 3) for i in range(n))

    def tokens_from_heads(self, y: torch.Tensor) -> torch.Tensor:
        """[B, L, H/U, D] -> [B, share, H, D]: the inverse of heads_from_tokens."""
        b, length, h, d = y.shape
        share = self.shares[self.rank]
        send = y.permute(1, 0, 2, 3).contiguous()  # [L, B, h, D]: process j's tokens are contiguous
        unit = b * h * d
        out = self._exchange(send.view(-1), [s * unit for s in self.shares], [share * unit] * self.size)
        # From process i: its heads for this process's tokens -> [U, share, B, h, D] -> [B, share, U*h, D].
        return out.view(self.size, share, b, h, d).permute(2, 1, 0, 3, 4).reshape(b, share, self.size * h, d)

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, share, C] -> [B, L, C] in token order (shares padded to the largest for all_gather)."""
        longest = max(self.shares)
        padded = F.pad(x, (0, 0, 0, longest - x.shape[1])).contiguous()
        parts = [torch.empty_like(padded) for _ in self.shares]
        with transport("gathering the DiT's output"):
            dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:, :s] for p, s in zip(parts, self.shares)], dim=1)


class UlyssesAttention:
    """A self-attention module's dispatcher under Ulysses: exchange, attend with `inner`, exchange back.

    inner: the dispatcher the module had (None: the process-wide one). query_chunk: query rows per
    inner call (Plan.attention_chunk), applied here over the whole sequence's queries: the module's
    own chunking is switched off under Ulysses, as its shares, hence its chunk counts, differ by process.
    """

    def __init__(self, ulysses: Ulysses, inner=None):
        self.ulysses = ulysses
        self.inner = inner
        self.query_chunk: int | None = None

    def __call__(self, q, k, v, *, scale=None, attn_mask=None) -> torch.Tensor:
        if attn_mask is not None:
            raise NotImplementedError("Ulysses attention takes no mask (the DiT's self-attention has none)")
        from wanfit.attention import get_dispatcher

        inner = self.inner if self.inner is not None else get_dispatcher()
        ulysses = self.ulysses
        q, k, v = ulysses.heads_from_tokens(q, k, v)
        out = run_in_chunks(lambda rows: inner(rows, k, v, scale=scale), q, self.query_chunk)
        return ulysses.tokens_from_heads(out)


class DiTParallel:
    """A DiT prediction spread over the processes of a run (the pipeline calls it; see the module doc)."""

    def __init__(self, groups: Groups, rank: int = 0, text_encoder_rank: int | None = None):
        """text_encoder_rank: the process that encodes the prompts for all (None: each encodes its own)."""
        self.groups = groups
        self.rank = rank
        self.text_encoder_rank = text_encoder_rank
        self.ulysses = Ulysses(groups.ulysses_group, groups.ulysses_rank, groups.ulysses)

    @property
    def cfg_parallel(self) -> bool:
        return self.groups.cfg == 2

    @property
    def is_output_rank(self) -> bool:
        return self.rank == 0

    @property
    def encodes_prompts(self) -> bool:
        """Whether this process runs umT5 (the others receive the embeddings, share_embeddings)."""
        return self.text_encoder_rank in (None, self.rank)

    @property
    def speaks_for_prompts(self) -> bool:
        """The one process that warns about the prompts (the encoding one, else rank 0)."""
        return self.rank == (self.text_encoder_rank or 0)

    def share_embeddings(self, embeds: torch.Tensor | None, device, dtype: torch.dtype) -> torch.Tensor:
        """The text encoder rank's embeddings [prompts, L, C] on every process (`embeds`: None on the
        others): the shape is broadcast first, so the receivers can allocate, then the values."""
        src = self.text_encoder_rank
        sent = embeds is not None
        shape = torch.tensor(embeds.shape if sent else (0, 0, 0), dtype=torch.int64, device=device)
        with transport("sharing the prompt embeddings"):
            dist.broadcast(shape, src=src)
            out = embeds.contiguous() if sent else torch.empty(shape.tolist(), dtype=dtype, device=device)
            dist.broadcast(out, src=src)
        return out

    def attach(self, dit: torch.nn.Module) -> None:
        """Give every self-attention of `dit` a UlyssesAttention around its dispatcher. Checked at each
        forward: a pipeline may hand the model new dispatchers (WanDiT.set_attention_dispatchers), and a
        self-attention left without the exchange would attend over its own share only."""
        heads = dit.config.num_heads
        if heads % self.groups.ulysses:
            raise ParallelError(
                f"Ulysses {self.groups.ulysses} needs a head count it divides; this DiT has {heads} heads."
            )
        for block in dit.blocks:
            attn, old = block.self_attn, block.self_attn.dispatcher
            if isinstance(old, UlyssesAttention) and old.ulysses is self.ulysses:
                continue
            wrapped = isinstance(old, UlyssesAttention)
            attn.dispatcher = UlyssesAttention(self.ulysses, old.inner if wrapped else old)
            attn.dispatcher.query_chunk = old.query_chunk if wrapped else None

    @staticmethod
    def _take_query_chunks(dit: torch.nn.Module) -> None:
        """Move each self-attention's query chunk (set by the runtime from the plan) to its
        UlyssesAttention, which chunks the same way over the exchanged, whole-sequence queries."""
        for block in dit.blocks:
            attn = block.self_attn
            if attn.attention_chunk is not None:
                attn.dispatcher.query_chunk, attn.attention_chunk = attn.attention_chunk, None

    def detach(self, dit: torch.nn.Module) -> None:
        """Give the self-attentions their own dispatchers back."""
        for block in dit.blocks:
            if isinstance(block.self_attn.dispatcher, UlyssesAttention):
                block.self_attn.dispatcher = block.self_attn.dispatcher.inner

    def bind(self, dit):
        """`dit` as a callable (x, timestep, context) -> noise, spread over this process's group."""
        return functools.partial(self.forward, dit)

    def forward(self, dit, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """dit(x, timestep, context) with the tokens shared by this process's Ulysses group."""
        if self.groups.ulysses == 1:
            return dit(x, timestep, context)
        self.attach(dit)
        self._take_query_chunks(dit)
        inputs = dit.embed(x, timestep, context)
        start, end = self.ulysses.split(inputs.tokens.shape[1])
        # A copy of the share, so the whole sequence's embeddings are freed now.
        inputs = replace(inputs, tokens=inputs.tokens[:, start:end].contiguous(), rope=inputs.rope[start:end])
        tokens = dit.run_blocks(inputs)
        return dit.unpatchify(self.ulysses.gather_tokens(dit.head(tokens, inputs.t_emb)), inputs.grid)

    def guided_pair(self, dit, x, timestep, cond, uncond) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise_cond, noise_uncond) under CFG-parallel: this group's half, the partner's half."""
        mine = self.forward(dit, x, timestep.expand(1), cond if self.groups.cfg_rank == 0 else uncond)
        mine = mine.float().contiguous()
        parts = [torch.empty_like(mine) for _ in range(2)]
        with transport("exchanging the guidance predictions"):
            dist.all_gather(parts, mine, group=self.groups.cfg_group)
        return parts[0], parts[1]

    def same_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Rank 0's latents on every process (they are drawn alike; this makes sure)."""
        latents = latents.contiguous()
        with transport("sharing the initial latents"):
            dist.broadcast(latents, src=0)
        return latents

    def out_of_memory(self, phase: str) -> PlanError:
        """What an out-of-memory error mid-denoising means here: every process must run one plan."""
        return PlanError(
            f"Out of memory during {phase} on rank {self.rank}; a run on several processes cannot step its "
            "plan down mid-run (every process must run the same plan): start again with --vram set below "
            "this GPU's free memory, or with more GPUs."
        )


def dit_parallel(session, plan) -> DiTParallel | None:
    """The run's DiTParallel for `plan` (None for a one-process plan in a one-process session)."""
    if plan.world_size == 1 and not session.is_parallel:
        return None
    groups = session.groups(plan.cfg_parallel, plan.ulysses)
    return DiTParallel(groups, session.rank, plan.text_encoder_rank if session.is_parallel else None)
