#!/usr/bin/env bash
# Builds FlashAttention-3 (flash-attention/hopper: its sm_90 CUDA kernels) on a GPU machine that
# reaches no package index, as a wheel. No index serves FA3; it is built from source. Here, once, from
# git clones (or bare mirrors) of github.com/Dao-AILab/flash-attention and github.com/NVIDIA/cutlass
# (the cutlass commit is the one flash-attention's csrc/cutlass submodule pins):
#   benchmarks/build_fa3.sh pack FA_CLONE CUTLASS_CLONE  # -> .fa3/fa3-src.tar.gz (~3 MB, kept out of git)
# On the GPU machine, carry [".fa3"] (its nvcc >= 12.3, torch, setuptools and ninja are used):
#   benchmarks/build_fa3.sh build DIR   # -> DIR/flash_attn_3-*.whl, then pip install --target it
# The build keeps the forward kernels wanfit calls: head dim 128 (every Wan2.1 model's), bf16 (exact)
# and float8 e4m3 (the fast tier's lossy kernel), no split-KV, paged KV, softcap, local window,
# varlen, GQA packing or backward. A full build compiles several hundred variants (hours).
set -euo pipefail
root=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
case "${1:-}" in
pack)
  fa=${2:?"pack FA_CLONE CUTLASS_CLONE: git clones (or bare mirrors) of flash-attention and cutlass"}
  cutlass=${3:?"pack FA_CLONE CUTLASS_CLONE"}
  mkdir -p "$root/.fa3"
  grep -qx "/.fa3/" "$root/.git/info/exclude" 2>/dev/null || echo "/.fa3/" >> "$root/.git/info/exclude"
  pin=$(git -C "$fa" ls-tree HEAD csrc/cutlass | awk '{print $3}')
  work=$(mktemp -d)
  mkdir -p "$work/src/csrc/cutlass"
  git -C "$fa" archive HEAD README.md LICENSE hopper | tar x -C "$work/src"
  git -C "$cutlass" archive "$pin" include | tar x -C "$work/src/csrc/cutlass"
  echo "flash-attention $(git -C "$fa" rev-parse HEAD), cutlass $pin" > "$work/src/PROVENANCE"
  tar czf "$root/.fa3/fa3-src.tar.gz" -C "$work" src
  rm -rf "$work"
  du -sh "$root/.fa3/fa3-src.tar.gz"
  ;;
build)
  out=${2:?"build DIR: where the wheel goes"}
  mkdir -p "$out"
  out=$(cd "$out" && pwd)
  work=$(mktemp -d)
  tar xzf "$root/.fa3/fa3-src.tar.gz" -C "$work"
  cat "$work/src/PROVENANCE"
  # Newer `wheel` releases moved bdist_wheel into setuptools.
  python3 - "$work/src/hopper/setup.py" <<'EOF'
import sys
from pathlib import Path
setup = Path(sys.argv[1])
text = setup.read_text()
old = "from wheel.bdist_wheel import bdist_wheel as _bdist_wheel"
new = ("try:\n    from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel\n"
       "except ImportError:\n    " + old)
setup.write_text(text.replace(old, new))
EOF
  for part in BACKWARD SPLIT PAGEDKV APPENDKV LOCAL SOFTCAP PACKGQA FP16 VARLEN CLUSTER \
      HDIM64 HDIM96 HDIM192 HDIM256 SM80 HDIMDIFF64 HDIMDIFF192; do
    export "FLASH_ATTENTION_DISABLE_$part=TRUE"
  done
  export FLASH_ATTENTION_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16} NVCC_THREADS=${NVCC_THREADS:-4}
  # The whole log goes to DIR/fa3_build.log; the progress lines and errors to the terminal.
  (cd "$work/src/hopper" && python3 -m pip wheel -v --no-build-isolation --no-deps -w "$out" . 2>&1 \
    | tee "$out/fa3_build.log" | grep -E "^ *\[[0-9]+/[0-9]+\]|error|Error|FAILED|Successfully" | cut -c1-300) || true
  ls -la "$out"
  ls "$out"/flash_attn_3-*.whl  # the exit status: whether a wheel was made
  ;;
*)
  echo "usage: $0 pack FA_CLONE CUTLASS_CLONE | build DIR" >&2
  exit 2
  ;;
esac
