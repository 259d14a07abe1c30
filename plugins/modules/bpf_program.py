#!/usr/bin/python
# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r'''
---
module: bpf_program
short_description: Load BPF programs (a C source compiled with BCC, or a prebuilt object) and pin them in bpffs
version_added: 0.1.0
description:
  - Compiles a restricted-C source with BCC (the iovisor bindings, Debian package C(python3-bpfcc)),
    loads the named programs into the kernel and pins each at O(pin_dir)/<name>.
  - Or, with O(object), loads a prebuilt BPF ELF object (C(clang -target bpf), libbpf-style BTF map
    definitions and C(SEC) names, for example built by C(scripts/build-bpf.sh)) through libbpf; no
    compiler, kernel headers or bcc are needed on the managed host, only C(libbpf1). Every map the
    object defines is pinned at O(pin_dir)/<map name>; a pinned map of the same shape (type, key and
    value size, max_entries, flags) is reused, so sockets already in a sockhash stay there. The same
    idempotence, drift repair, check mode and diff apply; the digest covers the object's bytes, the
    program and map lists and the libbpf version.
  - Maps are pinned by the source itself with C(BPF_TABLE_PINNED(..., BPF_PIN_DIR "/<name>")); the
    module defines C(BPF_PIN_DIR) as O(pin_dir). A re-load reuses pinned maps, so sockets already in
    a sockhash stay there across upgrades of the programs.
  - Idempotent. A digest of the source, the C(*.h) files next to it, the defines, the program list,
    the bcc version and the kernel headers is recorded in C(/run/ebpf-sockredir/) with the kernel ids
    and tags of the programs it produced. When the digest matches and the kernel still reports those
    programs at the pins, using the pinned maps, nothing is compiled and nothing changes.
  - When the source or an option changed, or a pin was removed or replaced by hand, the new programs
    are loaded, pinned beside the old ones and renamed over them. Programs already attached keep
    running until M(ebpf.sockredir.bpf_attach) swaps them atomically, so traffic is never without a
    program.
  - On any failure, pins created by the failed run are removed again; pins that existed are kept.
  - With O(state=absent), unpins the programs and maps and removes the record. Programs that are
    still attached stay loaded (the kernel keeps them); detach them first with
    M(ebpf.sockredir.bpf_attach).
  - Connections established while the programs ran stay in the sockhash and keep being redirected
    until they close, even after detach and unpin; the kernel keeps the map and the C(sk_msg) program
    alive for them. New connections take the normal TCP path.
author:
  - ebpf.sockredir developers (@ebpf-sockredir)
requirements:
  - Linux with BPF, cgroup-bpf and sockmap (C(CONFIG_BPF_SYSCALL), C(CONFIG_CGROUP_BPF), C(CONFIG_NET_SOCK_MSG)).
  - With O(src) only, bcc Python bindings (Debian/Ubuntu C(python3-bpfcc); the PyPI package named C(bcc)
    is unrelated). If the interpreter running the module lacks them, the module re-runs itself under
    C(/usr/bin/python3).
  - With O(src) only, kernel headers for BCC, see O(kernel_headers).
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ebpf.sockredir.sockredir
  - ebpf.sockredir.sockredir.actions
options:
  state:
    description: V(present) loads and pins; V(absent) unpins.
    type: str
    choices: [present, absent]
    default: present
  pin_dir:
    description:
      - Directory on a mounted bpffs that holds this set of pins. Created with mode 0700 if missing.
    type: path
    required: true
  src:
    description:
      - Path of the BPF C source on the managed host, compiled with BCC.
      - With O(state=present) one of O(src) and O(object) is required; they are mutually exclusive.
    type: path
  object:
    description:
      - Path of a prebuilt BPF ELF object on the managed host (C(*.bpf.o)), loaded through libbpf.
      - Its programs' types come from their C(SEC) names (C(sockops), C(sk_msg)).
      - O(defines), O(include_dirs) and O(kernel_headers) do not apply (the object is already compiled)
        and must not be set; O(headers_cache) is ignored.
    type: path
    version_added: 0.2.0
  programs:
    description:
      - Functions of O(src) (or programs of O(object)) to load, each pinned at O(pin_dir)/<name>.
      - Required with O(src) and O(state=present). With O(object) defaults to every program of the
        object; a list must name every program of the object, each with the type its C(SEC) name
        gives. With O(state=absent) defaults to the recorded ones.
    type: list
    elements: dict
    suboptions:
      name:
        description: Function name; also the kernel program name, so at most 15 characters.
        type: str
        required: true
      type:
        description: Program type.
        type: str
        required: true
        choices: [sock_ops, sk_msg]
  maps:
    description:
      - Names of the maps the source pins in O(pin_dir). Checked after compiling (each must be there)
        and unpinned with O(state=absent).
      - With O(object), every map the object defines is pinned anyway; names listed here must be among
        them.
    type: list
    elements: str
    default: []
  defines:
    description:
      - Preprocessor definitions, passed as C(-DNAME=VALUE). Give string values with their quotes.
      - C(BPF_PIN_DIR) is always set to O(pin_dir) by the module.
    type: dict
    default: {}
  include_dirs:
    description:
      - Include directories (C(-I)); their C(*.h) files are part of the digest.
      - Defaults to the directory of O(src).
    type: list
    elements: path
  kernel_headers:
    description:
      - Kernel headers BCC compiles against.
      - V(auto) uses C(/lib/modules/$(uname -r\)/build) when it exists (a distribution kernel with
        C(linux-headers-$(uname -r\)) installed). Otherwise it uses Debian's generic headers
        (C(linux-headers-amd64) or another flavour) if installed, merged as symlinks into
        O(headers_cache), which serve programs that only use UAPI structs, like this collection's.
        Last, the kernel's own header archive C(/sys/kernel/kheaders.tar.xz) (C(CONFIG_IKHEADERS);
        the C(kheaders) module is loaded when the archive is missing), unpacked once per kernel
        release into O(headers_cache). Nothing is ever written under C(/lib/modules).
      - V(kheaders) takes the kernel's own header archive even when other headers are installed,
        and fails when the kernel has none.
      - Any other value is a header directory handed to BCC as C(BCC_KERNEL_SOURCE).
      - The result reports which was used in RV(kernel_headers).
    type: str
    default: auto
  headers_cache:
    description: Where the merged generic headers and the unpacked kernel header archive are kept
      (only when no headers for the running kernel are installed, or with O(kernel_headers=kheaders)).
    type: path
    default: /var/cache/ebpf-sockredir/kernel-headers
  recreate_maps:
    description:
      - What to do when a map pinned by an earlier load no longer matches the source's declaration
        (another type or size, for example a changed C(SOCKREDIR_MAP_SIZE)) or the object's
        definition (type, key size, value size, max_entries or flags). A pinned map cannot be
        changed in place.
      - V(false) fails with a message naming the map and both shapes, and changes nothing.
      - V(true) replaces the map by a new one. The programs attached so far keep the old map until
        M(ebpf.sockredir.bpf_attach) swaps them; then the sockets in the old map go back to plain
        TCP, and new connections land in the new map. RV(recreated_maps) lists the maps replaced.
    type: bool
    default: false
notes:
  - Pins are created by root with mode 0600 (bpffs default); the pin directory is mode 0700.
seealso:
  - module: ebpf.sockredir.bpf_attach
  - module: ebpf.sockredir.bpf_info
'''

EXAMPLES = r'''
- name: Load the sockredir programs and pin them
  ebpf.sockredir.bpf_program:
    src: /usr/local/share/ebpf-sockredir/bpf/sockredir.bpf.c
    pin_dir: /sys/fs/bpf/sockredir
    programs:
      - {name: sockredir_ops, type: sock_ops}
      - {name: sockredir_msg, type: sk_msg}
    maps: [sockredir_hash, sockredir_stats]
    defines:
      SOCKREDIR_MAP_SIZE: 65535
  register: loaded

- name: Load a prebuilt object instead (no compiler, headers or bcc on the host)
  ebpf.sockredir.bpf_program:
    object: /usr/local/share/ebpf-sockredir/bpf/sockredir.bpf.o
    pin_dir: /sys/fs/bpf/sockredir
  register: loaded

- name: Unpin everything (detach first with bpf_attach state=absent)
  ebpf.sockredir.bpf_program:
    pin_dir: /sys/fs/bpf/sockredir
    state: absent
'''

RETURN = r'''
pin_dir:
  description: The normalized pin directory.
  returned: always
  type: str
programs:
  description: Pinned programs as the kernel reports them.
  returned: state=present
  type: dict
  sample: {"sockredir_ops": {"id": 41, "tag": "a04f5eef1a2e5c3b", "type": "sock_ops",
           "pin": "/sys/fs/bpf/sockredir/sockredir_ops", "map_ids": [12, 13]}}
maps:
  description: Pinned maps as the kernel reports them.
  returned: state=present
  type: dict
  sample: {"sockredir_hash": {"id": 12, "type": "sockhash", "max_entries": 65535,
           "pin": "/sys/fs/bpf/sockredir/sockredir_hash"}}
object:
  description: The object loaded (with O(object)).
  returned: state=present and O(object) given
  type: str
digest:
  description: sha256 over everything that shapes the bytecode (with O(object), its bytes and the libbpf version).
  returned: state=present
  type: str
reasons:
  description: Why a (re)load was needed; empty when nothing changed.
  returned: state=present
  type: list
  elements: str
  sample: ["source or options changed"]
kernel_headers:
  description: Which kernel headers BCC used (or would use, in check mode).
  returned: state=present and O(src) given
  type: dict
  sample: {"kind": "generic", "path": "/var/cache/ebpf-sockredir/kernel-headers/linux-headers-6.1.0-56-amd64",
           "env": {"BCC_KERNEL_SOURCE": "/var/cache/ebpf-sockredir/kernel-headers/linux-headers-6.1.0-56-amd64"},
           "package_tree": "/usr/src/linux-headers-6.1.0-56-amd64"}
recreated_maps:
  description: Maps replaced because their pinned shape no longer matched the source (O(recreate_maps)).
  returned: when a map was replaced
  type: list
  elements: str
compiler_warnings:
  description: What the compiler printed on a successful compile.
  returned: when not empty
  type: list
  elements: str
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ebpf.sockredir.plugins.module_utils import bcc_import
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type='str', default='present', choices=['present', 'absent']),
            pin_dir=dict(type='path', required=True),
            src=dict(type='path'),
            object=dict(type='path'),
            programs=dict(type='list', elements='dict', options=dict(
                name=dict(type='str', required=True),
                type=dict(type='str', required=True, choices=['sock_ops', 'sk_msg']))),
            maps=dict(type='list', elements='str', default=[]),
            defines=dict(type='dict', default={}),
            include_dirs=dict(type='list', elements='path'),
            kernel_headers=dict(type='str', default='auto'),
            headers_cache=dict(type='path', default='/var/cache/ebpf-sockredir/kernel-headers'),
            recreate_maps=dict(type='bool', default=False),
        ),
        required_if=[('state', 'present', ('src', 'object'), True)],
        mutually_exclusive=[('src', 'object'), ('object', 'include_dirs')],
        supports_check_mode=True,
    )
    params = module.params
    if params['state'] == 'present' and params['src'] and not params['programs']:
        module.fail_json(msg='programs is required with src and state=present', param='programs')
    if params['object'] and (params['defines'] or params['kernel_headers'] != 'auto'):
        module.fail_json(msg='defines and kernel_headers shape a BCC compile (src); object is already '
                         'compiled: build it with other defines instead', param='object')
    if params['state'] == 'present' and params['src']:
        bcc_import.require_bcc(module)
    from ansible_collections.ebpf.sockredir.plugins.module_utils import objloader, program
    engine = objloader if params['object'] else program
    try:
        result = engine.execute(params, module.check_mode, module._diff)
    except BpfError as e:
        module.fail_json(**e.to_fail_json())
    except OSError as e:
        module.fail_json(msg='bpf_program: %s' % e)
    for warning in result.pop('warnings', []):
        module.warn(warning)
    module.exit_json(**result)


if __name__ == '__main__':
    main()
