#!/usr/bin/python
# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r'''
---
module: bpf_attach
short_description: Attach a pinned sock_ops program to a cgroup v2, or a pinned sk_msg program to a sockmap
version_added: 0.1.0
description:
  - Attaches the program pinned at O(program) where its type belongs. A C(sock_ops) program attaches
    to a cgroup v2 directory (C(BPF_CGROUP_SOCK_OPS)); an C(sk_msg) program attaches to a pinned
    sockhash or sockmap (C(BPF_SK_MSG_VERDICT)).
  - Idempotent through the kernel's own answer (C(BPF_PROG_QUERY) on the cgroup or the map), not a
    state file; a program detached by hand (for example C(bpftool cgroup detach)) is noticed and
    attached again.
  - On a cgroup the module attaches with C(BPF_F_ALLOW_MULTI), so C(sock_ops) programs of other tools
    on the same cgroup keep running and are never detached. When an older version of the pinned
    program is attached (same name and type, sharing a map with it, as M(ebpf.sockredir.bpf_program)
    leaves it after a reload), it is swapped for the new one in one step with C(BPF_F_REPLACE), so
    connections are never without the program.
  - A sockmap holds one C(sk_msg) program; attaching replaces the one there in one step.
  - If another tool attached a C(sock_ops) program to the cgroup without C(BPF_F_ALLOW_MULTI), the
    kernel refuses a second one; the module fails with a message saying so and evicts nothing.
  - With O(state=absent), detaches the pinned program and any older version of it. If the pin is
    gone, only the program id that M(ebpf.sockredir.bpf_program) recorded for that pin (in
    C(/run/ebpf-sockredir/)) is detached; a program is never detached on a name match alone, since it
    could belong to another instance. A missing cgroup or map means nothing is attached there.
author:
  - ebpf.sockredir developers (@ebpf-sockredir)
requirements:
  - Linux with cgroup-bpf and sockmap; querying the program of a sockmap needs Linux 5.19 or later.
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ebpf.sockredir.sockredir
  - ebpf.sockredir.sockredir.actions
options:
  program:
    description: Pin path of the program (in bpffs), as created by M(ebpf.sockredir.bpf_program).
    type: path
    required: true
  cgroup:
    description:
      - cgroup v2 directory to attach a C(sock_ops) program to, for example C(/sys/fs/cgroup) or
        C(/sys/fs/cgroup/unified/myservice). Programs see the connections of every process in it and
        below it.
      - Exactly one of O(cgroup) and O(map).
    type: path
  map:
    description:
      - Pin path of a sockhash or sockmap to attach an C(sk_msg) program to.
      - Exactly one of O(cgroup) and O(map).
    type: path
  state:
    description: V(present) attaches; V(absent) detaches.
    type: str
    choices: [present, absent]
    default: present
seealso:
  - module: ebpf.sockredir.bpf_program
  - module: ebpf.sockredir.bpf_info
'''

EXAMPLES = r'''
- name: Attach the sock_ops program to a service's cgroup
  ebpf.sockredir.bpf_attach:
    program: /sys/fs/bpf/sockredir/sockredir_ops
    cgroup: /sys/fs/cgroup/system.slice/myservice.service

- name: Attach the sk_msg program to the sockhash
  ebpf.sockredir.bpf_attach:
    program: /sys/fs/bpf/sockredir/sockredir_msg
    map: /sys/fs/bpf/sockredir/sockredir_hash

- name: Detach
  ebpf.sockredir.bpf_attach:
    program: /sys/fs/bpf/sockredir/sockredir_ops
    cgroup: /sys/fs/cgroup/system.slice/myservice.service
    state: absent
'''

RETURN = r'''
target:
  description: The normalized cgroup directory or map pin.
  returned: always
  type: str
attach_type:
  description: Program type that decided the attach type (C(sock_ops) or C(sk_msg)).
  returned: always
  type: str
actions:
  description: What was (or in check mode would be) done; C(attach), C(replace) (atomic swap of the
    listed old program id) or C(detach).
  returned: always
  type: list
  elements: dict
  sample: [{"action": "replace", "id": 41}]
attached:
  description: Programs attached to the target for this attach type afterwards, as the kernel reports them.
  returned: always
  type: list
  elements: dict
  sample: [{"id": 57, "name": "sockredir_ops", "tag": "a04f5eef1a2e5c3b", "type": "sock_ops"}]
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ebpf.sockredir.plugins.module_utils import attach
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError


def main():
    module = AnsibleModule(
        argument_spec=dict(
            program=dict(type='path', required=True),
            cgroup=dict(type='path'),
            map=dict(type='path'),
            state=dict(type='str', default='present', choices=['present', 'absent']),
        ),
        required_one_of=[('cgroup', 'map')],
        mutually_exclusive=[('cgroup', 'map')],
        supports_check_mode=True,
    )
    try:
        result = attach.execute(module.params, module.check_mode, module._diff)
    except BpfError as e:
        module.fail_json(**e.to_fail_json())
    except OSError as e:
        module.fail_json(msg='bpf_attach: %s' % e)
    module.exit_json(**result)


if __name__ == '__main__':
    main()
