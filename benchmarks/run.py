"""Redirect versus TCP loopback versus Unix sockets, side by side; and the cost of a converge.

    sudo .venv/bin/python benchmarks/run.py --quick [--out DIR]   # < 1 minute
    sudo .venv/bin/python benchmarks/run.py --full  [--out DIR]   # a few minutes

One run measures three paths on the same cores, interleaved cell by cell:

  loopback  TCP over 127.0.0.1 in a network namespace made for the run, both
            peers in a child cgroup with nothing attached;
  redirect  the same, in a second child cgroup where ansible-playbook has
            converged this collection's programs (bpf_program + bpf_attach);
  unix      AF_UNIX stream sockets, the same-host upper bound.

The programs decide each flow's path; every redirect sample carries the
proof of the path its counters show it took (redirect_proof()):

  redirected      the delta of redirected_bytes matches the bytes the peers
                  wrote, nothing was passed to TCP, nothing demoted, and lo
                  saw only the handshakes and closes;
  demoted to TCP  a stream of small writes: every connection was demoted
                  once (demoted_small_writes) and left the sockhash
                  (removed), at most small_streak writes per connection were
                  redirected before, and lo carried the rest.

A sample whose counters fit neither is unproven, and a cell with an unproven
sample is reported as such, not as a figure.

"Peer on another host": the client in the same netns, the server in a
second one reached over a veth pair, as a remote host would be, in the plain
cgroup; the client once in the programs' cgroup ("with the programs") and
once in the plain cgroup ("without"), interleaved. The client writes, shuts
down its sending side and reads the server's 8-byte reply with a blocking
read (where a socket in the sockhash fed by TCP used to fail with EAGAIN).
Proof: the client was not admitted (not_admitted_peer once per connection,
nothing inserted, no sk_msg run), and the veth carried the bytes.

Every sample counts errors: reads or writes on blocking sockets that failed
with EAGAIN (retried by sockbench), and replies that did not match.

Client and server are benchmarks/sockbench.c, compiled here with the system
cc, pinned with taskset to separate CPUs (server on the first, client on the
second) so neither steals the other's core. Request/response runs also with
both on the first CPU: in a VM guest a cross-CPU wake-up goes through the
hypervisor and costs more than the socket path being measured.

The machine may be shared: the load of everything else is measured while each
sample runs; a disturbed sample is set aside and retaken after the machine
is quiet again, within limits, and the report says how busy it was.

Writes results.json (every sample), results.md (the tables) and
throughput.png (when matplotlib is importable) into --out. Run as root; no
traffic leaves the namespace, nothing is attached to the root cgroup, and
everything the run creates is removed again, also when it fails.
"""

import argparse
import collections
import contextlib
import ctypes
import datetime
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VENV_BIN = os.path.join(REPO, '.venv', 'bin')
COLLECTIONS = os.path.join(REPO, '.venv', 'collections')
SOCKBENCH_C = os.path.join(HERE, 'sockbench.c')
BPFFS = '/sys/fs/bpf'
MODULE_PYTHON = '/usr/bin/python3'

sys.path.insert(0, os.path.join(REPO, 'tests'))
sys.path.insert(0, COLLECTIONS)

from support import hostenv  # noqa: E402
from support.plays import OBJECT, converge_tasks, remove_pin_dir, teardown_tasks  # noqa: E402
from ansible_collections.ebpf.sockredir.plugins.module_utils import facts, libbpf  # noqa: E402
# the programs' defaults for a zero in sockredir_cfg (sockredir.h; tests/unit ties the two)
from ansible_collections.ebpf.sockredir.plugins.module_utils.policy import DEFAULT_SMALL_BYTES, DEFAULT_SMALL_STREAK  # noqa: E402,E501
from ansible_collections.ebpf.sockredir.plugins.module_utils import headers as kheaders  # noqa: E402

KIB = 1024
PATHS = ('loopback', 'redirect', 'unix')
# The peer-on-another-host row: the same client without and with the programs.
REMOTE_PATHS = ('plain', 'redirect')

# What each mode measures. Stream cells run with TCP_NODELAY off and on for
# the TCP paths; Unix sockets have no Nagle, so their figure serves both rows.
MODES = {
    'quick': dict(
        stream_sizes=[64, 4 * KIB, 64 * KIB], nodelay_sizes=[64],
        pingpong_sizes=[64], pingpong_placements=['same'], pairs=8, pairs_sizes=[16 * KIB],
        remote_sizes=[64 * KIB, KIB],
        duration=0.3, repeats=2, ansible_cycles=1, retake_budget=0.1, quiet_wait=2),
    'full': dict(
        stream_sizes=[64, 256, KIB, 4 * KIB, 16 * KIB, 64 * KIB],
        nodelay_sizes=[64, 256, KIB, 4 * KIB, 16 * KIB, 64 * KIB],
        pingpong_sizes=[64, KIB], pingpong_placements=['same', 'split'],
        pairs=64, pairs_sizes=[KIB, 64 * KIB],
        remote_sizes=[64 * KIB, KIB],
        duration=1.0, repeats=5, ansible_cycles=3, retake_budget=0.5, quiet_wait=300),
}

# The remote peer's network: a veth pair between the run's namespace and a
# second one. Private addresses inside namespaces made for the run.
REMOTE_CLIENT_DEV, REMOTE_SERVER_DEV = 'sbveth0', 'sbveth1'
REMOTE_CLIENT_ADDR, REMOTE_SERVER_ADDR = '10.211.0.1', '10.211.0.2'

# The redirect proof. Per connection the loopback device still carries the
# handshake and the close (3 + 4 packets, a few more with delayed ACKs); data
# carried over TCP would add at least one packet per 64 KiB.
LO_PACKETS_PER_CONNECTION = 12
LO_PACKETS_SLACK = 8
# Counters and bytes written must agree to this fraction.
PROOF_TOLERANCE = 0.001
# lo and the veth carry at most 64 KiB per packet (GSO): TCP that carried
# N bytes shows at least N / 65536 packets.
MAX_PACKET_BYTES = 65536
# Counters of decisions none of the benchmark's same-host flows may take.
UNEXPECTED_DECISIONS = ('not_admitted_peer', 'not_admitted_early_data', 'not_admitted_policy',
                        'insert_full', 'insert_failed', 'tcp_peer_absent', 'demotion_refused')
# Targets of issue 11, as ratios within one run.
STREAM_TARGET, STREAM_TOLERANCE = 1.0, 0.95
STREAM_64K_VS_LOOPBACK, STREAM_64K_VS_UNIX = 2.0, 0.95
PINGPONG_64_VS_LOOPBACK = 1.8
REMOTE_TARGET = 0.97
# Foreign load (CPUs) above which a sample counts as disturbed. Before each
# sample the run waits for the machine to be quiet (at most quiet_wait seconds
# in all); a disturbed sample is set aside and taken again, within a budget of
# extra samples (retake_budget, a fraction of the planned ones). So a shared
# machine stretches the run, but not without end. Set-aside samples stay in
# the JSON; the report calls the machine busy when the median of the kept
# samples is above the threshold.
BUSY_MACHINE = 0.25
QUIET_SPELL = 1.0


class BenchError(Exception):
    pass


def log(msg):
    print('[bench %s] %s' % (time.strftime('%H:%M:%S'), msg), file=sys.stderr, flush=True)


# ---- environment ---------------------------------------------------------

def host_info():
    model = ''
    with open('/proc/cpuinfo') as cpuinfo:
        for line in cpuinfo:
            if line.startswith('model name'):
                model = line.split(':', 1)[1].strip()
                break
    cc = subprocess.run(['cc', '--version'], capture_output=True, text=True, check=False).stdout.splitlines()
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                kernel=platform.release(), cpu=model, cpus=os.cpu_count(),
                hypervisor=_hypervisor(), cc=cc[0] if cc else '', python=platform.python_version())


def _hypervisor():
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if line.startswith('Hypervisor vendor:'):
            return line.split(':', 1)[1].strip()
    return None


def check_prerequisites():
    if os.geteuid() != 0:
        raise BenchError('run as root: the benchmark makes a network namespace, cgroups and BPF pins')
    missing = [tool for tool in ('cc', 'taskset', 'nsenter', 'ip') if not shutil.which(tool)]
    if missing:
        raise BenchError('missing tools: %s' % ', '.join(missing))
    if not os.path.exists(os.path.join(VENV_BIN, 'ansible-playbook')):
        raise BenchError('no %s/ansible-playbook: run scripts/bootstrap.sh first' % VENV_BIN)
    if not os.path.isdir(os.path.join(COLLECTIONS, 'ansible_collections', 'ebpf', 'sockredir')):
        raise BenchError('the collection is not in %s: run scripts/bootstrap.sh first' % COLLECTIONS)


def cpu_pinning():
    """(server cpu, client cpu) of this process's allowed CPUs, or None if only one."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return cpus[0], cpus[1]


@contextlib.contextmanager
def bpffs_mounted():
    mounted_here = subprocess.run(['mountpoint', '-q', BPFFS], check=False).returncode != 0
    if mounted_here:
        subprocess.run(['mount', '-t', 'bpf', 'bpf', BPFFS], check=True)
    try:
        yield BPFFS
    finally:
        if mounted_here:
            subprocess.run(['umount', BPFFS], check=False)


@contextlib.contextmanager
def terminate_cleanly():
    """SIGTERM unwinds like Ctrl-C, so every cleanup below still runs."""
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt('signal %d' % signum)
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def compile_sockbench(workdir):
    binary = os.path.join(workdir, 'sockbench')
    subprocess.run(['cc', '-O2', '-Wall', '-o', binary, SOCKBENCH_C], check=True)
    return binary


# ---- the collection through ansible-playbook -----------------------------

class Ansible(object):
    """Runs plays on localhost and times them, wall clock around ansible-playbook."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.count = 0

    def play(self, what, tasks):
        self.count += 1
        path = os.path.join(self.workdir, 'play%d-%s.yml' % (self.count, what))
        with open(path, 'w') as f:
            json.dump([dict(hosts='localhost', gather_facts=False, tasks=tasks)], f, indent=1)
        env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK='ansible.posix.json',
                   ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_NOCOLOR='1',
                   ANSIBLE_LOCALHOST_WARNING='false', ANSIBLE_INVENTORY_UNPARSED_WARNING='false')
        start = time.monotonic()
        proc = subprocess.run([os.path.join(VENV_BIN, 'ansible-playbook'), '-i', 'localhost,',
                               '-c', 'local', '-e', 'ansible_python_interpreter=%s' % MODULE_PYTHON,
                               path], capture_output=True, text=True, env=env, timeout=600, check=False)
        seconds = time.monotonic() - start
        try:
            report = json.loads(proc.stdout)
            stats = report['stats']['localhost']
            # what changed and why: the message a wrong count is reported with
            results = {t['task']['name']: t['hosts'].get('localhost', {})
                       for p in report['plays'] for t in p['tasks']}
        except (ValueError, KeyError):
            stats = None
        if proc.returncode != 0 or stats is None:
            raise BenchError('ansible-playbook %s failed (rc %s): %s%s'
                             % (what, proc.returncode, proc.stdout[-3000:], proc.stderr[-2000:]))
        changed = {name: r.get('reasons') or r.get('actions') for name, r in results.items() if r.get('changed')}
        return dict(seconds=round(seconds, 3), changed=stats.get('changed', 0), ok=stats.get('ok', 0),
                    changed_tasks=changed)


# Which build of the programs the run converges: the prebuilt object
# (files/bpf/sockredir.bpf.o, loaded through libbpf; it has the small-write
# switch) or the source compiled by BCC on the host (no small-write switch:
# BCC cannot read the psock's queue, see files/bpf/sockredir_bcc.h).
BUILDS = ('object', 'bcc')


def build_tasks(pin_dir, cgroup, build):
    return converge_tasks(pin_dir, cgroup, obj=OBJECT if build == 'object' else None)


def ansible_cycle(ansible, pin_dir, cgroup, build, keep=False):
    """First converge, idempotent rerun, and (unless keep) state absent, each timed."""
    first = ansible.play('converge', build_tasks(pin_dir, cgroup, build))
    rerun = ansible.play('rerun', build_tasks(pin_dir, cgroup, build))
    if first['changed'] != 3 or rerun['changed'] != 0:
        raise BenchError('converge changed %s tasks (expected 3), the rerun %s (expected 0): %s'
                         % (first['changed'], rerun['changed'], rerun['changed_tasks']))
    cycle = dict(first_converge=first, idempotent_rerun=rerun)
    if not keep:
        cycle['absent'] = remove_with_ansible(ansible, pin_dir, cgroup)
    return cycle


def remove_with_ansible(ansible, pin_dir, cgroup):
    gone = ansible.play('absent', teardown_tasks(pin_dir, cgroup))
    if gone['changed'] != 3 or os.path.exists(pin_dir):
        raise BenchError('state absent changed %s tasks (expected 3); pin dir left: %s'
                         % (gone['changed'], os.path.exists(pin_dir)))
    return gone


def counters(pin_dir):
    """The programs' counters, read straight from the pinned stats map (twice per sample:
    bpf_info's whole pin_dir_facts() would walk every map)."""
    with libbpf.Fd(libbpf.obj_get(os.path.join(pin_dir, facts.STATS_MAP))) as fd:
        return facts.counters(dict(values=[libbpf.percpu_u64_sum(fd, i) for i in range(len(facts.COUNTERS))]))


class _Settings(ctypes.Structure):
    # struct sockredir_settings in files/bpf/sockredir.h (the run changes only the first two)
    _fields_ = [('small_bytes', ctypes.c_uint32), ('small_streak', ctypes.c_uint32),
                ('flags', ctypes.c_uint32), ('instance', ctypes.c_uint32)]


def small_write_policy(pin_dir, small_bytes=None, small_streak=None):
    """Set (when given) and read back the programs' run-time settings, defaults filled in."""
    key = ctypes.c_uint32(0)
    value = _Settings()
    with libbpf.Fd(libbpf.obj_get(os.path.join(pin_dir, 'sockredir_cfg'))) as fd:
        rc = libbpf.lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
        if rc < 0:
            raise BenchError('reading sockredir_cfg: %s' % os.strerror(-rc))
        if small_bytes is not None or small_streak is not None:
            if small_bytes is not None:
                value.small_bytes = small_bytes
            if small_streak is not None:
                value.small_streak = small_streak
            rc = libbpf.lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), 0)
            if rc < 0:
                raise BenchError('writing sockredir_cfg: %s' % os.strerror(-rc))
    return dict(small_bytes=value.small_bytes or DEFAULT_SMALL_BYTES,
                small_streak=value.small_streak or DEFAULT_SMALL_STREAK,
                set_by_run=small_bytes is not None or small_streak is not None)


@contextlib.contextmanager
def remote_peer(netns):
    """A second namespace, linked to netns by a veth pair: where the 'remote host' runs."""
    with hostenv.netns('sockbench-peer') as peer:
        # Created inside netns, the other end moved straight into peer: the
        # host's own namespace never sees either device. Deleting the
        # namespaces deletes the pair.
        subprocess.run(['ip', '-n', netns, 'link', 'add', REMOTE_CLIENT_DEV, 'type', 'veth',
                        'peer', 'name', REMOTE_SERVER_DEV, 'netns', peer], check=True)
        for ns, dev, addr in ((netns, REMOTE_CLIENT_DEV, REMOTE_CLIENT_ADDR),
                              (peer, REMOTE_SERVER_DEV, REMOTE_SERVER_ADDR)):
            subprocess.run(['ip', '-n', ns, 'addr', 'add', addr + '/24', 'dev', dev], check=True)
            subprocess.run(['ip', '-n', ns, 'link', 'set', 'dev', dev, 'up'], check=True)
        yield peer


def link_packets(netns):
    """(lo packets, veth packets) of the run's namespace, in one look.

    lo: received packets, which on lo is every packet either peer sent (as
    hostenv.lo_packets() counts). veth: sent plus received on the client's end.
    """
    out = subprocess.run(['ip', '-n', netns, '-j', '-s', 'link', 'show'],
                         capture_output=True, text=True, check=True).stdout
    links = {link['ifname']: link['stats64'] for link in json.loads(out)}
    veth = links[REMOTE_CLIENT_DEV]
    return links['lo']['rx']['packets'], veth['rx']['packets'] + veth['tx']['packets']


# ---- one measurement -----------------------------------------------------

class Bench(object):
    def __init__(self, binary, netns, cgroups, pin_dir, unix_dir, pinning, remote_netns, policy):
        self.binary = binary
        self.netns = netns
        self.cgroups = cgroups          # path name -> cgroup directory
        self.pin_dir = pin_dir
        self.unix_dir = unix_dir
        self.pinning = pinning
        self.remote_netns = remote_netns
        self.policy = policy            # small_write_policy() of the programs
        self.seq = 0

    def _command(self, cgroup, netns, cpu, argv):
        pin = ['taskset', '-c', str(cpu)] if cpu is not None else []
        # The shell joins the cgroup, then exec()s: every socket belongs to it.
        return ['/bin/sh', '-c', 'echo $$ > "$0" && exec "$@"', os.path.join(cgroup, 'cgroup.procs'),
                'nsenter', '--net=/run/netns/%s' % netns] + pin + [self.binary] + argv

    def _endpoint(self, path, workload):
        if path == 'unix':
            self.seq += 1
            return ['--family', 'unix', '--addr', os.path.join(self.unix_dir, 's%d.sock' % self.seq)]
        if workload == 'remote':
            return ['--family', 'tcp', '--addr', REMOTE_SERVER_ADDR]
        return ['--family', 'tcp', '--addr', '127.0.0.1']

    def _witnesses(self):
        lo, veth = link_packets(self.netns)
        return dict(lo=lo, veth=veth, counters=counters(self.pin_dir))

    def run(self, path, workload, size, nodelay, pairs, placement, duration):
        """One sample: server and client processes, their reports, and the deltas around them."""
        remote = workload == 'remote'
        endpoint = self._endpoint(path, workload)
        common = endpoint + ['--mode', 'pingpong' if workload == 'pingpong' else 'stream',
                             '--size', str(size), '--pairs', str(pairs),
                             '--nodelay', '1' if nodelay else '0', '--reply', '1' if remote else '0']
        server_cpu, client_cpu = self.pinning or (None, None)
        if placement == 'same':
            client_cpu = server_cpu
        tcp = path != 'unix'
        # The remote server is a host without the programs: plain cgroup, own netns.
        server_cgroup, server_netns = ((self.cgroups['plain'], self.remote_netns) if remote
                                       else (self.cgroups[path], self.netns))
        before = self._witnesses()
        witness = CpuWitness()
        deadline = time.monotonic() + duration + 60
        procs = []
        try:
            server = subprocess.Popen(self._command(server_cgroup, server_netns, server_cpu,
                                                    ['server'] + common),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
            procs.append(server)
            line = _read_line(server, deadline)
            if not line or not line.startswith(b'listening '):
                server.kill()
                raise BenchError('sockbench server did not listen: %s'
                                 % server.communicate()[1].decode(errors='replace'))
            port = line.split()[1].decode()
            client = subprocess.Popen(
                self._command(self.cgroups[path], self.netns, client_cpu, ['client'] + common +
                              ['--port', port, '--duration', str(duration)]),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append(client)
            client_report = _report(client, 'client', deadline)
            server_report = _report(server, 'server', deadline)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()
        load = witness.result()
        after = self._witnesses()

        if server_report['recv_bytes'] != client_report['sent_bytes']:
            raise BenchError('%s %s size %d: client wrote %d bytes, server read %d'
                             % (path, workload, size, client_report['sent_bytes'],
                                server_report['recv_bytes']))
        sample = dict(client=client_report, server=server_report,
                      lo_packets=after['lo'] - before['lo'], veth_packets=after['veth'] - before['veth'],
                      load=load, errors=sample_errors(client_report, server_report))
        if workload == 'pingpong':
            sample.update(tps=client_report['transactions'] / client_report['elapsed'],
                          p50_us=client_report['p50_us'], p99_us=client_report['p99_us'])
        else:
            sample['bytes_per_s'] = server_report['recv_bytes'] / server_report['elapsed']
        if tcp:
            delta = {k: after['counters'][k] - before['counters'][k] for k in after['counters']}
            sample['counters'] = delta
        if path == 'redirect':
            sample['proof'] = (remote_proof(sample, pairs) if remote else
                               redirect_proof(sample, pairs, size, self.policy['small_streak']))
        return sample


def sample_errors(client_report, server_report):
    """Calls on blocking sockets that failed with EAGAIN (sockbench retried them), by side and
    direction, and replies that did not match."""
    out = {'%s_%s' % (role, key): report[key] for role, report in (('client', client_report),
                                                                   ('server', server_report))
           for key in ('eagain_read', 'eagain_write')}
    out['bad_replies'] = client_report.get('bad_replies', 0)
    return out


class CpuWitness(object):
    """Load that was not ours while a sample ran, in CPUs: a noise flag.

    others: busy time of the whole machine (/proc/stat) minus the CPU time of
    the children reaped meanwhile (the two sockbench processes). Interrupt
    time spent on our traffic counts as "others" too, so a quiet machine
    shows a small positive figure, not zero. steal: time the hypervisor gave
    our virtual CPUs to someone else.
    """

    def __init__(self):
        self.start = (time.monotonic(),) + _cpu_seconds() + (_children_seconds(),)

    def result(self):
        now = (time.monotonic(),) + _cpu_seconds() + (_children_seconds(),)
        wall, busy, steal, ours = (b - a for b, a in zip(now, self.start))
        if wall <= 0:
            return dict(others=0.0, steal=0.0)
        return dict(others=round(max(0.0, busy - ours) / wall, 3), steal=round(steal / wall, 3))


def _cpu_seconds():
    """(busy, steal) seconds of all CPUs since boot."""
    with open('/proc/stat') as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = \
            [int(v) for v in stat.readline().split()[1:9]]
    tick = os.sysconf('SC_CLK_TCK')
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _children_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _read_line(proc, deadline):
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(max(0.0, deadline - time.monotonic())):
            return None
    return proc.stdout.readline()


def _report(proc, role, deadline):
    try:
        out, err = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise BenchError('sockbench %s did not finish in time' % role) from None
    if proc.returncode != 0:
        raise BenchError('sockbench %s failed (exit %s): %s'
                         % (role, proc.returncode, err.decode(errors='replace').strip()))
    return json.loads(out.decode().strip().splitlines()[-1])


PATH_REDIRECTED = 'redirected'
PATH_DEMOTED = 'demoted to TCP'
PATH_NOT_ADMITTED = 'not admitted (TCP)'


def redirect_proof(sample, pairs, size, small_streak):
    """Which path did this sample's bytes take, by the programs' counters? The evidence, and a verdict.

    Each path has its own checks; the sample takes the path whose checks all
    hold (they exclude each other: demoted_small_writes is 0 or one per
    connection), or none and is unproven.
    """
    moved = sample['client']['sent_bytes'] + sample['server']['sent_bytes']
    c = sample['counters']
    lo = sample['lo_packets']
    lo_budget = LO_PACKETS_PER_CONNECTION * pairs + LO_PACKETS_SLACK
    no_other_decision = all(c.get(k, 0) == 0 for k in UNEXPECTED_DECISIONS)
    by_path = {
        PATH_REDIRECTED: dict(
            redirected_bytes_match=abs(c['redirected_bytes'] - moved) <= PROOF_TOLERANCE * moved,
            nothing_passed=c['passed_bytes'] <= PROOF_TOLERANCE * moved,
            sockets_inserted=c['inserted'] >= 2 * pairs,
            # a client leaves the map at its shutdown(SHUT_WR) if nothing was redirected into it
            nothing_demoted=c['demoted_small_writes'] == 0,
            removed_at_most_at_shutdown=c['removed'] <= pairs,
            no_other_decision=no_other_decision,
            lo_packets_within_budget=lo <= lo_budget,
        ),
        PATH_DEMOTED: dict(
            sockets_inserted=c['inserted'] >= 2 * pairs,
            every_connection_demoted_once=c['demoted_small_writes'] == pairs,
            every_demoted_socket_removed=c['removed'] == pairs,
            redirected_at_most_the_streak=c['redirected_bytes'] <= small_streak * size * pairs,
            counted_no_more_than_written=(c['redirected_bytes'] + c['passed_bytes']
                                          <= moved * (1 + PROOF_TOLERANCE)),
            no_other_decision=no_other_decision,
            # what was not redirected crossed lo as TCP segments
            rest_on_lo=lo >= (moved - c['redirected_bytes']) // MAX_PACKET_BYTES,
        ),
    }
    path = next((p for p, checks in by_path.items() if all(checks.values())), None)
    out = dict(ok=path is not None, path=path, checks=by_path[path] if path else {},
               bytes_moved=moved, redirected_bytes=c['redirected_bytes'],
               passed_bytes=c['passed_bytes'], inserted=c['inserted'],
               demoted=c['demoted_small_writes'], removed=c['removed'],
               lo_packets=lo, lo_packet_budget=lo_budget,
               redirect_bound=small_streak * size * pairs)
    if path is None:
        out['failed_checks'] = {p: sorted(k for k, v in checks.items() if not v)
                                for p, checks in by_path.items()}
    return out


def remote_proof(sample, pairs):
    """The client of the peer-on-another-host row, in the programs' cgroup: never admitted."""
    moved = sample['client']['sent_bytes'] + sample['server']['sent_bytes']
    c = sample['counters']
    checks = dict(
        not_admitted_every_connection=c['not_admitted_peer'] == pairs,
        nothing_inserted=c['inserted'] == 0,
        # not in the sockhash: sk_msg never ran for its sends
        no_sk_msg_verdict=c['redirected_msgs'] == 0 and c['passed_msgs'] == 0,
        veth_carried_the_bytes=sample['veth_packets'] >= moved // MAX_PACKET_BYTES,
    )
    ok = all(checks.values())
    out = dict(ok=ok, path=PATH_NOT_ADMITTED if ok else None, checks=checks if ok else {},
               bytes_moved=moved, redirected_bytes=c['redirected_bytes'],
               passed_bytes=c['passed_bytes'], inserted=c['inserted'],
               not_admitted_peer=c['not_admitted_peer'], veth_packets=sample['veth_packets'],
               lo_packets=sample['lo_packets'])
    if not ok:
        out['failed_checks'] = {PATH_NOT_ADMITTED: sorted(k for k, v in checks.items() if not v)}
    return out


# ---- the plan ------------------------------------------------------------

# Where client and server run. split: on two CPUs (streams, and request/response
# as most deployments see it). same: both on one CPU, so that a transaction
# costs what the socket path costs and not a cross-CPU wake-up (which in a VM
# guest is an IPI through the hypervisor, tens of microseconds).
PLACEMENTS = ('split', 'same')


def plan(mode, sizes=None, streams_only=False):
    """Groups of cells measured back to back: the paths of one workload point.

    sizes replaces the mode's one-connection stream sizes (both TCP_NODELAY
    rows); streams_only leaves out request/response, concurrent connections
    and the remote peer (for experiments on the stream rows).
    """
    m = MODES[mode]
    stream_sizes = sizes or m['stream_sizes']
    nodelay_sizes = sizes or m['nodelay_sizes']
    groups = []

    def group(workload, size, nodelay, pairs, placement='split', paths=PATHS):
        groups.append(dict(workload=workload, size=size, nodelay=nodelay, pairs=pairs,
                           placement=placement, paths=paths))
    for size in stream_sizes:
        group('stream', size, False, 1)
    for size in nodelay_sizes:
        # Unix was measured in the TCP_NODELAY-off group of the same size.
        group('stream', size, True, 1,
              paths=PATHS if size not in stream_sizes else ('loopback', 'redirect'))
    if streams_only:
        return groups
    for placement in m['pingpong_placements']:
        for size in m['pingpong_sizes']:
            group('pingpong', size, True, 1, placement)
    for size in m['pairs_sizes']:
        group('stream', size, False, m['pairs'])
    for size in m['remote_sizes']:
        group('remote', size, False, 1, paths=REMOTE_PATHS)
    return groups


def cell_key(workload, size, nodelay, pairs, path, placement='split'):
    if path == 'unix':
        nodelay = None
    return '%s/%d/%s/%d/%s/%s' % (workload, size, {None: 'na', True: 'nodelay', False: 'nagle'}[nodelay],
                                  pairs, placement, path)


def measure(bench, mode, repeats, duration, sizes=None, streams_only=False):
    groups = plan(mode, sizes, streams_only)
    cells = {}
    for g in groups:
        for path in g['paths']:
            key = cell_key(g['workload'], g['size'], g['nodelay'], g['pairs'], path, g['placement'])
            cells[key] = dict(key=key, workload=g['workload'], size=g['size'],
                              nodelay=None if path == 'unix' else g['nodelay'],
                              pairs=g['pairs'], placement=g['placement'], path=path, samples=[])
    total = repeats * sum(len(g['paths']) for g in groups)
    retakes = int(MODES[mode]['retake_budget'] * total)
    quiet = QuietWaiter(MODES[mode]['quiet_wait'])
    disturbed = True
    done = 0
    for r in range(repeats):
        for g in groups:
            # Rotate the order per repeat: no path always runs first after a switch.
            paths = list(g['paths'])
            paths = paths[r % len(paths):] + paths[:r % len(paths)]
            for path in paths:
                key = cell_key(g['workload'], g['size'], g['nodelay'], g['pairs'], path, g['placement'])
                while True:
                    if disturbed:
                        quiet.wait()
                    sample = bench.run(path, g['workload'], g['size'], g['nodelay'], g['pairs'],
                                       g['placement'], duration)
                    sample['repeat'] = r
                    disturbed = sample['load']['others'] > BUSY_MACHINE
                    if not disturbed or not retakes:
                        break
                    cells[key].setdefault('set_aside', []).append(sample)
                    retakes -= 1
                cells[key]['samples'].append(sample)
                done += 1
        log('repeat %d/%d done (%d/%d samples, %d retakes left, %.0f s spent waiting for quiet)'
            % (r + 1, repeats, done, total, retakes, quiet.waited))
    for cell in cells.values():
        summarize(cell)
    return list(cells.values()), dict(waited_for_quiet=round(quiet.waited, 1), retakes_left=retakes)


class QuietWaiter(object):
    """Waits, after a disturbed sample, until the machine is quiet again.

    Called between samples, when nothing of ours runs: all load is foreign.
    """

    def __init__(self, budget):
        self.budget = budget
        self.waited = 0.0

    def wait(self):
        calm = 0.0
        start = time.monotonic()
        while calm < QUIET_SPELL and self.waited + time.monotonic() - start < self.budget:
            before = (time.monotonic(),) + _cpu_seconds()
            time.sleep(0.25)
            after = (time.monotonic(),) + _cpu_seconds()
            wall, busy, _steal = (b - a for b, a in zip(after, before))
            calm = calm + wall if busy / wall <= BUSY_MACHINE else 0.0
        self.waited += time.monotonic() - start - calm


def _stats(values):
    med = statistics.median(values)
    return dict(median=med, min=min(values), max=max(values),
                spread=(max(values) - min(values)) / med if med else 0.0)


def summarize(cell):
    samples = cell['samples']
    if cell['workload'] == 'pingpong':
        cell['tps'] = _stats([s['tps'] for s in samples])
        cell['p50_us'] = _stats([s['p50_us'] for s in samples])
        cell['p99_us'] = _stats([s['p99_us'] for s in samples])
    else:
        cell['bytes_per_s'] = _stats([s['bytes_per_s'] for s in samples])
        cell['write_calls_per_s'] = statistics.median(
            s['client']['writes'] / s['client']['elapsed'] for s in samples)
        cell['reads_per_write'] = statistics.median(
            s['server']['reads'] / s['client']['writes'] for s in samples)
    cell['lo_packets'] = statistics.median(s['lo_packets'] for s in samples)
    cell['load'] = {k: statistics.median(s['load'][k] for s in samples) for k in ('others', 'steal')}
    kinds = collections.Counter()
    for s in samples:
        kinds.update(s['errors'])
    cell['errors'] = sum(kinds.values())
    cell['error_kinds'] = {k: n for k, n in sorted(kinds.items()) if n}
    if cell['path'] == 'redirect':
        cell['proven'] = all(s['proof']['ok'] for s in samples)
        # path -> number of samples that took it (None: unproven)
        cell['paths_taken'] = dict(collections.Counter(s['proof']['path'] or 'unproven'
                                                       for s in samples))


# ---- reporting -----------------------------------------------------------

def find(cells, workload, size, nodelay, pairs, path, placement='split'):
    key = cell_key(workload, size, nodelay, pairs, path, placement)
    for cell in cells:
        if cell['key'] == key:
            return cell
    return None


def figure(cell):
    """The headline figure of a cell, or None when a redirect cell lacks its proof."""
    if cell is None or (cell['path'] == 'redirect' and not cell['proven']):
        return None
    return (cell['tps'] if cell['workload'] == 'pingpong' else cell['bytes_per_s'])['median']


def ratio(a, b):
    fa, fb = figure(a), figure(b)
    if fa is None or fb is None or not fb:
        return None
    return fa / fb


def human_size(n):
    return '%d KiB' % (n // KIB) if n >= KIB else '%d B' % n


def fmt_rate(cell):
    if cell is None:
        return '-'
    if cell['path'] == 'redirect' and not cell['proven']:
        return 'unproven'
    s = cell['bytes_per_s']
    return '%.0f ±%.0f%%' % (s['median'] / 1e6, 50 * s['spread'])


def fmt_ratio(r):
    return '-' if r is None else '%.2fx' % r


def fmt_proof(cell):
    """The path(s) a redirect cell's samples took, and the evidence, in one table cell."""
    if cell is None:
        return '-'
    p = [s['proof'] for s in cell['samples']]
    n = len(p)
    if not cell['proven']:
        bad = [x for x in p if not x['ok']]
        return 'UNPROVEN (%d of %d samples fit no path): %s' % (len(bad), n, '; '.join(
            '%s fails %s' % (path, ', '.join(failed)) for path, failed in bad[0]['failed_checks'].items()))
    parts = []
    for path in (PATH_REDIRECTED, PATH_DEMOTED, PATH_NOT_ADMITTED):
        took = [x for x in p if x['path'] == path]
        if not took:
            continue
        moved = sum(x['bytes_moved'] for x in took) / 1e6
        redirected = sum(x['redirected_bytes'] for x in took) / 1e6
        if path == PATH_REDIRECTED:
            evidence = '%.4g of %.4g MB redirected, lo <= %d pkts' % (
                redirected, moved, max(x['lo_packets'] for x in took))
        elif path == PATH_DEMOTED:
            evidence = ('each connection demoted and removed once, %.3g of %.4g MB redirected '
                        'before (<= %d writes each), rest on lo (>= %d pkts)' % (
                            redirected, moved, took[0]['redirect_bound'] // cell['size'] // cell['pairs'],
                            min(x['lo_packets'] for x in took)))
        else:
            evidence = 'not_admitted_peer once per connection, 0 inserted, %.4g MB over veth' % moved
        parts.append('%s (%d/%d): %s' % (path, len(took), n, evidence))
    return '; '.join(parts)


def path_taken(cell):
    """Short form of the path(s) of a redirect cell, for tables and targets."""
    if cell is None:
        return '-'
    taken = cell['paths_taken']
    if len(taken) == 1:
        return next(iter(taken))
    return 'mixed: ' + ', '.join('%s %d' % (path, k) for path, k in sorted(taken.items()))


def _verdict(value, target, tolerance=None):
    if value is None:
        return 'unproven'
    if value >= target:
        return 'met'
    if tolerance is not None and value >= tolerance:
        return 'met within tolerance'
    return 'not met'


def targets(cells):
    """Issue 11's targets against this run's medians. met is None when the run did not measure it."""
    out = {}
    # 1. Every stream row, one connection and concurrent, both TCP_NODELAY settings.
    rows = []
    for c in sorted((c for c in cells if c['workload'] == 'stream' and c['path'] == 'redirect'),
                    key=lambda c: (c['pairs'], c['nodelay'], c['size'])):
        r = ratio(c, find(cells, 'stream', c['size'], c['nodelay'], c['pairs'], 'loopback'))
        rows.append(dict(size=c['size'], nodelay=c['nodelay'], pairs=c['pairs'], ratio=r,
                         path=path_taken(c), verdict=_verdict(r, STREAM_TARGET, STREAM_TOLERANCE)))
    known = [row['ratio'] for row in rows if row['ratio'] is not None]
    out['stream_vs_loopback'] = dict(
        target=STREAM_TARGET, tolerance=STREAM_TOLERANCE, rows=rows,
        min_ratio=min(known) if known else None,
        met=all(row['verdict'] != 'not met' and row['verdict'] != 'unproven' for row in rows)
        if rows else None)
    # 2. 64 KiB stream, each TCP_NODELAY row judged; the lower decides.
    big = 64 * KIB
    by_row = {}
    for nodelay, name in ((False, 'nagle'), (True, 'nodelay')):
        redirect = find(cells, 'stream', big, nodelay, 1, 'redirect')
        if redirect:
            by_row[name] = dict(
                vs_loopback=ratio(redirect, find(cells, 'stream', big, nodelay, 1, 'loopback')),
                vs_unix=ratio(redirect, find(cells, 'stream', big, None, 1, 'unix')),
                path=path_taken(redirect))
    out['stream_64k'] = dict(
        target_vs_loopback=STREAM_64K_VS_LOOPBACK, target_vs_unix=STREAM_64K_VS_UNIX, by_row=by_row,
        met=all(v['vs_loopback'] is not None and v['vs_loopback'] >= STREAM_64K_VS_LOOPBACK and
                v['vs_unix'] is not None and v['vs_unix'] >= STREAM_64K_VS_UNIX
                for v in by_row.values()) if by_row else None)
    # 3. 64 B request/response: transactions/s on one CPU; p99 wherever measured.
    same = find(cells, 'pingpong', 64, True, 1, 'redirect', 'same')
    tps = ratio(same, find(cells, 'pingpong', 64, True, 1, 'loopback', 'same'))
    p99 = {}
    for placement in PLACEMENTS:
        rd = find(cells, 'pingpong', 64, True, 1, 'redirect', placement)
        lb = find(cells, 'pingpong', 64, True, 1, 'loopback', placement)
        if rd and lb:
            mine = rd['p99_us']['median'] if rd['proven'] else None
            p99[placement] = dict(redirect_us=mine, loopback_us=lb['p99_us']['median'],
                                  met=mine is not None and mine <= lb['p99_us']['median'])
    out['pingpong_64'] = dict(
        target_tps_same_cpu=PINGPONG_64_VS_LOOPBACK, tps_ratio_same_cpu=tps, p99=p99,
        path=path_taken(same) if same else None,
        met=(tps is not None and tps >= PINGPONG_64_VS_LOOPBACK and all(v['met'] for v in p99.values()))
        if same else None)
    # 4. Peer on another host: with the programs against without, zero errors.
    rows = []
    for c in sorted((c for c in cells if c['workload'] == 'remote' and c['path'] == 'redirect'),
                    key=lambda c: -c['size']):
        plain = find(cells, 'remote', c['size'], c['nodelay'], c['pairs'], 'plain')
        r = ratio(c, plain)
        rows.append(dict(size=c['size'], nodelay=c['nodelay'], ratio=r, path=path_taken(c),
                         errors_with=c['errors'], errors_without=plain['errors'],
                         met=r is not None and r >= REMOTE_TARGET and c['errors'] == 0))
    out['remote_peer'] = dict(target=REMOTE_TARGET, rows=rows,
                              met=all(row['met'] for row in rows) if rows else None)
    return out


def fmt_met(met):
    return {True: '**met**', False: '**not met**', None: 'not measured'}[met]


def targets_table(t):
    """Issue 11's targets as a Markdown table, from targets()."""
    lines = ['| target | this run | met? |', '|---|---|---|']
    s = t['stream_vs_loopback']
    below = [r for r in s['rows'] if r['verdict'] != 'met']
    lines.append('| every stream row (Nagle on and TCP_NODELAY, 64 B-64 KiB, one connection and '
                 'concurrent) >= %.1fx loopback; %.2fx counts as met for noise | lowest %s%s | %s |' % (
                     s['target'], s['tolerance'], fmt_ratio(s['min_ratio']),
                     '; below %.1fx: %s' % (s['target'], ', '.join(
                         '%s %s%s %s (%s, %s)' % (human_size(r['size']), 'nodelay' if r['nodelay'] else 'nagle',
                                                  ' x%d' % r['pairs'] if r['pairs'] > 1 else '',
                                                  fmt_ratio(r['ratio']), r['path'], r['verdict'])
                         for r in below)) if below else '', fmt_met(s['met'])))
    b = t['stream_64k']
    lines.append('| 64 KiB stream >= %.1fx loopback and >= %.2fx Unix (each TCP_NODELAY row) | %s | %s |' % (
        b['target_vs_loopback'], b['target_vs_unix'], '; '.join(
            'TCP_NODELAY %s: %s loopback, %s Unix (%s)' % (
                'on' if row == 'nodelay' else 'off', fmt_ratio(v['vs_loopback']),
                fmt_ratio(v['vs_unix']), v['path']) for row, v in b['by_row'].items()) or '-',
        fmt_met(b['met'])))
    p = t['pingpong_64']
    lines.append('| 64 B request/response >= %.1fx loopback transactions/s (one CPU), p99 never worse '
                 'than loopback | %s transactions/s; p99 %s | %s |' % (
                     p['target_tps_same_cpu'], fmt_ratio(p['tps_ratio_same_cpu']), '; '.join(
                         '%s CPUs %s vs %.1f us' % (
                             placement, '-' if v['redirect_us'] is None else '%.1f' % v['redirect_us'],
                             v['loopback_us']) for placement, v in p['p99'].items()) or '-',
                     fmt_met(p['met'])))
    r = t['remote_peer']
    lines.append('| peer on another host >= %.2fx the same client without the programs, zero errors | %s | %s |' % (
        r['target'], '; '.join('%s: %s, errors %d with / %d without' % (
            human_size(row['size']), fmt_ratio(row['ratio']), row['errors_with'], row['errors_without'])
            for row in r['rows']) or '-', fmt_met(r['met'])))
    return lines


def noise_note(cells, noise):
    others = [s['load']['others'] for c in cells for s in c['samples']]
    steal = [s['load']['steal'] for c in cells for s in c['samples']]
    set_aside = sum(len(c.get('set_aside', [])) for c in cells)
    disturbed = sum(1 for x in others if x > BUSY_MACHINE)
    note = ('Load besides the two benchmark processes while the kept samples ran (CPUs): '
            'median %.2f, max %.2f; hypervisor steal: median %.2f, max %.2f. '
            '%d samples were set aside and retaken (load above %.2f CPUs), %.0f s spent waiting '
            'for quiet; %d kept samples are above it.'
            % (statistics.median(others), max(others), statistics.median(steal), max(steal),
               set_aside, BUSY_MACHINE, noise['waited_for_quiet'], disturbed))
    if statistics.median(others) > BUSY_MACHINE or statistics.median(steal) > BUSY_MACHINE:
        note += ' **The machine was busy: the figures are noisy, rerun on a quiet machine.**'
    return note


def policy_note(result):
    policy = result['small_write_policy']
    if result['build'] == 'bcc':
        built = ('Programs compiled from files/bpf/sockredir.bpf.c by BCC on this host: this build has no '
                 'small-write switch (sockredir_bcc.h), small writes stay redirected.')
    else:
        built = 'Programs: the prebuilt object files/bpf/sockredir.bpf.o, loaded through libbpf.'
    return built + (' Small-write policy: a direction switches to TCP after %d sends in a row '
                    'under %d bytes with nothing received between (%s).'
                    % (policy['small_streak'], policy['small_bytes'],
                       'set by this run in sockredir_cfg' if policy['set_by_run'] else 'the defaults'))


def errors_note(cells):
    bad = [c for c in cells if c['errors']]
    total = sum(c['errors'] for c in cells)
    return ('Errors (reads or writes that failed with EAGAIN on a blocking socket, wrong replies) '
            'over all %d kept samples: %d%s.' % (
                sum(len(c['samples']) for c in cells), total,
                ' (%s)' % '; '.join('%s: %s' % (c['key'], ', '.join('%s %d' % kv for kv in c['error_kinds'].items()))
                                    for c in bad) if bad else ''))


def markdown(result):
    cells, mode, info = result['cells'], result['mode'], result['host']
    pin = result['pinning']
    lines = ['# sockredir benchmark (%s mode)' % mode, '',
             '%s, kernel %s, %s (%d CPUs%s).' % (
                 info['date'], info['kernel'], info['cpu'], info['cpus'],
                 ', %s guest' % info['hypervisor'] if info['hypervisor'] else ''),
             'Each cell: %d runs of %.1f s, median and ±half the min-max range. '
             % (result['repeats'], result['duration']) +
             ('Server pinned to CPU %d, client to CPU %d (taskset).' % tuple(pin) if pin
              else 'Not pinned (one CPU).'),
             'MB/s = 10^6 bytes per second read by the server. Unix sockets have no Nagle: '
             'their figure is the same in both TCP_NODELAY rows.', '',
             policy_note(result), '', noise_note(cells, result['noise']), '',
             errors_note(cells), '',
             '## Streaming throughput (one connection)', '',
             '| write | TCP_NODELAY | loopback MB/s | redirect MB/s | unix MB/s | redirect/loopback '
             '| redirect/unix | path taken | proof |',
             '|---|---|---|---|---|---|---|---|---|']
    rows = [(c['size'], c['nodelay']) for c in cells
            if c['workload'] == 'stream' and c['pairs'] == 1 and c['path'] == 'redirect']
    for size, nodelay in sorted(rows, key=lambda r: (r[1], r[0])):
        lb, rd, ux = (find(cells, 'stream', size, nodelay, 1, p) for p in PATHS)
        lines.append('| %s | %s | %s | %s | %s | %s | %s | %s | %s |' % (
            human_size(size), 'on' if nodelay else 'off', fmt_rate(lb), fmt_rate(rd), fmt_rate(ux),
            fmt_ratio(ratio(rd, lb)), fmt_ratio(ratio(rd, ux)), path_taken(rd), fmt_proof(rd)))

    lines += ['', '## Request/response (one connection, TCP_NODELAY on)', '',
              'CPUs: *same* = client and server on CPU %s; *split* = on two CPUs as for the streams.'
              % (pin[0] if pin else '-'), '',
              '| message | CPUs | path | transactions/s | p50 us | p99 us | vs loopback | path taken and proof |',
              '|---|---|---|---|---|---|---|---|']
    points = sorted({(PLACEMENTS.index(c['placement']), c['size']) for c in cells
                     if c['workload'] == 'pingpong'})
    for order, size in points:
        placement = PLACEMENTS[order]
        lb = find(cells, 'pingpong', size, True, 1, 'loopback', placement)
        for path in PATHS:
            c = find(cells, 'pingpong', size, True, 1, path, placement)
            if path == 'redirect' and not c['proven']:
                lines.append('| %s | %s | redirect | unproven | | | | %s |'
                             % (human_size(size), placement, fmt_proof(c)))
                continue
            lines.append('| %s | %s | %s | %.0f ±%.0f%% | %.1f | %.1f | %s | %s |' % (
                human_size(size), placement, path, c['tps']['median'], 50 * c['tps']['spread'],
                c['p50_us']['median'], c['p99_us']['median'], fmt_ratio(ratio(c, lb)),
                fmt_proof(c) if path == 'redirect' else ''))

    multi = sorted({(c['pairs'], c['size']) for c in cells if c['workload'] == 'stream' and c['pairs'] > 1})
    if multi:
        lines += ['', '## Concurrent connections (aggregate, TCP_NODELAY off, one epoll thread per side)', '',
                  '| pairs | write | loopback MB/s | redirect MB/s | unix MB/s | redirect/loopback '
                  '| redirect/unix | path taken | proof |', '|---|---|---|---|---|---|---|---|---|']
        for pairs, size in multi:
            lb, rd, ux = (find(cells, 'stream', size, False, pairs, p) for p in PATHS)
            lines.append('| %d | %s | %s | %s | %s | %s | %s | %s | %s |' % (
                pairs, human_size(size), fmt_rate(lb), fmt_rate(rd), fmt_rate(ux),
                fmt_ratio(ratio(rd, lb)), fmt_ratio(ratio(rd, ux)), path_taken(rd), fmt_proof(rd)))

    remote = sorted({c['size'] for c in cells if c['workload'] == 'remote'}, reverse=True)
    if remote:
        lines += ['', '## Peer on another host (one connection, TCP_NODELAY off)', '',
                  'Server in a second network namespace reached over a veth pair, in the plain cgroup; '
                  'the client writes, shuts down its sending side and reads an 8-byte reply with a '
                  'blocking read. *without*: the client in the plain cgroup; *with*: the same client in '
                  'the cgroup with the programs. Errors: calls that failed with EAGAIN on a blocking '
                  'socket, and wrong replies, over all samples.', '',
                  '| write | without MB/s | with the programs MB/s | with/without | errors without | '
                  'errors with | path taken and proof |', '|---|---|---|---|---|---|---|']
        for size in remote:
            plain, rd = (find(cells, 'remote', size, False, 1, p) for p in REMOTE_PATHS)
            lines.append('| %s | %s | %s | %s | %d | %d | %s |' % (
                human_size(size), fmt_rate(plain), fmt_rate(rd), fmt_ratio(ratio(rd, plain)),
                plain['errors'], rd['errors'], fmt_proof(rd)))

    lines += ['', '## Ansible cost (ansible-playbook wall time, localhost, seconds)', '',
              '| step | ' + ' | '.join('run %d' % (i + 1) for i in range(len(result['ansible']['cycles'])))
              + ' | median |', '|---|' + '---|' * (len(result['ansible']['cycles']) + 1)]
    for step, label in (('first_converge', 'first converge (load + 2 attach, changed 3)'),
                        ('idempotent_rerun', 'idempotent re-run (changed 0)'),
                        ('absent', 'state: absent (changed 3)')):
        values = [c[step]['seconds'] for c in result['ansible']['cycles']]
        lines.append('| %s | %s | %.2f |' % (label, ' | '.join('%.2f' % v for v in values),
                                             statistics.median(values)))
    if result['build'] == 'bcc':
        lines += ['', 'Kernel header cache %s before the first converge.'
                  % ('present' if result['ansible']['headers_cache_present'] else 'absent')]

    lines += ['', '## Targets of issue 11', ''] + targets_table(result['targets'])
    return '\n'.join(lines) + '\n'


def plot(result, png):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        log('matplotlib not importable: no plot (Debian: apt-get install python3-matplotlib)')
        return False
    cells = result['cells']
    rows = sorted({c['nodelay'] for c in cells if c['workload'] == 'stream' and c['pairs'] == 1
                   and c['nodelay'] is not None})
    if not rows:
        return False
    fig, axes = plt.subplots(1, len(rows), figsize=(6 * len(rows), 4.5), squeeze=False, sharey=True)
    for ax, nodelay in zip(axes[0], rows):
        for name, style in zip(PATHS, ('o-', 's-', '^--')):
            points = []
            for c in cells:
                if (c['workload'] == 'stream' and c['pairs'] == 1 and c['path'] == name
                        and c['nodelay'] in (nodelay, None) and figure(c) is not None):
                    if name != 'unix' or find(cells, 'stream', c['size'], nodelay, 1, 'redirect'):
                        points.append(c)
            points.sort(key=lambda c: c['size'])
            if not points:
                continue
            x = [c['size'] for c in points]
            y = [c['bytes_per_s']['median'] / 1e6 for c in points]
            err = [[(c['bytes_per_s']['median'] - c['bytes_per_s']['min']) / 1e6 for c in points],
                   [(c['bytes_per_s']['max'] - c['bytes_per_s']['median']) / 1e6 for c in points]]
            ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=name)
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        sizes = sorted({c['size'] for c in cells if c['workload'] == 'stream' and c['pairs'] == 1})
        ax.set_xticks(sizes)
        ax.set_xticklabels([human_size(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel('write size')
        ax.set_title('TCP_NODELAY %s' % ('on' if nodelay else 'off'))
        ax.grid(True, which='both', alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel('MB/s (median, min-max bars)')
    fig.suptitle('Stream throughput, one connection: %s, kernel %s'
                 % (result['host']['cpu'], result['host']['kernel']), fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


# ---- main ------------------------------------------------------------------

def run(mode, out_dir, repeats=None, duration=None, sizes=None, streams_only=False,
        small_bytes=None, small_streak=None, build=BUILDS[0]):
    m = MODES[mode]
    repeats = repeats or m['repeats']
    duration = duration or m['duration']
    check_prerequisites()
    os.makedirs(out_dir, exist_ok=True)
    started = time.monotonic()
    pinning = cpu_pinning()
    result = dict(mode=mode, host=host_info(), repeats=repeats, duration=duration,
                  pinning=list(pinning) if pinning else None,
                  plan=dict(sizes=sizes, streams_only=streams_only), build=build)
    with contextlib.ExitStack() as stack:
        stack.enter_context(terminate_cleanly())
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix='sockbench-'))
        binary = compile_sockbench(workdir)
        stack.enter_context(bpffs_mounted())
        netns = stack.enter_context(hostenv.netns('sockbench'))
        remote_netns = stack.enter_context(remote_peer(netns))
        plain_cg = stack.enter_context(hostenv.child_cgroup('sockbench-plain'))
        redirect_cg = stack.enter_context(hostenv.child_cgroup('sockbench-redirect'))
        pin_dir = os.path.join(BPFFS, hostenv.unique_name('sockbench'))
        # Runs before the cgroups go (LIFO): unpinned programs stay loaded only
        # while the cgroup holds them.
        stack.callback(remove_pin_dir, pin_dir)
        log('netns %s (remote peer: %s), cgroups %s and %s, pins %s'
            % (netns, remote_netns, plain_cg, redirect_cg, pin_dir))

        ansible = Ansible(workdir)
        headers_cache = os.path.isdir(kheaders.DEFAULT_CACHE)
        cycles = []
        for i in range(m['ansible_cycles']):
            last = i == m['ansible_cycles'] - 1
            cycles.append(ansible_cycle(ansible, pin_dir, redirect_cg, build, keep=last))
            log('ansible cycle %d: %s' % (i + 1, {k: v['seconds'] for k, v in cycles[-1].items()}))

        policy = small_write_policy(pin_dir, small_bytes, small_streak)
        result['small_write_policy'] = policy
        log('small-write policy: %s' % policy)
        bench = Bench(binary, netns, dict(loopback=plain_cg, redirect=redirect_cg, unix=plain_cg,
                                          plain=plain_cg),
                      pin_dir, workdir, pinning, remote_netns, policy)
        result['cells'], result['noise'] = measure(bench, mode, repeats, duration, sizes, streams_only)
        cycles[-1]['absent'] = remove_with_ansible(ansible, pin_dir, redirect_cg)
        result['ansible'] = dict(cycles=cycles, headers_cache_present=headers_cache)
    result['targets'] = targets(result['cells'])
    result['seconds'] = round(time.monotonic() - started, 1)
    with open(os.path.join(out_dir, 'results.json'), 'w') as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(os.path.join(out_dir, 'results.md'), 'w') as f:
        f.write(md)
    result['plot'] = plot(result, os.path.join(out_dir, 'throughput.png'))
    return result, md


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument('--quick', dest='mode', action='store_const', const='quick',
                       help='a subset of the cells, short runs (under a minute); the default')
    which.add_argument('--full', dest='mode', action='store_const', const='full',
                       help='every cell of issues 5 and 11, longer runs (a few minutes)')
    parser.add_argument('--out', default=os.path.join(HERE, 'out'),
                        help='directory for results.json, results.md, throughput.png (default: %(default)s)')
    parser.add_argument('--repeats', type=int, help='runs per cell (default: by mode)')
    parser.add_argument('--duration', type=float, help='seconds per run (default: by mode)')
    parser.add_argument('--sizes', type=lambda v: [int(x) for x in v.split(',')],
                        help='comma-separated write sizes of the one-connection stream rows '
                             '(both TCP_NODELAY settings), instead of the mode\'s')
    parser.add_argument('--streams-only', action='store_true',
                        help='only the one-connection stream rows (for experiments)')
    parser.add_argument('--small-bytes', type=int,
                        help='set the programs\' small_bytes in sockredir_cfg (default: theirs)')
    parser.add_argument('--build', choices=BUILDS, default=BUILDS[0],
                        help='programs to converge: the prebuilt object (default) or the source compiled by BCC')
    parser.add_argument('--small-streak', type=int,
                        help='set the programs\' small_streak in sockredir_cfg (default: theirs)')
    args = parser.parse_args(argv)
    try:
        result, md = run(args.mode or 'quick', args.out, args.repeats, args.duration, args.sizes,
                         args.streams_only, args.small_bytes, args.small_streak, args.build)
    except BenchError as e:
        log('failed: %s' % e)
        return 1
    print(md)
    log('done in %.1f s; results in %s' % (result['seconds'], args.out))
    return 0


if __name__ == '__main__':
    sys.exit(main())
