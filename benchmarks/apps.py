"""Redis, nginx and iperf3: plain TCP loopback versus the collection's redirect, side by side.

    sudo .venv/bin/python benchmarks/apps.py --quick [--out DIR]   # under a minute
    sudo .venv/bin/python benchmarks/apps.py --full  [--out DIR]   # six to ten minutes
    sudo .venv/bin/python benchmarks/apps.py --quick --only nginx  # one application
    sudo .venv/bin/python benchmarks/apps.py --quick --build object

Real applications from Debian packages, each server started by this run with
a configuration of its own (never the system service), in a network
namespace made for the run, server and client bound to 127.0.0.1:

  loopback  server and client in a child cgroup with nothing attached;
  redirect  server and client in a sibling child cgroup where ansible-playbook
            converged this collection's programs (bpf_program + bpf_attach,
            the task lists tests/support/plays.py shares with benchmarks/run.py):
            compiled by BCC on this host as the role does (the default), or
            the prebuilt object with --build object (the build that has the
            small-write switch: iperf3's 1 KiB writes then go TCP).

Each path has its own server (own port) for the whole run; the cells are
measured interleaved (loopback and redirect alternate which goes first),
several repeats, medians reported:

  redis     redis-server (no persistence) and redis-benchmark, SET and GET,
            50 clients, pipeline 1 and 16: requests/s, p50/p99 latency;
  nginx     nginx (master_process off, daemon off, Debian's sendfile on)
            serving a 1 KiB and a 1 MiB file, and the 1 MiB file with
            tcp_nopush off and with sendfile off, driven by wrk (keep-alive,
            2 threads, 50 connections): requests/s, p99, non-2xx, socket errors;
  iperf3    one stream, default writes (128 KiB) and 1 KiB writes (-l 1K,
            Nagle on): Gbit/s and the retransmits field.

Every redirect sample carries its proof from the programs' counters (deltas
around the load generator alone) and the namespace's own TCP counters:
which path the application's bytes took (redirected, or demoted to TCP for a
stream of small writes), bytes redirected and passed, sockets inserted (two
per connection the namespace opened), demotions, sockets removed,
tcp_peer_absent and not_admitted. A loopback sample proves the opposite: the
programs saw nothing. After each sample the data itself is checked through
the same path (a 64 KiB value through redis, the 1 MiB file's sha256 through
nginx from every location).

Writes results.json (every sample) and results.md (the tables, ratios
redirect/loopback) into --out. Run as root. Nothing leaves the namespace,
nothing is attached to the root cgroup, and every process, cgroup, namespace,
pin and temporary directory the run makes is removed at the end, also when
it fails or is interrupted (Ctrl-C, SIGTERM).
"""

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run as bench  # noqa: E402  (benchmarks/run.py: environment, ansible, counters)
from support import hostenv  # noqa: E402  (run put tests/ on sys.path)
from support.plays import OBJECT, converge_tasks, remove_pin_dir  # noqa: E402
from ansible_collections.ebpf.sockredir.plugins.module_utils import facts, program  # noqa: E402

PREFIX = 'srapps'
PATHS = ('loopback', 'redirect')
ADDR = '127.0.0.1'
# Ports inside the run's own namespace: nothing else listens there, so a
# system redis or nginx (port 6379, 80 on the host) can never collide.
PORTS = dict(redis=dict(loopback=16379, redirect=16380),
             nginx=dict(loopback=18080, redirect=18081),
             iperf3=dict(loopback=15201, redirect=15202))
TOOLS = ('redis-server', 'redis-benchmark', 'redis-cli', 'nginx', 'wrk', 'iperf3', 'curl')

KIB = 1024
MIB = 1024 * KIB
CLIENTS = 50
WRK_THREADS = 2
FILES = {'1k.bin': KIB, '1m.bin': MIB}
NGINX_LOCATIONS = {'/nopush-off/': 'tcp_nopush off;', '/sendfile-off/': 'sendfile off;'}

MODES = {
    # redis_requests: per pipeline depth, for each of SET and GET
    # quiet_wait: seconds in all the run may wait for a busy machine to calm
    # down before a sample, after a disturbed one (benchmarks/run.py's rule)
    'quick': dict(repeats=1, redis_requests={1: 20000, 16: 100000}, wrk_seconds=1, iperf_seconds=1,
                  quiet_wait=3),
    'full': dict(repeats=5, redis_requests={1: 40000, 16: 300000}, wrk_seconds=3, iperf_seconds=3,
                 quiet_wait=120),
}

PATH_REDIRECTED = 'redirected'
PATH_DEMOTED = 'demoted to TCP'

# Which build of the programs the run converges: the source compiled by BCC
# on this host, as the role does it (the default), or the prebuilt object
# files/bpf/sockredir.bpf.o loaded through libbpf (benchmarks/run.py's
# default). Only the object has the small-write switch (files/bpf/sockredir_bcc.h
# says why).
BUILDS = ('bcc', 'object')
SMALL_WRITE_SWITCH = dict(object=True, bcc=False)

# The cells: (app, variant) -> what runs and which path its bytes must take.
CELLS = [
    dict(app='redis', variant='P1', pipeline=1, expect=PATH_REDIRECTED),
    dict(app='redis', variant='P16', pipeline=16, expect=PATH_REDIRECTED),
    # sendfile and tcp_nopush (TCP_CORK while sending a file) on, as Debian's
    # nginx.conf has them; the 1 MiB file also with tcp_nopush off, and with
    # sendfile off (the body through sendmsg from nginx's buffers instead of
    # splice): locations of the same server (NGINX_LOCATIONS)
    dict(app='nginx', variant='1k.bin', file='1k.bin', url='/1k.bin', sendfile=True, nopush=True,
         expect=PATH_REDIRECTED),
    dict(app='nginx', variant='1m.bin', file='1m.bin', url='/1m.bin', sendfile=True, nopush=True,
         expect=PATH_REDIRECTED),
    dict(app='nginx', variant='1m.bin-nopush-off', file='1m.bin', url='/nopush-off/1m.bin',
         sendfile=True, nopush=False, expect=PATH_REDIRECTED),
    dict(app='nginx', variant='1m.bin-sendfile-off', file='1m.bin', url='/sendfile-off/1m.bin',
         sendfile=False, nopush=None, expect=PATH_REDIRECTED),
    # one-way streams (128 KiB writes by default, and 1 KiB writes with Nagle on) are
    # demoted to TCP where the build has the switch (expect_switch): every send size
    # counts towards the streak by default
    dict(app='iperf3', variant='default', length=None, expect=PATH_REDIRECTED, expect_switch=PATH_DEMOTED),
    dict(app='iperf3', variant='1K', length=KIB, expect=PATH_REDIRECTED, expect_switch=PATH_DEMOTED),
]

# Proof limits. Per connection lo still carries the handshake and the close
# (3 + 4 packets, a few more with delayed ACKs).
LO_PACKETS_PER_CONNECTION = 12
LO_PACKETS_SLACK = 16
LO_PACKETS_PER_PASSED_MSG = 4
# Decisions no flow of these applications may take: all of them are same-host
# flows between two sockets of the programs' cgroup.
NEVER = ('not_admitted_peer', 'not_admitted_early_data', 'not_admitted_policy', 'insert_full',
         'insert_failed')
# redis-benchmark's smallest request and reply (SET key:__rand_int__ xxx: 45
# bytes and +OK: 5; GET: 36 and 9): bytes per operation at least.
REDIS_MIN_BYTES_PER_OP = 45
REDIS_MAX_BYTES_PER_OP = 64
# wrk's request line and headers, and nginx's response headers, at most.
HTTP_MAX_HEADER_BYTES = 512
# redis-benchmark's own CONFIG GET connection and the like.
SIDE_TRAFFIC_BYTES = 64 * KIB

log = bench.log
BenchError = bench.BenchError


# ---- placing processes -----------------------------------------------------

def placed(cgroup, netns, cpu, argv):
    """argv run in the cgroup (the shell joins it, then exec()s: every socket is made
    in it), the run's network namespace, and pinned to one CPU when there are two."""
    pin = ['taskset', '-c', str(cpu)] if cpu is not None else []
    return (['/bin/sh', '-c', 'echo $$ > "$0" && exec "$@"', os.path.join(cgroup, 'cgroup.procs'),
             'nsenter', '--net=/run/netns/%s' % netns] + pin + list(argv))


def netns_tcp(netns):
    """The namespace's TCP counters and lo packets: an independent witness of each sample."""
    out = subprocess.run(['nsenter', '--net=/run/netns/%s' % netns, 'cat', '/proc/net/snmp',
                          '/proc/net/dev'], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    tcp = [line.split()[1:] for line in lines if line.startswith('Tcp:')]
    values = dict(zip(tcp[0], (int(v) for v in tcp[1])))
    lo = next(line for line in lines if line.strip().startswith('lo:'))
    rx = lo.split(':', 1)[1].split()
    return dict(active_opens=values['ActiveOpens'], in_segs=values['InSegs'],
                retrans_segs=values['RetransSegs'], lo_bytes=int(rx[0]), lo_packets=int(rx[1]))


def process_cpu_seconds(pid):
    try:
        with open('/proc/%d/stat' % pid) as stat:
            fields = stat.read().rsplit(')', 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


class Server(object):
    """One application server of one path, alive for the whole run."""

    def __init__(self, name, argv, cgroup, netns, cpu, port, workdir):
        self.name, self.port, self.netns = name, port, netns
        self.log_path = os.path.join(workdir, '%s.out' % name)
        self.log = open(self.log_path, 'wb')
        self.proc = subprocess.Popen(placed(cgroup, netns, cpu, argv), stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError('%s exited (%s) before listening: %s'
                                 % (self.name, self.proc.returncode, self.output()))
            out = subprocess.run(['nsenter', '--net=/run/netns/%s' % self.netns, 'ss', '-Hltn',
                                  'sport = :%d' % self.port], capture_output=True, text=True,
                                 check=False).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise BenchError('%s did not listen on port %d within %ds: %s'
                         % (self.name, self.port, timeout, self.output()))

    def output(self):
        with open(self.log_path, 'rb') as f:
            return f.read()[-2000:].decode(errors='replace')

    def cpu_seconds(self):
        return process_cpu_seconds(self.proc.pid)

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def redis_server(path, cgroup, netns, cpu, workdir):
    port = PORTS['redis'][path]
    home = os.path.join(workdir, 'redis-%s' % path)
    os.mkdir(home)
    conf = os.path.join(home, 'redis.conf')
    with open(conf, 'w') as f:
        f.write('\n'.join([
            'bind %s' % ADDR, 'port %d' % port, 'protected-mode yes', 'daemonize no',
            'supervised no', 'dir %s' % home, 'logfile ""', 'save ""', 'appendonly no',
            'databases 1', 'unixsocket ""', '']))
    return Server('redis-%s' % path, ['redis-server', conf], cgroup, netns, cpu, port, workdir)


def nginx_server(path, cgroup, netns, cpu, workdir, www):
    port = PORTS['nginx'][path]
    home = os.path.join(workdir, 'nginx-%s' % path)
    os.mkdir(home)
    conf = os.path.join(home, 'nginx.conf')
    temp = ''.join('    %s_temp_path %s/%s;\n' % (kind, home, kind)
                   for kind in ('client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'))
    with open(conf, 'w') as f:
        f.write('daemon off;\nmaster_process off;\nworker_processes 1;\n'
                'pid %(home)s/nginx.pid;\nerror_log %(home)s/error.log warn;\n'
                'events { worker_connections 1024; }\n'
                'http {\n    access_log off;\n%(temp)s'
                # as Debian's stock nginx.conf has them
                '    sendfile on;\n    tcp_nopush on;\n'
                '    keepalive_requests 100000000;\n    keepalive_timeout 60s;\n'
                '    default_type application/octet-stream;\n'
                '    server {\n        listen %(addr)s:%(port)d;\n        root %(www)s;\n'
                '%(locations)s    }\n}\n'
                % dict(home=home, temp=temp, addr=ADDR, port=port, www=www,
                       locations=''.join('        location %s {\n            alias %s/;\n'
                                         '            %s\n        }\n' % (url, www, directive)
                                         for url, directive in NGINX_LOCATIONS.items())))
    argv = ['nginx', '-p', home, '-e', os.path.join(home, 'error.log'), '-c', conf]
    return Server('nginx-%s' % path, argv, cgroup, netns, cpu, port, workdir)


def iperf3_server(path, cgroup, netns, cpu, workdir):
    port = PORTS['iperf3'][path]
    return Server('iperf3-%s' % path, ['iperf3', '-s', '-B', ADDR, '-p', str(port)],
                  cgroup, netns, cpu, port, workdir)


def web_root(workdir):
    www = os.path.join(workdir, 'www')
    os.mkdir(www)
    digests = {}
    for name, size in FILES.items():
        data = os.urandom(size)
        with open(os.path.join(www, name), 'wb') as f:
            f.write(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    os.chmod(workdir, 0o755)  # nginx (master_process off) runs as root, but be explicit
    return www, digests


WRK_REPORT = r'''
done = function(summary, latency, requests)
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
'''


# ---- one sample ------------------------------------------------------------

class Apps(object):
    def __init__(self, mode, netns, cgroups, pin_dir, pinning, workdir):
        self.m = MODES[mode]
        self.netns, self.cgroups, self.pin_dir, self.workdir = netns, cgroups, pin_dir, workdir
        self.server_cpu, self.client_cpu = pinning or (None, None)
        self.servers = {}
        self.www, self.digests = web_root(workdir)
        self.wrk_script = os.path.join(workdir, 'report.lua')
        with open(self.wrk_script, 'w') as f:
            f.write(WRK_REPORT)

    def start_servers(self, stack):
        for path in PATHS:
            args = (path, self.cgroups[path], self.netns, self.server_cpu, self.workdir)
            for app, start in (('redis', redis_server), ('iperf3', iperf3_server)):
                self.servers[app, path] = start(*args)
                stack.callback(self.servers[app, path].stop)
            self.servers['nginx', path] = nginx_server(*args, www=self.www)
            stack.callback(self.servers['nginx', path].stop)
        log('servers: %s' % ', '.join('%s on %d' % (s.name, s.port) for s in self.servers.values()))

    def client(self, path, argv, timeout):
        proc = subprocess.run(placed(self.cgroups[path], self.netns, self.client_cpu, argv),
                              capture_output=True, text=True, timeout=timeout, check=False)
        return proc.returncode, proc.stdout, proc.stderr

    def sample(self, cell, path):
        """One run of the cell's load generator on one path, with the witnesses around it."""
        server = self.servers[cell['app'], path]
        if not server.alive():
            raise BenchError('%s died: %s' % (server.name, server.output()))
        before_c, before_t = bench.counters(self.pin_dir), netns_tcp(self.netns)
        witness, server_cpu = bench.CpuWitness(), server.cpu_seconds()
        started = time.monotonic()
        result = getattr(self, 'run_' + cell['app'])(cell, path, server.port)
        wall = time.monotonic() - started
        load = witness.result()
        after_c, after_t = bench.counters(self.pin_dir), netns_tcp(self.netns)
        # the server is ours too, not foreign load
        load['others'] = round(max(0.0, load['others'] - (server.cpu_seconds() - server_cpu) / wall), 3)
        sample = dict(result, seconds=round(wall, 3), load=load,
                      counters={k: after_c[k] - before_c[k] for k in after_c},
                      tcp={k: after_t[k] - before_t[k] for k in after_t})
        sample['integrity'] = getattr(self, 'check_' + cell['app'])(path, server.port)
        sample['proof'] = (redirect_proof(cell, sample) if path == 'redirect'
                           else loopback_proof(sample))
        if not sample['proof']['ok']:
            sample['proof']['attached'] = self.attached()
        return sample

    def attached(self):
        """What is attached now, for a failed proof: something else may have detached ours."""
        try:
            info = facts.pin_dir_facts(self.pin_dir)
            return dict(sock_ops=[p['id'] for p in facts.cgroup_attachments(
                self.cgroups['redirect'])['sock_ops']],
                msg_verdict=info['maps'].get('sockredir_hash', {}).get('msg_verdict'),
                pins=sorted(info['programs']) + sorted(info['maps']))
        except Exception as e:  # a diagnosis only: report what failed instead
            return repr(e)

    # -- redis
    def run_redis(self, cell, path, port):
        n, pipeline = self.m['redis_requests'][cell['pipeline']], cell['pipeline']
        rc, out, err = self.client(path, ['redis-benchmark', '-h', ADDR, '-p', str(port),
                                          '-c', str(CLIENTS), '-n', str(n), '-P', str(pipeline),
                                          '-t', 'set,get', '--csv'], timeout=300)
        tests = {}
        for line in out.splitlines():
            fields = [f.strip('"') for f in line.split(',')]
            if fields[0] in ('SET', 'GET'):
                header = ['test', 'rps', 'avg_ms', 'min_ms', 'p50_ms', 'p95_ms', 'p99_ms', 'max_ms']
                row = dict(zip(header, fields))
                tests[fields[0]] = {k: float(v) for k, v in row.items() if k != 'test'}
        error_lines = [line for line in err.splitlines() if 'rror' in line]
        errors = dict(exit_status=int(rc != 0), error_lines=len(error_lines),
                      missing_results=2 - len(tests))
        return dict(requests_per_test=n, pipeline=pipeline, tests=tests, errors=errors,
                    stderr=err[-500:] if sum(errors.values()) else '')

    def check_redis(self, path, port):
        """A 64 KiB value written and read back through the path."""
        value = os.urandom(32 * KIB).hex()
        key = 'srapps-check-%s' % path
        put = subprocess.run(placed(self.cgroups[path], self.netns, self.client_cpu,
                                    ['redis-cli', '-h', ADDR, '-p', str(port), '-x', 'set', key]),
                             input=value, capture_output=True, text=True, timeout=30, check=False)
        if put.returncode != 0 or put.stdout.strip() != 'OK':
            return dict(ok=False, detail='set: %s %s' % (put.stdout[-200:], put.stderr[-200:]))
        rc, out, err = self.client(path, ['redis-cli', '-h', ADDR, '-p', str(port), '--raw',
                                          'get', key], timeout=30)
        return dict(ok=rc == 0 and out.strip() == value, detail=err.strip()[-300:])

    # -- nginx
    def run_nginx(self, cell, path, port):
        seconds = self.m['wrk_seconds']
        rc, out, err = self.client(path, ['wrk', '-t', str(WRK_THREADS), '-c', str(CLIENTS),
                                          '-d', '%ds' % seconds, '-s', self.wrk_script,
                                          'http://%s:%d%s' % (ADDR, port, cell['url'])],
                                   timeout=seconds + 60)
        try:
            report = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BenchError('wrk gave no report (exit %s): %s %s' % (rc, out[-1000:], err[-1000:]))
        errors = dict(exit_status=int(rc != 0), non_2xx=report['status'],
                      socket_errors=report['connect'] + report['read'] + report['write'] + report['timeout'])
        return dict(wrk=report, errors=errors, requests_per_s=report['requests'] / (report['duration_us'] / 1e6),
                    p50_ms=report['p50_us'] / 1000.0, p99_ms=report['p99_us'] / 1000.0,
                    file_size=FILES[cell['file']])

    def check_nginx(self, path, port):
        """The 1 MiB file's sha256 as fetched through the path, from every location."""
        failed = []
        for url in ['/1m.bin'] + [prefix + '1m.bin' for prefix in NGINX_LOCATIONS]:
            argv = placed(self.cgroups[path], self.netns, self.client_cpu,
                          ['curl', '-sS', '--fail', '-o', '-', 'http://%s:%d%s' % (ADDR, port, url)])
            proc = subprocess.run(argv, capture_output=True, timeout=30, check=False)
            if proc.returncode != 0 or hashlib.sha256(proc.stdout).hexdigest() != self.digests['1m.bin']:
                failed.append('%s: exit %s, %d bytes, %s' % (
                    url, proc.returncode, len(proc.stdout), proc.stderr.decode(errors='replace')[-200:]))
        return dict(ok=not failed, detail='; '.join(failed))

    # -- iperf3
    def run_iperf3(self, cell, path, port):
        seconds = self.m['iperf_seconds']
        argv = ['iperf3', '-c', ADDR, '-p', str(port), '-t', str(seconds), '-J']
        if cell['length']:
            argv += ['-l', str(cell['length'])]
        rc, out, err = self.client(path, argv, timeout=seconds + 60)
        try:
            report = json.loads(out)
        except ValueError:
            raise BenchError('iperf3 gave no JSON (exit %s): %s %s' % (rc, out[-1000:], err[-1000:]))
        end = report.get('end', {})
        sent, received = end.get('sum_sent', {}), end.get('sum_received', {})
        errors = dict(exit_status=int(rc != 0), iperf3_error=int('error' in report),
                      missing_results=int(not sent or not received))
        return dict(errors=errors, error=report.get('error', ''),
                    gbit_per_s=received.get('bits_per_second', 0) / 1e9,
                    sent_gbit_per_s=sent.get('bits_per_second', 0) / 1e9,
                    retransmits=sent.get('retransmits'),
                    sent_bytes=sent.get('bytes', 0), received_bytes=received.get('bytes', 0),
                    length=cell['length'] or 128 * KIB)

    def check_iperf3(self, path, port):
        """iperf3 reports what the server received; nothing more to fetch."""
        return dict(ok=True, detail='')


# ---- proofs ----------------------------------------------------------------

def app_bytes(cell, sample):
    """(at least, at most) bytes the application's sockets wrote in the sample, as its own
    figures tell; the programs count every byte written by a socket while in the sockhash."""
    if cell['app'] == 'redis':
        ops = 2 * sample['requests_per_test']
        extra = 2 * CLIENTS * sample['pipeline']
        return (ops * REDIS_MIN_BYTES_PER_OP,
                (ops + extra) * REDIS_MAX_BYTES_PER_OP + SIDE_TRAFFIC_BYTES)
    if cell['app'] == 'nginx':
        wrk = sample['wrk']
        # wrk read `bytes`; nginx may have written up to one more response per
        # connection that wrk stopped reading
        in_flight = CLIENTS * (sample['file_size'] + HTTP_MAX_HEADER_BYTES)
        return (wrk['bytes'],
                wrk['bytes'] + (wrk['requests'] + CLIENTS) * HTTP_MAX_HEADER_BYTES + in_flight)
    return (sample['received_bytes'], sample['sent_bytes'] + SIDE_TRAFFIC_BYTES)


def max_reply(cell, sample):
    """The most one connection's server side writes in one reply."""
    if cell['app'] == 'nginx':
        return sample['file_size'] + HTTP_MAX_HEADER_BYTES
    if cell['app'] == 'iperf3':
        return sample['length'] + SIDE_TRAFFIC_BYTES
    return SIDE_TRAFFIC_BYTES


def redirect_proof(cell, sample):
    """Did this sample's bytes take the path the cell expects? Checks that could each be false."""
    c, t = sample['counters'], sample['tcp']
    connections = t['active_opens']
    low, high = app_bytes(cell, sample)
    lo_budget = LO_PACKETS_PER_CONNECTION * connections + LO_PACKETS_SLACK
    checks = dict(
        # the namespace opened connections, and every one was admitted, both sockets
        every_socket_inserted=connections > 0 and c['inserted'] == 2 * connections,
        no_other_decision=all(c.get(k, 0) == 0 for k in NEVER),
        msgs_and_bytes_agree=(c['redirected_msgs'] <= c['redirected_bytes']
                              and c['passed_msgs'] <= c['passed_bytes']
                              and (c['redirected_msgs'] > 0) == (c['redirected_bytes'] > 0)),
        # a socket leaves the map only after a direction of its connection went
        # TCP (the sender, and the receiver once its queue is drained)
        removed_only_after_tcp=c['removed'] <= 2 * (c['demoted_small_writes'] + c['tcp_peer_absent']),
        bytes_redirected=c['redirected_bytes'] > 0,
    )
    if cell['expect'] == PATH_REDIRECTED:
        # A sender whose peer closed first (wrk stops mid-response) finds no
        # peer and sends its last bytes over TCP, into a closed socket: at most
        # one reply per connection, a few packets per such send on lo.
        lo_budget += LO_PACKETS_PER_PASSED_MSG * c['passed_msgs']
        checks.update(
            redirected_bytes_match_the_app=low <= c['redirected_bytes'] <= high,
            passed_only_a_last_reply=(c['tcp_peer_absent'] <= 2 * connections and c['passed_bytes']
                                      <= connections * max_reply(cell, sample)),
            nothing_demoted=c['demoted_small_writes'] == 0,
            # a server streaming a large response has received the request, so its streak
            # is refused (it cannot leave the map) at most once per connection: still redirected
            demotion_refused_at_most_once_per_connection=c['demotion_refused'] <= connections,
            lo_only_handshakes=t['lo_packets'] <= lo_budget,
        )
    else:
        streams = 1  # iperf3 -P 1: one data connection, its client side streams
        checks.update(
            stream_demoted_once=c['demoted_small_writes'] == streams,
            demoted_socket_left_the_map=streams <= c['removed'] <= 2 * streams,
            most_bytes_over_tcp=c['redirected_bytes'] < sample['received_bytes'] / 2,
            counted_no_more_than_written=c['redirected_bytes'] + c['passed_bytes'] <= high,
            # after it left the map sk_msg no longer sees its sends: lo does
            rest_on_lo=t['lo_bytes'] >= sample['received_bytes'] - c['redirected_bytes'],
        )
    ok = all(checks.values())
    return dict(ok=ok, path=cell['expect'] if ok else None, checks=checks, connections=connections,
                app_bytes=[low, high], lo_packet_budget=lo_budget,
                failed=sorted(k for k, v in checks.items() if not v))


def loopback_proof(sample):
    """The plain cgroup: the programs saw nothing, and lo carried the data."""
    c, t = sample['counters'], sample['tcp']
    checks = dict(programs_untouched=all(v == 0 for v in c.values()),
                  connections_opened=t['active_opens'] > 0,
                  lo_carried_data=t['lo_packets'] > LO_PACKETS_PER_CONNECTION * t['active_opens'])
    ok = all(checks.values())
    return dict(ok=ok, path='TCP loopback' if ok else None, checks=checks,
                connections=t['active_opens'], failed=sorted(k for k, v in checks.items() if not v))


# ---- the run -----------------------------------------------------------------

def cell_name(cell):
    return '%s %s' % (cell['app'], cell['variant'])


def expected_path(cell, build):
    if SMALL_WRITE_SWITCH[build]:
        return cell.get('expect_switch', cell['expect'])
    return cell['expect']


def measure(apps, repeats, quiet_wait, build, only=None):
    results = [dict(cell, name=cell_name(cell), expect=expected_path(cell, build),
                    samples={p: [] for p in PATHS})
               for cell in CELLS if not only or cell['app'] in only]
    quiet = bench.QuietWaiter(quiet_wait)
    disturbed = True
    for r in range(repeats):
        for i, cell in enumerate(results):
            order = PATHS if (r + i) % 2 == 0 else PATHS[::-1]
            for path in order:
                if disturbed:
                    quiet.wait()
                s = apps.sample(cell, path)
                s['repeat'] = r
                disturbed = s['load']['others'] > bench.BUSY_MACHINE
                cell['samples'][path].append(s)
                log('repeat %d %-14s %-8s %s  proof %s%s' % (
                    r + 1, cell['name'], path, headline(cell, s),
                    s['proof']['path'] or 'FAILED', '' if s['proof']['ok']
                    else ' %s counters %s lo %s attached %s' % (
                        s['proof']['failed'], {k: v for k, v in s['counters'].items() if v},
                        s['tcp'], s['proof'].get('attached'))))
    for cell in results:
        summarize(cell)
    return results, dict(waited_for_quiet=round(quiet.waited, 1))


def headline(cell, s):
    if cell['app'] == 'redis':
        return ' '.join('%s %.0f/s' % (t, s['tests'][t]['rps']) for t in ('SET', 'GET') if t in s['tests'])
    if cell['app'] == 'nginx':
        return '%.0f req/s p99 %.2f ms' % (s['requests_per_s'], s['p99_ms'])
    return '%.2f Gbit/s retr %s' % (s['gbit_per_s'], s['retransmits'])


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(cell):
    out = {}
    for path in PATHS:
        samples = cell['samples'][path]
        m = dict(errors=sum(sum(s['errors'].values()) for s in samples),
                 integrity_ok=all(s['integrity']['ok'] for s in samples),
                 proven=all(s['proof']['ok'] for s in samples),
                 load_others=_median(s['load']['others'] for s in samples),
                 lo_packets=_median(s['tcp']['lo_packets'] for s in samples),
                 lo_bytes=_median(s['tcp']['lo_bytes'] for s in samples),
                 connections=_median(s['tcp']['active_opens'] for s in samples),
                 counters={k: _median(s['counters'][k] for s in samples)
                           for k in samples[0]['counters']})
        if cell['app'] == 'redis':
            for t in ('SET', 'GET'):
                for k in ('rps', 'p50_ms', 'p99_ms'):
                    m['%s_%s' % (t, k)] = _median(s['tests'].get(t, {}).get(k) for s in samples)
        elif cell['app'] == 'nginx':
            for k in ('requests_per_s', 'p50_ms', 'p99_ms'):
                m[k] = _median(s[k] for s in samples)
            m['non_2xx'] = sum(s['errors']['non_2xx'] for s in samples)
            m['socket_errors'] = sum(s['errors']['socket_errors'] for s in samples)
        else:
            m['gbit_per_s'] = _median(s['gbit_per_s'] for s in samples)
            m['retransmits'] = _median(s['retransmits'] for s in samples)
        out[path] = m
    cell['median'] = out


def ratio(cell, key):
    lo, re = cell['median']['loopback'].get(key), cell['median']['redirect'].get(key)
    if not lo or re is None or not cell['median']['redirect']['proven']:
        return None
    return re / lo


def check_prerequisites():
    bench.check_prerequisites()
    missing = [tool for tool in TOOLS + ('ss',) if not shutil.which(tool)]
    if missing:
        raise BenchError('missing tools: %s (scripts/bootstrap.sh installs them)' % ', '.join(missing))


def run(mode, out_dir, repeats=None, only=None, build=BUILDS[0]):
    m = MODES[mode]
    repeats = repeats or m['repeats']
    check_prerequisites()
    os.makedirs(out_dir, exist_ok=True)
    started = time.monotonic()
    pinning = bench.cpu_pinning()
    result = dict(mode=mode, host=bench.host_info(), repeats=repeats, clients=CLIENTS,
                  settings=m, pinning=list(pinning) if pinning else None,
                  versions=tool_versions(), only=only, build=build)
    with contextlib.ExitStack() as stack:
        stack.enter_context(bench.terminate_cleanly())
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix=PREFIX + '-'))
        stack.enter_context(bench.bpffs_mounted())
        netns = stack.enter_context(hostenv.netns(PREFIX))
        cgroups = dict(loopback=stack.enter_context(hostenv.child_cgroup(PREFIX + '-plain')),
                       redirect=stack.enter_context(hostenv.child_cgroup(PREFIX + '-redirect')))
        pin_dir = os.path.join(bench.BPFFS, hostenv.unique_name(PREFIX))
        # Runs before the cgroups go (LIFO): unpinned programs stay loaded only
        # while the cgroup holds them.
        stack.callback(remove_pin_dir, pin_dir)
        result['made'] = dict(netns=netns, cgroups=cgroups, pin_dir=pin_dir, workdir=workdir,
                              record=program.record_path(pin_dir))
        log('made: %s' % json.dumps(result['made']))

        # One converge, as a user's first run: its idempotence and cost are
        # benchmarks/run.py's business.
        ansible = bench.Ansible(workdir)
        tasks = converge_tasks(pin_dir, cgroups['redirect'], obj=OBJECT if build == 'object' else None)
        cycle = dict(converge=ansible.play('converge', tasks))
        if cycle['converge']['changed'] != len(tasks):
            raise BenchError('the converge changed %d tasks, expected every one'
                             % cycle['converge']['changed'])
        log('converged the %s build with ansible-playbook in %.1f s' % (build, cycle['converge']['seconds']))
        result['policy'] = bench.small_write_policy(pin_dir)

        apps = Apps(mode, netns, cgroups, pin_dir, pinning, workdir)
        # Servers stop before the programs are removed (LIFO).
        with contextlib.ExitStack() as servers:
            apps.start_servers(servers)
            result['cells'], result['noise'] = measure(apps, repeats, m['quiet_wait'], build, only)
        cycle['absent'] = bench.remove_with_ansible(ansible, pin_dir, cgroups['redirect'])
        result['ansible'] = cycle
    result['seconds'] = round(time.monotonic() - started, 1)
    with open(os.path.join(out_dir, 'results.json'), 'w') as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(os.path.join(out_dir, 'results.md'), 'w') as f:
        f.write(md)
    return result, md


def tool_versions():
    def first_line(argv):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return None
        text = (proc.stdout or proc.stderr).strip().splitlines()
        return text[0] if text else None
    return {'redis-server': first_line(['redis-server', '--version']),
            'nginx': first_line(['nginx', '-v']),
            'wrk': first_line(['wrk', '--version']),
            'iperf3': first_line(['iperf3', '--version'])}


# ---- report ------------------------------------------------------------------

def fmt(v, spec='%.0f'):
    return '-' if v is None else spec % v


def fmt_ratio(r):
    return '-' if r is None else '**%.2fx**' % r


def proof_cell(cell):
    samples = cell['samples']['redirect']
    ok = sum(s['proof']['ok'] for s in samples)
    return '%s (%d/%d)' % (cell['expect'] if ok == len(samples) else 'UNPROVEN', ok, len(samples))


def errors_cell(cell):
    return '%d / %d' % (cell['median']['loopback']['errors'], cell['median']['redirect']['errors'])


def markdown(result):
    cells = {c['name']: c for c in result['cells']}
    h = result['host']
    lines = [
        '# Applications: TCP loopback vs redirect (%s mode, %s build)' % (result['mode'], result['build']),
        '',
        '%s, kernel %s, %s CPUs (%s), %s. %d repeat(s) per cell, medians; the two paths '
        'interleaved, each with its own server; server on CPU %s, client on CPU %s. '
        'Ratios are redirect / loopback; a redirect figure whose proof failed gives no ratio.'
        % (h['date'], h['kernel'], h['cpus'], h['hypervisor'] or 'bare metal', h['cpu'],
           result['repeats'], *(result['pinning'] or ('-', '-'))), '',
        'Versions: %s.' % ', '.join('%s' % v for v in result['versions'].values() if v), '',
    ]
    if 'redis P1' in cells:
        lines += redis_table(result, cells)
    if 'nginx 1k.bin' in cells:
        lines += nginx_table(result, cells)
    if 'iperf3 default' in cells:
        lines += iperf3_table(result, cells)
    lines += proof_table(result)
    return '\n'.join(lines)


def redis_table(result, cells):
    lines = ['## redis-server + redis-benchmark (%d clients, 3-byte values)' % result['clients'], '',
             '| test | pipeline | loopback req/s | redirect req/s | ratio | p50 ms lo / redir '
             '| p99 ms lo / redir | errors lo / redir | path (proof) |',
             '|---|---|---|---|---|---|---|---|---|']
    for variant in ('P1', 'P16'):
        cell = cells['redis %s' % variant]
        lo, re = cell['median']['loopback'], cell['median']['redirect']
        for t in ('SET', 'GET'):
            lines.append('| %s | %d | %s | %s | %s | %s / %s | %s / %s | %s | %s |' % (
                t, cell['pipeline'], fmt(lo['%s_rps' % t]), fmt(re['%s_rps' % t]),
                fmt_ratio(ratio(cell, '%s_rps' % t)),
                fmt(lo['%s_p50_ms' % t], '%.3f'), fmt(re['%s_p50_ms' % t], '%.3f'),
                fmt(lo['%s_p99_ms' % t], '%.3f'), fmt(re['%s_p99_ms' % t], '%.3f'),
                errors_cell(cell), proof_cell(cell)))
    return lines + ['']


def nginx_table(result, cells):
    lines = ['## nginx + wrk (keep-alive, %d threads, %d connections, %d s)'
             % (WRK_THREADS, result['clients'], result['settings']['wrk_seconds']), '',
             '| file | loopback req/s | redirect req/s | ratio | p99 ms lo / redir '
             '| non-2xx lo / redir | socket errors lo / redir | path (proof) |',
             '|---|---|---|---|---|---|---|---|']
    for cell in result['cells']:
        if cell['app'] != 'nginx':
            continue
        lo, re = cell['median']['loopback'], cell['median']['redirect']
        lines.append('| %s | %s | %s | %s | %s / %s | %d / %d | %d / %d | %s |' % (
            '%s (%s)' % (cell['file'], nginx_settings(cell)),
            fmt(lo['requests_per_s']), fmt(re['requests_per_s']),
            fmt_ratio(ratio(cell, 'requests_per_s')), fmt(lo['p99_ms'], '%.2f'),
            fmt(re['p99_ms'], '%.2f'), lo['non_2xx'], re['non_2xx'], lo['socket_errors'],
            re['socket_errors'], proof_cell(cell)))
    return lines + ['']


def nginx_settings(cell):
    if not cell['sendfile']:
        return 'sendfile off'  # tcp_nopush applies to sendfile only
    return 'sendfile on, tcp_nopush %s' % ('on: Debian\'s' if cell['nopush'] else 'off')


def iperf3_table(result, cells):
    lines = ['## iperf3 (one stream, %d s)' % result['settings']['iperf_seconds'], '',
             '| writes | loopback Gbit/s | redirect Gbit/s | ratio | retransmits lo / redir '
             '| errors lo / redir | path (proof) |',
             '|---|---|---|---|---|---|---|']
    for variant, label in (('default', '128 KiB (default)'), ('1K', '1 KiB (-l 1K, Nagle on)')):
        cell = cells['iperf3 %s' % variant]
        lo, re = cell['median']['loopback'], cell['median']['redirect']
        lines.append('| %s | %s | %s | %s | %s / %s | %s | %s |' % (
            label, fmt(lo['gbit_per_s'], '%.2f'), fmt(re['gbit_per_s'], '%.2f'),
            fmt_ratio(ratio(cell, 'gbit_per_s')), fmt(lo['retransmits']), fmt(re['retransmits']),
            errors_cell(cell), proof_cell(cell)))
    return lines + ['']


def proof_table(result):
    lines = ['## Which path the bytes took: the programs\' counters per redirect cell', '',
             'Medians of the per-sample deltas, around the load generator alone. connections: '
             'opened in the namespace (its ActiveOpens, an independent count); every connection '
             'puts two sockets in the sockhash. lo packets: what the namespace\'s loopback '
             'device carried, redirect vs loopback.', '',
             '| cell | connections | inserted | redirected bytes | passed bytes | demoted '
             '| removed | tcp_peer_absent | not_admitted (peer / early data) '
             '| lo packets redir / loopback | lo MB redir / loopback | data check | proof |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for cell in result['cells']:
        re, lo = cell['median']['redirect'], cell['median']['loopback']
        c = re['counters']
        lines.append('| %s | %s | %s | %s | %s | %s | %s | %s | %s / %s | %s / %s | %s / %s | %s | %s |' % (
            cell['name'], fmt(re['connections']), fmt(c['inserted']), fmt(c['redirected_bytes']),
            fmt(c['passed_bytes']), fmt(c['demoted_small_writes']), fmt(c['removed']),
            fmt(c['tcp_peer_absent']), fmt(c['not_admitted_peer']),
            fmt(c['not_admitted_early_data']), fmt(re['lo_packets']), fmt(lo['lo_packets']),
            fmt(re['lo_bytes'] / 1e6, '%.1f'), fmt(lo['lo_bytes'] / 1e6, '%.1f'),
            'ok' if re['integrity_ok'] and lo['integrity_ok'] else 'FAILED', proof_cell(cell)))
    lines += ['', 'Proof of a redirected cell: both sockets of every connection inserted; '
              'redirected bytes within what the application itself reports it moved '
              '(redis-benchmark\'s operations, wrk\'s bytes read, iperf3\'s bytes); nothing '
              'demoted; passed to TCP at most one last reply per connection, written after its '
              'peer had closed (tcp_peer_absent: wrk stops in the middle of responses), and '
              'only such sockets left the map; lo saw at most %d packets per connection '
              '(handshake and close) and a few per such last send. Proof of the demoted cell: '
              'the data connection\'s stream of small writes demoted once and its socket removed '
              'from the sockhash (its receiver may follow once drained), most bytes over TCP (on '
              'lo). Every cell: no not_admitted, no failed insert, no refused demotion. Loopback '
              'samples: the programs\' counters did not move. Data check: a 64 KiB value through '
              'redis and the 1 MiB file\'s sha256 through nginx (every location), after every '
              'sample, on both paths.' % LO_PACKETS_PER_CONNECTION,
              '', small_write_note(result),
              '', 'Machine load of others during the samples (median, CPUs): %s. '
              'Run took %.0f s (ansible-playbook converge %.1f s, state absent %.1f s).' % (
                  fmt(_median(c['median'][p]['load_others'] for c in result['cells'] for p in PATHS),
                      '%.2f'),
                  result['seconds'], result['ansible']['converge']['seconds'],
                  result['ansible']['absent']['seconds']), '']
    return lines


def small_write_note(result):
    if not SMALL_WRITE_SWITCH[result['build']]:
        return ('Programs compiled from files/bpf/sockredir.bpf.c by BCC on this host, as the role '
                'does: this build has no small-write switch, small writes stay redirected.')
    return ('Programs: the prebuilt object files/bpf/sockredir.bpf.o, loaded through libbpf. '
            'Small-write switch: %(small_streak)d sends under %(small_bytes)d bytes in a row, '
            'with nothing received, switch a direction to TCP.' % result['policy'])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument('--quick', dest='mode', action='store_const', const='quick',
                       help='one repeat, short runs (under a minute); the default')
    which.add_argument('--full', dest='mode', action='store_const', const='full',
                       help='%d repeats, longer runs (a few minutes)' % MODES['full']['repeats'])
    parser.add_argument('--out', default=os.path.join(HERE, 'apps-out'),
                        help='directory for results.json and results.md (default: %(default)s)')
    parser.add_argument('--repeats', type=int, help='runs per cell and path (default: by mode)')
    parser.add_argument('--build', choices=BUILDS, default=BUILDS[0],
                        help='the programs compiled by BCC as the role does, or the prebuilt object '
                        '(default: %(default)s)')
    parser.add_argument('--only', action='append', choices=sorted(PORTS),
                        help='measure only this application (repeatable; default: all)')
    args = parser.parse_args(argv)
    try:
        result, md = run(args.mode or 'quick', args.out, args.repeats, args.only, args.build)
    except BenchError as e:
        log('failed: %s' % e)
        return 1
    except KeyboardInterrupt:
        log('interrupted; everything the run made is removed')
        return 130
    print(md)
    log('done in %.1f s; results in %s' % (result['seconds'], args.out))
    return 0


if __name__ == '__main__':
    sys.exit(main())
