"""Faults: a peer killed mid-transfer, and the programs attached and removed mid-transfer.

Nothing may hang beyond a bounded timeout, and every connection that stays
open must deliver exactly the bytes that were sent. The kernel log is
checked after the suite (conftest.py).
"""

import contextlib
import os
import time

import pytest

from support import hostenv

from . import kit
from .streampeer import stream_sha256

HANG = 10          # seconds a surviving peer may take to notice the other one died
ENDLESS = 1 << 40  # bytes: the victim stream never finishes by itself


@pytest.mark.parametrize('family', ['ipv4', 'ipv6'])
@pytest.mark.parametrize('killed', ['client', 'server', 'server, while the client waits for memory'])
def test_peer_killed_mid_transfer(redirection, netns, family, killed):
    """SIGKILL one end of a redirected stream; a paced bystander stream runs alongside."""
    cg = redirection.cgroup
    slow = killed.startswith('server, while')
    with kit.Stream(netns, family, 2, cg, cg, bytes=ENDLESS, read_pause=0.05 if slow else 0.0) as victim:
        before = redirection.counters()
        threshold = (1 << 20) if slow else (16 << 20)
        kit.wait_until(lambda: kit.delta(before, redirection.counters())['redirected_bytes'] >= threshold,
                       20, 'the victim stream to be under way')
        with kit.Stream(netns, family, 1, cg, cg, seconds=1.5, pace=0.005) as bystander:
            kit.wait_until(lambda: kit.delta(before, redirection.counters())['inserted'] == 4, 10,
                           'the bystander stream to connect')
            if slow:
                time.sleep(0.5)   # far behind: the sender sleeps in sendmsg, waiting for memory
            (victim.client if killed == 'client' else victim.server).kill()
            start = time.monotonic()
            if killed == 'client':
                survivor = victim.server_report(HANG)
                assert survivor['end'] in ('eof', 'ECONNRESET'), survivor
                # what arrived is an exact prefix of what was sent
                assert survivor['recv_sha256'] == stream_sha256(2, survivor['recv_bytes'])
            else:
                survivor = victim.client_report(HANG)
                assert survivor['end'] in ('EPIPE', 'ECONNRESET'), survivor
            assert time.monotonic() - start < HANG
            server, client = bystander.wait(60)
    assert client['end'] == server['end'] == 'eof'
    assert client['sent_bytes'] == server['recv_bytes'] > 0
    assert client['sent_sha256'] == server['recv_sha256']


def test_role_attaches_and_removes_itself_mid_transfer(tmp_path):
    """The role turns redirection on, then off (state: absent), while streams flow.

    Streams opened before the role ran keep going over TCP (sock_ops only sees
    new connections); streams opened after are redirected; the role's
    state: absent runs while both kinds are in the middle of a transfer,
    with slow readers so that redirected data is queued at that moment.
    """
    families = sorted(kit.FAMILIES)
    with hostenv.child_cgroup(kit.PREFIX) as cg, hostenv.netns(kit.PREFIX) as ns, \
            contextlib.ExitStack() as stack:
        role = kit.RoleInstance(tmp_path, cg)
        stack.callback(role.cleanup)
        early = [stack.enter_context(kit.Stream(ns, f, 10 + i, cg, cg, seconds=120, pace=0.02,
                                                read_pause=0.025, timeout=150))
                 for i, f in enumerate(families)]
        time.sleep(1)
        on = role.run('present')
        assert on.rc == 0, on
        ids = role.program_ids()
        assert set(ids) == {'sockredir_ops', 'sockredir_msg'}
        assert role.attached() == (['sockredir_ops'], 'sockredir_msg')
        before = kit.counters(role.pin_root)
        time.sleep(0.5)
        assert kit.counters(role.pin_root) == before, 'connections made before the attach are redirected'

        late = [stack.enter_context(kit.Stream(ns, f, 20 + i, cg, cg, seconds=120, pace=0.02,
                                               read_pause=0.025, timeout=150))
                for i, f in enumerate(families)]
        kit.wait_until(lambda: kit.delta(before, kit.counters(role.pin_root))['redirected_bytes'] > (1 << 20),
                       10, 'the new streams to be redirected')
        assert kit.delta(before, kit.counters(role.pin_root))['inserted'] == 2 * len(late)

        off = role.run('absent')
        assert off.rc == 0, off
        running = [s for s in early + late if s.client.poll() is None and s.server.poll() is None]
        assert len(running) == len(early + late), 'a stream ended before the role removed itself'
        assert not os.path.exists(role.pin_root)
        assert role.attached() == ([], None)
        assert role.recorded() is None

        for stream in early + late:
            stream.stop()
        for stream in early + late:
            server, client = stream.wait(60)
            assert client['end'] == server['end'] == 'eof', (server, client)
            assert client['sent_bytes'] == server['recv_bytes'] > 0
            assert client['sent_sha256'] == server['recv_sha256']
        # the sockets held the last references to the programs: now nothing is left
        kit.wait_until(lambda: not any(kit.program_exists(i) for i in ids.values()), 10,
                       'programs %s to be unloaded' % sorted(ids.values()))
