"""Address families and mixed peers: the bytes arrive intact whichever way they travel.

IPv4, IPv6 and IPv4-mapped IPv6 (a server on "::" accepting an IPv4 client),
each with both ends in the attached cgroup (redirected) and with one end
outside it (plain TCP both ways: the end inside is not admitted into the map,
its peer not being a socket under the programs). Messages of 1 byte to 1 MiB and a burst of many small writes,
in both directions at once; the counters say which path each byte took.
"""

import random

import pytest

from . import kit

SIZES = (1, 1000, 65536, 1 << 20)
SMALL_WRITES = 500


def messages(seed):
    rng = random.Random(seed)
    return [rng.randbytes(n) for n in SIZES]


def send_small_writes(sock, seed):
    rng = random.Random(seed)
    chunks = [rng.randbytes(rng.randint(1, 200)) for _chunk in range(SMALL_WRITES)]
    for chunk in chunks:
        sock.sendall(chunk)
    return b''.join(chunks)


@pytest.mark.parametrize('family', sorted(kit.FAMILIES))
@pytest.mark.parametrize('mix', ['both inside', 'client outside', 'server outside'])
def test_data_intact(redirection, netns, family, mix):
    bind, address, client_family = kit.FAMILIES[family]
    client_cg = redirection.plain_cgroup if mix == 'client outside' else redirection.cgroup
    server_cg = redirection.plain_cgroup if mix == 'server outside' else redirection.cgroup
    with kit.SocketFactory(client_cg, netns) as client_side, kit.SocketFactory(server_cg, netns) as server_side:
        listener = server_side.listen(bind)
        client, server = kit.connected_pair(listener, client_side, client_family, address)
        try:
            before = redirection.counters()
            up_total = down_total = 0
            for up, down in zip(messages(1), messages(2)):
                got_up, got_down = kit.exchange(client, server, up, down)
                assert got_up == up and got_down == down, (family, mix, len(up))
                up_total += len(up)
                down_total += len(down)
            # a burst of small writes each way, read as one stream
            with kit.concurrent_calls() as calls:
                calls.submit(send_small_writes, client, 3)
                calls.submit(send_small_writes, server, 4)
            burst_up, burst_down = calls.results
            assert kit.recv_exactly(server, len(burst_up)) == burst_up
            assert kit.recv_exactly(client, len(burst_down)) == burst_down
            up_total += len(burst_up)
            down_total += len(burst_down)
            assert kit.pending(client) == kit.pending(server) == 'idle'
            change = kit.delta(before, redirection.counters())
        finally:
            for sock in (client, server, listener):
                sock.close()
    if mix == 'both inside':
        assert change['redirected_bytes'] == up_total + down_total
        assert change['passed_bytes'] == 0
    else:                              # neither end entered the map: sk_msg never ran
        assert change['redirected_bytes'] == 0
        assert change['passed_bytes'] == 0
