"""Per-module time of bpf_program: object path (libbpf) vs BCC path, first load and idempotent rerun.

    .venv/bin/python benchmarks/loader_time.py [--runs 5]

Runs the module file the way Ansible's AnsiballZ wrapper ends up running it
(a fresh interpreter, arguments in a JSON file), so the time includes Python
start-up and imports but not SSH or Ansible's controller side. Object path:
tests/data/bpf/redir_test.bpf.o; BCC path: files/bpf/sockredir.bpf.c, the
role's source of the same two programs. Each run uses a new pin directory,
removed afterwards. Prints JSON: median and range in seconds per case.
"""

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = os.path.join(REPO, 'plugins', 'modules', 'bpf_program.py')
PYTHON = os.path.join(REPO, '.venv', 'bin', 'python')
OBJ = os.path.join(REPO, 'tests', 'data', 'bpf', 'redir_test.bpf.o')
SRC = os.path.join(REPO, 'files', 'bpf', 'sockredir.bpf.c')

sys.path.insert(0, os.path.join(REPO, 'tests'))
sys.path.insert(0, os.path.join(REPO, '.venv', 'collections'))
from support.plays import MAPS, PROGRAMS, remove_pin_dir  # noqa: E402


def run_module(args):
    with tempfile.NamedTemporaryFile('w', suffix='.json') as f:
        json.dump(dict(ANSIBLE_MODULE_ARGS=args), f)
        f.flush()
        env = dict(os.environ, PYTHONPATH=os.path.join(REPO, '.venv', 'collections'))
        start = time.monotonic()
        proc = subprocess.run([PYTHON, MODULE, f.name], capture_output=True, text=True, env=env, check=False)
        secs = time.monotonic() - start
    out = json.loads(proc.stdout)
    if out.get('failed'):
        raise RuntimeError(out)
    return secs, out['changed']


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--runs', type=int, default=5)
    runs = ap.parse_args().runs
    cases = dict(object=lambda d: dict(object=OBJ, pin_dir=d),
                 bcc=lambda d: dict(src=SRC, pin_dir=d, programs=PROGRAMS, maps=MAPS))
    times = {}
    for _run in range(runs):
        for name, args in cases.items():
            pin_dir = '/sys/fs/bpf/loadtime-%s' % secrets.token_hex(4)
            try:
                first, changed = run_module(args(pin_dir))
                assert changed
                again, changed = run_module(args(pin_dir))
                assert not changed
            finally:
                remove_pin_dir(pin_dir)
            times.setdefault(name + '_first', []).append(first)
            times.setdefault(name + '_rerun', []).append(again)
    print(json.dumps({k: dict(median=round(statistics.median(v), 3), min=round(min(v), 3), max=round(max(v), 3))
                      for k, v in times.items()}, indent=1))


if __name__ == '__main__':
    main()
