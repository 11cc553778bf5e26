"""ComfyUI's conventions inside weight files, shared by its DiT and text-encoder files.

Scaled fp8 files ("..._fp8_e4m3fn_scaled.safetensors") hold a marker tensor `scaled_fp8` (under the
model's prefix) and, beside each fp8 matrix `X.weight`, its fp32 scale `X.scale_weight` (the weight is
stored * scale); `X.scale_input` describes activations, which wanfit does not quantise. A umT5 file
may carry its sentencepiece tokenizer as a uint8 tensor `spiece_model`.
"""

FP8_MARKER_KEY = "scaled_fp8"
FP8_WEIGHT_SCALE = ".scale_weight"
FP8_INPUT_SCALE = ".scale_input"
TOKENIZER_KEY = "spiece_model"
