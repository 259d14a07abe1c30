"""The role's default loader (the prebuilt object) and the run-time settings (issue 15).

Real kernel: the role converges a child cgroup of the test's own; connections are made
in that cgroup inside a network namespace of the test's own. A policy change or the
debug switch is a map write: program ids stay (bpftool as witness), an established
redirected connection keeps working, a new connection meets the new policy.
"""

import json
import os
import queue
import select
import subprocess
import threading

import pytest

from conftest import bpftool_json
from support import hostenv
from reliability import kit

from ansible_collections.ebpf.sockredir.plugins.module_utils import instance, policy

PREFIX = 'integrt'
TRACE_PIPES = ('/sys/kernel/tracing/trace_pipe', '/sys/kernel/debug/tracing/trace_pipe')


@pytest.fixture
def role(tmp_path):
    with hostenv.child_cgroup(PREFIX) as cgroup:
        inst = kit.RoleInstance(tmp_path, cgroup)
        try:
            yield inst
        finally:
            inst.cleanup()


def bpftool_ids(pin_root):
    return {name: bpftool_json('prog', 'show', 'pinned', os.path.join(pin_root, name))['id']
            for name in ('sockredir_ops', 'sockredir_msg')}


def redirected_pair(factory):
    listener = factory.listen('127.0.0.1')
    client = factory.connect('4', '127.0.0.1', listener.getsockname()[1])
    server = listener.accept()[0]
    server.settimeout(kit.SOCKET_TIMEOUT)
    return listener, client, server


def roundtrip(client, server, data=b'x' * 4096):
    client.sendall(data)
    assert kit.recv_exactly(server, len(data)) == data
    server.sendall(data)
    assert kit.recv_exactly(client, len(data)) == data


def recorded_loader(role):
    with open(instance.record_path(role.pin_root)) as f:
        return json.load(f)['params']['loader']


def settings_of(role):
    from ansible_collections.ebpf.sockredir.plugins.module_utils import pins
    with pins.PinDir(role.pin_root, 'pin_root') as at:
        return policy.read(at)


@pytest.fixture
def tracefs():
    """tracefs at /sys/kernel/tracing, mounted for the test when the host has it nowhere."""
    if any(os.path.exists(p) for p in TRACE_PIPES):
        yield
        return
    subprocess.run(['mount', '-t', 'tracefs', 'tracefs', '/sys/kernel/tracing'], check=True)
    try:
        yield
    finally:
        subprocess.run(['umount', '/sys/kernel/tracing'], check=False)


class TraceReader(object):
    """trace_pipe lines naming an instance, read in a thread (a read blocks until a line comes)."""

    def __init__(self, needle):
        self.path = next(p for p in TRACE_PIPES if os.path.exists(p))
        self.needle = needle
        self.lines = queue.Queue()
        self.stop = threading.Event()
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        buf = b''
        while not self.stop.is_set():
            ready = select.select([self.fd], [], [], 0.2)[0]
            if not ready:
                continue
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            buf += chunk
            *whole, buf = buf.split(b'\n')
            for line in whole:
                if self.needle in line:
                    self.lines.put(line.decode(errors='replace'))

    def wait(self, timeout):
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self):
        self.stop.set()
        self.thread.join(5)
        os.close(self.fd)


def test_object_loader_converges_and_a_policy_change_reloads_nothing(role, netns):
    first = role.run()
    assert first.rc == 0, first.output[-3000:]
    assert recorded_loader(role) == 'object'
    again = role.run()
    assert again.rc == 0 and again.changed == 0, again.output[-3000:]
    ids = bpftool_ids(role.pin_root)
    settings = settings_of(role)
    assert settings['deny_ports'] == [] and not settings['debug'], settings

    with kit.SocketFactory(role.cgroup, netns) as f:
        listener, client, server = redirected_pair(f)
        before = kit.counters(role.pin_root)
        roundtrip(client, server)
        assert kit.delta(before, kit.counters(role.pin_root))['redirected_bytes'] >= 8192
        port = listener.getsockname()[1]

        deny = role.run(sockredir_deny_ports=[port])
        assert deny.rc == 0 and deny.changed >= 1, deny.output[-3000:]
        assert bpftool_ids(role.pin_root) == ids  # no program was loaded or swapped
        assert settings_of(role)['deny_ports'] == [port]

        # the established connection keeps its path
        before = kit.counters(role.pin_root)
        roundtrip(client, server)
        assert kit.delta(before, kit.counters(role.pin_root))['redirected_bytes'] >= 8192

        # a new connection on the denied port is not admitted
        before = kit.counters(role.pin_root)
        late = f.connect('4', '127.0.0.1', port)
        accepted = listener.accept()[0]
        accepted.settimeout(kit.SOCKET_TIMEOUT)
        roundtrip(late, accepted)
        d = kit.delta(before, kit.counters(role.pin_root))
        assert d['not_admitted_policy'] >= 1 and d['inserted'] == 0, d
        for s in (late, accepted, client, server, listener):
            s.close()

    rerun = role.run(sockredir_deny_ports=[port])
    assert rerun.rc == 0 and rerun.changed == 0, rerun.output[-3000:]


def test_debug_switch_traces_a_new_connection_without_a_reload(role, netns, tracefs):
    assert role.run().rc == 0
    ids = bpftool_ids(role.pin_root)
    on = role.run(sockredir_debug=True)
    assert on.rc == 0 and on.changed >= 1, on.output[-3000:]
    assert bpftool_ids(role.pin_root) == ids
    settings = settings_of(role)
    assert settings['debug'] is True
    needle = ('sockredir %x ' % int(settings['instance'], 16)).encode()
    reader = TraceReader(needle)
    try:
        with kit.SocketFactory(role.cgroup, netns) as f:
            listener, client, server = redirected_pair(f)
            roundtrip(client, server)
            line = reader.wait(timeout=10)
            for s in (client, server, listener):
                s.close()
    finally:
        reader.close()
    assert line is not None and 'admitted' in line, line

    # bpf_info reports the switch as the maps hold it
    result = kit.run_tasks(role.workdir, [dict(name='info', register='info', **{
        'ebpf.sockredir.bpf_info': dict(pin_dir=role.pin_root)})])
    info = result.tasks['info']
    assert info['settings']['debug'] is True and info['settings']['instance'] == settings['instance'], info
    off = role.run(sockredir_debug=False)
    assert off.rc == 0 and bpftool_ids(role.pin_root) == ids and not settings_of(role)['debug']


def test_bcc_loader_still_converges_and_redirects(role, netns):
    run = role.run(sockredir_loader='bcc')
    assert run.rc == 0, run.output[-3000:]
    assert recorded_loader(role) == 'bcc'
    with kit.SocketFactory(role.cgroup, netns) as f:
        listener, client, server = redirected_pair(f)
        before = kit.counters(role.pin_root)
        roundtrip(client, server)
        assert kit.delta(before, kit.counters(role.pin_root))['redirected_bytes'] >= 8192
        for s in (client, server, listener):
            s.close()
    again = role.run(sockredir_loader='bcc')
    assert again.rc == 0 and again.changed == 0, again.output[-3000:]
