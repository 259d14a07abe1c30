#!/usr/bin/python3
# SPDX-License-Identifier: GPL-3.0-or-later
"""Push TCP traffic over loopback from inside a cgroup, in a fresh netns.

Usage: traffic.py CGROUP_DIR MIB

Moves itself into CGROUP_DIR (so its sockets belong to that cgroup and the
sock_ops program attached there sees them), unshares a new network namespace
(so the loopback counters count this script's packets only), then for IPv4
(127.0.0.1) and IPv6 (::1) opens one connection, sends MIB MiB of random data
each way at the same time (full duplex: each side reads while it writes, and
the client shuts down its sending side only after it received everything)
and checks both ends' SHA-256. A one-byte hello goes each way first: a
direction that streams 16 sends without receiving anything switches to TCP
(the programs' default small-write policy counts every size), and a socket
that has received redirected bytes never does, so with the hello both
directions stay redirected. (A reply that starts after the client's
shutdown(SHUT_WR) goes TCP by design: docs/design.md, "The path of a flow".)
Prints one JSON object:

  {"ipv4": {"bytes": ..., "sent_sha256": ..., "received_sha256": ...,
            "echo_sent_sha256": ..., "echo_received_sha256": ...,
            "intact": true, "seconds": ..., "lo_packets": ..., "lo_bytes": ...},
   "ipv6": {...}}

lo_packets/lo_bytes are what crossed the namespace's loopback device during
that connection (rx side). Redirected data never reaches it: only the
handshake and the teardown do.
"""

import ctypes
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

CLONE_NEWNET = 0x40000000
CHUNK = 1 << 20
TIMEOUT = 60


def enter(cgroup):
    with open(os.path.join(cgroup, 'cgroup.procs'), 'w') as f:
        f.write(str(os.getpid()))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, 'unshare(CLONE_NEWNET): ' + os.strerror(err))
    subprocess.check_call(['ip', 'link', 'set', 'lo', 'up'])


def lo_counters():
    """(rx_bytes, rx_packets) of lo in this process's network namespace."""
    with open('/proc/self/net/dev') as f:
        for line in f:
            name, sep, rest = line.partition(':')
            if sep and name.strip() == 'lo':
                fields = rest.split()
                return int(fields[0]), int(fields[1])
    raise RuntimeError('no lo in /proc/self/net/dev')


def send_random(sock, mib):
    digest = hashlib.sha256()
    block = bytearray(os.urandom(CHUNK))
    for i in range(mib):
        block[:8] = i.to_bytes(8, 'little')  # every MiB differs
        digest.update(block)
        sock.sendall(block)
    return digest.hexdigest()


def receive_all(sock, limit=None):
    """(sha256, bytes) of what arrives until EOF, or until limit bytes arrived."""
    digest = hashlib.sha256()
    total = 0
    while limit is None or total < limit:
        data = sock.recv(CHUNK if limit is None else min(CHUNK, limit - total))
        if not data:
            break
        digest.update(data)
        total += len(data)
    return digest.hexdigest(), total


def in_background(result, key, fn, *args):
    def run():
        result[key] = fn(*args)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def one_connection(family, address, mib):
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.settimeout(TIMEOUT)
    listener.bind((address, 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    server = {}

    def serve():
        conn = listener.accept()[0]
        conn.settimeout(TIMEOUT)
        with conn:
            if conn.recv(1) != b'h':
                raise RuntimeError('no hello from the client')
            conn.sendall(b'h')
            sender = in_background(server, 'echo_sent', send_random, conn, mib)
            server['received'], server['bytes'] = receive_all(conn)
            sender.join(TIMEOUT)

    rx_bytes0, rx_packets0 = lo_counters()
    start = time.monotonic()
    thread = threading.Thread(target=serve)
    thread.start()
    client = socket.socket(family, socket.SOCK_STREAM)
    client.settimeout(TIMEOUT)
    client.connect((address, port))
    with client:
        client.sendall(b'h')
        if client.recv(1) != b'h':
            raise RuntimeError('no hello from the server')
        echo = {}
        reader = in_background(echo, 'received', receive_all, client, mib * CHUNK)
        sent = send_random(client, mib)
        reader.join(TIMEOUT)
        echo_received, echo_bytes = echo.get('received', (None, 0))
        client.shutdown(socket.SHUT_WR)
        trailing = receive_all(client)[1]     # then EOF, with nothing more
        echo_bytes += trailing
    thread.join(TIMEOUT)
    listener.close()
    seconds = time.monotonic() - start
    rx_bytes1, rx_packets1 = lo_counters()
    return dict(bytes=server.get('bytes', 0), echo_bytes=echo_bytes,
                sent_sha256=sent, received_sha256=server.get('received'),
                echo_sent_sha256=server.get('echo_sent'), echo_received_sha256=echo_received,
                intact=(sent == server.get('received') and echo_received == server.get('echo_sent')
                        and server.get('bytes') == echo_bytes == mib * CHUNK),
                seconds=round(seconds, 3),
                lo_packets=rx_packets1 - rx_packets0, lo_bytes=rx_bytes1 - rx_bytes0)


def main():
    cgroup, mib = sys.argv[1], int(sys.argv[2])
    enter(cgroup)
    out = dict(cgroup=cgroup, mib=mib)
    out['ipv4'] = one_connection(socket.AF_INET, '127.0.0.1', mib)
    out['ipv6'] = one_connection(socket.AF_INET6, '::1', mib)
    print(json.dumps(out))


if __name__ == '__main__':
    main()
