#!/usr/bin/env bash
# The whole test suite, on this host's real kernel (run as root): installs what
# it needs, runs the molecule scenarios from the collection installed with
# ansible-galaxy (this host; the kernel matrix under
# qemu: a Debian 12 guest with kernel 6.1 and a Debian 13 guest with kernel
# 6.12, each image built on first use; the Debian 12 guest without sockmap),
# ansible-test's integration targets of the modules, then pytest (unit,
# module lifecycle, traffic, bad input, build, role, boot unit, quality gates,
# reliability, benchmark quick mode).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export ANSIBLE_COLLECTIONS_PATH="$PWD/.venv/collections"
export PATH="$PWD/.venv/bin:$PATH"
# The molecule scenarios run against the collection as a user gets it: built and installed with
# ansible-galaxy into a directory of its own, found through ANSIBLE_COLLECTIONS_PATH alone
# (ansible.posix comes with the ansible package).
installed="$(mktemp -d /tmp/ebpf-sockredir-installed.XXXXXX)"
trap 'rm -rf "$installed"' EXIT
ansible-galaxy collection build --output-path "$installed" .
# --force: the checkout is on ANSIBLE_COLLECTIONS_PATH above and would count as installed already
ansible-galaxy collection install --no-deps --force -p "$installed/collections" "$installed"/ebpf-sockredir-*.tar.gz
(
  cd "$installed/collections/ansible_collections/ebpf/sockredir"
  export ANSIBLE_COLLECTIONS_PATH="$installed/collections"
  molecule test -s default
  SOCKREDIR_VM_SUITE=bookworm molecule test -s vm
  SOCKREDIR_VM_SUITE=trixie molecule test -s vm
  SOCKREDIR_VM_SUITE=bookworm molecule test -s vm-nosockmap
)
# tests/integration/targets/bpf_*: each case in check mode, for real, and both again, in a child
# cgroup and pin root of its own. --local: on this host, under .venv's Python (made from
# /usr/bin/python3 with system site packages, so bcc imports); about 2 min.
bash scripts/ansible-test.sh integration --allow-destructive --local \
  --python-interpreter "$PWD/.venv/bin/python" --color no
pytest -q -p no:cacheprovider tests
