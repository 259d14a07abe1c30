# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Compile a BPF C source with BCC and load its programs.

bcc's C++ side writes compiler and verifier messages straight to file
descriptor 2 (and sometimes 1), which would corrupt a module's JSON on stdout
and lose the message the user needs. They are captured around every bcc call
and put into the error.
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import ctypes
import os
import re

from ansible_collections.ebpf.sockredir.plugins.module_utils.capture import captured_output
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError

# bcc is imported on first use: the import takes about 0.3 s, and a module on
# the object path (objloader) never needs it.
BPF = libbcc = None
BCC_IMPORT_ERROR = None

PROG_TYPES = {'sock_ops': 13, 'sk_msg': 16}  # BPF.SOCK_OPS, BPF.SK_MSG
NO_TABLE = 2 ** 64 - 1  # bpf_table_id() of an unknown name


def import_bcc():
    """Import bcc once; returns the ImportError, or None when bcc is there."""
    global BPF, libbcc, BCC_IMPORT_ERROR
    if BPF is None and BCC_IMPORT_ERROR is None:
        try:
            from bcc import BPF as bpf_class, libbcc as bcc_lib
            BPF, libbcc = bpf_class, bcc_lib
        except ImportError as e:
            BCC_IMPORT_ERROR = e
    return BCC_IMPORT_ERROR


def bcc_version():
    import bcc
    return getattr(bcc, '__version__', 'unknown')


def _tail(text, lines=40):
    kept = [line for line in text.splitlines() if line.strip()]
    return '\n'.join(kept[-lines:])


class Compiled(object):
    """A compiled source; load(name, type) gives a program fd. Close it when done."""

    def __init__(self, src_path, cflags, env):
        self.src_path = src_path
        if import_bcc() is not None:
            raise BpfError('src: compiling needs bcc (python3-bpfcc): %s' % BCC_IMPORT_ERROR, param='src')
        saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            with captured_output() as out:
                try:
                    self.bpf = BPF(src_file=src_path.encode(), cflags=cflags)
                    err = None
                except Exception as e:  # bcc raises bare Exception
                    err = e
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.warnings = out.text
        refused = re.search(r'could not open bpf map: (\w+), error: (.*)', out.text)
        if err is not None and refused:
            raise BpfError('maps: the kernel refused to create map %s (%s). Check the size the source '
                           'declares (for this collection SOCKREDIR_MAP_SIZE, at most 134217728 for a '
                           'sockhash) and the memory available for BPF maps.'
                           % (refused.group(1), refused.group(2).strip()), param='maps',
                           details={'compiler_output': out.text.splitlines()})
        if err is not None:
            raise BpfError('src: %s does not compile (%s). Compiler output:\n%s'
                           % (src_path, err, _tail(out.text)), param='src',
                           details={'compiler_output': out.text.splitlines()})

    def has_function(self, name):
        return bool(libbcc.lib.bpf_function_start(self.bpf.module, name.encode()))

    def load(self, name, prog_type):
        if not self.has_function(name):
            raise BpfError('programs: %r is not a function in %s' % (name, self.src_path),
                           param='programs')
        with captured_output() as out:
            try:
                fn = self.bpf.load_func(name, PROG_TYPES[prog_type])
                err = None
            except Exception as e:
                err = e
        if err is not None:
            raise BpfError('programs: the kernel rejected %r as %s (%s). Verifier output:\n%s'
                           % (name, prog_type, err, _tail(out.text)), param='programs',
                           details={'verifier_output': out.text.splitlines()})
        return fn.fd

    def declared_map(self, name):
        """dict(type, key_size, value_size, max_entries, flags) as the source declares map `name`, or None.

        For a pinned map that bcc reused, this is the declaration, not the
        pinned map's own shape: comparing the two tells a changed map apart.
        """
        lib = libbcc.lib
        table_id = lib.bpf_table_id(self.bpf.module, name.encode())
        if table_id == NO_TABLE:
            return None
        for fn in ('bpf_table_key_size_id', 'bpf_table_leaf_size_id'):
            getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
            getattr(lib, fn).restype = ctypes.c_size_t
        return dict(type=lib.bpf_table_type_id(self.bpf.module, table_id),
                    key_size=lib.bpf_table_key_size_id(self.bpf.module, table_id),
                    value_size=lib.bpf_table_leaf_size_id(self.bpf.module, table_id),
                    max_entries=lib.bpf_table_max_entries_id(self.bpf.module, table_id),
                    flags=lib.bpf_table_flags_id(self.bpf.module, table_id))

    def close(self):
        with captured_output():
            self.bpf.cleanup()
