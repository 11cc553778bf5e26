"""The benchmarks' kernel breakdown: kernel names as CUDA libraries and Inductor give them, by kind."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from kernel_profile import kernel_kind, kernel_profile  # noqa: E402


@pytest.mark.parametrize(
    "name, kind",
    [
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_128x128x128", "attention"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64>>", "attention"),
        ("_attn_fwd_int8", "attention"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "gemm"),
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "gemm"),
        ("triton_poi_fused__to_copy_add_mul_native_layer_norm_0", "fused (triton)"),
        ("triton_red_fused_mean_pow_1", "fused (triton)"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise"),
        ("Memcpy HtoD (Pinned -> Device)", "copy"),
        ("some_unknown_kernel", "other"),
    ],
)
def test_kernels_are_grouped_by_kind(name, kind):
    assert kernel_kind(name) == kind


def test_no_profile_without_cuda():
    assert kernel_profile(lambda: None) is None  # the CPU build: the benchmarks record None
