#!/usr/bin/env bash
# Builds libbpf-style BPF C sources (*.bpf.c) into objects committed next to
# them (*.bpf.o), the same bytes on every build with the same toolchain:
#
#   scripts/build-bpf.sh                 every files/bpf/*.bpf.c
#   scripts/build-bpf.sh DIR|FILE...     the *.bpf.c in DIR, or the FILEs
#   scripts/build-bpf.sh --check ...     build into a temp dir and compare with
#                                        the committed objects; exit 1 and name
#                                        each one that differs or is missing
#
# Reproducible: clang compiles from the source's own directory with a relative
# file name and -fdebug-prefix-map, so no absolute path of the checkout ends up
# in the object; `llvm-strip -g` then drops the DWARF sections (build paths,
# producer strings) and keeps .BTF and .BTF.ext, which libbpf needs for the map
# definitions and the kernel for line info. Headers: the UAPI ones of
# linux-libc-dev and <bpf/bpf_helpers.h> of libbpf-dev (scripts/bootstrap.sh).
set -euo pipefail

CLANG=${CLANG:-clang}
STRIP=${LLVM_STRIP:-llvm-strip}
ARCH_INCLUDE=/usr/include/$(gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)
[ -d "$ARCH_INCLUDE" ] || ARCH_INCLUDE=/usr/include/x86_64-linux-gnu

check=0
if [ "${1:-}" = "--check" ]; then check=1; shift; fi
repo=$(cd "$(dirname "$0")/.." && pwd)
[ $# -gt 0 ] || set -- "$repo/files/bpf"

sources=()
for arg in "$@"; do
  if [ -d "$arg" ]; then
    for f in "$arg"/*.bpf.c; do [ -e "$f" ] && sources+=("$f"); done
  elif [[ "$arg" == *.bpf.c && -f "$arg" ]]; then
    sources+=("$arg")
  else
    echo "build-bpf: $arg is neither a directory nor a *.bpf.c file" >&2; exit 2
  fi
done
[ ${#sources[@]} -gt 0 ] || { echo "build-bpf: no *.bpf.c sources in $*" >&2; exit 2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
stale=0
for src in "${sources[@]}"; do
  dir=$(cd "$(dirname "$src")" && pwd)
  base=$(basename "$src" .c)
  out="$tmp/$base.o"
  (cd "$dir" && "$CLANG" -O2 -g -target bpf -D__TARGET_ARCH_x86 -Wall -Werror \
      -fdebug-prefix-map="$dir"=. -fno-ident -idirafter "$ARCH_INCLUDE" \
      -c "$base.c" -o "$out")
  "$STRIP" -g "$out"
  if ((check)); then
    if ! cmp -s "$out" "$dir/$base.o"; then
      echo "build-bpf: $dir/$base.o does not match $src (run scripts/build-bpf.sh $src and commit it)" >&2
      stale=1
    fi
  else
    if cmp -s "$out" "$dir/$base.o"; then
      echo "build-bpf: $dir/$base.o unchanged"
    else
      cp "$out" "$dir/$base.o"
      echo "build-bpf: $dir/$base.o built ($(stat -c %s "$out") bytes)"
    fi
  fi
done
exit $stale
