#!/usr/bin/env bash
# ansible-test wants the working directory inside .../ansible_collections/ebpf/sockredir and
# resolves symlinks (so .venv/collections/..., which links this checkout, does not do): runs
# `ansible-test "$@"` in a copy of the working tree placed there, removed afterwards.
#   bash scripts/ansible-test.sh integration --allow-destructive --local
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
root="$(mktemp -d /tmp/ebpf-sockredir-ansible-test.XXXXXX)"
trap 'rm -rf "$root"' EXIT
copy="$root/ansible_collections/ebpf/sockredir"
mkdir -p "$copy"
tar -C "$repo" -c --exclude=./.git --exclude=./.venv --exclude=./tests/output --exclude=__pycache__ \
    --exclude=.pytest_cache --exclude='*.tar.gz' . | tar -C "$copy" -x
cd "$copy"
"${ANSIBLE_TEST:-$repo/.venv/bin/ansible-test}" "$@"
