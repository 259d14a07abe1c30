"""Wall time of an idempotent rerun of the role on this host, beside `ansible -m ping`.

Converges the role once on a child cgroup and a pin root of its own, then times,
round after round and interleaved (so both see the same machine load), a rerun of
the role (which must report changed=0) and `ansible localhost -m ping`, both as
root with the same interpreter and connection. Prints the medians, the ratio and
every sample as JSON; removes everything it made, also on failure. Exit status 1
when the ratio of the medians is above --max-ratio (default 2).

    .venv/bin/python benchmarks/rerun.py --rounds 5
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests'))
sys.path.insert(0, os.path.join(REPO, '.venv', 'collections'))

from support import hostenv  # noqa: E402
from support.plays import ROLE_PLAY as PLAY, remove_pin_dir  # noqa: E402

BIN = os.path.join(REPO, '.venv', 'bin')
RECAP = re.compile(r'localhost\s+:\s+ok=\d+\s+changed=(\d+)\s+unreachable=0\s+failed=0')


def env():
    return dict(os.environ, ANSIBLE_COLLECTIONS_PATH=os.path.join(REPO, '.venv', 'collections'),
                ANSIBLE_NOCOLOR='1', ANSIBLE_LOCALHOST_WARNING='false', ANSIBLE_INVENTORY_UNPARSED_WARNING='false')


def timed(argv):
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=600, check=False)
    return time.monotonic() - start, proc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--max-ratio', type=float, default=2.0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix='sockredir-rerun-') as work, \
            hostenv.child_cgroup('srbench-rerun') as cgroup:
        pin_root = os.path.join('/sys/fs/bpf', hostenv.unique_name('srbench-rerun'))
        role_vars = dict(sockredir_cgroup=cgroup, sockredir_pin_root=pin_root,
                         sockredir_src_dir=os.path.join(work, 'src'), sockredir_install_packages=False)
        with open(os.path.join(work, 'play.yml'), 'w') as f:
            f.write(PLAY)
        with open(os.path.join(work, 'vars.json'), 'w') as f:
            json.dump(role_vars, f)
        role = [os.path.join(BIN, 'ansible-playbook'), '-i', 'localhost,', '-e', '@' + os.path.join(work, 'vars.json'),
                os.path.join(work, 'play.yml')]
        ping = [os.path.join(BIN, 'ansible'), '-i', 'localhost,', '-c', 'local',
                '-e', 'ansible_python_interpreter=/usr/bin/python3', 'localhost', '-m', 'ansible.builtin.ping']
        try:
            first = timed(role)[1]
            if first.returncode != 0:
                raise SystemExit('the first run of the role failed:\n' + first.stdout[-3000:] + first.stderr[-2000:])
            samples = dict(rerun=[], ping=[])
            for _round in range(args.rounds):
                seconds, proc = timed(role)
                recap = RECAP.search(proc.stdout)
                if proc.returncode != 0 or not recap or recap.group(1) != '0':
                    raise SystemExit('a rerun was not idempotent:\n' + proc.stdout[-3000:])
                samples['rerun'].append(round(seconds, 3))
                seconds, proc = timed(ping)
                if proc.returncode != 0:
                    raise SystemExit('ansible -m ping failed:\n' + proc.stdout + proc.stderr)
                samples['ping'].append(round(seconds, 3))
        finally:
            timed(role + ['-e', 'sockredir_state=absent'])
            remove_pin_dir(pin_root)
    medians = {k: round(statistics.median(v), 3) for k, v in samples.items()}
    ratio = round(medians['rerun'] / medians['ping'], 2)
    print(json.dumps(dict(median_seconds=medians, ratio=ratio, max_ratio=args.max_ratio, samples=samples)))
    return 0 if ratio <= args.max_ratio else 1


if __name__ == '__main__':
    sys.exit(main())
