# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one exception the engine raises.

Every failure that reaches a user goes through BpfError, with a message that
says which parameter (or which host fact) is wrong, what was expected and what
was found, so the module can hand it to fail_json unchanged.
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type


class BpfError(Exception):
    def __init__(self, msg, param=None, details=None):
        super(BpfError, self).__init__(msg)
        self.msg = msg
        self.param = param
        self.details = details or {}

    def to_fail_json(self):
        out = dict(msg=self.msg)
        if self.param:
            out['param'] = self.param
        out.update(self.details)
        return out
