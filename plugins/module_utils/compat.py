# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Which socket semantics differ from TCP on this kernel, measured through the programs.

Redirected sockets are served by the kernel's tcp_bpf code, not TCP's, and
what an application observes differs in places that change between kernel
releases (docs/compatibility.md). So the engine measures instead of
assuming: the prebuilt object is loaded into a throwaway pin directory,
attached to a throwaway child cgroup, and a helper process in a throwaway
network namespace (unshare()d, so it ends with the helper) makes the
checks' sockets, once in that cgroup (redirected) and once in a sibling
cgroup with nothing attached (plain TCP). A check compares what the
application saw in the two runs. Everything made is undone in finally
blocks, also when a check raises.

The report is cached per kernel release (and object) in a root-only file;
refresh reruns.
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import secrets
import select
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time

from ansible_collections.ebpf.sockredir.plugins.module_utils import facts, libbpf, mounts, objloader
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError

CACHE_DIR = '/var/cache/ebpf-sockredir'
PREFIX = 'sockredir-compat'
HELPER_MARK = 'ebpf-sockredir-compat-helper'  # in the helper's argv, so it can be found by name
OPS, MSG, HASH = 'sockredir_ops', 'sockredir_msg', 'sockredir_hash'

WAIT = 2.0     # for what plain TCP delivers at once: how long it may take
QUIET = 0.5    # for "nothing happens" observations: how long nothing must happen
ADDRESS = '127.0.0.1'

# The helper: leaves the caller's network namespace for a new one (with lo up
# and TCP Fast Open on), then makes one TCP socket per request, inside the
# cgroup the request names, and passes it back. A socket keeps the cgroup
# and namespace of the process that made it, whoever uses it later; an
# accepted socket those of its listener.
HELPER = r'''
import ctypes, fcntl, os, socket, struct, sys
ctl = socket.socket(fileno=int(sys.argv[1]))
cgroups = {b'r': sys.argv[2], b'p': sys.argv[3]}
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
    sys.exit('unshare(CLONE_NEWNET): ' + os.strerror(ctypes.get_errno()))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack('16sH22x', fcntl.ioctl(s, 0x8913, struct.pack('16sH22x', b'lo', 0)))[1]
fcntl.ioctl(s, 0x8914, struct.pack('16sH22x', b'lo', flags | 1))  # SIOCSIFFLAGS IFF_UP
s.close()
with open('/proc/sys/net/ipv4/tcp_fastopen', 'w') as f:
    f.write('3')
ctl.send(b'ready %d' % os.stat('/proc/self/ns/net').st_ino)
while True:
    request = ctl.recv(16)
    if not request:
        break
    with open(os.path.join(cgroups[request], 'cgroup.procs'), 'w') as f:
        f.write(str(os.getpid()))
    made = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    socket.send_fds(ctl, [b'k'], [made.fileno()])
    made.close()
'''


# -- the checks: each gets a Net and returns what the application observed ---

def _errname(e):
    return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__


def _readable_within(sock, timeout):
    return bool(select.select([sock], [], [], timeout)[0])


def _recv_exactly(sock, nbytes):
    chunks, got = [], 0
    while got < nbytes:
        chunk = sock.recv(nbytes - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b''.join(chunks)


def _fionread(sock):
    import termios
    return struct.unpack('i', fcntl.ioctl(sock.fileno(), termios.FIONREAD, b'\0' * 4))[0]


def splice_reader(net):
    """A reader moving the data to a pipe with splice() gets it (4 KiB, waited for up to 2 s)."""
    client, server = net.pair()
    client.sendall(b's' * 4096)
    r, w = os.pipe()
    got = 0
    try:
        deadline = time.monotonic() + WAIT
        while got < 4096 and time.monotonic() < deadline:
            _readable_within(server, max(0, deadline - time.monotonic()))
            try:
                n = os.splice(server.fileno(), w, 4096 - got, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                time.sleep(0.02)  # readable, yet nothing to splice: what a redirected queue does
                continue
            if n == 0:
                break
            os.read(r, n)
            got += n
    finally:
        os.close(r)
        os.close(w)
    return dict(bytes_spliced=got, of=4096)


def msg_waitall(net):
    """recv(8000, MSG_WAITALL) called before 8 sends of 1000 bytes, 20 ms apart, returns all 8000."""
    client, server = net.pair()
    server.settimeout(None)  # MSG_WAITALL needs a blocking socket; SO_RCVTIMEO bounds it
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack('ll', int(WAIT), 0))

    def send():
        time.sleep(0.1)
        for _message in range(8):
            client.sendall(b'w' * 1000)
            time.sleep(0.02)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        got = len(server.recv(8000, socket.MSG_WAITALL))
    finally:
        sender.join(WAIT * 2)
    return dict(first_recv_bytes=got, of=8000)


def fionread(net):
    """ioctl(FIONREAD) counts the queued bytes of 3 messages, and what is left after reading some."""
    client, server = net.pair()
    for n in (1000, 2000, 3000):
        client.sendall(b'f' * n)
    _readable_within(server, WAIT)
    deadline = time.monotonic() + WAIT
    while _fionread(server) != 6000 and time.monotonic() < deadline:
        time.sleep(0.02)
    queued = _fionread(server)
    _recv_exactly(server, 1500)
    return dict(queued=queued, after_reading_1500=_fionread(server))


def so_rcvlowat(net):
    """With SO_RCVLOWAT 1000, 100 bytes do not wake the reader (poll); 1000 do."""
    client, server = net.pair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1000)
    client.sendall(b'l' * 100)
    below = _readable_within(server, QUIET)
    client.sendall(b'l' * 900)
    at = _readable_within(server, WAIT)
    return dict(woken_below_mark=below, woken_at_mark=at, read=len(_recv_exactly(server, 1000)))


def reset_then_send(net):
    """The peer closes with unread data (an RST): what the next three send()s report."""
    client, server = net.pair()
    server.sendall(b'y' * 1000)
    _readable_within(client, WAIT)
    client.close()  # unread data in its queue: the kernel resets the connection
    time.sleep(0.2)
    outcomes = []
    for _attempt in range(3):
        try:
            server.send(b'after')
            outcomes.append('ok')
        except OSError as e:
            outcomes.append(_errname(e))
        time.sleep(0.05)
    return dict(sends_after_reset=outcomes)


def tcp_fastopen_order(net):
    """Data sent in the SYN (TCP Fast Open, with a cookie from a first connection) is read first."""
    listener = net.listener(fastopen=True)
    addr = listener.getsockname()
    for warm_up in (True, False):
        client = net.socket()
        client.settimeout(None)  # a blocking MSG_FASTOPEN send waits for the handshake
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack('ll', int(WAIT), 0))
        first, then = (b'w', b'') if warm_up else (b'first:in-the-SYN;', b'then:after-the-handshake;')
        client.sendto(first, socket.MSG_FASTOPEN, addr)
        # tcpi_options, byte 5 of struct tcp_info; TCPI_OPT_SYN_DATA: the SYN carried data
        syn_data = bool(client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)[5] & 0x20)
        client.settimeout(WAIT)
        if then:
            client.sendall(then)
        server = net.accepted(listener)
        data = _recv_exactly(server, len(first + then))
    order = {first + then: 'SYN data first', then + first: 'SYN data last'}.get(data, repr(data))
    return dict(data_in_syn=syn_data, order=order)


CHECKS = {
    'splice_reader': (splice_reader, 'proxies and relays that move data with splice() (e.g. HAProxy '
                      'with its splice options): they wait for data they never get'),
    'msg_waitall': (msg_waitall, 'readers of fixed-size records that call recv(MSG_WAITALL) once and '
                    'take a short read for an error or the end of the stream'),
    'fionread': (fionread, 'applications that size reads or judge readiness by ioctl(FIONREAD) '
                 '(Java\'s InputStream.available(), some event loops)'),
    'so_rcvlowat': (so_rcvlowat, 'readers that set SO_RCVLOWAT to be woken only once a whole record '
                    'is queued: they wake per message and must cope with short reads'),
    'reset_then_send': (reset_then_send, 'clients that count on the first send() after the peer '
                        'reset to fail (to detect a dead peer and retry): its bytes are dropped '
                        'silently'),
    'tcp_fastopen_order': (tcp_fastopen_order, 'clients and servers that use TCP Fast Open '
                           '(MSG_FASTOPEN, TCP_FASTOPEN): data sent in the SYN'),
}


# -- the sockets: made by the helper in the namespace and a cgroup ----------

class Net(object):
    """Sockets of one run (mode 'r': the attached cgroup, 'p': the plain one); close() closes all."""

    def __init__(self, helper, mode):
        self.helper, self.mode = helper, mode
        self.sockets = []

    def socket(self):
        made = self.helper.socket(self.mode)
        self.sockets.append(made)
        made.settimeout(WAIT)
        return made

    def listener(self, fastopen=False):
        listener = self.socket()
        if fastopen:
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 5)
        listener.bind((ADDRESS, 0))
        listener.listen(8)
        return listener

    def accepted(self, listener):
        conn, _addr = listener.accept()
        self.sockets.append(conn)
        conn.settimeout(WAIT)
        return conn

    def pair(self):
        """(client, accepted server) of a new connection; both ends made in this run's cgroup."""
        listener = self.listener()
        client = self.socket()
        client.connect(listener.getsockname())
        return client, self.accepted(listener)

    def close(self):
        for s in self.sockets:
            s.close()


class Helper(object):
    """The helper process (HELPER), in a network namespace of its own."""

    def __init__(self, redirected_cgroup, plain_cgroup):
        self.stderr, self.closed = '', False
        self.ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # a long-lived helper process that hands sockets over a socketpair: run_command cannot
            self.proc = subprocess.Popen(  # pylint: disable=ansible-bad-function
                [sys.executable, '-c', HELPER, str(theirs.fileno()), redirected_cgroup, plain_cgroup,
                 HELPER_MARK], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        finally:
            theirs.close()
        try:
            self.ctl.settimeout(10)
            try:
                ready = self.ctl.recv(64)
            except socket.timeout:
                ready = b''
            if not ready.startswith(b'ready '):
                self.close()
                raise BpfError('the compatibility checks could not set up a network namespace: %s'
                               % (self.stderr or 'the helper did not answer'))
            self.netns_inode = int(ready.split()[1])
        except BaseException:
            self.close()
            raise

    def socket(self, mode):
        # not an OSError when it fails: a broken helper is no observation of a check
        try:
            self.ctl.send(mode.encode())
            _msg, fds, _flags, _addr = socket.recv_fds(self.ctl, 16, 1)
        except OSError as e:
            fds, problem = [], _errname(e)
        else:
            problem = 'no socket came back'
        if not fds:
            self.close()
            raise BpfError('the compatibility checks\' helper process failed (%s): %s'
                           % (problem, self.stderr or 'it said nothing'))
        return socket.socket(fileno=fds[0])

    def close(self):
        """Ends the helper (idempotent); its error output is in .stderr."""
        if self.closed:
            return
        self.closed = True
        self.ctl.close()  # EOF: the helper exits
        try:
            _out, err = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
        self.stderr = (err or b'').decode(errors='replace').strip()[-2000:]


# -- the throwaway pins, cgroups and attachments -----------------------------

def _cgroup(stack, made, parent, name):
    path = os.path.join(parent, name)
    os.mkdir(path, 0o755)
    stack.callback(_remove_cgroup, path)
    made.setdefault('cgroups', []).append(path)
    return path


def _remove_cgroup(path, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except OSError as e:
            # EBUSY while the helper's exit is still being accounted
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def _unpin_all(pin_dir):
    if not os.path.isdir(pin_dir):
        return
    for name in os.listdir(pin_dir):
        os.unlink(os.path.join(pin_dir, name))
    os.rmdir(pin_dir)


def _attach(stack, pin, target_fd_opener, attach_type, flags):
    with libbpf.Fd(libbpf.obj_get(pin)) as pfd, libbpf.Fd(target_fd_opener()) as tfd:
        libbpf.prog_attach(pfd, tfd, attach_type, flags)
    stack.callback(_detach, pin, target_fd_opener, attach_type)


def _detach(pin, target_fd_opener, attach_type):
    with libbpf.Fd(libbpf.obj_get(pin)) as pfd, libbpf.Fd(target_fd_opener()) as tfd:
        libbpf.prog_detach(pfd, tfd, attach_type)


def _require_plain(cgroup):
    """Refuse when sock_ops programs run for cgroup from an ancestor (e.g. sockredir scoped to
    the whole host): the plain run would not be plain TCP, and the report would be wrong."""
    with libbpf.Fd(os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)) as fd:
        ids = libbpf.prog_query(fd, libbpf.ATTACH_CGROUP_SOCK_OPS, libbpf.F_QUERY_EFFECTIVE)[1]
    if ids:
        raise BpfError('compat: sock_ops programs (ids %s) are attached to a cgroup above %s, so '
                       'they also run for the checks\' plain TCP control, and what it observes would '
                       'not be plain TCP (is socket redirection scoped to the whole host?). Measure '
                       'before attaching there, or on a host of the same kernel release without it'
                       % (', '.join(str(i) for i in ids), os.path.dirname(cgroup)), param='compat',
                       details=dict(effective_sock_ops=ids))


def _counters(pin_dir):
    return facts.pin_dir_facts(pin_dir)['counters']


def _run(check, helper, mode, pin_dir):
    """(observation, counter changes) of one run of a check; a socket error is an observation."""
    before = _counters(pin_dir)
    net = Net(helper, mode)
    try:
        try:
            seen = check(net)
        except OSError as e:  # a timeout too: an application would see the same
            seen = dict(error=_errname(e))
    finally:
        net.close()
    after = _counters(pin_dir)
    return seen, dict((k, after[k] - before[k]) for k in after if after[k] != before[k])


def run_checks(obj_path, checks=None, made=None, parent=None):
    """Run the checks through the object's programs; the report. The throwaway cgroups are made
    in parent (default: the root of the cgroup v2 mount). made (a dict) is filled with what was
    created (pin_dir, cgroups, program_ids, helper_pid, netns_inode), for whoever verifies that
    it is gone."""
    checks = CHECKS if checks is None else checks
    made = {} if made is None else made
    parent = parent or mounts.cgroup2_mount()
    if parent is None:
        raise BpfError('the compatibility checks need a cgroup v2 mount; none is mounted')
    obj_bytes = objloader.read_trusted(obj_path)
    bpffs = mounts.mount_points('bpf')
    if not bpffs:
        raise BpfError('the compatibility checks need a bpffs mount; none is mounted')
    suffix = secrets.token_hex(4)
    pin_dir = os.path.join(bpffs[0], '%s-%s' % (PREFIX, suffix))
    out = dict(kernel=os.uname().release, object_sha256=hashlib.sha256(obj_bytes).hexdigest(),
               checks={})
    with contextlib.ExitStack() as stack:
        redirected = _cgroup(stack, made, parent, '%s-%s' % (PREFIX, suffix))
        plain = _cgroup(stack, made, parent, '%s-%s-tcp' % (PREFIX, suffix))
        _require_plain(plain)
        made['pin_dir'] = pin_dir
        stack.callback(_unpin_all, pin_dir)
        loaded = objloader.ObjectSet(pin_dir, obj_path)
        try:
            loaded.load_and_pin()
        finally:
            loaded.pins.close()  # the opened pin directory (pins.PinDir)
        made['program_ids'] = sorted(p['id'] for p in facts.pin_dir_facts(pin_dir)['programs'].values())
        # sk_msg on the sockhash first: a socket inserted by sock_ops is then redirected at once
        _attach(stack, os.path.join(pin_dir, MSG), lambda: libbpf.obj_get(os.path.join(pin_dir, HASH)),
                libbpf.ATTACH_SK_MSG_VERDICT, 0)
        _attach(stack, os.path.join(pin_dir, OPS),
                lambda: os.open(redirected, os.O_RDONLY | os.O_DIRECTORY),
                libbpf.ATTACH_CGROUP_SOCK_OPS, libbpf.F_ALLOW_MULTI)
        helper = Helper(redirected, plain)
        stack.callback(helper.close)
        made.update(helper_pid=helper.proc.pid, netns_inode=helper.netns_inode)
        for name in sorted(checks):
            check, affects = checks[name]
            seen_redirected, path = _run(check, helper, 'r', pin_dir)
            seen_tcp, _tcp_counters = _run(check, helper, 'p', pin_dir)
            out['checks'][name] = dict(same_as_tcp=seen_redirected == seen_tcp, redirected=seen_redirected,
                                       tcp=seen_tcp, affects=affects, counters=path,
                                       what=(check.__doc__ or '').strip())
    out['differs'] = sorted(n for n, c in out['checks'].items() if not c['same_as_tcp'])
    out['checked_at'] = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')
    return out


# -- the cache: one root-only file per kernel release ---------------------

def _cache_dir_fd(cache_dir):
    """An fd of cache_dir, made 0700 if missing; refused unless a real directory only root writes."""
    try:
        os.makedirs(cache_dir, mode=0o700)
    except FileExistsError:
        pass
    fd = os.open(cache_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.close(fd)
        raise BpfError('compat: the cache directory %s must be owned by root and writable only by '
                       'it (found uid %d, mode %o)' % (cache_dir, st.st_uid, stat.S_IMODE(st.st_mode)),
                       param='compat')
    return fd


def cache_name(release):
    return 'compat-%s.json' % release.replace('/', '_')


def cached(cache_dir=CACHE_DIR, release=None):
    """The cached report of this (or the given) kernel release, or None."""
    name = cache_name(release or os.uname().release)
    try:
        fd = os.open(os.path.join(cache_dir, name), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        try:
            return json.load(f)
        except ValueError:
            return None


def _write(dir_fd, cache_dir, name, report):
    fd, tmp = tempfile.mkstemp(prefix='.' + name, dir=cache_dir)  # 0600
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(report, f, indent=1, sort_keys=True)
            f.write('\n')
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(cache_dir, name))
        os.fsync(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def report(obj_path=None, refresh=False, check_mode=False, cache_dir=CACHE_DIR, made=None):
    """The report of this kernel release: from the cache, or measured (run_checks) and cached.

    Measured when there is no cached report, refresh is set, or the cached one was measured with
    another object than obj_path. Without obj_path: the cached report, whatever object it was
    measured with. check_mode: the cached report only (None without one). The returned dict has
    from_cache, which is not stored. made: as for run_checks.
    """
    release = os.uname().release
    if check_mode or (obj_path is None and not refresh):
        found = cached(cache_dir, release)
        if found or check_mode:
            return dict(found, from_cache=True) if found else None
    if obj_path is None:
        raise BpfError('compat_object: no report of kernel %s is cached in %s; measuring one needs the '
                       'path of the prebuilt object (files/bpf/sockredir.bpf.o of this collection, '
                       'copied to the host)' % (release, cache_dir), param='compat_object')
    dir_fd = _cache_dir_fd(cache_dir)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)  # one measurement at a time; the others then read it
        sha = hashlib.sha256(objloader.read_trusted(obj_path)).hexdigest()
        found = cached(cache_dir, release)
        if found and not refresh and found.get('object_sha256') == sha:
            return dict(found, from_cache=True)
        fresh = run_checks(obj_path, made=made)
        _write(dir_fd, cache_dir, cache_name(release), fresh)
        return dict(fresh, from_cache=False)
    finally:
        os.close(dir_fd)  # releases the lock
