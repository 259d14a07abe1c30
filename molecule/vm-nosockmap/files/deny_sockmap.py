#!/usr/bin/python3
# SPDX-License-Identifier: GPL-3.0-or-later
"""Make this kernel answer like one built without CONFIG_NET_SOCK_MSG.

Loads a BPF LSM program on the `bpf` hook (the kernel must run the bpf LSM:
`bpf` in /sys/kernel/security/lsm, as Debian 12's kernel does by default)
that fails, with EINVAL, every bpf() call creating a SOCKMAP or SOCKHASH
map or loading an SK_MSG or SK_SKB program: what the bpf() system call
answers on a kernel built without CONFIG_NET_SOCK_MSG, whose map and program
type tables have no such entries. Everything else is allowed, so systemd's
own cgroup programs, sock_ops programs, and bpftool keep working.

Stays in the foreground holding the program (run it as a systemd unit); the
program goes when this process ends. Writes READY_FILE once it is attached.
"""

import signal
import sys

from bcc import BPF

PROGRAM = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/errno.h>

LSM_PROBE(bpf, int cmd, union bpf_attr *attr, unsigned int size)
{
    if (cmd == BPF_MAP_CREATE) {
        u32 type = attr->map_type;
        if (type == BPF_MAP_TYPE_SOCKMAP || type == BPF_MAP_TYPE_SOCKHASH)
            return -EINVAL;
    }
    if (cmd == BPF_PROG_LOAD) {
        u32 type = attr->prog_type;
        if (type == BPF_PROG_TYPE_SK_MSG || type == BPF_PROG_TYPE_SK_SKB)
            return -EINVAL;
    }
    return 0;
}
"""


def main():
    ready_file = sys.argv[1]
    bpf = BPF(text=PROGRAM)  # bcc attaches LSM_PROBE programs on load
    with open(ready_file, 'w') as f:
        f.write('attached\n')
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    finally:
        bpf.cleanup()


if __name__ == '__main__':
    main()
