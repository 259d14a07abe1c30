"""The path each flow takes: admission, the one-way switch to TCP, small writes.

Every scenario runs on the real kernel with the collection's programs on a
child cgroup (kit.Redirection) and checks two things: what the application
sees (every byte, in order; blocking reads that never fail with EAGAIN; no
40 ms stalls), and the counters that say which path the programs chose, so a
test cannot pass because nothing was redirected in the first place.
"""

import errno
import socket
import struct
import subprocess
import threading
import time

import pytest

import conftest
from support import hostenv

from . import kit

MSG_FASTOPEN = 0x20000000
TCP_FASTOPEN = 23
RECORD = struct.Struct('!I60x')          # a 64-byte record carrying its sequence number


def records(first, count):
    return b''.join(RECORD.pack(i) for i in range(first, first + count))


def sequence_of(data, size=RECORD.size):
    return [struct.unpack_from('!I', data, off)[0] for off in range(0, len(data), size)]


def sysctl(netns, name, value):
    subprocess.run(['ip', 'netns', 'exec', netns, 'sysctl', '-qw', '%s=%s' % (name, value)],
                   check=True)


def nft(netns, *args):
    subprocess.run(['ip', 'netns', 'exec', netns, 'nft'] + list(args), check=True)


def blocking(sock, rcvtimeo=30):
    """A truly blocking socket (Python's timeouts would retry EAGAIN behind our back),
    bounded by SO_RCVTIMEO: an EAGAIN sooner than that is a spurious one."""
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack('ll', rcvtimeo, 0))
    return sock


def read_to_eof(sock):
    chunks = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return b''.join(chunks)
        chunks.append(chunk)


def write_shutdown_read_reply(client, server, payload, write_size):
    """The pattern that showed spurious EAGAIN: stream, SHUT_WR, block for an 8-byte reply.

    Returns None on success, else what the client's blocking read raised.
    """
    def serve():
        got['n'] = len(read_to_eof(server))
        server.sendall(b'thanks!\n')

    got = {}
    reader = threading.Thread(target=serve)
    reader.start()
    view = memoryview(payload)
    for off in range(0, len(payload), write_size):
        client.sendall(view[off:off + write_size])
    client.shutdown(socket.SHUT_WR)
    started = time.monotonic()
    try:
        reply = kit.recv_exactly(client, 8)
        outcome = None if reply == b'thanks!\n' else 'short reply %r' % reply
    except OSError as e:
        outcome = '%s after %.3fs' % (errno.errorcode.get(e.errno, e.errno),
                                      time.monotonic() - started)
    reader.join(30)
    assert got.get('n') == len(payload)
    return outcome


@pytest.fixture(scope='module')
def redirection(tmp_path_factory):
    """The prebuilt object (what the role loads by default): it can see a socket's redirected
    queue, which the small-write switch needs (the BCC build keeps small writes redirected)."""
    with kit.Redirection(tmp_path_factory.mktemp('redirection'), obj=conftest.OBJECT) as r:
        yield r


@pytest.fixture(scope='module')
def bcc_redirection(tmp_path_factory):
    with kit.Redirection(tmp_path_factory.mktemp('bcc')) as r:
        yield r


def set_cfg(redirection, small_bytes=0, small_streak=0):
    value = struct.pack('<IIII', small_bytes, small_streak, 0, 0)
    subprocess.run(['bpftool', 'map', 'update', 'pinned', redirection.pin_dir + '/sockredir_cfg',
                    'key', 'hex', '00', '00', '00', '00', 'value', 'hex']
                   + ['%02x' % b for b in value], check=True)


@pytest.fixture
def default_cfg(redirection):
    set_cfg(redirection)
    yield redirection
    set_cfg(redirection)


def test_fast_open_data_is_read_first(redirection, netns):
    """Data in the SYN crossed TCP before either socket could be inserted: the flow stays TCP."""
    sysctl(netns, 'net.ipv4.tcp_fastopen', 3)
    chunks = [records(i * 4, 4) for i in range(16)]
    before = redirection.counters()
    in_order = 0
    with kit.SocketFactory(redirection.cgroup, netns) as f:
        listener = f.listen('127.0.0.1')
        listener.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 256)
        address = listener.getsockname()
        for _run in range(200):
            client = blocking(f.socket('4'))
            client.sendto(chunks[0], MSG_FASTOPEN, address)
            for chunk in chunks[1:]:
                client.sendall(chunk)
            client.shutdown(socket.SHUT_WR)
            accepted = listener.accept()[0]
            data = read_to_eof(blocking(accepted))   # everything has arrived
            in_order += sequence_of(data) == list(range(64))
            client.close()
            accepted.close()
        listener.close()
    d = kit.delta(before, redirection.counters())
    assert in_order == 200
    # the SYN carried data on all but the first connection (which fetched the cookie)
    assert d['not_admitted_early_data'] >= 199, d
    assert d['redirected_bytes'] == 0, d


def test_first_send_before_the_peer_is_inserted_stays_tcp(redirection, netns):
    """The handshake's last ACK is lost: the accept()ing side is established by the first
    data segment, after the connecting side sent over TCP. Nothing may be redirected after it."""
    nft(netns, 'add', 'table', 'inet', 'srtest')
    nft(netns, 'add', 'chain', 'inet', 'srtest', 'in', '{ type filter hook input priority 0; }')
    before = redirection.counters()
    in_order = 0
    with kit.SocketFactory(redirection.cgroup, netns) as f:
        listener = f.listen('127.0.0.1')
        port = listener.getsockname()[1]
        # a pure ACK (no payload: 20 + 32 bytes with timestamps) to the listener's port
        nft(netns, 'add', 'rule', 'inet', 'srtest', 'in', 'tcp', 'dport', str(port),
            'tcp', 'flags', '==', 'ack', 'ip', 'length', '52', 'drop')
        for _run in range(50):
            client = blocking(f.connect('4', '127.0.0.1', port))
            for i in range(16):
                client.sendall(records(i * 4, 4))
            client.shutdown(socket.SHUT_WR)
            accepted = listener.accept()[0]
            in_order += sequence_of(read_to_eof(blocking(accepted))) == list(range(64))
            client.close()
            accepted.close()
        listener.close()
    d = kit.delta(before, redirection.counters())
    assert in_order == 50
    assert d['tcp_peer_absent'] >= 50, d          # each client's first send found no peer
    assert d['redirected_bytes'] == 0, d
    assert d['removed'] >= 50, d                  # and the client left the map at its first ACK


def test_first_sends_racing_the_handshake_under_load(redirection, netns):
    """400 connections from 16 threads at once, each writing the moment connect() returns,
    while the accept()ing side is busy: whichever path each flow takes, its bytes arrive in order."""
    per_thread, threads, chunks = 25, 16, 16
    results, errors = [], []
    with kit.SocketFactory(redirection.cgroup, netns) as f:
        listener = f.listen('127.0.0.1')
        port = listener.getsockname()[1]

        def client_thread():
            try:
                for _run in range(per_thread):
                    client = blocking(f.connect('4', '127.0.0.1', port))
                    for i in range(chunks):
                        client.sendall(records(i * 4, 4))
                    client.shutdown(socket.SHUT_WR)
                    client.recv(1)                # the server's close
                    client.close()
            except OSError as e:
                errors.append(repr(e))

        def serve_one(accepted):
            try:
                results.append(sequence_of(read_to_eof(blocking(accepted))) == list(range(chunks * 4)))
            finally:
                accepted.close()

        before = redirection.counters()
        clients = [threading.Thread(target=client_thread) for _run in range(threads)]
        for t in clients:
            t.start()
        servers = []
        for _run in range(per_thread * threads):
            accepted = listener.accept()[0]
            servers.append(threading.Thread(target=serve_one, args=(accepted,)))
            servers[-1].start()
        for t in clients + servers:
            t.join(60)
        listener.close()
    d = kit.delta(before, redirection.counters())
    assert errors == []
    assert results.count(True) == per_thread * threads, results.count(False)
    # every flow was decided one way or the other, and most were redirected
    assert d['inserted'] + d['not_admitted_peer'] + d['not_admitted_early_data'] == 2 * 400, d
    assert d['redirected_bytes'] > 0, d


def test_peer_on_another_host_is_not_admitted_and_reads_never_fail(redirection):
    """The peer is in another namespace over veth: the client never enters the map, and its
    blocking reads never see the spurious EAGAIN of a socket in the map fed by TCP."""
    with hostenv.netns(kit.PREFIX) as here, hostenv.netns(kit.PREFIX + '-far') as far, \
            hostenv.veth_link(here, far) as (_near_addr, far_addr), \
            kit.SocketFactory(redirection.cgroup, here) as near, \
            kit.SocketFactory(redirection.plain_cgroup, far) as remote:
        listener = remote.listen(far_addr)
        port = listener.getsockname()[1]
        payload = bytes(range(256)) * 65536       # 16 MiB
        before = redirection.counters()
        outcomes = []
        for _run in range(20):
            client = blocking(near.connect('4', far_addr, port))
            accepted = listener.accept()[0]
            outcomes.append(write_shutdown_read_reply(client, blocking(accepted), payload, 65536))
            client.close()
            accepted.close()
        listener.close()
    d = kit.delta(before, redirection.counters())
    assert outcomes == [None] * 20
    assert d['inserted'] == 0 and d['not_admitted_peer'] == 20, d
    assert d['passed_msgs'] == 0, d               # sk_msg never ran for these sockets


def test_small_write_stream_goes_tcp_and_reads_never_fail(redirection, netns, default_cfg):
    """A Nagle-on stream of small writes leaves the redirect after the streak, for good, and the
    writer leaves the map: its blocking read of the reply never fails."""
    before = redirection.counters()
    outcomes = []
    payload = records(0, 32768)                   # 2 MiB in 64-byte records
    with kit.SocketFactory(redirection.cgroup, netns) as f:
        listener = f.listen('127.0.0.1')
        for _run in range(20):
            client, accepted = kit.connected_pair(listener, f, '4', '127.0.0.1')
            outcomes.append(write_shutdown_read_reply(blocking(client), blocking(accepted),
                                                      payload, 1024))
            client.close()
            accepted.close()
        listener.close()
    d = kit.delta(before, redirection.counters())
    assert outcomes == [None] * 20
    assert d['demoted_small_writes'] == 20 and d['removed'] >= 20, d
    # the first 15 writes of each stream were redirected, the streak's 16th and the rest not
    assert d['redirected_bytes'] == 20 * 15 * 1024, d
    # the replies found the writer gone and went TCP too
    assert d['tcp_peer_absent'] == 20, d


def test_a_socket_that_received_redirected_bytes_keeps_redirecting(redirection, netns, default_cfg):
    """Its queue may still hold redirected bytes, so it cannot leave the map: no demotion."""
    before = redirection.counters()
    with kit.SocketFactory(redirection.cgroup, netns) as f:
        listener = f.listen('127.0.0.1')
        client, accepted = kit.connected_pair(listener, f, '4', '127.0.0.1')
        accepted.sendall(b'hello')                # opens the client's receive gate for good
        assert kit.recv_exactly(client, 5) == b'hello'
        outcome = write_shutdown_read_reply(blocking(client), blocking(accepted),
                                            records(0, 4096), 64)
        client.close()
        accepted.close()
        listener.close()
    d = kit.delta(before, redirection.counters())
    assert outcome is None
    assert d['demotion_refused'] == 1 and d['demoted_small_writes'] == 0, d
    # the client's shutdown switched the server's reply to TCP, nothing else went TCP
    assert d['passed_bytes'] == 8 and d['redirected_bytes'] == 5 + 4096 * RECORD.size, d


@pytest.mark.parametrize('server_starts', ['before the switch', 'after the switch'])
def test_order_across_the_switch_both_directions(redirection, netns, default_cfg, server_starts):
    """Sequence-numbered records both ways at once, slow readers so that redirected bytes wait
    in the receive queue when the path changes, and a close right after the switch."""
    set_cfg(redirection, small_streak=4)
    runs, count = 10, 2000
    before = redirection.counters()
    with kit.SocketFactory(redirection.cgroup, netns) as f:
        listener = f.listen('127.0.0.1')
        for _run in range(runs):
            client, accepted = kit.connected_pair(listener, f, '4', '127.0.0.1')
            client, accepted = blocking(client), blocking(accepted)
            got = {}

            def serve(sock=accepted):
                if server_starts == 'before the switch':
                    sock.sendall(records(0, 1))
                time.sleep(0.05)                  # slow reader: the client's first records wait
                got['client->server'] = read_to_eof(sock)
                sock.sendall(records(1, count - 1) if server_starts == 'before the switch'
                             else records(0, count))
                sock.close()                      # right after its last record

            server = threading.Thread(target=serve)
            server.start()
            if server_starts == 'before the switch':   # its first record is there, unread
                assert len(client.recv(RECORD.size, socket.MSG_PEEK | socket.MSG_WAITALL)) > 0
            for i in range(count):
                client.sendall(records(i, 1))     # small writes: the streak switches them
            client.shutdown(socket.SHUT_WR)
            time.sleep(0.02)                      # the client reads late too
            got['server->client'] = read_to_eof(client)
            server.join(30)
            client.close()
            assert sequence_of(got['client->server']) == list(range(count))
            assert sequence_of(got['server->client']) == list(range(count))
        listener.close()
    d = kit.delta(before, redirection.counters())
    assert d['redirected_bytes'] > 0, d           # some bytes went each way before any switch
    if server_starts == 'after the switch':
        assert d['demoted_small_writes'] == runs and d['tcp_peer_absent'] == runs, d
    else:
        assert d['demotion_refused'] == runs and d['demoted_small_writes'] == 0, d


def test_request_response_with_split_writes_never_stalls(redirection, netns, default_cfg):
    """write-write-read with Nagle on: over TCP this is the 40 ms delayed-ACK stall. Redirected
    request/response must never be switched to TCP by the small-write rule."""
    before = redirection.counters()
    latencies = []
    with kit.SocketFactory(redirection.cgroup, netns) as f:
        listener = f.listen('127.0.0.1')
        client, accepted = kit.connected_pair(listener, f, '4', '127.0.0.1')
        client, accepted = blocking(client), blocking(accepted)

        def serve():
            while True:
                request = kit.recv_exactly(accepted, 96)
                if len(request) < 96:
                    return
                accepted.sendall(request[:32])
                accepted.sendall(request[32:])

        server = threading.Thread(target=serve)
        server.start()
        for i in range(2000):
            started = time.monotonic()
            client.sendall(records(i, 1)[:32])    # header
            client.sendall(records(i, 1))         # body
            assert kit.recv_exactly(client, 96) == records(i, 1)[:32] + records(i, 1)
            latencies.append(time.monotonic() - started)
        client.shutdown(socket.SHUT_WR)
        server.join(10)
        client.close()
        accepted.close()
        listener.close()
    d = kit.delta(before, redirection.counters())
    latencies.sort()
    assert latencies[int(len(latencies) * 0.99)] < 0.010, latencies[-10:]
    assert d['demoted_small_writes'] == 0 and d['passed_bytes'] == 0, d
    assert d['redirected_msgs'] == 2000 * 4, d


def test_the_receiver_leaves_once_drained_and_its_reads_never_fail(redirection, netns, default_cfg):
    """After the writer's small-write switch, the receiver (which holds redirected bytes, so it
    stayed in the map) answers with a bulk transfer over TCP, then blocks for a reply: it left
    the map once its redirected queue was empty, so its blocking read never fails."""
    before = redirection.counters()
    outcomes = []
    with kit.SocketFactory(redirection.cgroup, netns) as f:
        listener = f.listen('127.0.0.1')
        for _run in range(20):
            writer, receiver = kit.connected_pair(listener, f, '4', '127.0.0.1')
            writer, receiver = blocking(writer), blocking(receiver)
            for i in range(64):
                writer.sendall(records(i, 1))     # switches after 16
            assert sequence_of(kit.recv_exactly(receiver, 64 * RECORD.size)) == list(range(64))
            outcomes.append(write_shutdown_read_reply(receiver, writer, bytes(16 << 20), 65536))
            writer.close()
            receiver.close()
        listener.close()
    d = kit.delta(before, redirection.counters())
    assert outcomes == [None] * 20
    assert d['demoted_small_writes'] == 20 and d['removed'] == 40, d


def test_bcc_build_keeps_small_writes_redirected(bcc_redirection, netns):
    """BCC cannot see a socket's redirected queue, so it never switches small writes: slower,
    never unsafe. The writer leaves the map at its shutdown (nothing was ever redirected into
    it), so its blocking read of the reply never fails, and the reply goes TCP."""
    runs = 10
    before = bcc_redirection.counters()
    outcomes = []
    with kit.SocketFactory(bcc_redirection.cgroup, netns) as f:
        listener = f.listen('127.0.0.1')
        for _run in range(runs):
            client, accepted = kit.connected_pair(listener, f, '4', '127.0.0.1')
            outcomes.append(write_shutdown_read_reply(blocking(client), blocking(accepted),
                                                      records(0, 4096), 64))
            client.close()
            accepted.close()
        listener.close()
    d = kit.delta(before, bcc_redirection.counters())
    assert outcomes == [None] * runs
    assert d['demoted_small_writes'] == 0 and d['redirected_bytes'] == runs * 4096 * RECORD.size, d
    assert d['removed'] == runs and d['tcp_peer_absent'] == runs and d['passed_bytes'] == runs * 8, d
