# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Bring the sockredir instances back at boot, through the collection's own engine.

bpffs pins live in kernel memory: after a reboot the programs and maps are
gone. With sockredir_boot_persist the role copies the engine
(plugins/module_utils, under its ansible_collections/... package path) and
this file to /usr/local/lib/ebpf-sockredir/, and installs
ebpf-sockredir.service, which runs

    /usr/bin/python3 -I .../sockredir-apply.py --mount-bpffs
    /usr/bin/python3 -I .../sockredir-apply.py

Each instance's record (/var/lib/ebpf-sockredir/instances/*.json, written by
the engine) that says boot: true goes to instance.converge(), the very call
the role makes, with the parameters the role gave it; so after a boot the role
finds nothing to change. This file only picks records and prints what
happened: no BPF logic lives here, and nothing of Ansible is needed.

Exit status: 0 when every instance is up, 1 when one failed (the others are
still done), 2 on a bad command line or an unreadable record.
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import argparse
import glob
import json
import os
import subprocess
import sys
import traceback

# The engine is installed beside this file; python3 -I leaves the script's
# directory off sys.path, so put it first explicitly.
sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))

from ansible_collections.ebpf.sockredir.plugins.module_utils import instance, mounts  # noqa: E402
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError  # noqa: E402


class SpecError(Exception):
    pass


def boot_records(paths):
    """The params of every record (files, or directories of *.json) that asks for boot."""
    found = []
    for path in paths:
        found += sorted(glob.glob(os.path.join(path, '*.json'))) if os.path.isdir(path) else [path]
    out = []
    for path in found:
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError) as e:
            raise SpecError('%s: cannot read the record: %s' % (path, e))
        if not isinstance(record, dict) or record.get('format') != instance.RECORD_FORMAT \
                or not isinstance(record.get('params'), dict):
            raise SpecError('%s: not a sockredir instance record of format %d' % (path, instance.RECORD_FORMAT))
        if record['params'].get('boot'):
            out.append(record['params'])
    return out


def mount_bpffs(params, check):
    """Mount bpffs where the instance's pins go, unless one is mounted there already."""
    where = params['bpffs_mount']
    if mounts.lexical_mount(params['pin_root'], 'bpf'):
        return '%s: bpffs is mounted' % where
    if check:
        return '%s: would mount bpffs' % where
    if not os.path.isdir(where):
        os.makedirs(where, mode=0o700)
    subprocess.run(['mount', '-t', 'bpf', '-o', instance.BPFFS_OPTS, 'bpf', where], check=True)
    return '%s: mounted bpffs' % where


def apply(params, check):
    """Lines saying what was done for one instance; raises BpfError."""
    # a record from before the object loader has no loader: it was compiled by bcc
    done = instance.converge(dict(dict(loader='bcc'), **dict(params, state='present', sources=None)), check)
    if done['needs']['packages'] or done['needs']['mounts']:
        raise BpfError('the host lacks %s' % ', '.join(done['needs']['packages'] +
                                                       [m['path'] for m in done['needs']['mounts']]))
    if not done['actions']:
        return ['%s: already up' % params['pin_root']]
    verb = 'would ' if check else ''
    return ['%s: %s%s' % (params['pin_root'], verb, action) for action in done['actions']]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Load, pin and attach BPF socket redirection for the sockredir instances that ask for boot.')
    parser.add_argument('specs', nargs='*', metavar='RECORD', default=[instance.RECORD_DIR],
                        help='a record file, or a directory of them (default %s)' % instance.RECORD_DIR)
    parser.add_argument('--mount-bpffs', action='store_true',
                        help='only mount bpffs where a spec needs it and none is mounted')
    parser.add_argument('--check', action='store_true', help='change nothing, say what would change')
    args = parser.parse_args(argv)

    try:
        specs = boot_records(args.specs)
    except SpecError as e:
        print('sockredir-apply: %s' % e, file=sys.stderr)
        return 2
    if not specs:
        print('sockredir-apply: no instance in %s asks for boot, nothing to do' % ', '.join(args.specs))
        return 0

    failed = 0
    for spec in specs:
        try:
            if args.mount_bpffs:
                lines = [mount_bpffs(spec, args.check)]
            else:
                lines = apply(spec, args.check)
        except (BpfError, OSError, subprocess.CalledProcessError) as e:
            failed += 1
            print('sockredir-apply: %s: FAILED: %s' % (spec['pin_root'], getattr(e, 'msg', e)),
                  file=sys.stderr)
            continue
        except Exception:  # pylint: disable=broad-except
            # one pin root's surprise must not keep the others from coming up
            failed += 1
            print('sockredir-apply: %s: FAILED:\n%s' % (spec['pin_root'], traceback.format_exc()),
                  file=sys.stderr)
            continue
        for line in lines:
            print(line)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
