"""Integrity under load: 1,000 concurrent connections, each with its own random payload.

loadpeer.py (inside the attached cgroup and a fresh namespace) opens 1,000
connections to itself from a forked client process; each sends a header
(index, length, sha256) and 64 KiB of bytes seeded by its index, the server
side checks length and sha256 of what arrived on each connection and sends
its sha256 back, which the client checks too. "all open": every connection is
established before the first byte is sent, so all 1,000 are open at once.
"eager": each sends as soon as its connect() returns, racing the server
side's insertion into the map.
"""

import json
import os
import subprocess

import pytest

from . import kit

CONNECTIONS = 1000
BYTES = 64 * 1024
PEER = os.path.join(kit.HERE, 'loadpeer.py')


def run_load(cgroup, netns, family, eager, seed, timeout=60):
    bind, address = kit.FAMILIES[family][:2]
    argv = [kit.PYTHON, PEER, '--bind', bind, '--connect', address, '--connections', str(CONNECTIONS),
            '--bytes', str(BYTES), '--seed', str(seed), '--timeout', str(timeout)]
    proc = subprocess.run(kit.in_place(cgroup, netns, argv + (['--eager'] if eager else [])),
                          capture_output=True, text=True, timeout=timeout + 30, check=False)
    reports = {}
    for line in proc.stdout.splitlines():
        report = json.loads(line)
        reports[report['role']] = report
    return proc, reports


@pytest.mark.parametrize('family', sorted(kit.FAMILIES))
@pytest.mark.parametrize('mode', ['all open', 'eager'])
def test_thousand_concurrent_connections_each_verified(redirection, netns, family, mode):
    seed = sorted(kit.FAMILIES).index(family) * 2 + (mode == 'eager')
    before = redirection.counters()
    proc, reports = run_load(redirection.cgroup, netns, family, mode == 'eager', seed)
    change = kit.delta(before, redirection.counters())
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-2000:])
    server, client = reports['server'], reports['client']
    assert server['ok'] == CONNECTIONS and server['nbad'] == 0, server
    assert server['bytes'] == CONNECTIONS * BYTES
    assert client['confirmed'] == CONNECTIONS and not client['mismatch'] and not client['errors'], client
    if mode == 'all open':
        assert client['all_open_at_once'] and server['peak_open'] == CONNECTIONS
    # every connection's both ends went into the map and every byte was redirected, but the
    # replies: the client left the map at its shutdown(SHUT_WR), so they went TCP
    assert change['inserted'] == 2 * CONNECTIONS
    assert change['insert_full'] == change['insert_failed'] == 0
    payload_and_headers = CONNECTIONS * (BYTES + 40)
    replies = CONNECTIONS * 32
    assert change['redirected_bytes'] == payload_and_headers
    assert change['passed_bytes'] == replies and change['tcp_peer_absent'] == CONNECTIONS
    kit.wait_until(lambda: redirection.entries() == 0, 10, 'the closed sockets to leave the sockhash')


def test_the_same_load_without_redirection_is_the_control(redirection, netns):
    """The peer itself is right: the same run in the unattached cgroup passes and counts nothing."""
    before = redirection.counters()
    proc, reports = run_load(redirection.plain_cgroup, netns, 'ipv4', False, 1)
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-2000:])
    assert reports['server']['ok'] == CONNECTIONS
    assert kit.delta(before, redirection.counters()) == dict.fromkeys(before, 0)
