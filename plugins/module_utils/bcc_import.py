# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Find the Python that has bcc, as ansible.posix's seboolean does for selinux.

bcc's Python bindings come from the distribution (python3-bpfcc) and live in
the system Python only; a module started under another interpreter re-runs
itself there.
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import traceback

from ansible.module_utils.basic import missing_required_lib
from ansible.module_utils.common.respawn import has_respawned, probe_interpreters_for_module, respawn_module

from ansible_collections.ebpf.sockredir.plugins.module_utils import loader

SYSTEM_PYTHONS = ['/usr/bin/python3', '/usr/libexec/platform-python', '/usr/bin/python']


def require_bcc(module):
    if loader.import_bcc() is None:
        return
    if not has_respawned():
        interpreter = probe_interpreters_for_module(SYSTEM_PYTHONS, 'bcc')
        if interpreter:
            respawn_module(interpreter)  # does not return
    module.fail_json(
        msg=missing_required_lib('bcc (Debian/Ubuntu package python3-bpfcc; the PyPI package named '
                                 '"bcc" is unrelated)'),
        exception=''.join(traceback.format_exception_only(type(loader.BCC_IMPORT_ERROR),
                                                          loader.BCC_IMPORT_ERROR)))


def prefer_bcc():
    """Re-run under a system Python that has bcc, if this one lacks it; else carry on
    (the caller reports bcc as a missing package)."""
    if has_respawned() or loader.import_bcc() is None:
        return
    interpreter = probe_interpreters_for_module(SYSTEM_PYTHONS, 'bcc')
    if interpreter:
        respawn_module(interpreter)  # does not return
