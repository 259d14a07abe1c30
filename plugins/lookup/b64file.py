# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r'''
name: b64file
author: ebpf.sockredir developers (@ebpf-sockredir)
short_description: Read a binary file on the controller, base64-encoded
description:
  - Returns the contents of each file, read on the controller, as base64 text.
  - M(ansible.builtin.file) lookups decode files as UTF-8 text and fail on a binary such as a BPF ELF
    object; this one carries it into a module argument, which then travels to the managed host with
    the module (locally and over SSH alike), without a separate copy task.
options:
  _terms:
    description: Paths of the files, absolute or relative to the role or playbook C(files/) directory.
    required: true
'''

EXAMPLES = r'''
- name: Hand the prebuilt object to the engine
  ansible.builtin.debug:
    msg: "{{ lookup('ebpf.sockredir.b64file', role_path ~ '/../../files/bpf/sockredir.bpf.o') | length }}"
'''

RETURN = r'''
_raw:
  description: Base64 of each file's bytes.
  type: list
  elements: str
'''

import base64

from ansible.errors import AnsibleError
from ansible.plugins.lookup import LookupBase


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        out = []
        for term in terms:
            path = self.find_file_in_search_path(variables, 'files', term)
            if path is None:
                raise AnsibleError('b64file: %s not found' % term)
            try:
                with open(path, 'rb') as f:
                    out.append(base64.b64encode(f.read()).decode('ascii'))
            except OSError as e:
                raise AnsibleError('b64file: cannot read %s: %s' % (path, e))
        return out
