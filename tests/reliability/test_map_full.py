"""Map full: connections beyond the sockhash's size fall back to plain TCP, silently and counted.

The programs here are built with SOCKREDIR_MAP_SIZE=8 (four connections, two
ends each). The application never sees an error; insert_full counts every
socket that did not fit; a socket whose peer did not fit passes its bytes to
TCP; freed entries are used again.
"""

import contextlib

import pytest

from . import kit
from .test_load import run_load

MAP_SIZE = 8


@pytest.fixture(scope='module')
def small_map(tmp_path_factory):
    with kit.Redirection(tmp_path_factory.mktemp('small-map'),
                         defines={'SOCKREDIR_MAP_SIZE': MAP_SIZE}) as r:
        yield r


def data(i, direction):
    return ('%s-%d|' % (direction, i)).encode() * 500


def test_more_connections_than_the_map_holds(small_map, netns):
    with kit.SocketFactory(small_map.cgroup, netns) as factory, contextlib.ExitStack() as stack:
        listener = factory.listen('127.0.0.1')
        stack.callback(listener.close)
        before = small_map.counters()
        pairs = []
        for i in range(10):
            pair = kit.connected_pair(listener, factory, '4', '127.0.0.1')
            stack.callback(pair[0].close)
            stack.callback(pair[1].close)
            pairs.append(pair)
        sent = []
        for i, (client, server) in enumerate(pairs):
            got = kit.exchange(client, server, data(i, 'up'), data(i, 'down'))
            assert got == (data(i, 'up'), data(i, 'down')), i
            sent.append(len(got[0]) + len(got[1]))
        change = kit.delta(before, small_map.counters())
        assert small_map.entries() == MAP_SIZE
        assert change['inserted'] == MAP_SIZE
        assert change['insert_full'] == 2 * len(pairs) - MAP_SIZE
        assert change['insert_failed'] == 0
        # the first four connections have both ends in the map; the others neither
        assert change['redirected_bytes'] == sum(sent[:MAP_SIZE // 2])
        assert change['passed_bytes'] == 0

        # closing the redirected ones frees their entries for new connections
        for client, server in pairs[:MAP_SIZE // 2]:
            client.close()
            server.close()
        kit.wait_until(lambda: small_map.entries() == 0, 10, 'the closed sockets to leave the map')
        before = small_map.counters()
        again = []
        for i in range(MAP_SIZE // 2 + 1):   # four fill the map again, the fifth finds no slot
            pair = kit.connected_pair(listener, factory, '4', '127.0.0.1')
            stack.callback(pair[0].close)
            stack.callback(pair[1].close)
            again.append(pair)
        sizes = []
        for i, (client, server) in enumerate(again):
            got = kit.exchange(client, server, data(100 + i, 'up'), data(100 + i, 'down'))
            assert got == (data(100 + i, 'up'), data(100 + i, 'down'))
            sizes.append((len(got[0]), len(got[1])))
        change = kit.delta(before, small_map.counters())
        assert change['inserted'] == MAP_SIZE and change['insert_full'] == 2
        assert change['redirected_bytes'] == sum(u + d for u, d in sizes[:MAP_SIZE // 2])
        assert change['passed_bytes'] == 0


def test_one_end_in_the_map_passes_its_bytes_to_tcp(small_map, netns):
    """The client end gets the last free slot, the server end none: data still intact.

    Three connections take six slots, the inside end of a connection to a
    server outside the cgroup a seventh; the next connection's client end
    (ACTIVE_ESTABLISHED comes before the server's PASSIVE_ESTABLISHED) takes
    the eighth. Its sends find no peer in the map and go the TCP way; its
    server end runs no program at all.
    """
    with kit.SocketFactory(small_map.cgroup, netns) as inside, \
            kit.SocketFactory(small_map.plain_cgroup, netns) as outside, contextlib.ExitStack() as stack:
        listener = inside.listen('127.0.0.1')
        outside_listener = outside.listen('127.0.0.1')
        stack.callback(listener.close)
        stack.callback(outside_listener.close)
        kit.wait_until(lambda: small_map.entries() == 0, 10, 'an empty map')
        held = [kit.connected_pair(listener, inside, '4', '127.0.0.1') for _pair in range(MAP_SIZE // 2 - 1)]
        held.append(kit.connected_pair(outside_listener, inside, '4', '127.0.0.1'))
        for pair in held:
            stack.callback(pair[0].close)
            stack.callback(pair[1].close)
        assert small_map.entries() == MAP_SIZE - 1
        before = small_map.counters()
        client, server = kit.connected_pair(listener, inside, '4', '127.0.0.1')
        stack.callback(client.close)
        stack.callback(server.close)
        up, down = data(7, 'up') * 10, data(7, 'down') * 10
        assert kit.exchange(client, server, up, down) == (up, down)
        change = kit.delta(before, small_map.counters())
        assert small_map.entries() == MAP_SIZE
        assert change['inserted'] == 1 and change['insert_full'] == 1
        assert change['redirected_bytes'] == 0
        assert change['passed_bytes'] == len(up)


def test_a_thousand_concurrent_connections_through_an_eight_entry_map(small_map, netns):
    """Under load: 8 sockets fit, 1,992 do not; every connection still checks out."""
    kit.wait_until(lambda: small_map.entries() == 0, 10, 'an empty map')
    before = small_map.counters()
    proc, reports = run_load(small_map.cgroup, netns, 'ipv4', False, 42)
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-2000:])
    assert reports['server']['ok'] == reports['client']['confirmed'] == 1000
    change = kit.delta(before, small_map.counters())
    assert change['inserted'] == MAP_SIZE
    assert change['insert_full'] == 2 * 1000 - MAP_SIZE
    assert change['insert_failed'] == 0
