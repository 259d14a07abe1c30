"""The main job: the role turns redirection on for a demo cgroup, before/after shown.

1. makes a child cgroup and a network namespace (so lo counts only our bytes);
2. moves data over TCP loopback between processes in that cgroup, twice: an
   exchange (64 MiB each way, IPv4 and IPv6, in 32 KiB turns: what
   request/response traffic looks like), and a one-way 256 MiB stream;
3. runs the role (demo/site.yml) twice: the first run changes, the second not;
4. moves the same data again: the exchange is redirected, the one-way
   stream switches to TCP at its 16th send in a row (by design: a one-way stream is no
   faster redirected; docs/design.md, "The path of a flow");
5. prints lo packets and redirected bytes for both runs;
6. runs the role with sockredir_state=absent and removes the cgroup and namespace.
"""

import argparse
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tests'))
sys.path.insert(0, os.path.join(REPO, '.venv', 'collections'))

from support import hostenv  # noqa: E402
from ansible_collections.ebpf.sockredir.plugins.module_utils import facts  # noqa: E402

NBYTES = 256 << 20
EXCHANGE_MIB = 64
# the exchange of molecule/default (its own network namespace per run; prints lo's counters)
TRAFFIC = os.path.join(REPO, 'molecule', 'default', 'files', 'traffic.py')


def role(cgroup, pin_root, state):
    cmd = [os.path.join(REPO, '.venv', 'bin', 'ansible-playbook'), '-i', 'localhost,',
           os.path.join(REPO, 'demo', 'site.yml'), '-e', 'sockredir_cgroup=' + cgroup,
           '-e', 'sockredir_pin_root=' + pin_root, '-e', 'sockredir_state=' + state]
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=os.path.join(REPO, '.venv', 'collections'),
               ANSIBLE_LOCALHOST_WARNING='false', ANSIBLE_INVENTORY_UNPARSED_WARNING='false')
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    recap = [line for line in out.stdout.splitlines() if re.match(r'^localhost\s+:', line)]
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-6000:] + out.stderr[-3000:])
        raise SystemExit('the role failed (state=%s)' % state)
    return recap[-1].split(':', 1)[1].split() if recap else []


def measured(cgroup, ns, pin_root):
    """(exchange, one-way stream): lo packets, bytes redirected, sha256 prefix of each."""
    before = counters(pin_root)
    out = subprocess.run(['/usr/bin/python3', TRAFFIC, cgroup, str(EXCHANGE_MIB)], capture_output=True,
                         text=True, check=False, timeout=300)
    if out.returncode != 0:
        raise SystemExit('the exchange failed: %s' % out.stderr[-3000:])
    result = json.loads(out.stdout)
    assert all(result[f]['intact'] for f in ('ipv4', 'ipv6')), 'payload corrupted'
    middle = counters(pin_root)
    exchange = dict(lo=sum(result[f]['lo_packets'] for f in ('ipv4', 'ipv6')),
                    redirected=middle.get('redirected_bytes', 0) - before.get('redirected_bytes', 0),
                    sha='equal')  # random payloads, compared inside traffic.py
    before_lo = hostenv.lo_packets(ns)
    stream = hostenv.transfer(cgroup, ns, '127.0.0.1', '127.0.0.1', 0, NBYTES, seed=42, timeout=120)
    assert stream['recv_sha256'] == stream['sent_sha256'], 'payload corrupted'
    after = counters(pin_root)
    return exchange, dict(lo=hostenv.lo_packets(ns) - before_lo,
                          redirected=after.get('redirected_bytes', 0) - middle.get('redirected_bytes', 0),
                          sha=stream['recv_sha256'][:16])


def counters(pin_root):
    if not os.path.isdir(pin_root):
        return {}
    return facts.pin_dir_facts(pin_root).get('counters', {})


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    pin_root = '/sys/fs/bpf/sockredir-demo'
    with hostenv.child_cgroup('sockredir-demo') as cgroup, hostenv.netns('sockredir-demo') as ns:
        print('demo cgroup: %s\nnetwork namespace: %s (its own lo)\n' % (cgroup, ns))
        before = measured(cgroup, ns, pin_root)
        print('role, first run:  ', ' '.join(role(cgroup, pin_root, 'present')))
        print('role, second run: ', ' '.join(role(cgroup, pin_root, 'present')))
        after = measured(cgroup, ns, pin_root)
        titles = ('exchange, %d MiB each way x2' % EXCHANGE_MIB, 'one-way stream, 256 MiB')
        for title, was, now in zip(titles, before, after):
            print('\n%-30s %14s %14s' % (title, 'before', 'after'))
            for key, label in (('lo', 'loopback packets'), ('redirected', 'bytes redirected by BPF'),
                               ('sha', 'sha256 (both sides equal)')):
                print('%-30s %14s %14s' % (label, was[key], now[key]))
        print('\n(the one-way stream went TCP at its 16th send in a row, by design: docs/design.md;'
              '\n speed: see benchmarks/RESULTS.md; these transfers are bound by Python hashing)')
        print('\nrole, state=absent:', ' '.join(role(cgroup, pin_root, 'absent')))
    print('removed the demo cgroup and namespace; %s exists: %s' % (pin_root, os.path.exists(pin_root)))


if __name__ == '__main__':
    main()
