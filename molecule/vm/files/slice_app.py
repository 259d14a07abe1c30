# SPDX-License-Identifier: GPL-3.0-or-later
"""A small request/response application for the systemd slice check.

Usage: slice_app.py serve PORT
       slice_app.py ask PORT COUNT SIZE

serve: echoes every message of every connection on 127.0.0.1:PORT back to
its sender, one thread per connection (systemd runs it as a service in the
slice the role is scoped to).

ask: one connection, COUNT requests of SIZE random bytes, each answered
before the next is sent (systemd-run starts it in the same slice); checks
every answer and prints {"requests": COUNT, "bytes": SIZE*COUNT,
"intact": true, "seconds": ...}. Request/response keeps both directions
redirected under the programs' default policy (a socket that received
redirected bytes never switches to TCP).
"""

import json
import os
import socket
import sys
import threading
import time


def recv_exactly(sock, size):
    data = b''
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError('connection closed after %d of %d bytes' % (len(data), size))
        data += chunk
    return data


def echo(conn):
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)


def serve(port):
    srv = socket.create_server(('127.0.0.1', port), reuse_port=False)
    while True:
        conn = srv.accept()[0]
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def ask(port, count, size):
    start = time.monotonic()
    intact = True
    with socket.create_connection(('127.0.0.1', port), timeout=30) as sock:
        for _request in range(count):
            request = os.urandom(size)
            sock.sendall(request)
            intact = intact and recv_exactly(sock, size) == request
    print(json.dumps(dict(requests=count, bytes=count * size, intact=intact,
                          seconds=round(time.monotonic() - start, 3))))
    return 0 if intact else 1


def main(argv):
    if len(argv) == 3 and argv[1] == 'serve':
        return serve(int(argv[2]))
    if len(argv) == 5 and argv[1] == 'ask':
        return ask(int(argv[2]), int(argv[3]), int(argv[4]))
    sys.stderr.write(__doc__)
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv))
