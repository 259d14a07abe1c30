#!/usr/bin/python3
# SPDX-License-Identifier: GPL-3.0-or-later
"""Push TCP traffic over loopback from inside a cgroup, in a fresh netns.

Usage: traffic.py CGROUP_DIR MIB

Moves itself into CGROUP_DIR (so its sockets belong to that cgroup and the
sock_ops program attached there sees them), unshares a new network namespace
(so the loopback counters count this script's packets only), then for IPv4
(127.0.0.1) and IPv6 (::1) opens one connection and moves MIB MiB of random
data each way in turns of 32 KiB (the client sends one, the server reads it
and answers with one of its own, and so on), then the client shuts down its
sending side and sees EOF; both ends' SHA-256 are compared. Turns, because
the programs' default policy switches a direction to TCP after 16 sends in a
row with nothing received (docs/design.md, "The path of a flow"), and this
script must show both directions redirected.
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
# One turn of the exchange: one sk_msg verdict per send (a send of up to ~64 KiB is one)
TURN = 32 << 10
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


def block_of(seed):
    """TURN bytes, a fresh random block per seed (the seed is written in its first 8 bytes)."""
    block = bytearray(os.urandom(TURN))
    block[:8] = seed.to_bytes(8, 'little')
    return bytes(block)


def recv_exactly(sock, size):
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise RuntimeError('EOF after %d of %d bytes' % (len(data), size))
        data += chunk
    return bytes(data)


def one_connection(family, address, mib):
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.settimeout(TIMEOUT)
    listener.bind((address, 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    turns = mib * (CHUNK // TURN)
    server = dict(received=hashlib.sha256(), sent=hashlib.sha256(), bytes=0)

    def serve():
        conn = listener.accept()[0]
        conn.settimeout(TIMEOUT)
        with conn:
            for i in range(turns):
                data = recv_exactly(conn, TURN)
                server['received'].update(data)
                server['bytes'] += len(data)
                reply = block_of(turns + i)
                server['sent'].update(reply)
                conn.sendall(reply)
            server['eof'] = conn.recv(1) == b''

    rx_bytes0, rx_packets0 = lo_counters()
    start = time.monotonic()
    thread = threading.Thread(target=serve)
    thread.start()
    client = socket.socket(family, socket.SOCK_STREAM)
    client.settimeout(TIMEOUT)
    client.connect((address, port))
    sent, echo_received, echo_bytes = hashlib.sha256(), hashlib.sha256(), 0
    with client:
        for i in range(turns):
            block = block_of(i)
            sent.update(block)
            client.sendall(block)
            data = recv_exactly(client, TURN)
            echo_received.update(data)
            echo_bytes += len(data)
        client.shutdown(socket.SHUT_WR)
        echo_bytes += len(client.recv(1))     # then EOF, with nothing more
    thread.join(TIMEOUT)
    listener.close()
    seconds = time.monotonic() - start
    rx_bytes1, rx_packets1 = lo_counters()
    sent, received = sent.hexdigest(), server['received'].hexdigest()
    echo_sent, echo_received = server['sent'].hexdigest(), echo_received.hexdigest()
    return dict(bytes=server['bytes'], echo_bytes=echo_bytes,
                sent_sha256=sent, received_sha256=received,
                echo_sent_sha256=echo_sent, echo_received_sha256=echo_received,
                intact=(sent == received and echo_sent == echo_received and server.get('eof', False)
                        and server['bytes'] == echo_bytes == mib * CHUNK),
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
