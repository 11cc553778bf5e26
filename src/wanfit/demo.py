"""A tiny random model (DiT, VAE, umT5 of random seeded weights), built in memory in a moment.

It draws noise; tests and `--tiny` benchmark checks use it where a model's weights do not matter
(plans, placements, LoRA and cache plumbing, resume). The model `wanfit generate` runs without
--model is the trained one in wanfit.builtin.
"""

from __future__ import annotations

import string

import torch

from wanfit.models.configs import WAN_TINY, TextEncoderConfig


def tiny_text_encoder_config(vocab_size: int) -> TextEncoderConfig:
    """The tiny umT5's shape (d_model is the tiny DiT's text_dim) for a tokenizer of `vocab_size`."""
    return TextEncoderConfig(
        vocab_size=vocab_size,
        d_model=WAN_TINY.text_dim,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )


def tiny_tokenizer():
    """A character-level T5-style tokenizer (pad 0, eos 1, unk 2), built in memory."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_pipeline(device: str | None = None, seed: int = 0, plan=None, *, with_text_encoder: bool = True):
    """A WanPipeline of tiny random models (DiT, VAE, umT5), the same on every machine for a seed.

    plan: a PlanResult or Plan to obey; None plans the default tiny job for this machine (or `device`).
    with_text_encoder: False builds no umT5 (a process of a parallel run that receives the embeddings).
    The public way in: WanPipeline.from_pretrained("builtin").
    """
    from wanfit.models.text_encoder import WanTextEncoder
    from wanfit.pipeline import SamplingDefaults, WanPipeline

    if plan is None:
        from wanfit.plan.planning import Constraints, plan_for

        plan = plan_for(tiny_request(192, 320, 17, True), Constraints(device=device))
    planned = plan
    plan = getattr(plan, "plan", plan)
    dit, vae, text_model, tokenizer = _tiny_models(seed, with_text_encoder)
    dtype = plan.torch_compute_dtype
    dit = dit.to(device=plan.device, dtype=dtype).eval().requires_grad_(False)
    vae = vae.to(device=plan.device, dtype=dtype).eval().requires_grad_(False)
    if with_text_encoder:
        text_model = text_model.to(device=plan.text_encoder_device).eval()
        text_encoder = WanTextEncoder(text_model, tokenizer, cache=None)
    else:
        text_encoder = None
    defaults = SamplingDefaults(num_inference_steps=10)

    def text_encoder_loader(plan):
        """The tiny text encoder, rebuilt in a moment if a plan freed it (the pipeline places it)."""
        text_model, tokenizer = _tiny_models(seed)[2:]
        return WanTextEncoder(text_model.to(plan.text_encoder_device).eval(), tokenizer, cache=None)

    return WanPipeline(
        dit,
        vae,
        text_encoder,
        plan=planned,
        defaults=defaults,
        name="tiny random model",
        text_encoder_loader=text_encoder_loader,
        model_key=tiny_model_key(seed),
    )


def tiny_model_key(seed: int = 0) -> str:
    """Where step-cache calibrations of the tiny model with this seed are stored."""
    return f"builtin-tiny-seed{seed}"


def _tiny_models(seed: int, text_encoder: bool = True):
    """The tiny DiT, VAE and umT5 (random, from one seed; None when not text_encoder) and the
    tokenizer, on the host."""
    from transformers import UMT5Config, UMT5EncoderModel

    from wanfit.models.dit import WanDiT
    from wanfit.models.vae import WAN_VAE_TINY, WanVAE

    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = WanDiT(WAN_TINY)
        vae = WanVAE(WAN_VAE_TINY)
        text_config = UMT5Config(**tiny_text_encoder_config(len(tokenizer)).umt5_kwargs())
        text_model = UMT5EncoderModel(text_config) if text_encoder else None  # built last: the same DiT
    return dit, vae, text_model, tokenizer


def tiny_request(height: int, width: int, num_frames: int, guidance: bool):
    """The planner's Request for the tiny model (its own text encoder and VAE shapes)."""
    from wanfit.models.vae import WAN_VAE_TINY
    from wanfit.plan.estimates import Request

    return Request(
        WAN_TINY,
        height=height,
        width=width,
        num_frames=num_frames,
        guidance=guidance,
        model_name="tiny",
        text_encoder=tiny_text_encoder_config(len(tiny_tokenizer())),
        vae=WAN_VAE_TINY,
    )
