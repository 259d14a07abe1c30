#!/usr/bin/env bash
# Installs everything the demo and the tests need on a fresh Debian 12 host:
# the packages the modules use on the managed host (python3-bpfcc, bpftool,
# kernel headers), the traffic tools, and a controller venv in .venv.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

# What it installs and runs needs root (apt, BPF, cgroups), Debian's packages
# (apt, python3-bpfcc) and an x86_64 host (linux-headers-amd64; the guests).
if [ "$(id -u)" -ne 0 ]; then
  echo "bootstrap: run as root (it installs packages, and the tests load BPF programs)" >&2; exit 1
fi
if ! grep -qsE '^ID=debian$' /etc/os-release; then
  echo "bootstrap: needs Debian (apt and Debian's package names); /etc/os-release says: $(grep -s '^PRETTY_NAME=' /etc/os-release)" >&2
  exit 1
fi
if [ "$(uname -m)" != x86_64 ]; then
  echo "bootstrap: needs an x86_64 host (linux-headers-amd64, the qemu guests); this is $(uname -m)" >&2; exit 1
fi

# redis-server, nginx-light, wrk, curl: benchmarks/apps.py. Where the packages start their
# system services, those are left alone: the benchmark runs its own servers in a netns of its own.
# libbpf-dev, llvm: scripts/build-bpf.sh; openssh-*: the fleet harness (benchmarks/fleet.py);
# and shellcheck, which ansible-test sanity (tests/test_quality.py) runs on the scripts (a comment
# that starts with the word "shellcheck" is read as a shellcheck directive).
packages=(python3-bpfcc bpftool clang linux-headers-amd64 socat iperf3 sockperf nftables
          iproute2 python3-venv python3-pip util-linux procps python3-matplotlib
          redis-server nginx-light wrk curl libbpf-dev llvm openssh-server openssh-client shellcheck)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/ansible-playbook ] || ! cmp -s tests/requirements.txt .venv/.requirements; then
  echo "bootstrap: creating .venv (system site packages, so bcc is visible)"
  /usr/bin/python3 -m venv --system-site-packages .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
  cp tests/requirements.txt .venv/.requirements
fi

# The collection as Ansible expects to find it: ansible_collections/ebpf/sockredir.
mkdir -p .venv/collections/ansible_collections/ebpf
ln -sfn "$PWD" .venv/collections/ansible_collections/ebpf/sockredir
