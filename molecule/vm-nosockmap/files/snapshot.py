#!/usr/bin/python3
# SPDX-License-Identifier: GPL-3.0-or-later
"""What the sockredir role could have changed on this host, as one JSON object.

Usage: snapshot.py CGROUP PATH...

BPF program and map ids (bpftool), the programs attached to CGROUP, bpffs and
cgroup v2 mounts, which of PATH exist, and checksums of the package database
and /etc/fstab. verify compares one taken before a role run with one after.
"""

import hashlib
import json
import os
import subprocess
import sys


def bpftool(*args):
    out = subprocess.run(['bpftool', *args, '--json'], capture_output=True, text=True, check=False)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else []


def digest(path):
    try:
        with open(path, 'rb') as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def main():
    cgroup, paths = sys.argv[1], sys.argv[2:]
    mounts = subprocess.run(['findmnt', '--json', '--types', 'bpf,cgroup2', '--output', 'TARGET,FSTYPE'],
                            capture_output=True, text=True, check=False).stdout
    print(json.dumps(dict(
        kernel=os.uname().release,
        programs=sorted('%s %s' % (p['id'], p.get('name', '')) for p in bpftool('prog', 'show')),
        maps=sorted('%s %s' % (m['id'], m.get('name', '')) for m in bpftool('map', 'show')),
        attached_to_cgroup=bpftool('cgroup', 'show', cgroup),
        mounts=json.loads(mounts)['filesystems'] if mounts.strip() else [],
        paths=sorted(p for p in paths if os.path.lexists(p)),
        dpkg_status=digest('/var/lib/dpkg/status'),
        fstab=digest('/etc/fstab'),
    ), sort_keys=True))


if __name__ == '__main__':
    main()
