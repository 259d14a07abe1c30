# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Documentation the three modules share."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type


class ModuleDocFragment(object):

    # every module: what the managed host needs, and where the modules run
    DOCUMENTATION = r'''
requirements:
  - Linux with cgroup v2 and a mounted bpffs; run as root (loading and attaching BPF programs needs
    C(CAP_BPF) and C(CAP_NET_ADMIN)).
  - libbpf (C(libbpf1), a dependency of C(python3-bpfcc)).
attributes:
  platform:
    platforms: linux
'''

    # bpf_program and bpf_attach: they change the kernel's state
    ACTIONS = r'''
attributes:
  check_mode:
    support: full
    details: Reads the kernel's state, reports what would change, and changes nothing.
  diff_mode:
    support: full
    details: Before and after, as the kernel reports them.
'''

    # bpf_info: only reads
    INFO_MODULE = r'''
attributes:
  check_mode:
    support: full
    details: This action does not modify state.
  diff_mode:
    support: N/A
    details: This action does not modify state.
'''
