#!/usr/bin/env bash
# Packs flash-attn-4 for a GPU machine without a package index whose calls carry at most 64 MiB:
# its wheels (and the CuTe DSL's), with nvidia-cutlass-dsl-libs-cu13 (92 MB as a wheel) unpacked,
# xz-compressed and split in two, into .fa4a/ (wheels + part 1) and .fa4b/ (part 2), both kept out of
# git. Run from the project root (pip must reach a package index):
#   benchmarks/fa4_carry.sh
# On the GPU machine, two calls in a row while it stays warm (its python3 has torch and cuda-bindings):
#   call 1, carry [".whl", ".fa4a"]:  mkdir -p /tmp/fa4 && cp .fa4a/* /tmp/fa4/
#   call 2, carry [".fa4b"]:
#     python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site /tmp/fa4/*.whl
#     cat /tmp/fa4/part_aa .fa4b/part_ab | xz -d | tar xf - -C /tmp/site   # after pip: --upgrade replaces dirs
#     export PYTHONPATH=/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/site:src   # its .pth is not read
set -euo pipefail
root=$(git rev-parse --show-toplevel)
version=${FA4_VERSION:-4.0.0b36}
dsl=${CUTLASS_DSL_VERSION:-4.8.1}
for d in .fa4a .fa4b; do
  grep -qx "/$d/" "$root/.git/info/exclude" 2>/dev/null || echo "/$d/" >> "$root/.git/info/exclude"
  rm -rf "${root:?}/$d" && mkdir -p "$root/$d"
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
  -d "$tmp" "flash-attn-4==$version" "nvidia-cutlass-dsl==$dsl" "nvidia-cutlass-dsl-libs-base==$dsl" \
  "nvidia-cutlass-dsl-libs-core==$dsl" "nvidia-cutlass-dsl-libs-cu13==$dsl" "apache-tvm-ffi<0.2" \
  quack-kernels torch-c-dlpack-ext
mkdir "$tmp/libs"
(cd "$tmp/libs" && unzip -q ../nvidia_cutlass_dsl_libs_cu13-*.whl && tar cf - . | xz -T0 -6 > ../libs_cu13.tar.xz)
rm "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl
mv "$tmp"/*.whl "$root/.fa4a/"
split -b 34000000 "$tmp/libs_cu13.tar.xz" "$tmp/part_"
[ ! -e "$tmp/part_ac" ] || { echo "the libraries no longer fit two parts: split them over more calls" >&2; exit 1; }
mv "$tmp/part_aa" "$root/.fa4a/" && mv "$tmp/part_ab" "$root/.fa4b/"
du -sh "$root/.fa4a" "$root/.fa4b"
