"""One end of a long TCP stream for the fault tests: paced sender, slow reader.

    streampeer.py server --bind ADDR [--read-pause S] [--timeout T]
        Listens (port chosen by the kernel), prints {"listening": PORT}, accepts
        one connection and reads it to EOF in 64 KiB reads, sleeping S seconds
        after each (a slow reader keeps redirected data queued). Prints
        {"recv_bytes", "recv_sha256", "end"}: end is "eof" or the errno name
        that stopped it.

    streampeer.py client --connect ADDR --port N --seed K
                         [--bytes N] [--seconds S] [--pace S] [--timeout T]
        Sends 64 KiB chunks of random.Random(K).randbytes(65536), one after
        another, until N bytes, S seconds or a SIGUSR1, sleeping --pace
        between chunks; then half-closes and waits for the server's close. Prints
        {"sent_bytes", "sent_sha256", "end"}.

stream_sha256(seed, nbytes) recomputes what a client sent (also a prefix of it).
Standard library only.
"""

import argparse
import errno
import hashlib
import json
import random
import signal
import socket
import sys
import time

CHUNK = 65536


def chunks(seed):
    rng = random.Random(seed)
    while True:
        yield rng.randbytes(CHUNK)


def stream_sha256(seed, nbytes):
    digest = hashlib.sha256()
    left = nbytes
    for chunk in chunks(seed):
        if left <= 0:
            break
        digest.update(chunk[:left])
        left -= len(chunk)
    return digest.hexdigest()


def report(**fields):
    print(json.dumps(fields), flush=True)


def errname(e):
    return errno.errorcode.get(e.errno, str(e)) if isinstance(e, OSError) and e.errno else type(e).__name__


def serve(args):
    family = socket.AF_INET6 if ':' in args.bind else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind((args.bind, 0))
    listener.listen(1)
    listener.settimeout(args.timeout)
    report(listening=listener.getsockname()[1])
    conn = listener.accept()[0]
    conn.settimeout(args.timeout)
    digest, got, end = hashlib.sha256(), 0, 'eof'
    try:
        while True:
            data = conn.recv(CHUNK)
            if not data:
                break
            digest.update(data)
            got += len(data)
            if args.read_pause:
                time.sleep(args.read_pause)
    except (OSError, socket.timeout) as e:
        end = errname(e)
    conn.close()
    report(recv_bytes=got, recv_sha256=digest.hexdigest(), end=end)


def send(args):
    family = socket.AF_INET6 if ':' in args.connect else socket.AF_INET
    conn = socket.socket(family, socket.SOCK_STREAM)
    conn.settimeout(args.timeout)
    conn.connect((args.connect, args.port))
    digest, sent, end = hashlib.sha256(), 0, 'eof'
    stop_at = time.monotonic() + args.seconds if args.seconds else None
    stop = []
    signal.signal(signal.SIGUSR1, lambda *_: stop.append(True))
    try:
        for chunk in chunks(args.seed):
            if stop:
                break
            if args.bytes and sent >= args.bytes:
                break
            if stop_at and time.monotonic() >= stop_at:
                break
            if args.bytes:
                chunk = chunk[:args.bytes - sent]
            conn.sendall(chunk)
            digest.update(chunk)
            sent += len(chunk)
            if args.pace:
                time.sleep(args.pace)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(CHUNK):
            pass
    except (OSError, socket.timeout) as e:
        end = errname(e)
    conn.close()
    report(sent_bytes=sent, sent_sha256=digest.hexdigest(), end=end)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='role', required=True)
    server = sub.add_parser('server')
    server.add_argument('--bind', required=True)
    server.add_argument('--read-pause', type=float, default=0.0)
    server.add_argument('--timeout', type=float, default=60.0)
    client = sub.add_parser('client')
    client.add_argument('--connect', required=True)
    client.add_argument('--port', type=int, required=True)
    client.add_argument('--seed', type=int, required=True)
    client.add_argument('--bytes', type=int, default=0)
    client.add_argument('--seconds', type=float, default=0.0)
    client.add_argument('--pace', type=float, default=0.0)
    client.add_argument('--timeout', type=float, default=60.0)
    args = parser.parse_args(argv)
    (serve if args.role == 'server' else send)(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
