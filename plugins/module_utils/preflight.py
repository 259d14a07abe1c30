# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the instance engine checks before it changes anything.

PREFLIGHT lists the checks; each takes the instance (instance.Instance: its
params, features, cgroup and mounts) and returns one line per problem, naming
the option, what was expected and what was found. converge() refuses with all
of them at once. Add a check by appending a function to PREFLIGHT.
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import json
import os
import re
import stat
import subprocess

from ansible_collections.ebpf.sockredir.plugins.module_utils import libbpf, mounts, pins, policy
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError

MIN_KERNEL = (5, 15)  # bpf_get_netns_cookie() in sock_ops and sk_msg (the sockhash key)
MAX_MAP_SIZE = 134217728  # largest sockhash the kernel creates
MAX_PORTS = policy.MAX_PORTS  # entries of the sockredir_ports map
OBJECT_MAP_SIZE = 65535  # SOCKREDIR_MAP_SIZE of the prebuilt object
BOOT_UNIT = '/etc/systemd/system/ebpf-sockredir.service'
BOOT_LIB = '/usr/local/lib/ebpf-sockredir'


def check_kernel(inst):
    if inst.params['state'] != 'present':
        return []
    out = []
    release = os.uname().release
    version = tuple(int(n) for n in re.findall(r'\d+', release)[:2])
    if version < MIN_KERNEL:
        out.append('kernel: %s is older than %d.%d (the programs key sockets by bpf_get_netns_cookie(), '
                   'which sock_ops and sk_msg programs have since 5.15)' % ((release,) + MIN_KERNEL))
    f = inst.features
    if not f['btf']:
        out.append('kernel: /sys/kernel/btf/vmlinux is missing (a kernel built without CONFIG_DEBUG_INFO_BTF)')
    if f['bpf_syscall'] and f['sockhash'] and not f.get('sockmap_prog_query'):
        out.append('kernel: %s has no BPF_PROG_QUERY on a sockmap (Linux 5.19+); the engine asks the kernel '
                   'which program is attached to the sockhash with it, so 5.15-5.18 are not supported' % release)
    for key, what in (('sock_ops', 'sock_ops programs (CONFIG_CGROUP_BPF)'),
                      ('sk_msg', 'sk_msg programs (CONFIG_NET_SOCK_MSG)'),
                      ('sockhash', 'BPF_MAP_TYPE_SOCKHASH (CONFIG_NET_SOCK_MSG)'),
                      ('netns_cookie_in_sk_msg', 'bpf_get_netns_cookie() in sk_msg programs (5.15+)')):
        if not f[key]:
            out.append('kernel: no %s; the kernel refuses to load a probe of it' % what)
    return out


def check_options(inst):
    p, out = inst.params, []
    if p['state'] != 'present':
        return out
    if inst.cgroup == inst.cgroup2_root and not p['whole_host']:
        # redirected sockets differ from TCP in corners (docs/compatibility.md): every program of
        # the host is exposed only when someone chose it
        out.append('cgroup: empty, which is the whole host (%s); name the cgroup of the services to '
                   'accelerate, or set whole_host: true to redirect every TCP connection of the host'
                   % inst.cgroup2_root)
    ports = [x for x in p['allow_ports'] + p['deny_ports'] if not 1 <= x <= 65535]
    if ports:
        out.append('allow_ports/deny_ports: ports must be 1-65535, got %s' % ', '.join(map(str, ports)))
    listed = set(p['allow_ports']) | set(p['deny_ports'])
    if len(listed) > MAX_PORTS:
        out.append('allow_ports/deny_ports: at most %d ports in all (the size of the sockredir_ports map), got %d'
                   % (MAX_PORTS, len(listed)))
    both = sorted(set(p['allow_ports']) & set(p['deny_ports']))
    if both:
        out.append('allow_ports/deny_ports: %s listed in both; a port is either allowed or denied'
                   % ', '.join(map(str, both)))
    for name in ('small_write_bytes', 'small_write_streak'):
        if not 0 <= p[name] <= 0xffffffff:
            out.append('%s: must be 0 (the program\'s default) to 4294967295, got %d' % (name, p[name]))
    if p['loader'] not in ('object', 'bcc'):
        out.append('loader: must be object or bcc, got %r' % p['loader'])
    elif p['loader'] == 'object' and p['map_size'] != OBJECT_MAP_SIZE:
        out.append('map_size: the prebuilt object has a sockhash of %d entries; for %d use loader bcc, which '
                   'compiles the size in' % (OBJECT_MAP_SIZE, p['map_size']))
    if not 1 <= p['map_size'] <= MAX_MAP_SIZE:
        out.append('map_size: must be 1-%d (the largest sockhash the kernel creates), got %d'
                   % (MAX_MAP_SIZE, p['map_size']))
    if p['loader'] == 'bcc' and p['kernel_headers'] != 'auto' and not os.path.isdir(os.path.join(p['kernel_headers'], 'include')):
        out.append('kernel_headers: must be auto or a kernel header tree (a directory with include/), '
                   '%s/include does not exist' % p['kernel_headers'])
    if p['loader'] == 'bcc' and p['sources'] is not None and inst.SOURCE not in p['sources']:
        out.append('sources: must hold %s (the program source), got %s' % (inst.SOURCE, ', '.join(sorted(p['sources']))))
    for name in sorted(p['sources'] or {}):
        if '/' in name or name.startswith('.'):
            out.append('sources: %r must be a plain file name' % name)
    return out


def check_paths(inst):
    out = []
    p = inst.params
    bpffs = p['bpffs_mount']
    others = [fs for mp, fs in mounts.mounts() if mp == bpffs and fs != 'bpf']
    if others:
        out.append('bpffs_mount: %s holds a %s mount, not bpffs; choose another directory'
                   % (bpffs, ', '.join(others)))
    if not p['pin_root'].startswith(bpffs.rstrip('/') + '/'):
        out.append('pin_root: %s must be a directory below bpffs_mount (%s)' % (p['pin_root'], bpffs))
    elif inst.bpffs_mounted:
        out += _refusal(lambda: pins.PinDir(p['pin_root'], 'pin_root').close())
    root = inst.cgroup2_root
    if '..' in inst.cgroup.split('/'):
        pass  # refused while reading the parameters
    elif not (inst.cgroup == root or inst.cgroup.startswith(root.rstrip('/') + '/')):
        out.append('cgroup: %s is not below the cgroup v2 mount %s' % (inst.cgroup, root))
    elif p['state'] == 'present' and inst.cgroup2_mounted and not os.path.isdir(inst.cgroup):
        out.append('cgroup: %s does not exist (create the cgroup, or let systemd create it, before '
                   'attaching to it)' % inst.cgroup)
    if p['state'] == 'present':
        out += _refusal(inst.src.check)
    return out


def check_boot(inst):
    p = inst.params
    if not p['boot'] or p['state'] != 'present':
        return []
    out = []
    if not os.path.isdir(os.path.dirname(BOOT_UNIT)):
        out.append('boot: needs systemd, and this host has no %s' % os.path.dirname(BOOT_UNIT))
    out += _refusal(lambda: require_root_only_code(p['boot_python'], 'boot_python'))
    for path in _chain(os.path.dirname(BOOT_LIB)):
        out += _refusal(lambda: _require_root_only(path, 'boot', why=' (the boot unit runs code from %s)' % BOOT_LIB))
    return out


def check_libbpf(inst):
    """libbpf.so.1 with every function the engine calls (0.x, e.g. Ubuntu 22.04's 0.5, has another soname)."""
    if inst.params['state'] != 'present':
        return []
    try:
        missing = libbpf.missing_functions()
    except BpfError as e:
        return ['libbpf: %s' % e.msg]
    if missing:
        return ['libbpf: %s (%s) lacks %s, which the engine calls; install libbpf 1.0 or later'
                % (libbpf.LIBBPF, libbpf.loaded_version(), ', '.join(missing))]
    return []


PREFLIGHT = [check_options, check_paths, check_libbpf, check_kernel, check_boot]


def _refusal(check):
    try:
        check()
    except BpfError as e:
        return [e.msg]
    return []


def require_root_only_code(path, param):
    """path is an interpreter that only root can change, with every directory it imports from.

    Root runs it at every boot: a venv or a directory a user can write would
    make that user's code root's. Each directory from / down, the file, and (once
    those pass) each entry of the interpreter's own sys.path are checked.
    """
    if not os.path.isabs(path):
        raise BpfError('%s: must be an absolute path, got %r' % (param, path), param=param)
    for candidate in _chain(path):
        _require_root_only(candidate, param)
    # the boot command runs this too, without an AnsibleModule (no run_command there)
    proc = subprocess.run([path, '-I', '-c', 'import sys, json; print(json.dumps(sys.path))'],  # pylint: disable=ansible-bad-function
                          capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise BpfError('%s: %s does not run (%s)' % (param, path, proc.stderr.strip()[-300:]), param=param)
    for entry in json.loads(proc.stdout):
        if entry and os.path.exists(entry):
            for candidate in _chain(entry):
                _require_root_only(candidate, param, why=' (on the sys.path of %s)' % path)


def _chain(path):
    """Every path whose owner and mode matter for path: its prefixes, and those of symlink targets."""
    out, seen = [], set()
    todo = [os.path.normpath(path)]
    while todo:
        current = todo.pop()
        parts = current.split('/')
        for i in range(1, len(parts) + 1):
            prefix = '/'.join(parts[:i]) or '/'
            if prefix in seen:
                continue
            seen.add(prefix)
            out.append(prefix)
            if os.path.islink(prefix):
                target = os.path.join(os.path.dirname(prefix), os.readlink(prefix))
                todo.append(os.path.normpath(os.path.join(target, *parts[i:])))
                break
    return out


def _require_root_only(path, param, why=''):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BpfError('%s: %s does not exist%s' % (param, path, why), param=param)
    if stat.S_ISLNK(st.st_mode):
        problem = None if st.st_uid == 0 else 'is a symbolic link owned by uid %d' % st.st_uid
    elif st.st_uid != 0:
        problem = 'is owned by uid %d' % st.st_uid
    elif st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and path == '/tmp'):
        problem = 'is writable by group or others (mode %o)' % stat.S_IMODE(st.st_mode)
    else:
        problem = None
    if problem:
        raise BpfError('%s: %s %s%s: root would run code a non-root user can change at every boot. '
                       'Use an interpreter only root can write, e.g. /usr/bin/python3.'
                       % (param, path, problem, why), param=param)
