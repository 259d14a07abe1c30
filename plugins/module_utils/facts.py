# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Read-only facts for bpf_info: kernel features, pins, attachments, counters."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import os

from ansible_collections.ebpf.sockredir.plugins.module_utils import advisories, libbpf, mounts, pins
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError

# Index -> name of the counters in the sockredir_stats per-CPU array. This list
# and the enum in files/bpf/sockredir.h are one contract: change both together.
COUNTERS = ('redirected_msgs', 'redirected_bytes', 'passed_msgs', 'passed_bytes',
            'inserted', 'insert_full', 'insert_failed',
            'not_admitted_peer', 'not_admitted_early_data', 'demoted_small_writes',
            'tcp_peer_absent', 'removed', 'demotion_refused', 'not_admitted_policy')
STATS_MAP = 'sockredir_stats'


def features():
    """What the running kernel offers for sockops redirection, probed through libbpf."""
    out = dict(kernel=os.uname().release,
               btf=os.path.exists('/sys/kernel/btf/vmlinux'),
               cgroup2_mount=mounts.cgroup2_mount(),
               bpffs_mounts=mounts.mount_points('bpf'))
    try:
        out.update(
            bpf_syscall=True,
            sock_ops=libbpf.probe_prog_type(libbpf.PROG_TYPE_SOCK_OPS),  # needs CONFIG_CGROUP_BPF
            sk_msg=libbpf.probe_prog_type(libbpf.PROG_TYPE_SK_MSG),      # needs CONFIG_NET_SOCK_MSG
            sockhash=libbpf.probe_map_type(libbpf.MAP_TYPE_SOCKHASH),
            netns_cookie_in_sk_msg=libbpf.probe_helper(libbpf.PROG_TYPE_SK_MSG,
                                                       libbpf.FUNC_GET_NETNS_COOKIE),
            sockmap_prog_query=libbpf.probe_sockmap_query(),  # 5.19+
        )
    except BpfError:
        out.update(bpf_syscall=False, sock_ops=False, sk_msg=False, sockhash=False,
                   netns_cookie_in_sk_msg=False, sockmap_prog_query=False)
    # libbpf counts a helper probe whose program fails to load for another
    # reason as supported: without sk_msg programs there is no helper to have
    out['netns_cookie_in_sk_msg'] = out['sk_msg'] and out['netns_cookie_in_sk_msg']
    out['advisories'] = kernel_advisories(out['kernel'])
    out['sockredir_ready'] = all(out[k] for k in ('btf', 'sock_ops', 'sk_msg', 'sockhash',
                                                  'netns_cookie_in_sk_msg', 'sockmap_prog_query')) \
        and bool(out['cgroup2_mount'])
    return out


def kernel_advisories(release):
    """Known sockmap bugs that may apply to this kernel (see advisories.py)."""
    version_text = ''
    for path in ('/proc/version', '/proc/version_signature'):  # Debian / Ubuntu name the upstream level
        try:
            with open(path) as f:
                version_text += f.read()
        except OSError:
            pass
    try:
        return advisories.advisories_for(release, version_text)
    except ValueError as e:
        return [dict(status='unknown', message=str(e))]


def map_details(path, info):
    """Add the entry count (hash-like maps) or per-index sums (per-CPU arrays)."""
    out = dict(info)
    with libbpf.Fd(libbpf.obj_get(path)) as fd:
        if info['type'] in ('sockhash', 'hash'):
            out['entries'] = len(libbpf.map_keys(fd, info['key_size']))
        if info['type'] in ('sockhash', 'sockmap'):
            out['msg_verdict'] = map_attachment(fd)
        elif info['type'] == 'percpu_array' and info['value_size'] == 8 and info['max_entries'] <= 64:
            out['values'] = [libbpf.percpu_u64_sum(fd, i) for i in range(info['max_entries'])]
    return out


def counters(stats_map_info):
    values = stats_map_info.get('values') or []
    return {name: values[i] for i, name in enumerate(COUNTERS) if i < len(values)}


def pin_dir_facts(pin_dir):
    """Pins in pin_dir with kernel info; maps with contents; counters if ours are there."""
    pin_dir = mounts.require_bpffs(pin_dir, 'pin_dir')
    found = pins.list_dir(pin_dir)
    programs, maps = {}, {}
    for name, info in found.items():
        if info is None or name.startswith('.'):
            continue
        if info['kind'] == 'prog':
            programs[name] = info
        elif info['kind'] == 'map':
            maps[name] = map_details(os.path.join(pin_dir, name), info)
    out = dict(pin_dir=pin_dir, exists=os.path.isdir(pin_dir), programs=programs, maps=maps)
    if STATS_MAP in maps:
        out['counters'] = counters(maps[STATS_MAP])
    return out


def cgroup_attachments(cgroup):
    """sock_ops programs attached directly to a cgroup v2 directory."""
    cgroup = mounts.require_cgroup2_dir(cgroup, 'cgroup')
    with libbpf.Fd(os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)) as fd:
        flags, out = libbpf.attached_programs(fd, libbpf.ATTACH_CGROUP_SOCK_OPS)
    return dict(cgroup=cgroup, sock_ops=out,
                allow_multi=bool(flags & libbpf.F_ALLOW_MULTI) if out else None)


def map_attachment(map_fd):
    """The msg_verdict program attached to a sockmap/sockhash fd, or None."""
    try:
        progs = libbpf.attached_programs(map_fd, libbpf.ATTACH_SK_MSG_VERDICT)[1]
    except BpfError:
        return None  # kernels before 5.19 cannot query a map
    return progs[0] if progs else None


def execute(params):
    out = dict(changed=False, features=features())
    if params.get('pin_dir'):
        out.update(pin_dir_facts(params['pin_dir']))
        if out.get('exists'):
            from ansible_collections.ebpf.sockredir.plugins.module_utils import policy
            settings = policy.read_path(params['pin_dir'])
            if settings is not None:
                out['settings'] = settings
    if params.get('cgroup'):
        out['attached'] = cgroup_attachments(params['cgroup'])
    return out
