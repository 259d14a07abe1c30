#!/usr/bin/env python3
"""Redirect versus TCP loopback versus Unix sockets, side by side; and the cost of a converge.

    sudo .venv/bin/python benchmarks/run.py --quick [--out DIR]   # < 1 minute
    sudo .venv/bin/python benchmarks/run.py --full  [--out DIR]   # a few minutes

One run measures three paths on the same cores, interleaved cell by cell:

  loopback  TCP over 127.0.0.1 in a network namespace made for the run, both
            peers in a child cgroup with nothing attached;
  redirect  the same, in a second child cgroup where ansible-playbook has
            converged this collection's programs (bpf_program + bpf_attach);
  unix      AF_UNIX stream sockets, the same-host upper bound.

Every redirect sample carries its proof: the delta of the programs'
redirected_bytes counter must match the bytes the peers wrote, nothing may
have fallen back to TCP (passed_bytes), and the loopback interface of the
namespace may only have seen the handshakes. A cell with a sample lacking
the proof is reported as unproven, not as a redirect figure.

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
import contextlib
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
from support.plays import converge_tasks, remove_pin_dir, teardown_tasks  # noqa: E402
from ansible_collections.ebpf.sockredir.plugins.module_utils import facts, program  # noqa: E402
from ansible_collections.ebpf.sockredir.plugins.module_utils import headers as kheaders  # noqa: E402

KIB = 1024
PATHS = ('loopback', 'redirect', 'unix')

# What each mode measures. Stream cells run with TCP_NODELAY off and on for
# the TCP paths; Unix sockets have no Nagle, so their figure serves both rows.
MODES = {
    'quick': dict(
        stream_sizes=[64, 4 * KIB, 64 * KIB], nodelay_sizes=[64],
        pingpong_sizes=[64], pingpong_placements=['same'], pairs=8, pairs_sizes=[16 * KIB],
        duration=0.3, repeats=2, ansible_cycles=1, retake_budget=0.2, quiet_wait=5),
    'full': dict(
        stream_sizes=[64, 256, KIB, 4 * KIB, 16 * KIB, 64 * KIB],
        nodelay_sizes=[64, 256, KIB, 4 * KIB, 16 * KIB, 64 * KIB],
        pingpong_sizes=[64, KIB], pingpong_placements=['same', 'split'],
        pairs=64, pairs_sizes=[KIB, 64 * KIB],
        duration=1.0, repeats=5, ansible_cycles=3, retake_budget=0.5, quiet_wait=900),
}

# The redirect proof. Per connection the loopback device still carries the
# handshake and the close (3 + 4 packets, a few more with delayed ACKs); data
# carried over TCP would add at least one packet per 64 KiB.
LO_PACKETS_PER_CONNECTION = 12
LO_PACKETS_SLACK = 8
# Counters and bytes written must agree to this fraction.
PROOF_TOLERANCE = 0.001
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
    cc = subprocess.run(['cc', '--version'], capture_output=True, text=True).stdout.splitlines()
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                kernel=platform.release(), cpu=model, cpus=os.cpu_count(),
                hypervisor=_hypervisor(), cc=cc[0] if cc else '', python=platform.python_version())


def _hypervisor():
    out = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
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
    mounted_here = subprocess.run(['mountpoint', '-q', BPFFS]).returncode != 0
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
                               path], capture_output=True, text=True, env=env, timeout=600)
        seconds = time.monotonic() - start
        try:
            stats = json.loads(proc.stdout)['stats']['localhost']
        except (ValueError, KeyError):
            stats = None
        if proc.returncode != 0 or stats is None:
            raise BenchError('ansible-playbook %s failed (rc %s): %s%s'
                             % (what, proc.returncode, proc.stdout[-3000:], proc.stderr[-2000:]))
        return dict(seconds=round(seconds, 3), changed=stats.get('changed', 0), ok=stats.get('ok', 0))


def ansible_cycle(ansible, pin_dir, cgroup, keep=False):
    """First converge, idempotent rerun, and (unless keep) state absent, each timed."""
    first = ansible.play('converge', converge_tasks(pin_dir, cgroup))
    rerun = ansible.play('rerun', converge_tasks(pin_dir, cgroup))
    if first['changed'] != 3 or rerun['changed'] != 0:
        raise BenchError('converge changed %s tasks (expected 3), the rerun %s (expected 0)'
                         % (first['changed'], rerun['changed']))
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
    return facts.pin_dir_facts(pin_dir)['counters']


# ---- one measurement -----------------------------------------------------

class Bench(object):
    def __init__(self, binary, netns, cgroups, pin_dir, unix_dir, pinning):
        self.binary = binary
        self.netns = netns
        self.cgroups = cgroups          # path name -> cgroup directory
        self.pin_dir = pin_dir
        self.unix_dir = unix_dir
        self.pinning = pinning
        self.seq = 0

    def _command(self, path, cpu, argv):
        cgroup = self.cgroups[path]
        pin = ['taskset', '-c', str(cpu)] if cpu is not None else []
        # The shell joins the cgroup, then exec()s: every socket belongs to it.
        return ['/bin/sh', '-c', 'echo $$ > "$0" && exec "$@"', os.path.join(cgroup, 'cgroup.procs'),
                'nsenter', '--net=/run/netns/%s' % self.netns] + pin + [self.binary] + argv

    def _endpoint(self, path):
        if path == 'unix':
            self.seq += 1
            return ['--family', 'unix', '--addr', os.path.join(self.unix_dir, 's%d.sock' % self.seq)]
        return ['--family', 'tcp', '--addr', '127.0.0.1']

    def run(self, path, workload, size, nodelay, pairs, placement, duration):
        """One sample: server and client processes, their reports, and the deltas around them."""
        endpoint = self._endpoint(path)
        common = endpoint + ['--mode', 'pingpong' if workload == 'pingpong' else 'stream',
                             '--size', str(size), '--pairs', str(pairs),
                             '--nodelay', '1' if nodelay else '0']
        server_cpu, client_cpu = self.pinning or (None, None)
        if placement == 'same':
            client_cpu = server_cpu
        tcp = path != 'unix'
        before = dict(lo=hostenv.lo_packets(self.netns), counters=counters(self.pin_dir))
        witness = CpuWitness()
        deadline = time.monotonic() + duration + 60
        procs = []
        try:
            server = subprocess.Popen(self._command(path, server_cpu, ['server'] + common),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
            procs.append(server)
            line = _read_line(server, deadline)
            if not line or not line.startswith(b'listening '):
                server.kill()
                raise BenchError('sockbench server did not listen: %s'
                                 % server.communicate()[1].decode(errors='replace'))
            port = line.split()[1].decode()
            client = subprocess.Popen(
                self._command(path, client_cpu, ['client'] + common +
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
        after = dict(lo=hostenv.lo_packets(self.netns), counters=counters(self.pin_dir))

        if server_report['recv_bytes'] != client_report['sent_bytes']:
            raise BenchError('%s %s size %d: client wrote %d bytes, server read %d'
                             % (path, workload, size, client_report['sent_bytes'],
                                server_report['recv_bytes']))
        sample = dict(client=client_report, server=server_report,
                      lo_packets=after['lo'] - before['lo'], load=load)
        if workload == 'pingpong':
            sample.update(tps=client_report['transactions'] / client_report['elapsed'],
                          p50_us=client_report['p50_us'], p99_us=client_report['p99_us'])
        else:
            sample['bytes_per_s'] = server_report['recv_bytes'] / server_report['elapsed']
        if tcp:
            delta = {k: after['counters'][k] - before['counters'][k] for k in after['counters']}
            sample['counters'] = delta
        if path == 'redirect':
            sample['proof'] = redirect_proof(sample, pairs)
        return sample


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


def redirect_proof(sample, pairs):
    """Did this sample's bytes take the redirect? The evidence, and a verdict."""
    moved = sample['client']['sent_bytes'] + sample['server']['sent_bytes']
    c = sample['counters']
    lo_budget = LO_PACKETS_PER_CONNECTION * pairs + LO_PACKETS_SLACK
    checks = dict(
        redirected_bytes_match=abs(c['redirected_bytes'] - moved) <= PROOF_TOLERANCE * moved,
        nothing_passed=c['passed_bytes'] <= PROOF_TOLERANCE * moved,
        sockets_inserted=c['inserted'] >= 2 * pairs,
        lo_packets_within_budget=sample['lo_packets'] <= lo_budget,
    )
    return dict(ok=all(checks.values()), checks=checks, bytes_moved=moved,
                redirected_bytes=c['redirected_bytes'], passed_bytes=c['passed_bytes'],
                inserted=c['inserted'], lo_packets=sample['lo_packets'], lo_packet_budget=lo_budget)


# ---- the plan ------------------------------------------------------------

# Where client and server run. split: on two CPUs (streams, and request/response
# as most deployments see it). same: both on one CPU, so that a transaction
# costs what the socket path costs and not a cross-CPU wake-up (which in a VM
# guest is an IPI through the hypervisor, tens of microseconds).
PLACEMENTS = ('split', 'same')


def plan(mode):
    """Groups of cells measured back to back: the paths of one workload point."""
    m = MODES[mode]
    groups = []

    def group(workload, size, nodelay, pairs, placement='split', paths=PATHS):
        groups.append(dict(workload=workload, size=size, nodelay=nodelay, pairs=pairs,
                           placement=placement, paths=paths))
    for size in m['stream_sizes']:
        group('stream', size, False, 1)
    for size in m['nodelay_sizes']:
        # Unix was measured in the TCP_NODELAY-off group of the same size.
        group('stream', size, True, 1,
              paths=PATHS if size not in m['stream_sizes'] else ('loopback', 'redirect'))
    for placement in m['pingpong_placements']:
        for size in m['pingpong_sizes']:
            group('pingpong', size, True, 1, placement)
    for size in m['pairs_sizes']:
        group('stream', size, False, m['pairs'])
    return groups


def cell_key(workload, size, nodelay, pairs, path, placement='split'):
    if path == 'unix':
        nodelay = None
    return '%s/%d/%s/%d/%s/%s' % (workload, size, {None: 'na', True: 'nodelay', False: 'nagle'}[nodelay],
                                  pairs, placement, path)


def measure(bench, mode, repeats, duration):
    groups = plan(mode)
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
    if cell['path'] == 'redirect':
        cell['proven'] = all(s['proof']['ok'] for s in samples)


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
    if cell is None:
        return '-'
    p = [s['proof'] for s in cell['samples']]
    moved = sum(x['bytes_moved'] for x in p)
    redirected = sum(x['redirected_bytes'] for x in p)
    lo = max(x['lo_packets'] for x in p)
    mark = 'ok' if cell['proven'] else 'FAILED'
    return '%s: %.4g of %.4g MB, lo <= %d pkts' % (mark, redirected / 1e6, moved / 1e6, lo)


def targets(cells, mode):
    """Issue 5's targets against this run's medians."""
    m = MODES[mode]
    stream = [c for c in cells if c['workload'] == 'stream' and c['path'] == 'redirect']
    slower = []
    ratios = []
    for c in stream:
        r = ratio(c, find(cells, 'stream', c['size'], c['nodelay'], c['pairs'], 'loopback'))
        if r is None:
            continue
        ratios.append(r)
        if r < 1.0:
            slower.append(dict(size=c['size'], nodelay=c['nodelay'], pairs=c['pairs'], ratio=r))
    out = dict(never_slower_than_loopback=dict(
        met=bool(ratios) and not slower and len(ratios) == len(stream),
        min_ratio=min(ratios) if ratios else None, slower_cells=slower))
    big = 64 * KIB
    # Both TCP_NODELAY rows measure the same redirect path (the option does
    # not touch redirected data): each row is judged, the lower one decides.
    by_row = {}
    for nodelay, row in ((False, 'nagle'), (True, 'nodelay')):
        redirect = find(cells, 'stream', big, nodelay, 1, 'redirect')
        if redirect:
            by_row[row] = ratio(redirect, find(cells, 'stream', big, None, 1, 'unix'))
    known = [r for r in by_row.values() if r is not None]
    out['stream_64k_vs_unix'] = dict(met=bool(known) and len(known) == len(by_row) and min(known) >= 0.8,
                                     target=0.8, ratio=min(known) if known else None, by_row=by_row)
    if 64 in m['pingpong_sizes']:
        by_placement = {}
        for placement in m['pingpong_placements']:
            by_placement[placement] = ratio(find(cells, 'pingpong', 64, True, 1, 'redirect', placement),
                                            find(cells, 'pingpong', 64, True, 1, 'loopback', placement))
        known = [r for r in by_placement.values() if r is not None]
        out['pingpong_64_vs_loopback'] = dict(
            target=1.5, ratio=by_placement,
            met={p: r is not None and r >= 1.5 for p, r in by_placement.items()},
            met_everywhere=len(known) == len(by_placement) and min(known) >= 1.5)
    return out


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


def markdown(result):
    cells, mode, info = result['cells'], result['mode'], result['host']
    pin = result['pinning']
    lines = ['# sockredir benchmark (%s mode)' % mode, '',
             '%s, kernel %s, %s (%d CPUs%s).' % (info['date'], info['kernel'], info['cpu'], info['cpus'],
                                                ', %s guest' % info['hypervisor'] if info['hypervisor'] else ''),
             'Each cell: %d runs of %.1f s, median and ±half the min-max range. '
             % (result['repeats'], result['duration']) +
             ('Server pinned to CPU %d, client to CPU %d (taskset).' % tuple(pin) if pin
              else 'Not pinned (one CPU).'),
             'MB/s = 10^6 bytes per second read by the server. Unix sockets have no Nagle: '
             'their figure is the same in both TCP_NODELAY rows.', '', noise_note(cells, result['noise']), '',
             '## Streaming throughput (one connection)', '',
             '| write | TCP_NODELAY | loopback MB/s | redirect MB/s | unix MB/s | redirect/loopback '
             '| redirect/unix | proof (redirected of written, lo packets) |',
             '|---|---|---|---|---|---|---|---|']
    rows = [(c['size'], c['nodelay']) for c in cells
            if c['workload'] == 'stream' and c['pairs'] == 1 and c['path'] == 'redirect']
    for size, nodelay in sorted(rows, key=lambda r: (r[1], r[0])):
        lb, rd, ux = (find(cells, 'stream', size, nodelay, 1, p) for p in PATHS)
        lines.append('| %s | %s | %s | %s | %s | %s | %s | %s |' % (
            human_size(size), 'on' if nodelay else 'off', fmt_rate(lb), fmt_rate(rd), fmt_rate(ux),
            fmt_ratio(ratio(rd, lb)), fmt_ratio(ratio(rd, ux)), fmt_proof(rd)))

    lines += ['', '## Request/response (one connection, TCP_NODELAY on)', '',
              'CPUs: *same* = client and server on CPU %s; *split* = on two CPUs as for the streams.'
              % (pin[0] if pin else '-'), '',
              '| message | CPUs | path | transactions/s | p50 us | p99 us | vs loopback | proof |',
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
                  '| redirect/unix | proof |', '|---|---|---|---|---|---|---|---|']
        for pairs, size in multi:
            lb, rd, ux = (find(cells, 'stream', size, False, pairs, p) for p in PATHS)
            lines.append('| %d | %s | %s | %s | %s | %s | %s | %s |' % (
                pairs, human_size(size), fmt_rate(lb), fmt_rate(rd), fmt_rate(ux),
                fmt_ratio(ratio(rd, lb)), fmt_ratio(ratio(rd, ux)), fmt_proof(rd)))

    lines += ['', '## Ansible cost (ansible-playbook wall time, localhost, seconds)', '',
              '| step | ' + ' | '.join('run %d' % (i + 1) for i in range(len(result['ansible']['cycles'])))
              + ' | median |', '|---|' + '---|' * (len(result['ansible']['cycles']) + 1)]
    for step, label in (('first_converge', 'first converge (load + 2 attach, changed 3)'),
                        ('idempotent_rerun', 'idempotent re-run (changed 0)'),
                        ('absent', 'state: absent (changed 3)')):
        values = [c[step]['seconds'] for c in result['ansible']['cycles']]
        lines.append('| %s | %s | %.2f |' % (label, ' | '.join('%.2f' % v for v in values),
                                             statistics.median(values)))
    lines += ['', 'Kernel header cache %s before the first converge.'
              % ('present' if result['ansible']['headers_cache_present'] else 'absent')]

    t = result['targets']
    lines += ['', '## Targets of issue 5', '']
    nsl = t['never_slower_than_loopback']
    lines.append('- Redirect never slower than loopback (streams): **%s**, lowest ratio %s%s' % (
        'met' if nsl['met'] else 'missed', fmt_ratio(nsl['min_ratio']),
        ('; slower: ' + ', '.join('%s %s x%d (%.2fx)' % (human_size(s['size']),
                                                          'nodelay' if s['nodelay'] else 'nagle',
                                                          s['pairs'], s['ratio'])
                                  for s in nsl['slower_cells'])) if nsl['slower_cells'] else ''))
    u = t['stream_64k_vs_unix']
    lines.append('- 64 KiB stream >= 0.8x Unix: **%s** (%s)' % (
        'met' if u['met'] else 'missed',
        ', '.join('TCP_NODELAY %s %s' % ('on' if row == 'nodelay' else 'off', fmt_ratio(r))
                  for row, r in u['by_row'].items())))
    if 'pingpong_64_vs_loopback' in t:
        p = t['pingpong_64_vs_loopback']
        lines.append('- 64 B request/response >= 1.5x loopback transactions/s: %s' % '; '.join(
            '%s CPUs **%s** (%s)' % (placement, 'met' if p['met'][placement] else 'missed',
                                     fmt_ratio(r)) for placement, r in p['ratio'].items()))
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

def run(mode, out_dir, repeats=None, duration=None):
    m = MODES[mode]
    repeats = repeats or m['repeats']
    duration = duration or m['duration']
    check_prerequisites()
    os.makedirs(out_dir, exist_ok=True)
    started = time.monotonic()
    pinning = cpu_pinning()
    result = dict(mode=mode, host=host_info(), repeats=repeats, duration=duration,
                  pinning=list(pinning) if pinning else None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(terminate_cleanly())
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix='sockbench-'))
        binary = compile_sockbench(workdir)
        stack.enter_context(bpffs_mounted())
        netns = stack.enter_context(hostenv.netns('sockbench'))
        plain_cg = stack.enter_context(hostenv.child_cgroup('sockbench-plain'))
        redirect_cg = stack.enter_context(hostenv.child_cgroup('sockbench-redirect'))
        pin_dir = os.path.join(BPFFS, hostenv.unique_name('sockbench'))
        # Runs before the cgroups go (LIFO): unpinned programs stay loaded only
        # while the cgroup holds them.
        stack.callback(remove_pin_dir, pin_dir)
        log('netns %s, cgroups %s and %s, pins %s' % (netns, plain_cg, redirect_cg, pin_dir))

        ansible = Ansible(workdir)
        headers_cache = os.path.isdir(kheaders.DEFAULT_CACHE)
        cycles = []
        for i in range(m['ansible_cycles']):
            last = i == m['ansible_cycles'] - 1
            cycles.append(ansible_cycle(ansible, pin_dir, redirect_cg, keep=last))
            log('ansible cycle %d: %s' % (i + 1, {k: v['seconds'] for k, v in cycles[-1].items()}))

        unix_cg = plain_cg
        bench = Bench(binary, netns, dict(loopback=plain_cg, redirect=redirect_cg, unix=unix_cg),
                      pin_dir, workdir, pinning)
        result['cells'], result['noise'] = measure(bench, mode, repeats, duration)
        cycles[-1]['absent'] = remove_with_ansible(ansible, pin_dir, redirect_cg)
        result['ansible'] = dict(cycles=cycles, headers_cache_present=headers_cache)
    result['targets'] = targets(result['cells'], mode)
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
                       help='every cell of issue 5, longer runs (a few minutes)')
    parser.add_argument('--out', default=os.path.join(HERE, 'out'),
                        help='directory for results.json, results.md, throughput.png (default: %(default)s)')
    parser.add_argument('--repeats', type=int, help='runs per cell (default: by mode)')
    parser.add_argument('--duration', type=float, help='seconds per run (default: by mode)')
    args = parser.parse_args(argv)
    try:
        result, md = run(args.mode or 'quick', args.out, args.repeats, args.duration)
    except BenchError as e:
        log('failed: %s' % e)
        return 1
    print(md)
    log('done in %.1f s; results in %s' % (result['seconds'], args.out))
    return 0


if __name__ == '__main__':
    sys.exit(main())
