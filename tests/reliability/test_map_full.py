"""Map full: connections beyond the sockhash's size fall back to plain TCP, silently and counted.

The programs here are built with SOCKREDIR_MAP_SIZE=8 (four connections, two
ends each). The application never sees an error; insert_full counts every
connecting socket that did not fit, and its accept()ed peer is then not
admitted either (not_admitted_peer): a connection is in the map with both
ends or not at all. Freed entries are used again, and a full map leaves no
dead per-connection state behind.
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
        assert change['insert_full'] == change['not_admitted_peer'] == len(pairs) - MAP_SIZE // 2
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
        assert change['inserted'] == MAP_SIZE and change['insert_full'] == change['not_admitted_peer'] == 1
        assert change['insert_failed'] == 0   # the flow map (8 connections) kept no dead entries
        assert change['redirected_bytes'] == sum(u + d for u, d in sizes[:MAP_SIZE // 2])
        assert change['passed_bytes'] == 0


def test_a_thousand_concurrent_connections_through_an_eight_entry_map(small_map, netns):
    """Under load: 8 sockets fit at a time; every socket is decided once; every connection checks out."""
    kit.wait_until(lambda: small_map.entries() == 0, 10, 'an empty map')
    before = small_map.counters()
    proc, reports = run_load(small_map.cgroup, netns, 'ipv4', False, 42)
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-2000:])
    assert reports['server']['ok'] == reports['client']['confirmed'] == 1000
    change = kit.delta(before, small_map.counters())
    decided = ('inserted', 'insert_full', 'insert_failed', 'not_admitted_peer', 'not_admitted_early_data',
               'not_admitted_policy')
    assert sum(change[k] for k in decided) == 2 * 1000, change
    assert change['inserted'] >= MAP_SIZE and change['insert_full'] > 0, change
    assert change['insert_failed'] == 0, change
