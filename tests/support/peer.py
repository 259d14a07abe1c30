"""One end of a test TCP transfer, run as its own process by hostenv.transfer().

    peer.py server --bind ADDR --port N [--timeout S]
        Listens on ADDR:N (N = 0 picks a free port; "::" accepts IPv4 too),
        prints {"listening": PORT} once listening, accepts one connection,
        reads it to EOF and prints {"recv_bytes": ..., "recv_sha256": ...}.

    peer.py client --connect ADDR --port N --bytes N --seed S
                   [--source-port N] [--timeout S]
        Connects (from source port N if given), sends N pseudo-random bytes derived from the integer seed S
        in 64 KiB sendall() writes, shuts down its sending side, waits for
        the server to close, and prints {"sent_bytes": ..., "sent_sha256": ...}.

Each report is one JSON line on stdout. Standard library only, so it runs
under any python3 (hostenv starts it with /usr/bin/python3).
"""

import argparse
import hashlib
import json
import random
import socket
import sys

CHUNK = 64 * 1024


def payload_chunks(nbytes, seed):
    """The deterministic payload for (nbytes, seed), in CHUNK-sized pieces."""
    rng = random.Random(seed)
    remaining = nbytes
    while remaining > 0:
        size = min(CHUNK, remaining)
        yield rng.randbytes(size)
        remaining -= size


def payload_sha256(nbytes, seed):
    """sha256 hex digest of the payload a client sends for (nbytes, seed)."""
    digest = hashlib.sha256()
    for chunk in payload_chunks(nbytes, seed):
        digest.update(chunk)
    return digest.hexdigest()


def family_of(address):
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def report(**fields):
    print(json.dumps(fields), flush=True)


def serve(bind, port, timeout):
    family = family_of(bind)
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "::" must also take IPv4 clients (as ::ffff:a.b.c.d), whatever
            # net.ipv6.bindv6only says.
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind((bind, port))
        listener.listen(1)
        listener.settimeout(timeout)
        report(listening=listener.getsockname()[1])

        conn = listener.accept()[0]
    with conn:
        conn.settimeout(timeout)
        digest = hashlib.sha256()
        received = 0
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = conn.recv_into(buf)
            if n == 0:
                break
            digest.update(view[:n])
            received += n
    report(recv_bytes=received, recv_sha256=digest.hexdigest())


def connect_from(connect, port, source_port, timeout):
    conn = socket.socket(family_of(connect), socket.SOCK_STREAM)
    try:
        conn.settimeout(timeout)
        if source_port:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            conn.bind(("::" if conn.family == socket.AF_INET6 else "0.0.0.0", source_port))
        conn.connect((connect, port))
    except BaseException:
        conn.close()
        raise
    return conn


def send(connect, port, nbytes, seed, source_port, timeout):
    digest = hashlib.sha256()
    sent = 0
    with connect_from(connect, port, source_port, timeout) as conn:
        for chunk in payload_chunks(nbytes, seed):
            conn.sendall(chunk)
            digest.update(chunk)
            sent += len(chunk)
        conn.shutdown(socket.SHUT_WR)
        # Wait for the server's close: the connection is over only once it
        # has read everything, and a bug that loses the FIN shows up here
        # as a timeout instead of a silently short transfer.
        while conn.recv(CHUNK):
            pass
    report(sent_bytes=sent, sent_sha256=digest.hexdigest())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    server = sub.add_parser("server")
    server.add_argument("--bind", required=True)
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--timeout", type=float, default=60.0)
    client = sub.add_parser("client")
    client.add_argument("--connect", required=True)
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--bytes", type=int, required=True)
    client.add_argument("--seed", type=int, required=True)
    client.add_argument("--source-port", type=int, default=0)
    client.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    if args.role == "server":
        serve(args.bind, args.port, args.timeout)
    else:
        send(args.connect, args.port, args.bytes, args.seed, args.source_port,
             args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
