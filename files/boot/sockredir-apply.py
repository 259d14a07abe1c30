# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Load, pin and attach at boot what the sockredir role set up, with the collection's own engine.

bpffs pins live in kernel memory: after a reboot the programs and maps are
gone. With sockredir_boot_persist the role copies the collection's engine
(plugins/module_utils, under its ansible_collections/... package path) and
this file to /usr/local/lib/ebpf-sockredir/, writes one JSON spec per pin
root to /etc/ebpf-sockredir/boot.d/, and installs ebpf-sockredir.service,
which runs

    python3 -I .../sockredir-apply.py --mount-bpffs /etc/ebpf-sockredir/boot.d
    python3 -I .../sockredir-apply.py /etc/ebpf-sockredir/boot.d

A spec holds the very parameters the role gives ebpf.sockredir.bpf_program
and ebpf.sockredir.bpf_attach, and they go to the same execute() functions
the modules call; so after a boot the role finds nothing to change. This file
only reads specs and prints what happened: no BPF logic lives here, and
nothing of Ansible is needed (the engine imports none of it).

Exit status: 0 when every pin root is loaded and attached, 1 when one failed
(the others are still done), 2 on a bad command line or an unreadable spec.
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

from ansible_collections.ebpf.sockredir.plugins.module_utils import attach, mounts, program  # noqa: E402
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError  # noqa: E402

SPEC_FORMAT = 1
BPFFS_OPTIONS = 'nosuid,nodev,noexec,mode=0700'  # what the role mounts with


class SpecError(Exception):
    pass


def spec_files(paths):
    """Spec files named on the command line; a directory stands for its *.json."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += sorted(glob.glob(os.path.join(path, '*.json')))
        else:
            found.append(path)
    return found


def read_spec(path):
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise SpecError('%s: cannot read the spec: %s' % (path, e))
    if not isinstance(spec, dict) or spec.get('format') != SPEC_FORMAT:
        raise SpecError('%s: not a sockredir boot spec of format %d' % (path, SPEC_FORMAT))
    for key in ('pin_root', 'bpffs_mount', 'bpf_program', 'bpf_attach'):
        if key not in spec:
            raise SpecError('%s: the spec lacks %r' % (path, key))
    return spec


def mount_bpffs(spec, check):
    """Mount bpffs where the spec's pins go, unless one is mounted there already."""
    where = spec['bpffs_mount']
    if mounts.fs_of(where) == (os.path.realpath(where), 'bpf'):
        return '%s: bpffs is mounted' % where
    if check:
        return '%s: would mount bpffs' % where
    if not os.path.isdir(where):
        os.makedirs(where, mode=0o700)
    subprocess.run(['mount', '-t', 'bpf', '-o', BPFFS_OPTIONS, 'bpf', where], check=True)
    return '%s: mounted bpffs' % where


def apply(spec, check):
    """Lines saying what was done for one pin root; raises BpfError."""
    root = spec['pin_root']
    lines = []
    loaded = program.execute(spec['bpf_program'], check, False)
    ids = ', '.join('%s (id %d)' % (name, info['id']) for name, info in sorted(loaded.get('programs', {}).items()))
    if loaded['changed']:
        lines.append('%s: %s %s: %s' % (root, 'would load and pin' if check else 'loaded and pinned',
                                        ids or 'the programs', '; '.join(loaded['reasons'])))
    else:
        lines.append('%s: already pinned: %s' % (root, ids))
    # sk_msg on the sockhash before sock_ops on the cgroup (the role's spec
    # lists them so): a socket takes the sockhash's msg_verdict program when it
    # is inserted, so every socket sock_ops inserts is redirected from its start.
    for params in spec['bpf_attach']:
        done = attach.execute(params, check, False)
        target = params['cgroup'] or params['map']
        if done['changed']:
            verb = 'would attach' if check else 'attached'
        else:
            verb = 'already attached'
        lines.append('%s: %s %s to %s' % (root, verb, os.path.basename(params['program']), target))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(
        description='Load, pin and attach BPF socket redirection from sockredir boot specs.')
    parser.add_argument('specs', nargs='+', metavar='SPEC',
                        help='a spec file, or a directory whose *.json are specs')
    parser.add_argument('--mount-bpffs', action='store_true',
                        help='only mount bpffs where a spec needs it and none is mounted')
    parser.add_argument('--check', action='store_true', help='change nothing, say what would change')
    args = parser.parse_args(argv)

    try:
        specs = [read_spec(path) for path in spec_files(args.specs)]
    except SpecError as e:
        print('sockredir-apply: %s' % e, file=sys.stderr)
        return 2
    if not specs:
        print('sockredir-apply: no specs in %s, nothing to do' % ', '.join(args.specs))
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
