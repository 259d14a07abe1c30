"""The main job: the role turns redirection on for a demo cgroup, before/after shown.

1. makes a child cgroup and a network namespace (so lo counts only our bytes);
2. sends 256 MiB over TCP loopback between two processes in that cgroup;
3. runs the role (demo/site.yml) twice: the first run changes, the second not;
4. sends the same 256 MiB again, now redirected;
5. prints lo packets and redirected bytes for both transfers;
6. runs the role with sockredir_state=absent and removes the cgroup and namespace.
"""

import argparse
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
    before_lo = hostenv.lo_packets(ns)
    before = counters(pin_root)
    result = hostenv.transfer(cgroup, ns, '127.0.0.1', '127.0.0.1', 0, NBYTES, seed=42, timeout=120)
    assert result['recv_sha256'] == result['sent_sha256'], 'payload corrupted'
    after = counters(pin_root)
    return dict(lo=hostenv.lo_packets(ns) - before_lo,
                redirected=after.get('redirected_bytes', 0) - before.get('redirected_bytes', 0),
                sha=result['recv_sha256'][:16])


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
        print('\n%-28s %14s %14s' % ('same 256 MiB transfer', 'before', 'after'))
        for key, label in (('lo', 'loopback packets'), ('redirected', 'bytes redirected by BPF'),
                           ('sha', 'sha256 (both sides equal)')):
            print('%-28s %14s %14s' % (label, before[key], after[key]))
        print('(speed: see benchmarks/RESULTS.md; this transfer is bound by Python hashing)')
        print('\nrole, state=absent:', ' '.join(role(cgroup, pin_root, 'absent')))
    print('removed the demo cgroup and namespace; %s exists: %s' % (pin_root, os.path.exists(pin_root)))


if __name__ == '__main__':
    main()
