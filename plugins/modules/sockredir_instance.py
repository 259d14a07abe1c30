#!/usr/bin/python
# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r'''
---
module: sockredir_instance
short_description: Turn socket redirection on or off for one instance (pin root and cgroup), in one step
version_added: 0.2.0
description:
  - The whole converge of one instance of this collection's programs, the same engine call the
    C(ebpf.sockredir.sockredir) role and the boot unit make. It writes the prebuilt BPF object
    (O(loader=object), the default) or the BPF sources (O(loader=bcc)) into O(src_dir), loads (or
    compiles and loads) and pins the programs below O(pin_root) when the object, the source, an option or
    a pin changed, writes the run-time settings (port policy, debug switch, small-write thresholds) into
    the pinned maps C(sockredir_ports) and C(sockredir_cfg),
    attaches the C(sk_msg) program to the sockhash, then the C(sock_ops) program to O(cgroup), then
    detaches it from the cgroup of an earlier run. The C(sk_msg) program goes first, so every socket the
    C(sock_ops) program inserts is redirected.
  - One record per pin root in C(/var/lib/ebpf-sockredir/instances/) holds what a later run (or
    O(state=absent)) must undo; it is written before each step, and an earlier cgroup leaves it only
    once its detach succeeded. With O(boot=true) the same record is what the boot unit applies.
  - A run holds an exclusive lock (C(/run/ebpf-sockredir.lock)) from start to end; a second run on the
    host waits up to O(lock_timeout) seconds, then fails saying so.
  - Every check comes before the first change. Problems the host cannot fix by itself (kernel features,
    bad options, unsafe paths) fail the task with one line per problem in RV(refusals). Missing packages
    or mounts change nothing and are returned in RV(needs), for the role to provide before it calls again.
  - Directories root acts in are opened one component at a time without following symbolic links; a
    pin root (or any directory above it on bpffs) that is a symbolic link, not owned by root, or writable
    by group or others is refused and nothing is loaded from it.
  - O(state=absent) detaches, unpins, removes only the source files this module wrote (never a directory
    with files of others), and the record.
author:
  - ebpf.sockredir developers (@ebpf-sockredir)
requirements:
  - Linux 5.15 or later with BPF, cgroup-bpf, sockmap and BTF.
  - With O(loader=bcc) only, bcc Python bindings (Debian/Ubuntu C(python3-bpfcc)) and kernel headers to
    compile; the module re-runs itself under C(/usr/bin/python3) when that one has them.
  - libbpf 1.x (C(libbpf.so.1)).
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  platform:
    platforms: linux
options:
  state:
    description: V(present) turns redirection on for O(cgroup); V(absent) turns it off and removes what this module made.
    type: str
    choices: [present, absent]
    default: present
  pin_root:
    description: Directory below O(bpffs_mount) for this instance's programs and maps; one per instance.
    type: path
    default: /sys/fs/bpf/sockredir
  cgroup:
    description:
      - cgroup v2 directory to attach to, absolute or relative to the cgroup v2 mount; V("") is the cgroup v2
        root (every process of the host), which needs O(whole_host=true). Must exist.
    type: str
    default: ''
  whole_host:
    description:
      - With O(cgroup=""), redirect every TCP connection of the host. Redirected sockets differ from TCP in
        corners (C(bpf_info) C(compat)), so the whole host is never the default; without this, an empty
        O(cgroup) is refused with O(state=present).
    type: bool
    default: false
  bpffs_mount:
    description: Where bpffs is mounted (or is to be mounted, see RV(needs)).
    type: path
    default: /sys/fs/bpf
  bpffs_persist:
    description: Whether bpffs should also be in C(/etc/fstab); when it is not, RV(needs) asks for it.
    type: bool
    default: false
  cgroup2_mount:
    description:
      - Where a cgroup v2 hierarchy should be mounted when the host has none. V("") picks
        C(/sys/fs/cgroup/unified) when C(/sys/fs/cgroup) is a mount (a hybrid layout), else C(/sys/fs/cgroup).
    type: path
    default: ''
  src_dir:
    description:
      - Directory the BPF sources are written to and compiled from. Created (mode 0755) if missing. Files of
        others in it are left alone; a file of the same name as one of O(sources) that this module did not
        write is refused.
    type: path
    default: /usr/local/share/ebpf-sockredir/bpf
  loader:
    description:
      - V(object) loads the prebuilt C(sockredir.bpf.o) (given in O(object_b64)) through libbpf; the host needs
        no compiler, kernel headers or bcc. V(bcc) compiles C(sockredir.bpf.c) from O(sources) with bcc.
      - Changing it reloads the programs; the maps (and their sockets) are kept when their shape is the same.
    type: str
    choices: [object, bcc]
    default: object
  sources:
    description:
      - With O(loader=bcc), the BPF sources, file name to content (the role passes the collection's
        C(files/bpf/*.c) and C(*.h)). Must hold C(sockredir.bpf.c). Omitted, the files already in O(src_dir)
        are used.
    type: dict
  object_b64:
    description:
      - With O(loader=object), the prebuilt BPF object as base64 (the role reads the collection's
        C(files/bpf/sockredir.bpf.o) with the C(ebpf.sockredir.b64file) lookup); written to
        O(src_dir)/C(sockredir.bpf.o), root-owned, mode 0644, and loaded from exactly these bytes. Omitted,
        the object already in O(src_dir) is used.
    type: str
  map_size:
    description: Max sockets in the sockhash (two per connection).
    type: int
    default: 65535
  allow_ports:
    description:
      - Redirect only connections with one of these local or remote ports; V([]) is all. Written into the
        pinned C(sockredir_ports) map at run time (a change reloads nothing and keeps established
        connections). At most 1024 ports with O(deny_ports).
    type: list
    elements: int
    default: []
  deny_ports:
    description:
      - Never redirect connections touching these ports; a port may not be in both lists. Written into
        C(sockredir_ports) like O(allow_ports).
    type: list
    elements: int
    default: []
  debug:
    description:
      - One C(trace_pipe) line per admission and per path decision (C(sockredir <instance> <port>><port>
        ...)); read them with C(cat /sys/kernel/tracing/trace_pipe). A flag in C(sockredir_cfg), turning it
        on or off reloads nothing.
    type: bool
    default: false
  small_write_bytes:
    description: A send smaller than this counts towards a one-way streak; V(0) is the program's default (4294967295, so every send counts).
    type: int
    default: 0
  small_write_streak:
    description: That many small sends in a row, nothing received, and the connection goes back to TCP; V(0) is the program's default (16).
    type: int
    default: 0
  kernel_headers:
    description: V(auto), V(kheaders) or a kernel header directory, as for M(ebpf.sockredir.bpf_program).
    type: str
    default: auto
  headers_cache:
    description: Where merged generic kernel headers are kept (see M(ebpf.sockredir.bpf_program)).
    type: path
    default: /var/cache/ebpf-sockredir/kernel-headers
  recreate_maps:
    description:
      - When a pinned map differs from the source's declaration in type, key size, value size, max entries
        or flags. V(false) fails naming the map and both shapes and changes nothing; V(true) replaces it
        (its sockets go back to plain TCP).
    type: bool
    default: false
  boot:
    description:
      - Whether the boot unit applies this instance again at every boot (the record says so). RV(boot) tells
        the caller whether any instance of the host still wants the unit.
    type: bool
    default: false
  boot_python:
    description:
      - Interpreter the boot unit runs as root. Refused, naming the path, when it, a directory above it, or a
        directory on its C(sys.path) is owned by a user other than root or writable by group or others (a
        user's venv would make that user's code root's at every boot).
    type: path
    default: /usr/bin/python3
  mounted:
    description:
      - Mounts the caller just made for this instance (from RV(needs)), recorded so that O(state=absent)
        undoes them once no other instance uses them. Each is C(path), C(fstype), and the booleans
        C(mounted), C(fstab), C(created_dir).
    type: list
    elements: dict
    default: []
  lock_timeout:
    description: Seconds to wait for another run on the host to finish.
    type: int
    default: 600
seealso:
  - module: ebpf.sockredir.bpf_program
  - module: ebpf.sockredir.bpf_attach
  - module: ebpf.sockredir.bpf_info
'''

EXAMPLES = r'''
- name: Redirect same-host TCP for one service
  ebpf.sockredir.sockredir_instance:
    pin_root: /sys/fs/bpf/myapp
    cgroup: system.slice/myapp.service
    object_b64: "{{ lookup('ebpf.sockredir.b64file', 'bpf/sockredir.bpf.o') }}"
    deny_ports: [22]
  register: myapp

- name: Same, compiled on the host by bcc
  ebpf.sockredir.sockredir_instance:
    pin_root: /sys/fs/bpf/myapp
    cgroup: system.slice/myapp.service
    loader: bcc
    sources:
      sockredir.bpf.c: "{{ lookup('ansible.builtin.file', 'bpf/sockredir.bpf.c') }}"
      sockredir.h: "{{ lookup('ansible.builtin.file', 'bpf/sockredir.h') }}"
      sockredir_bcc.h: "{{ lookup('ansible.builtin.file', 'bpf/sockredir_bcc.h') }}"

- name: Turn it off again
  ebpf.sockredir.sockredir_instance:
    pin_root: /sys/fs/bpf/myapp
    state: absent
'''

RETURN = r'''
engine_seconds:
  description:
    - Seconds the engine call took on the host (checks, lock, load, attach, record, facts), without
      the Python start-up and module transfer around it. C(benchmarks/fleet_rollout.py) reports it.
  returned: success
  type: float
  sample: 0.142
loader:
  description: Which path the host takes (the object loader or bcc) and what that path needs.
  returned: always
  type: str
  sample: "loader: object (the prebuilt sockredir.bpf.o through libbpf; no compiler, headers or bcc needed)"
actions:
  description: What was done (or, in check mode, would be done), in order.
  returned: always
  type: list
  elements: str
  sample: ["load and pin (no record of a load into /sys/fs/bpf/myapp)", "attach sockredir_msg on /sys/fs/bpf/myapp/sockredir_hash"]
needs:
  description:
    - What the host lacks before anything can be done; nothing was changed when it is not empty.
    - C(packages) lists C(libbpf) (object loader), C(bcc) and C(kernel-headers) (bcc loader), C(bpftool); C(mounts) lists dicts with C(path), C(src),
      C(fstype), C(opts) and C(state) as M(ansible.posix.mount) takes them.
  returned: always
  type: dict
  sample: {"packages": [], "mounts": [{"path": "/sys/fs/bpf", "src": "bpf", "fstype": "bpf", "opts": "nosuid,nodev,noexec,mode=0700", "state": "ephemeral"}]}
refusals:
  description: One line per reason the instance cannot run on this host (the task failed).
  returned: failure
  type: list
  elements: str
reload_reasons:
  description: Why the programs were (or would be) loaded again; empty when nothing was loaded.
  returned: state=present
  type: list
  elements: str
digest:
  description: sha256 over everything that shapes the bytecode.
  returned: state=present
  type: str
kernel_headers:
  description: Which kernel headers BCC used (or would use).
  returned: state=present
  type: dict
record:
  description: Path of this instance's record.
  returned: always
  type: str
unmount:
  description: Mounts the caller made for this instance that nothing needs any more; the caller unmounts them.
  returned: state=absent
  type: list
  elements: dict
boot:
  description: C(wanted) (whether any instance of the host wants the boot unit), C(installed), C(unit), C(lib), C(python).
  returned: always
  type: dict
facts:
  description: The instance as the kernel reports it afterwards, the role's C(sockredir_facts).
  returned: always
  type: dict
'''

import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ebpf.sockredir.plugins.module_utils import bcc_import, instance
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError


def main():
    spec = dict(
        state=dict(type='str', default='present', choices=['present', 'absent']),
        pin_root=dict(type='path', default='/sys/fs/bpf/sockredir'),
        cgroup=dict(type='str', default=''),
        whole_host=dict(type='bool', default=False),
        bpffs_mount=dict(type='path', default='/sys/fs/bpf'),
        bpffs_persist=dict(type='bool', default=False),
        cgroup2_mount=dict(type='path', default=''),
        src_dir=dict(type='path', default='/usr/local/share/ebpf-sockredir/bpf'),
        loader=dict(type='str', default='object', choices=['object', 'bcc']),
        sources=dict(type='dict'),
        object_b64=dict(type='str'),
        map_size=dict(type='int', default=65535),
        allow_ports=dict(type='list', elements='int', default=[]),
        deny_ports=dict(type='list', elements='int', default=[]),
        debug=dict(type='bool', default=False),
        small_write_bytes=dict(type='int', default=0),
        small_write_streak=dict(type='int', default=0),
        kernel_headers=dict(type='str', default='auto'),
        headers_cache=dict(type='path', default='/var/cache/ebpf-sockredir/kernel-headers'),
        recreate_maps=dict(type='bool', default=False),
        boot=dict(type='bool', default=False),
        boot_python=dict(type='path', default='/usr/bin/python3'),
        mounted=dict(type='list', elements='dict', default=[]),
        lock_timeout=dict(type='int', default=600),
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    if module.params['loader'] == 'bcc':
        bcc_import.prefer_bcc()
    started = time.monotonic()
    try:
        result = instance.converge(module.params, module.check_mode)
    except BpfError as e:
        module.fail_json(**e.to_fail_json())
    except OSError as e:
        module.fail_json(msg='sockredir_instance: %s' % e)
    result['engine_seconds'] = round(time.monotonic() - started, 3)
    for warning in result.pop('warnings', []):
        module.warn(warning)
    if module._diff:
        result['diff'] = dict(before='', after='\n'.join(result['actions']) + '\n' if result['actions'] else '')
    module.exit_json(**result)


if __name__ == '__main__':
    main()
