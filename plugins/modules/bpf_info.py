#!/usr/bin/python
# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r'''
---
module: bpf_info
short_description: Returns information about BPF socket redirection on a host
version_added: 0.1.0
description:
  - Returns information; changes nothing. Reports the kernel features socket redirection needs (probed through libbpf), the pins
    in a bpffs directory with what the kernel says of each (id, name, type, tag, map ids), map entry
    counts, the C(msg_verdict) program of each sockmap, the counters of this collection's programs,
    and the C(sock_ops) programs attached to a cgroup.
author:
  - ebpf.sockredir developers (@ebpf-sockredir)
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - ebpf.sockredir.sockredir
  - ebpf.sockredir.sockredir.info_module
options:
  pin_dir:
    description: A directory on bpffs whose pins to report. Optional.
    type: path
  cgroup:
    description: A cgroup v2 directory whose attached C(sock_ops) programs to report. Optional.
    type: path
  compat:
    description:
      - Also return RV(compat), which socket semantics differ from plain TCP on this kernel for
        redirected sockets (docs/compatibility.md).
      - The checks run once per kernel release, through the programs of O(compat_object) in a
        throwaway network namespace, pin directory and child cgroup (all removed afterwards, in a
        few seconds), and the report is cached in C(/var/cache/ebpf-sockredir/compat-<release>.json)
        (root only). Later runs return the cached report, until the kernel release or the object
        changes or O(compat_refresh) is set.
      - In check mode only a cached report is returned (RV(compat) is null without one); nothing is run.
      - Measuring fails, naming the program ids, while C(sock_ops) programs are attached to the root of
        the cgroup v2 hierarchy (e.g. socket redirection scoped to the whole host), since they would also
        run for the plain TCP control. A report cached before is still returned.
    type: bool
    default: false
  compat_object:
    description:
      - The prebuilt object whose programs the checks run (C(files/bpf/sockredir.bpf.o) of this
        collection, copied to the host; a regular file only root can write).
      - Needed when no report of this kernel release is cached, or with O(compat_refresh). Without
        it, the cached report is returned whatever object it was measured with.
    type: path
  compat_refresh:
    description: Run the checks again even if a report of this kernel release and object is cached.
    type: bool
    default: false
seealso:
  - module: ebpf.sockredir.bpf_program
  - module: ebpf.sockredir.bpf_attach
'''

EXAMPLES = r'''
- name: Put the collection's prebuilt object on the host (files/bpf/sockredir.bpf.o of the collection)
  ansible.builtin.copy:
    src: sockredir.bpf.o
    dest: /usr/local/lib/sockredir.bpf.o
    owner: root
    mode: "0644"

- name: Which socket semantics differ from TCP on this kernel (measured once per kernel release)
  ebpf.sockredir.bpf_info:
    compat: true
    compat_object: /usr/local/lib/sockredir.bpf.o
  register: sockredir_compat

- name: Name the differences
  ansible.builtin.debug:
    msg: "On {{ sockredir_compat.compat.kernel }} redirected sockets differ from TCP in {{ sockredir_compat.compat.differs }}"

- name: Read what is loaded and attached
  ebpf.sockredir.bpf_info:
    pin_dir: /sys/fs/bpf/sockredir
    cgroup: /sys/fs/cgroup
  register: sockredir

- name: Show the redirected bytes
  ansible.builtin.debug:
    msg: "{{ sockredir.counters.redirected_bytes }} bytes skipped the TCP stack"
'''

RETURN = r'''
settings:
  description:
    - The run-time settings of this collection's programs, when O(pin_dir) holds a C(sockredir_cfg) map;
      C(debug) (whether trace_pipe lines are on), C(allow_listed), C(instance) (the id the debug lines show),
      C(small_write_bytes) and C(small_write_streak) (0 is the default; C(effective_*) the values in use),
      C(flags), and the port policy from C(sockredir_ports) as C(allow_ports) and C(deny_ports).
  returned: when pin_dir holds sockredir_cfg
  type: dict
  sample: {"debug": false, "allow_listed": false, "instance": "bd8715c3", "allow_ports": [], "deny_ports": [22],
           "small_write_bytes": 0, "small_write_streak": 0, "effective_small_write_bytes": 4294967295,
           "effective_small_write_streak": 16, "flags": 0}
features:
  description: What the running kernel offers.
  returned: always
  type: dict
  sample: {"kernel": "6.1.0-26-amd64", "btf": true, "bpf_syscall": true, "sock_ops": true,
           "sk_msg": true, "sockhash": true, "netns_cookie_in_sk_msg": true,
           "cgroup2_mount": "/sys/fs/cgroup", "bpffs_mounts": ["/sys/fs/bpf"], "sockredir_ready": true,
           "advisories": [{"cve": "CVE-2024-41048", "status": "may_be_affected", "path": "sockredir",
                           "fixed_in": "6.1.101", "message": "6.1.0-21-amd64 may be affected by ...",
                           "source": "https://www.cve.org/CVERecord?id=CVE-2024-41048"}]}
  contains:
    advisories:
      description:
        - Known sockmap kernel bugs (data loss, crashes) that may apply to the running kernel, from the
          table in C(plugins/module_utils/advisories.py) with the CVE record of each.
        - C(status) is C(affected) for an upstream version below the fix, C(may_be_affected) for a
          distribution or vendor kernel (which can carry a backported fix without a new version) or
          when the fixed stable release is not known. C(path) is C(sockredir) when the bug is on the
          code path this collection's programs use.
      type: list
      elements: dict
exists:
  description: Whether O(pin_dir) exists.
  returned: when pin_dir is given
  type: bool
programs:
  description: Programs pinned in O(pin_dir), by pin name.
  returned: when pin_dir is given
  type: dict
  sample: {"sockredir_ops": {"kind": "prog", "id": 41, "name": "sockredir_ops", "type": "sock_ops",
           "tag": "a04f5eef1a2e5c3b", "map_ids": [12, 13]}}
maps:
  description: Maps pinned in O(pin_dir), with C(entries) for hash-like maps, C(values) for small
    per-CPU u64 arrays (summed over CPUs) and C(msg_verdict) for sockmaps.
  returned: when pin_dir is given
  type: dict
counters:
  description:
    - The counters of this collection's programs, summed over CPUs; one per path decision.
    - C(redirected_msgs)/C(redirected_bytes) went to the peer's queue, C(passed_msgs)/C(passed_bytes)
      went the TCP way from a socket in the map.
    - C(inserted) sockets were admitted into the sockhash (C(insert_full), C(insert_failed) could not be).
    - C(not_admitted_peer) sockets were not admitted because their peer is not a socket of this host
      in the same network namespace under these programs (another host, a socket outside the cgroup);
      C(not_admitted_early_data) because bytes crossed TCP before the connection was established
      (TCP Fast Open).
    - C(demoted_small_writes) directions switched to TCP after a streak of small writes,
      C(demotion_refused) streaks stayed redirected because the socket had received redirected bytes;
      C(tcp_peer_absent) directions switched to TCP because their peer was not (or no longer) in the map;
      C(removed) sockets that send over TCP left the sockhash.
  returned: when O(pin_dir) holds C(sockredir_stats)
  type: dict
  sample: {"redirected_msgs": 1024, "redirected_bytes": 67108864, "passed_msgs": 3,
           "passed_bytes": 120, "inserted": 2, "insert_full": 0, "insert_failed": 0,
           "not_admitted_peer": 5, "not_admitted_early_data": 0, "demoted_small_writes": 1,
           "tcp_peer_absent": 1, "removed": 1, "demotion_refused": 0}
attached:
  description: C(sock_ops) programs attached directly to O(cgroup).
  returned: when cgroup is given
  type: dict
compat:
  description:
    - Socket semantics of redirected sockets compared with plain TCP on this kernel, each check run
      once with both ends redirected and once as plain TCP. Null in check mode without a cached report.
    - C(differs) names the checks whose observations differ. Per check, C(same_as_tcp), what the
      application observed redirected (C(redirected)) and over plain TCP (C(tcp)), C(affects) the
      kinds of applications a difference affects, C(what) the check, and C(counters) the changes of
      the programs' counters during the redirected run (evidence that it went through them).
    - C(from_cache) is true when the report was read from the cache rather than measured now.
  returned: when O(compat) is true
  type: dict
  sample: {"kernel": "6.18.44", "checked_at": "2026-12-01T15:59:08Z", "object_sha256": "012d...",
           "from_cache": true, "differs": ["msg_waitall", "reset_then_send", "so_rcvlowat",
                                           "splice_reader"],
           "checks": {"splice_reader": {"same_as_tcp": false, "redirected": {"bytes_spliced": 0, "of": 4096},
                                        "tcp": {"bytes_spliced": 4096, "of": 4096},
                                        "affects": "proxies and relays that move data with splice() ...",
                                        "what": "A reader moving the data to a pipe with splice() gets it ...",
                                        "counters": {"redirected_bytes": 4096, "redirected_msgs": 1,
                                                     "inserted": 2}}}}
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ebpf.sockredir.plugins.module_utils import compat, facts
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError


def main():
    module = AnsibleModule(
        argument_spec=dict(
            pin_dir=dict(type='path'),
            cgroup=dict(type='path'),
            compat=dict(type='bool', default=False),
            compat_object=dict(type='path'),
            compat_refresh=dict(type='bool', default=False),
        ),
        supports_check_mode=True,
    )
    try:
        result = facts.execute(module.params)
        if module.params['compat']:
            result['compat'] = compat.report(module.params['compat_object'], module.params['compat_refresh'],
                                             module.check_mode)
    except BpfError as e:
        module.fail_json(**e.to_fail_json())
    except OSError as e:
        module.fail_json(msg='bpf_info: %s' % e)
    module.exit_json(**result)


if __name__ == '__main__':
    main()
