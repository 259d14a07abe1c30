"""Make TCP sockets inside this process's cgroup and network namespace; hand them over.

    sockfactory.py FD

FD is one end of an AF_UNIX SOCK_SEQPACKET pair. Each request is one byte,
b'4' (AF_INET) or b'6' (AF_INET6); the answer is one byte with the new
socket's descriptor attached (SCM_RIGHTS). EOF on FD ends the process.

A socket belongs to the cgroup and the network namespace of the process that
created it, whoever uses it later (an accepted socket inherits its
listener's), so the test process can drive sockets of several namespaces and
cgroups through the plain socket API. Standard library only.
"""

import socket
import sys

FAMILIES = {b'4': socket.AF_INET, b'6': socket.AF_INET6}


def main():
    ctl = socket.socket(fileno=int(sys.argv[1]))
    while True:
        request = ctl.recv(16)
        if not request:
            return 0
        made = socket.socket(FAMILIES[request], socket.SOCK_STREAM)
        socket.send_fds(ctl, [b'k'], [made.fileno()])
        made.close()


if __name__ == '__main__':
    sys.exit(main())
