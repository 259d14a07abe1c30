"""Many concurrent TCP connections, each with its own random payload, checked on receipt.

    loadpeer.py --bind ADDR --connect ADDR --connections N --bytes B --seed S [--timeout T]

Listens on ADDR (port chosen by the kernel), then forks: the child opens N
connections to it, waits until all N are established (so they are all open
at once), then sends on each a 40-byte header (index, length, sha256 of the
payload) and B pseudo-random bytes seeded by (S, index), and half-closes.
With --eager each connection sends as soon as its connect() completes
instead (the first bytes then race the server side's handshake). The parent
accepts them, hashes what arrives on each and, at EOF, checks
length and sha256 against the header, answers with the sha256 it computed
and closes. The client checks that answer too. Everything is non-blocking in
one selector loop per side; each side prints one JSON line. Exit status 0
only if every connection checked out on both sides before the timeout.

Standard library only (run with /usr/bin/python3 inside the cgroup and the
network namespace under test).
"""

import argparse
import errno
import hashlib
import json
import os
import random
import resource
import selectors
import socket
import struct
import sys
import time

HEADER = struct.Struct('!II32s')


def report_line(report):
    # one write(2): the two processes share stdout, and a line under
    # PIPE_BUF is never interleaved with the other's
    os.write(1, (json.dumps(report) + '\n').encode())


def payload(seed, index, nbytes):
    return random.Random(seed * 1000003 + index).randbytes(nbytes)


def raise_fd_limit(needed):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


def family_of(address):
    return socket.AF_INET6 if ':' in address else socket.AF_INET


def serve(listener, args, deadline):
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    conns = {}
    ok, bad, seen = 0, [], set()
    open_now = peak = 0
    received = 0
    finished = 0
    while finished < args.connections and time.monotonic() < deadline:
        for key, _events in sel.select(timeout=0.5):
            if key.data is None:
                while True:
                    try:
                        conn = listener.accept()[0]
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    state = dict(head=b'', header=None, digest=hashlib.sha256(), got=0, reply=b'')
                    conns[conn] = state
                    sel.register(conn, selectors.EVENT_READ, state)
                    open_now += 1
                    peak = max(peak, open_now)
                continue
            conn, state = key.fileobj, key.data
            if state['reply']:
                try:
                    sent = conn.send(state['reply'])
                except BlockingIOError:
                    continue
                state['reply'] = state['reply'][sent:]
                if not state['reply']:
                    sel.unregister(conn)
                    conn.close()
                    open_now -= 1
                    finished += 1
                continue
            try:
                data = conn.recv(262144)
            except BlockingIOError:
                continue
            except OSError as e:
                bad.append(dict(error=errno.errorcode.get(e.errno, str(e.errno))))
                sel.unregister(conn)
                conn.close()
                open_now -= 1
                finished += 1
                continue
            if data:
                if state['header'] is None:
                    state['head'] += data
                    if len(state['head']) < HEADER.size:
                        continue
                    state['header'] = HEADER.unpack(state['head'][:HEADER.size])
                    data = state['head'][HEADER.size:]
                state['digest'].update(data)
                state['got'] += len(data)
                received += len(data)
                continue
            # EOF: the client sent everything it will send
            index, length, expected = state['header'] or (None, None, None)
            digest = state['digest'].digest()
            if index is None or state['got'] != length or digest != expected or index in seen:
                bad.append(dict(index=index, got=state['got'], length=length,
                                digest_ok=digest == expected, duplicate=index in seen))
            else:
                ok += 1
            seen.add(index)
            state['reply'] = digest
            sel.modify(conn, selectors.EVENT_WRITE, state)
    return dict(role='server', accepted=len(conns), ok=ok, bad=bad[:20], nbad=len(bad),
                peak_open=peak, bytes=received, timed_out=finished < args.connections)


def client(port, args, deadline):
    sel = selectors.DefaultSelector()
    family = family_of(args.connect)
    states = []
    for index in range(args.connections):
        conn = socket.socket(family, socket.SOCK_STREAM)
        conn.setblocking(False)
        err = conn.connect_ex((args.connect, port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, 'connect #%d: %s' % (index, os.strerror(err)))
        data = payload(args.seed, index, args.bytes)
        digest = hashlib.sha256(data).digest()
        state = dict(index=index, conn=conn, out=memoryview(HEADER.pack(index, len(data), digest) + data),
                     digest=digest, reply=b'', connected=False, done=False)
        states.append(state)
        sel.register(conn, selectors.EVENT_WRITE, state)
    connected = 0
    while not args.eager and connected < len(states) and time.monotonic() < deadline:
        for key, _events in sel.select(timeout=0.5):
            state = key.data
            err = state['conn'].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, 'connect #%d: %s' % (state['index'], os.strerror(err)))
            state['connected'] = True
            connected += 1
            sel.unregister(state['conn'])
    all_open = connected == len(states)
    if args.eager:
        # write as soon as each connect completes: the first bytes race the
        # peer's side of the handshake (and so its insertion into the map)
        all_open = None
        for state in states:
            sel.modify(state['conn'], selectors.EVENT_WRITE, state)
    else:
        for state in states:
            sel.register(state['conn'], selectors.EVENT_WRITE, state)
    confirmed, mismatch, errors, sent = 0, [], [], 0
    done = 0
    while all_open is not False and done < len(states) and time.monotonic() < deadline:
        for key, events in sel.select(timeout=0.5):
            state, conn = key.data, key.fileobj
            try:
                if events & selectors.EVENT_WRITE:
                    n = conn.send(state['out'][:262144])
                    sent += n
                    state['out'] = state['out'][n:]
                    if not len(state['out']):
                        conn.shutdown(socket.SHUT_WR)
                        sel.modify(conn, selectors.EVENT_READ, state)
                    continue
                data = conn.recv(64)
            except BlockingIOError:
                continue
            except OSError as e:
                errors.append(dict(index=state['index'], error=errno.errorcode.get(e.errno, str(e.errno))))
                data = b''
            if data:
                state['reply'] += data
                continue
            if state['reply'] == state['digest']:
                confirmed += 1
            else:
                mismatch.append(state['index'])
            sel.unregister(conn)
            conn.close()
            done += 1
    return dict(role='client', connected=connected, all_open_at_once=all_open, sent=sent,
                confirmed=confirmed, mismatch=mismatch[:20], errors=errors[:20],
                timed_out=done < len(states))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--bind', required=True)
    parser.add_argument('--connect', required=True)
    parser.add_argument('--connections', type=int, required=True)
    parser.add_argument('--bytes', type=int, required=True)
    parser.add_argument('--seed', type=int, required=True)
    parser.add_argument('--timeout', type=float, default=60.0)
    parser.add_argument('--eager', action='store_true',
                        help='send on each connection as soon as it is established, instead of '
                             'after all of them are')
    args = parser.parse_args(argv)
    raise_fd_limit(args.connections + 64)
    deadline = time.monotonic() + args.timeout

    listener = socket.socket(family_of(args.bind), socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if listener.family == socket.AF_INET6:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind((args.bind, 0))
    listener.listen(args.connections + 16)
    port = listener.getsockname()[1]
    child = os.fork()
    if child == 0:
        listener.close()
        try:
            report = client(port, args, deadline)
            ok = report['confirmed'] == args.connections
        except Exception as e:
            report, ok = dict(role='client', exception=repr(e)), False
        report_line(report)
        os._exit(0 if ok else 1)
    report = serve(listener, args, deadline)
    report_line(report)
    status = os.waitpid(child, 0)[1]
    return 0 if report['ok'] == args.connections and status == 0 else 1


if __name__ == '__main__':
    sys.exit(main())
