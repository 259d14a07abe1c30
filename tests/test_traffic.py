"""Real bytes through the real kernel: intact, redirected, and never across namespaces.

Each transfer runs inside a network namespace made for it, so the lo packet
counter there counts only this transfer: thousands of packets over plain TCP,
a handful (the handshake and the close) when the payload is redirected.
"""

import concurrent.futures
import subprocess

import pytest

from conftest import converge_tasks
from support import hostenv

from ansible_collections.ebpf.sockredir.plugins.module_utils import facts

MIB64 = 64 << 20
FEW_PACKETS = 40        # handshake + close: 6 measured on this kernel
MANY_PACKETS = 1000     # 64 MiB over TCP loopback: ~3,000 measured

FAMILIES = {
    'ipv4': ('127.0.0.1', '127.0.0.1'),
    'ipv6': ('::1', '::1'),
    'ipv4-client-to-dual-stack-server': ('::', '127.0.0.1'),
}


def counters(pin_dir):
    return facts.pin_dir_facts(pin_dir)['counters']


def transfer_measured(cgroup, ns, bind, connect, seed, **kw):
    before = hostenv.lo_packets(ns)
    result = hostenv.transfer(cgroup, ns, bind, connect, 0, MIB64, seed, **kw)
    return result, hostenv.lo_packets(ns) - before


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_payload_is_redirected_intact(redirected, family):
    pin_dir, cgroup = redirected
    bind, connect = FAMILIES[family]
    with hostenv.netns('srtest') as ns:
        before = counters(pin_dir)
        result, lo = transfer_measured(cgroup, ns, bind, connect, seed=7)
        after = counters(pin_dir)
    assert result['recv_bytes'] == result['sent_bytes'] == MIB64
    assert result['recv_sha256'] == result['sent_sha256']
    assert after['redirected_bytes'] - before['redirected_bytes'] >= MIB64
    assert after['inserted'] - before['inserted'] == 2   # both ends of the connection
    assert lo < FEW_PACKETS, '%d lo packets: the payload went through TCP' % lo


def test_without_attachment_the_same_transfer_walks_tcp(cgroup):
    """The control for the packet bound above: it is the redirect that makes lo quiet."""
    with hostenv.netns('srtest') as ns:
        result, lo = transfer_measured(cgroup, ns, '127.0.0.1', '127.0.0.1', seed=7)
    assert result['recv_sha256'] == result['sent_sha256']
    assert lo > MANY_PACKETS


def test_peer_outside_the_cgroup_is_not_redirected(redirected):
    pin_dir, cgroup = redirected
    with hostenv.netns('srtest') as ns:
        before = counters(pin_dir)
        result, lo = transfer_measured(cgroup, ns, '127.0.0.1', '127.0.0.1', seed=3,
                                       server_cgroup=hostenv.NO_CGROUP)
        after = counters(pin_dir)
    assert result['recv_sha256'] == result['sent_sha256']
    assert after['redirected_bytes'] == before['redirected_bytes']
    # not admitted at all: the client never entered the map, sk_msg never ran
    assert after['inserted'] == before['inserted']
    assert after['not_admitted_peer'] - before['not_admitted_peer'] == 1
    assert after['passed_bytes'] == before['passed_bytes']
    assert lo > MANY_PACKETS


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_identical_tuples_in_two_namespaces_never_cross(redirected, family):
    """Same addresses and ports, at the same time, in two namespaces: each gets its own bytes."""
    pin_dir, cgroup = redirected
    bind, connect = FAMILIES[family]
    port, client_port = 42424, 42425
    with hostenv.netns('srtest-a') as ns_a, hostenv.netns('srtest-b') as ns_b:
        before = counters(pin_dir)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(hostenv.transfer, cgroup, ns, bind, connect, port, MIB64, seed,
                                client_port=client_port)
                    for ns, seed in ((ns_a, 101), (ns_b, 202))]
            a, b = [r.result() for r in runs]
        after = counters(pin_dir)
    assert a['recv_sha256'] == a['sent_sha256']
    assert b['recv_sha256'] == b['sent_sha256']
    assert a['sent_sha256'] != b['sent_sha256']
    # both were redirected, so the isolation above is the key's doing, not TCP's
    assert after['redirected_bytes'] - before['redirected_bytes'] >= 2 * MIB64
    assert after['inserted'] - before['inserted'] == 4


def test_reload_keeps_established_sockets_in_the_map(play, redirected, tmp_path):
    """An upgrade of the programs reuses the maps: open connections stay in the sockhash."""
    pin_dir, cgroup = redirected
    with hostenv.netns('srtest') as ns:
        hold = subprocess.Popen(
            ['sh', '-c', 'echo $$ > %s/cgroup.procs && exec nsenter --net=/run/netns/%s '
             'socat TCP6-LISTEN:4433,bind=[::1],reuseaddr EXEC:"sleep 60"' % (cgroup, ns)])
        client = None
        try:
            hostenv._wait_until(lambda: subprocess.run(
                ['nsenter', '--net=/run/netns/' + ns, 'ss', '-Hltn', 'sport = :4433'],
                capture_output=True, text=True, check=False).stdout.strip() != '', 10, 'socat listening')
            client = subprocess.Popen(
                ['sh', '-c', 'echo $$ > %s/cgroup.procs && exec nsenter --net=/run/netns/%s '
                 'socat TCP6:[::1]:4433 EXEC:"sleep 60"' % (cgroup, ns)])
            hostenv._wait_until(lambda: facts.pin_dir_facts(pin_dir)['maps']['sockredir_hash']['entries'] == 2,
                                10, 'both sockets in the sockhash')
            hash_id = facts.pin_dir_facts(pin_dir)['maps']['sockredir_hash']['id']

            result = play(converge_tasks(pin_dir, cgroup, defines={'SOCKREDIR_DENY_PORTS': '9'}))
            assert result.rc == 0, result
            assert result.tasks['load']['changed'] and result.tasks['attach ops']['changed']

            now = facts.pin_dir_facts(pin_dir)['maps']['sockredir_hash']
            assert now['id'] == hash_id
            assert now['entries'] == 2
        finally:
            for proc in (client, hold):
                if proc is not None:
                    proc.kill()
                    proc.wait()
