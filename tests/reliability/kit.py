"""Helpers of the reliability suite: sockets made inside a cgroup and a namespace,
redirection set up through ansible-playbook, the role run (and killed) as a
user would, and the kernel log.

Everything here has a bounded timeout and undoes what it made.
"""

import concurrent.futures
import contextlib
import errno
import json
import os
import re
import select
import signal
import socket
import subprocess
import tempfile
import threading
import time

import conftest
from support import hostenv, plays

from ansible_collections.ebpf.sockredir.plugins.module_utils import facts, instance

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIX = 'srrel'
PYTHON = '/usr/bin/python3'
SOCKET_TIMEOUT = 10.0

FAMILIES = {
    # name: (server bind address, client connect address, client family)
    'ipv4': ('127.0.0.1', '127.0.0.1', '4'),
    'ipv6': ('::1', '::1', '6'),
    'ipv4-mapped': ('::', '127.0.0.1', '4'),
}


def wait_until(condition, timeout, what, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError('timed out after %ss waiting for %s' % (timeout, what))
        time.sleep(interval)


def counters(pin_dir):
    return facts.pin_dir_facts(pin_dir)['counters']


def delta(before, after):
    return {k: after[k] - before[k] for k in after}


def sockhash_entries(pin_dir):
    return facts.pin_dir_facts(pin_dir)['maps']['sockredir_hash']['entries']


def in_place(cgroup, netns, argv):
    """argv run inside a network namespace and (unless cgroup is falsy) a cgroup.

    The shell joins the cgroup and exec()s, so every socket the command makes
    belongs to the cgroup from the start.
    """
    command = ['nsenter', '--net=/run/netns/%s' % netns] + list(argv)
    if not cgroup:
        return command
    return ['/bin/sh', '-c', 'echo $$ > "$0" && exec "$@"',
            os.path.join(cgroup, 'cgroup.procs')] + command


# -- sockets made in a cgroup and a namespace ------------------------------

class SocketFactory(object):
    """A process in (cgroup, netns) that makes sockets for this one (sockfactory.py)."""

    def __init__(self, cgroup, netns):
        self.cgroup, self.netns = cgroup, netns
        self.ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                in_place(cgroup, netns, [PYTHON, os.path.join(HERE, 'sockfactory.py'),
                                         str(theirs.fileno())]),
                pass_fds=[theirs.fileno()])
        finally:
            theirs.close()
        self.ctl.settimeout(SOCKET_TIMEOUT)

    def socket(self, family):
        """A new AF_INET ('4') or AF_INET6 ('6') stream socket, blocking with a timeout."""
        self.ctl.send(family.encode())
        _msg, fds, _flags, _addr = socket.recv_fds(self.ctl, 16, 1)
        made = socket.socket(fileno=fds[0])
        made.settimeout(SOCKET_TIMEOUT)
        return made

    def listen(self, bind, port=0, backlog=1024):
        family = '6' if ':' in bind else '4'
        listener = self.socket(family)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == '6':
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind((bind, port))
        listener.listen(backlog)
        return listener

    def connect(self, family, address, port, source_port=0):
        conn = self.socket(family)
        try:
            if source_port:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                conn.bind(('::' if family == '6' else '0.0.0.0', source_port))
            conn.connect((address, port))
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self):
        self.ctl.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connected_pair(listener, client_factory, family, address, source_port=0):
    """(client, accepted) for a new connection to listener."""
    port = listener.getsockname()[1]
    client = client_factory.connect(family, address, port, source_port)
    accepted = listener.accept()[0]
    accepted.settimeout(SOCKET_TIMEOUT)
    return client, accepted


def recv_exactly(sock, nbytes):
    chunks, got = [], 0
    while got < nbytes:
        chunk = sock.recv(min(nbytes - got, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b''.join(chunks)


def exchange(a, b, data_ab, data_ba):
    """a sends data_ab to b while b sends data_ba to a, concurrently; returns what each got."""
    got = {}
    errors = []

    def run(name, sender, receiver, data):
        try:
            sender.sendall(data)
        except Exception as e:  # reported below, after both directions ended
            errors.append('%s send: %r' % (name, e))
        try:
            got[name] = recv_exactly(receiver, len(data))
        except Exception as e:
            errors.append('%s recv: %r' % (name, e))

    threads = [threading.Thread(target=run, args=('ab', a, b, data_ab)),
               threading.Thread(target=run, args=('ba', b, a, data_ba))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SOCKET_TIMEOUT * 3)
    if any(t.is_alive() for t in threads) or errors:
        raise AssertionError('exchange failed: %s' % (errors or 'timed out'))
    return got['ab'], got['ba']


class _Calls(object):
    def __init__(self, workers):
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        self.futures = []
        self.results = None

    def submit(self, fn, *args, **kwargs):
        self.futures.append(self.pool.submit(fn, *args, **kwargs))


@contextlib.contextmanager
def concurrent_calls(workers=8, timeout=120):
    """Run the calls submitted in the with-block at the same time; .results in submit order."""
    calls = _Calls(workers)
    try:
        yield calls
        calls.results = [f.result(timeout=timeout) for f in calls.futures]
    finally:
        calls.pool.shutdown(wait=True)


def pending(sock):
    """'idle' (nothing to read), 'eof', or the bytes waiting, without consuming them."""
    timeout = sock.gettimeout()
    sock.settimeout(0)  # with a timeout Python would poll() first and wait
    try:
        data = sock.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return 'idle'
    finally:
        sock.settimeout(timeout)
    return data if data else 'eof'


def fionread(sock):
    import fcntl
    import struct
    import termios
    return struct.unpack('i', fcntl.ioctl(sock.fileno(), termios.FIONREAD, b'\0' * 4))[0]


def readable_within(sock, timeout):
    return bool(select.select([sock], [], [], timeout)[0])


# -- redirection through ansible-playbook ----------------------------------

class Redirection(object):
    """The collection's programs converged on a child cgroup, for a whole test module.

    cgroup is attached; plain_cgroup is a sibling with nothing attached (the
    control and the "outside" processes). Teardown detaches and unpins also
    when the test failed.
    """

    def __init__(self, workdir, defines=None, src=conftest.SRC, obj=None):
        self.workdir = workdir
        self.defines = defines
        self.src = src
        self.obj = obj
        self.pin_dir = os.path.join(conftest.BPFFS, hostenv.unique_name(PREFIX))
        self._stack = contextlib.ExitStack()
        self.runs = 0

    def play(self, tasks, *args):
        self.runs += 1
        return conftest.run_play(self.workdir, tasks, *args, name='redirection%d' % self.runs)

    def __enter__(self):
        try:
            self.cgroup = self._stack.enter_context(hostenv.child_cgroup(PREFIX))
            self.plain_cgroup = self._stack.enter_context(hostenv.child_cgroup(PREFIX + '-plain'))
            self._stack.callback(conftest.remove_pin_dir, self.pin_dir)
            self._stack.callback(lambda: self.play(conftest.teardown_tasks(self.pin_dir, self.cgroup)))
            result = self.play(conftest.converge_tasks(self.pin_dir, self.cgroup, src=self.src,
                                                       defines=self.defines, obj=self.obj))
            assert result.rc == 0, result
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def counters(self):
        return counters(self.pin_dir)

    def entries(self):
        return sockhash_entries(self.pin_dir)


# -- the role, as a playbook -------------------------------------------------

ROLE_PLAY = plays.ROLE_PLAY


def role_env():
    return dict(os.environ, ANSIBLE_COLLECTIONS_PATH=conftest.COLLECTIONS, ANSIBLE_NOCOLOR='1',
                ANSIBLE_LOCALHOST_WARNING='false', ANSIBLE_INVENTORY_UNPARSED_WARNING='false',
                ANSIBLE_FORCE_COLOR='0', PYTHONUNBUFFERED='1')


def role_command(workdir, role_vars):
    play = os.path.join(str(workdir), 'role-site.yml')
    if not os.path.exists(play):
        with open(play, 'w') as f:
            f.write(ROLE_PLAY)
    varfile = tempfile.NamedTemporaryFile('w', suffix='.json', dir=str(workdir), delete=False)
    with varfile:
        json.dump(role_vars, varfile)
    return [os.path.join(conftest.VENV_BIN, 'ansible-playbook'), '-i', 'localhost,',
            '-c', 'local', play, '-e', '@' + varfile.name]


RECAP = re.compile(r'localhost\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)')


class RoleRun(object):
    def __init__(self, rc, output, killed_at=None):
        self.rc, self.output, self.killed_at = rc, output, killed_at
        recap = RECAP.search(output)
        self.ok, self.changed, self.unreachable, self.failed = \
            [int(x) for x in recap.groups()] if recap else (None,) * 4

    def __repr__(self):
        return 'RoleRun(rc=%s, killed_at=%r, changed=%s, tail=%s)' % (
            self.rc, self.killed_at, self.changed, self.output[-3000:])


def run_role(workdir, role_vars, timeout=300):
    proc = subprocess.run(role_command(workdir, role_vars), capture_output=True, text=True,
                          env=role_env(), timeout=timeout, cwd=str(workdir), check=False)
    return RoleRun(proc.returncode, proc.stdout + proc.stderr)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)

    def group_gone():
        for pid in os.listdir('/proc'):
            if not pid.isdigit():
                continue
            try:
                if os.getpgid(int(pid)) == proc.pid:
                    os.kill(int(pid), signal.SIGKILL)
                    return False
            except (ProcessLookupError, PermissionError):
                continue
        return True

    wait_until(group_gone, 10, 'every process of ansible-playbook %d to exit' % proc.pid)


def run_role_killed(workdir, role_vars, task=None, after=0.0, timeout=120):
    """Run the role and SIGKILL the whole ansible-playbook process group.

    With task: `after` seconds after the banner of the first task whose name
    contains `task` appears. Without: `after` seconds after the start. The
    returned RoleRun says where it was killed (None: it finished first).
    """
    proc = subprocess.Popen(role_command(workdir, role_vars), stdout=subprocess.PIPE, cwd=str(workdir),
                            stderr=subprocess.STDOUT, env=role_env(), start_new_session=True)
    output = []
    deadline = time.monotonic() + timeout
    kill_at = None if task else time.monotonic() + after
    killed_at = None
    killed = False
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    buf = b''
    try:
        while True:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError('ansible-playbook ran longer than %ss' % timeout)
            if kill_at is not None and now >= kill_at:
                killed_at = killed_at or ('%.2fs after the start' % after)
                _kill_group(proc)
                killed = True
                break
            if not select.select([fd], [], [], 0.02)[0]:
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:  # every writer is gone: the run ended by itself
                proc.wait(timeout=30)
                output.extend(buf.decode(errors='replace').split('\n'))
                break
            buf += chunk
            *lines, buf = buf.split(b'\n')
            for line in lines:
                text = line.decode(errors='replace')
                output.append(text)
                if task and kill_at is None and text.startswith('TASK [') and task in text:
                    kill_at = time.monotonic() + after
                    killed_at = '%s +%.2fs' % (task, after)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        proc.stdout.close()
    return RoleRun(None if killed else proc.returncode, '\n'.join(output),
                   killed_at=killed_at if killed else None)


# -- the kernel log ----------------------------------------------------------

# What the kernel prints when something is wrong, rather than merely noisy.
KERNEL_PROBLEM = re.compile(
    r'(WARNING:|\bBUG:|kernel BUG|Oops|general protection fault|Call Trace:|'
    r'UBSAN:|KASAN:|KFENCE:|refcount_t:|list_add corruption|list_del corruption|'
    r'rcu_sched self-detected stall|rcu: INFO:|soft lockup|hard LOCKUP|hung_task|'
    r'blocked for more than|Kernel panic|stack-protector|unreferenced object|'
    r'------------\[ cut here \]------------)')


def _kmsg_records():
    """(seq, text) of every record in the kernel log buffer now (root only)."""
    out = []
    fd = os.open('/dev/kmsg', os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # overwritten while we read: skip ahead
                    continue
                raise
            head, _sep, text = record.decode(errors='replace').partition(';')
            fields = head.split(',')
            out.append((int(fields[1]), text.split('\n', 1)[0]))
    finally:
        os.close(fd)
    return out


def kernel_log_position():
    records = _kmsg_records()
    return records[-1][0] if records else -1


def kernel_problems_since(position):
    return ['[%d] %s' % (seq, text) for seq, text in _kmsg_records()
            if seq > position and KERNEL_PROBLEM.search(text)]


# -- long streams between two processes (streampeer.py) ---------------------

STREAMPEER = os.path.join(HERE, 'streampeer.py')


class Stream(object):
    """A streampeer.py server and client in a namespace; reports when both ended.

    server_cgroup/client_cgroup: the cgroup each side joins (falsy: none).
    """

    def __init__(self, netns, family, seed, server_cgroup, client_cgroup, read_pause=0.0,
                 timeout=60, **client_options):
        bind, address = FAMILIES[family][:2]
        self.seed, self.timeout = seed, timeout
        self.client = None
        self.server = subprocess.Popen(
            in_place(server_cgroup, netns, [PYTHON, STREAMPEER, 'server', '--bind', bind,
                                            '--read-pause', str(read_pause), '--timeout', str(timeout)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        try:
            if not select.select([self.server.stdout], [], [], 10)[0]:
                raise TimeoutError('stream server did not listen within 10 s')
            port = json.loads(self.server.stdout.readline())['listening']
            args = [PYTHON, STREAMPEER, 'client', '--connect', address, '--port', str(port),
                    '--seed', str(seed), '--timeout', str(timeout)]
            for name, value in client_options.items():
                args += ['--' + name.replace('_', '-'), str(value)]
            self.client = subprocess.Popen(in_place(client_cgroup, netns, args), stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, bufsize=0)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _report(proc, timeout):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise TimeoutError('stream peer %d did not end within %ss' % (proc.pid, timeout))
        lines = out.decode().strip().splitlines()
        if not lines:
            raise RuntimeError('stream peer %d exited %s without a report: %s'
                               % (proc.pid, proc.returncode, err.decode(errors='replace')[-2000:]))
        return json.loads(lines[-1])

    def server_report(self, timeout):
        return self._report(self.server, timeout)

    def client_report(self, timeout):
        return self._report(self.client, timeout)

    def stop(self):
        """Ask the client to finish: it half-closes after the chunk it is sending."""
        self.client.send_signal(signal.SIGUSR1)

    def wait(self, timeout):
        deadline = time.monotonic() + timeout
        client = self.client_report(max(0.1, deadline - time.monotonic()))
        server = self.server_report(max(0.1, deadline - time.monotonic()))
        return server, client

    def close(self):
        for proc in (self.client, self.server):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.communicate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- one instance of the role, with names of its own ------------------------


class RoleInstance(object):
    """Role variables for a pin root, a cgroup and a source directory of this test's own."""

    def __init__(self, workdir, cgroup, **extra):
        self.workdir = workdir
        self.cgroup = cgroup
        self.pin_root = os.path.join(conftest.BPFFS, hostenv.unique_name(PREFIX))
        self.src_dir = os.path.join(str(workdir), 'src')
        self.vars = dict(sockredir_cgroup=cgroup, sockredir_pin_root=self.pin_root,
                         sockredir_src_dir=self.src_dir, sockredir_install_packages=False)
        self.vars.update(extra)

    def run(self, state='present', **extra):
        return run_role(self.workdir, dict(self.vars, sockredir_state=state, **extra))

    def run_killed(self, state='present', task=None, after=0.0):
        return run_role_killed(self.workdir, dict(self.vars, sockredir_state=state), task=task, after=after)

    def program_ids(self):
        found = facts.pin_dir_facts(self.pin_root) if os.path.isdir(self.pin_root) else {'programs': {}}
        return {name: info['id'] for name, info in found['programs'].items()}

    def attached(self):
        """(sock_ops program names on the cgroup, msg_verdict program name on the sockhash)."""
        ops = [p['name'] for p in facts.cgroup_attachments(self.cgroup)['sock_ops']]
        msg = None
        if os.path.exists(os.path.join(self.pin_root, 'sockredir_hash')):
            verdict = facts.pin_dir_facts(self.pin_root)['maps']['sockredir_hash']['msg_verdict']
            msg = verdict and verdict['name']
        return ops, msg

    def recorded(self):
        """dict(cgroup, src_dir) from the engine's record of this pin root (None: no record)."""
        try:
            with open(instance.record_path(self.pin_root)) as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        return dict(cgroup=record.get('cgroup'), src_dir=record.get('src_dir'))

    def leftovers(self):
        return [p for p in (self.pin_root, self.src_dir) if os.path.exists(p)] + \
            (['record of %s' % self.pin_root] if self.recorded() is not None else [])

    def cleanup(self):
        """Undo everything, also after a failed test: the role, then by hand."""
        try:
            if self.leftovers():
                self.run('absent')
        finally:
            conftest.remove_pin_dir(self.pin_root)


def program_exists(prog_id):
    return subprocess.run(['bpftool', 'prog', 'show', 'id', str(prog_id)],
                          capture_output=True, check=False).returncode == 0


def run_tasks(workdir, tasks, name='tasks', cwd=None, timeout=600):
    """conftest.run_play, with the working directory under control.

    ansible-playbook's local connection runs modules in its own working
    directory, so a relative path given by a bad-input case lands there:
    cwd keeps that inside the test's own directory.
    """
    play = [dict(hosts='localhost', gather_facts=False, tasks=tasks)]
    path = os.path.join(str(workdir), '%s.json' % name)
    with open(path, 'w') as f:
        json.dump(play, f, indent=1)
    env = dict(role_env(), ANSIBLE_STDOUT_CALLBACK='ansible.posix.json')
    proc = subprocess.run([os.path.join(conftest.VENV_BIN, 'ansible-playbook'), '-i', 'localhost,', '-c',
                           'local', '-e', 'ansible_python_interpreter=/usr/bin/python3', path],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd or str(workdir), check=False)
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        data = None
    return conftest.PlayResult(proc, data)
