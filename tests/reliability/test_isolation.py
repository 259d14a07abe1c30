"""Isolation: the same addresses and ports in several namespaces, and processes outside the cgroup.

The sockhash key holds the network namespace cookie, so sockets with
identical 4-tuples in different namespaces are different entries. These
tests open, close and re-open connections with identical 4-tuples in three
namespaces at once, in every order, and check that each connection gets
exactly its own bytes and nothing else ever arrives anywhere. The counters
are checked to the byte, so the isolation shown is the redirect's, not plain
TCP's.
"""

import contextlib
import errno
import hashlib
import itertools
import time

import pytest

from support import hostenv

from . import kit

PORT = 42424
CLIENT_PORT = 42500   # + iteration: the same source port in every namespace at once
STYLES = ('client closes first', 'server closes first', 'client gone, server keeps its socket')
TIME_WAIT_REUSE = 1.1  # tcp_tw_reuse (loopback) lets a TIME_WAIT tuple be reused after 1 s


def connect_retrying(listener, factory, family, address, source_port, retry):
    """A connection from source_port; for `retry` seconds, again while its TIME_WAIT is too young."""
    deadline = time.monotonic() + retry
    while True:
        try:
            return kit.connected_pair(listener, factory, family, address, source_port=source_port)
        except OSError as e:
            retryable = (errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.ECONNREFUSED, errno.ECONNRESET)
            if time.monotonic() > deadline or e.errno not in retryable:
                raise
            time.sleep(0.1)


def payload(*tag):
    """Bytes that name their connection and direction: a misdelivery cannot go unnoticed."""
    seed = hashlib.sha256(repr(tag).encode()).digest()
    return (repr(tag).encode() + seed) * 97


@pytest.mark.parametrize('family', sorted(kit.FAMILIES))
def test_identical_tuples_in_three_namespaces_open_close_reopen_in_every_order(redirection, family):
    bind, address, client_family = kit.FAMILIES[family]
    live, stale, listeners = [], [], {}
    sent = 0
    with contextlib.ExitStack() as stack:
        names = [stack.enter_context(hostenv.netns('%s-%s' % (kit.PREFIX, x))) for x in 'abc']
        factories = {ns: stack.enter_context(kit.SocketFactory(redirection.cgroup, ns)) for ns in names}
        for ns in names:
            listeners[ns] = factories[ns].listen(bind, PORT)
        stack.callback(lambda: [s.close() for s in list(listeners.values()) + live + stale])
        before = redirection.counters()
        started = time.monotonic()

        def open_in(order, client_port, round_, retry=0.0):
            conns = {}
            for ns in order:
                client, server = connect_retrying(listeners[ns], factories[ns], client_family, address,
                                                  client_port, retry)
                assert client.getsockname()[1] == client_port
                conns[ns] = (client, server)
                live.extend((client, server))
            return conns

        def check_exchange(conns, order, round_):
            nonlocal sent
            for ns in order:
                client, server = conns[ns]
                up, down = payload(ns, round_, 'up'), payload(ns, round_, 'down')
                got_up, got_down = kit.exchange(client, server, up, down)
                assert got_up == up and got_down == down, (ns, round_)
                sent += len(up) + len(down)

        permutations = list(itertools.permutations(names))
        for i, order in enumerate(permutations):
            conns = open_in(order, CLIENT_PORT + i, i)
            check_exchange(conns, permutations[(i + 1) % len(permutations)], i)
            # all three at the same time too: identical tuples, live together
            with kit.concurrent_calls() as calls:
                for ns in order:
                    client, server = conns[ns]
                    calls.submit(kit.exchange, client, server, payload(ns, i, 'up2'),
                                 payload(ns, i, 'down2'))
            for (ns, (client, server)), got in zip(((ns, conns[ns]) for ns in order), calls.results):
                assert got == (payload(ns, i, 'up2'), payload(ns, i, 'down2')), (ns, i)
                sent += len(got[0]) + len(got[1])
            for position, ns in enumerate(reversed(permutations[(i + 2) % len(permutations)])):
                client, server = conns[ns]
                style = STYLES[(position + i) % len(STYLES)]
                first, second = (server, client) if style == 'server closes first' else (client, server)
                first.close()
                live.remove(first)
                assert kit.recv_exactly(second, 1) == b'', (ns, i, style)  # EOF, nothing else
                if style == STYLES[2]:
                    live.remove(second)
                    stale.append(second)
                else:
                    second.close()
                    live.remove(second)

        # re-open with the very first tuple where it is free again (TIME_WAIT reused)
        time.sleep(max(0.0, started + TIME_WAIT_REUSE - time.monotonic()))
        first_styles = {ns: STYLES[(position + 0) % len(STYLES)] for position, ns in
                        enumerate(reversed(permutations[2 % len(permutations)]))}
        reopened = {}
        for ns in names:
            port = CLIENT_PORT if first_styles[ns] != STYLES[2] else CLIENT_PORT + len(permutations)
            reopened.update(open_in([ns], port, 'again', retry=3.0))
        check_exchange(reopened, names, 'again')

        # the stale sockets got EOF and nothing more; what they send now goes
        # the TCP way (their peer is gone) and reaches no live socket
        for sock in stale:
            assert kit.pending(sock) == 'eof'
        for sock in stale:
            sock.send(b'stale')
        time.sleep(0.2)
        for sock in live:
            assert kit.pending(sock) == 'idle', sock
        after = redirection.counters()

    change = kit.delta(before, after)
    connections = len(permutations) * len(names) + len(names)
    assert change['inserted'] == 2 * connections
    assert change['redirected_bytes'] == sent
    assert change['passed_bytes'] == len(b'stale') * len(stale)
    assert change['insert_full'] == change['insert_failed'] == 0


def test_a_process_outside_the_cgroup_is_never_redirected(redirection, netns):
    """inside<->inside is redirected; inside<->outside and outside<->outside never are.

    Outside means a sibling cgroup with nothing attached. Counted to the byte:
    the only redirected bytes are those of the inside<->inside connection; the
    inside end of a mixed connection is not admitted (its peer is not under the
    programs), and an outside socket never enters the map.
    """
    bind, address, family = kit.FAMILIES['ipv4']
    with kit.SocketFactory(redirection.cgroup, netns) as inside, \
            kit.SocketFactory(redirection.plain_cgroup, netns) as outside, contextlib.ExitStack() as stack:
        before = redirection.counters()
        pairs = {}
        for server_side, client_side in itertools.product(('inside', 'outside'), repeat=2):
            server_factory = inside if server_side == 'inside' else outside
            client_factory = inside if client_side == 'inside' else outside
            listener = server_factory.listen(bind)
            stack.callback(listener.close)
            client, server = kit.connected_pair(listener, client_factory, family, address)
            stack.callback(client.close)
            stack.callback(server.close)
            pairs[(client_side, server_side)] = (client, server)
        sizes = {}
        with kit.concurrent_calls() as calls:
            for key, (client, server) in sorted(pairs.items()):
                up, down = payload(key, 'up') * 10, payload(key, 'down') * 10
                sizes[key] = (len(up), len(down))
                calls.submit(kit.exchange, client, server, up, down)
        for key, got in zip(sorted(pairs), calls.results):
            assert got == (payload(key, 'up') * 10, payload(key, 'down') * 10), key
        for client, server in pairs.values():
            assert kit.pending(client) == kit.pending(server) == 'idle'
        change = kit.delta(before, redirection.counters())
    # both ends inside; the inside end of a mixed pair is not admitted (its peer is not under the programs)
    assert change['inserted'] == 2
    assert change['not_admitted_peer'] == 2
    assert change['redirected_bytes'] == sum(sizes[('inside', 'inside')])
    assert change['passed_bytes'] == 0
