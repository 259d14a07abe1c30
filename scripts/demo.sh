#!/usr/bin/env bash
# The main job on a fresh Debian 12 host: install, then the role on a demo cgroup with before/after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python scripts/demo.py "$@"
