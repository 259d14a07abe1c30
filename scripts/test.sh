#!/usr/bin/env bash
# The whole test suite, on this host's real kernel (run as root): installs what
# it needs, runs the molecule scenario, then pytest (unit, module lifecycle,
# traffic, bad input, build, role lint, benchmark quick mode).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export ANSIBLE_COLLECTIONS_PATH="$PWD/.venv/collections"
export PATH="$PWD/.venv/bin:$PATH"
molecule test -s default
pytest -q -p no:cacheprovider tests
