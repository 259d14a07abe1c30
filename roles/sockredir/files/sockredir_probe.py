# SPDX-License-Identifier: GPL-3.0-or-later
"""Read-only preflight probe of the sockredir role; prints one JSON object.

Run by the role with the host's Ansible Python, before anything is installed
or changed, so it uses the standard library only. It reports what the role
cannot learn from facts: the kernel's build options (for the features the
programs need) and which Python on the host can import bcc (the bpf_program
module re-runs itself under that one).
"""

import gzip
import json
import os
import subprocess
import sys

OPTIONS = sys.argv[1].split(',') if len(sys.argv) > 1 else []
# bcc_import.SYSTEM_PYTHONS of the collection, after the running interpreter
PYTHONS = [sys.executable, '/usr/bin/python3', '/usr/libexec/platform-python', '/usr/bin/python']


def kernel_config():
    """{source, options: {name: value or None}} or None when no config is readable."""
    release = os.uname().release
    for path in ('/proc/config.gz', '/boot/config-%s' % release,
                 '/lib/modules/%s/config' % release):
        try:
            opener = gzip.open if path.endswith('.gz') else open
            with opener(path, 'rt') as f:
                text = f.read()
        except (IOError, OSError):
            continue
        values = {}
        for line in text.splitlines():
            name, sep, value = line.partition('=')
            if sep and name in OPTIONS:
                values[name] = value
        return dict(source=path, options={o: values.get(o) for o in OPTIONS})
    return None


def bcc_python():
    """The first interpreter that imports bcc, and every one tried."""
    tried = []
    for python in PYTHONS:
        if python in tried or not python or not os.path.exists(python):
            continue
        tried.append(python)
        with open(os.devnull, 'w') as devnull:
            rc = subprocess.call([python, '-c', 'import bcc'], stdout=devnull, stderr=devnull)
        if rc == 0:
            return dict(python=python, tried=tried)
    return dict(python=None, tried=tried)


print(json.dumps(dict(kernel=os.uname().release,
                      btf=os.path.exists('/sys/kernel/btf/vmlinux'),
                      kernel_config=kernel_config(),
                      bcc=bcc_python())))
