#!/usr/bin/env bash
# Builds SageAttention 2 (its CUDA kernels) on a GPU machine that reaches no package index, for that
# machine's card only, as a wheel. The package index serves only sageattention 1.0.6 (Triton kernels);
# 2.x is built from source. Here, once, from a git clone of github.com/thu-ml/SageAttention:
#   benchmarks/build_sage.sh pack CLONE  # -> .sage/sage-src.tar.gz (60 KB, kept out of git)
# On the GPU machine, carry [".sage"] (its nvcc, torch, setuptools and ninja are used):
#   benchmarks/build_sage.sh build DIR   # -> DIR/sageattention-2.*.whl, then pip install --target it
# The build keeps what wanfit calls on sm_90 (Hopper): the sm_90 kernels and the quantisation
# kernels, head dim 128 (every Wan2.1 model's), non-causal, bf16/fp16 out, no log-sum-exp. Those are
# the same kernels a full build makes; the full build also compiles 60 variants wanfit never calls
# (and sm_80/sm_89 modules Hopper does not use), which would take most of a call's ten minutes.
set -euo pipefail
root=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
case "${1:-}" in
pack)
  mkdir -p "$root/.sage"
  grep -qx "/.sage/" "$root/.git/info/exclude" 2>/dev/null || echo "/.sage/" >> "$root/.git/info/exclude"
  clone=${2:?"pack CLONE: a git clone (or bare mirror) of SageAttention"}
  git -C "$clone" archive HEAD setup.py pyproject.toml README.md LICENSE csrc sageattention \
    | gzip -9 > "$root/.sage/sage-src.tar.gz"
  du -sh "$root/.sage/sage-src.tar.gz"
  ;;
build)
  out=${2:?"build DIR: where the wheel goes"}
  mkdir -p "$out"
  work=$(mktemp -d)
  tar xzf "$root/.sage/sage-src.tar.gz" -C "$work"
  python3 - "$work" <<'EOF'
import re, sys
from pathlib import Path
work = Path(sys.argv[1])
setup = work / "setup.py"
text = setup.read_text()
# Hopper needs only the sm_90 module and the fused quantisation kernels.
text = text.replace("if HAS_SM80 or HAS_SM86 or HAS_SM89 or HAS_SM90 or HAS_SM100 or HAS_SM120 or HAS_SM121:",
                    "if HAS_SM80 or HAS_SM86:")
text = text.replace("if HAS_SM89 or HAS_SM90 or HAS_SM100 or HAS_SM120 or HAS_SM121:",
                    "if HAS_SM89 or HAS_SM120 or HAS_SM121:")
setup.write_text(text)
header = work / "csrc" / "dispatch_utils.h"
h = header.read_text()
def only(macro, cond_var):
    """Cut a dispatch macro's first branch (the variant wanfit never calls) out."""
    global h
    pattern = re.compile(r"(#define " + macro + r"\(.*?\)\s*\\\n)\s*if \(" + cond_var + r" == [^)]*\) \{.*?\} else if",
                         re.S)
    h, n = pattern.subn(lambda m: m.group(1) + "  if", h, count=1)
    assert n == 1, macro
only("DISPATCH_HEAD_DIM", "head_dim")  # 64 cut, 128 kept
only("DISPATCH_CAUSAL", "is_causal")  # causal cut
only("DISPATCH_RETURN_LSE", "return_lse")  # lse cut
header.write_text(h)
EOF
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} EXT_PARALLEL=3
  (cd "$work" && python3 -m pip wheel -q --no-build-isolation --no-deps -w "$out" .)
  ls -la "$out"
  ;;
*)
  echo "usage: $0 pack CLONE | build DIR" >&2
  exit 2
  ;;
esac
