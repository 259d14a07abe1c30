"""Half-close, RST, MSG_PEEK, FIONREAD and readiness behave as on plain TCP.

Each scenario runs twice on fresh connections in the same namespace: once
with both ends in the attached cgroup (redirected), once with both ends in a
sibling cgroup with nothing attached (plain TCP, the control). What the
application can observe (bytes, EOF, errors, poll/epoll events, FIONREAD)
must be the same; the counters must show that the first run was redirected,
so the comparison is not plain TCP against itself.
"""

import errno
import select
import socket
import struct
import threading
import time

import pytest

from . import kit

SETTLE = 0.2     # for "nothing happens" checks: how long nothing must happen


def wait_fionread(sock, nbytes, timeout=5):
    return kit.wait_until(lambda: kit.fionread(sock) == nbytes, timeout,
                          'FIONREAD to reach %d (is %d)' % (nbytes, kit.fionread(sock)))


def drain(sock):
    """Read until EOF or an error: (total bytes, 'eof' or the errno name)."""
    total = 0
    while True:
        try:
            data = sock.recv(1 << 20)
        except OSError as e:
            return total, errno.errorcode.get(e.errno, str(e.errno))
        if not data:
            return total, 'eof'
        total += len(data)


def half_close(client, server):
    """SHUT_WR after a transfer larger than the socket buffers: all data, then EOF, then a reply."""
    data = bytes(range(256)) * 16384          # 4 MiB: the sender blocks until the reader reads
    sender = threading.Thread(target=lambda: (client.sendall(data), client.shutdown(socket.SHUT_WR)))
    sender.start()
    time.sleep(SETTLE)                        # the reader starts late: data is queued or waiting
    received = kit.recv_exactly(server, len(data) + 1)
    sender.join(10)
    events = select.poll()
    events.register(server, select.POLLIN | select.POLLRDHUP)
    server_events = dict(events.poll(0)).get(server.fileno(), 0)
    server.sendall(b'reply after the peer half-closed')
    reply = kit.recv_exactly(client, 32)
    server.shutdown(socket.SHUT_WR)
    return dict(all_data_then_eof=received == data,
                server_sees=sorted(n for n in ('POLLIN', 'POLLRDHUP') if server_events & getattr(select, n)),
                reply=reply, client_then=drain(client))


def rst_with_unread_data(client, server):
    """SO_LINGER 0 close: RST. The reader gets what was queued, then ECONNRESET."""
    client.sendall(b'x' * 1000)
    wait_fionread(server, 1000)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    client.close()
    time.sleep(SETTLE)
    return dict(reader=drain(server), send_after=send_errors(server))


def close_with_unread_data(client, server):
    """A close with unread data in the receive queue sends RST; the sender's next sends fail."""
    server.sendall(b'y' * 1000)
    wait_fionread(client, 1000)
    client.close()
    time.sleep(SETTLE)
    return dict(send_after=send_errors(server), reader=drain(server))


def send_errors(sock):
    out = []
    for _round in range(3):
        try:
            sock.send(b'after')
            out.append('ok')
        except OSError as e:
            out.append(errno.errorcode.get(e.errno, str(e.errno)))
        time.sleep(0.05)
    return out


def peek(client, server):
    """MSG_PEEK does not consume, across several messages; a later read gets everything in order."""
    client.sendall(b'hello ')
    client.sendall(b'world')
    wait_fionread(server, 11)
    first = server.recv(5, socket.MSG_PEEK)
    again = server.recv(5, socket.MSG_PEEK)
    across = server.recv(11, socket.MSG_PEEK | socket.MSG_WAITALL)
    return dict(first=first, again=again, across=across, read=kit.recv_exactly(server, 11),
                then=kit.pending(server))


def fionread(client, server):
    """FIONREAD counts queued bytes over several messages, and drops as they are read."""
    seen = []
    for n in (1000, 2000, 3000):
        client.sendall(b'z' * n)
    wait_fionread(server, 6000)
    seen.append(kit.fionread(server))
    kit.recv_exactly(server, 1500)
    seen.append(kit.fionread(server))
    kit.recv_exactly(server, 4500)
    seen.append(kit.fionread(server))
    return dict(fionread=seen, sender_side=kit.fionread(client))


def readiness(client, server):
    """poll and edge-triggered epoll report readability exactly when there is something new."""
    out = {}
    p = select.poll()
    p.register(server, select.POLLIN | select.POLLOUT)
    out['idle'] = dict(p.poll(0)).get(server.fileno(), 0) & (select.POLLIN | select.POLLOUT)
    ep = select.epoll()
    try:
        ep.register(server.fileno(), select.EPOLLIN | select.EPOLLET | select.EPOLLRDHUP)
        out['epoll_idle'] = ep.poll(SETTLE)
        client.sendall(b'1')
        out['after_one_byte'] = [ev for _fd, ev in ep.poll(5)]
        out['no_repeat_without_new_data'] = ep.poll(SETTLE)
        client.sendall(b'2')
        out['after_second_byte'] = [ev for _fd, ev in ep.poll(5)]
        out['poll_readable'] = dict(p.poll(0)).get(server.fileno(), 0) & select.POLLIN
        out['read'] = server.recv(10)
        client.shutdown(socket.SHUT_WR)
        out['after_shutdown'] = [ev for _fd, ev in ep.poll(5)]
    finally:
        ep.close()
    return out


SCENARIOS = {f.__name__: f for f in (half_close, rst_with_unread_data, close_with_unread_data, peek,
                                     fionread, readiness)}
# sends after the peer is gone find no peer in the map: they go the TCP way; so does the reply
# to a peer that shut down its sending side (it left the map, having received nothing)
PASSED_AFTER_CLOSE = {'rst_with_unread_data': 3 * len(b'after'), 'close_with_unread_data': 3 * len(b'after'),
                      'half_close': len(b'reply after the peer half-closed')}


# Measured on 6.18: after the peer reset the connection, plain TCP fails the
# next send() with ECONNRESET; a socket still in the sockhash (sockets stay
# there until close()) reports the bytes as sent and discards them, and only
# the send after that fails (EPIPE). A kernel (tcp_bpf) difference the
# programs cannot change; docs/reliability.md has it.
KNOWN_DIFFERENCES = {
    'close_with_unread_data': 'tcp_bpf: the first send() after a peer RST succeeds (bytes dropped) '
                              'instead of failing with ECONNRESET',
}


def scenario_params():
    for name in sorted(SCENARIOS):
        why = KNOWN_DIFFERENCES.get(name)
        yield pytest.param(name, marks=[pytest.mark.xfail(reason=why, raises=AssertionError)] if why else [])


@pytest.mark.parametrize('family', sorted(kit.FAMILIES))
@pytest.mark.parametrize('scenario', list(scenario_params()))
def test_behaves_as_plain_tcp(redirection, netns, scenario, family):
    bind, address, client_family = kit.FAMILIES[family]
    seen = {}
    for mode, cgroup in (('redirected', redirection.cgroup), ('plain', redirection.plain_cgroup)):
        with kit.SocketFactory(cgroup, netns) as factory:
            listener = factory.listen(bind)
            client, server = kit.connected_pair(listener, factory, client_family, address)
            try:
                before = redirection.counters()
                seen[mode] = SCENARIOS[scenario](client, server)
                change = kit.delta(before, redirection.counters())
            finally:
                for sock in (client, server, listener):
                    sock.close()
        if mode == 'redirected':
            assert change['redirected_bytes'] > 0, change
            assert change['passed_bytes'] <= PASSED_AFTER_CLOSE.get(scenario, 0), change
        else:
            assert not any(change.values()), change
    assert seen['redirected'] == seen['plain']
