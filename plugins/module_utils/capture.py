# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Capture what C libraries write to file descriptors 1 and 2.

bcc's C++ side and libbpf print compiler, verifier and library messages
straight to fd 2 (and sometimes 1), which would corrupt a module's JSON on
stdout and lose the message the user needs: callers capture them around the
call and put them into the error.
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import contextlib
import os
import sys
import tempfile


class _Captured(object):
    text = ''


@contextlib.contextmanager
def captured_output():
    """Redirect fds 1 and 2 to a temp file for the duration; .text has what was written."""
    box = _Captured()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield box
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(0)
            box.text = tmp.read().decode('utf-8', 'replace')
