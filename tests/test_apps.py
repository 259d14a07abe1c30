"""benchmarks/apps.py --quick: redis, nginx and iperf3 through plain loopback and through the
collection's redirect. Every application completes without errors, every redirect sample proves
the path its bytes took, the data arrives intact, and nothing the run made is left behind, also
when it is interrupted; and the proof logic itself on made-up counters.

Performance ratios are not asserted (they depend on the machine and its load): the benchmark
reports them.
"""

import copy
import importlib.util
import json
import os
import re
import selectors
import signal
import subprocess
import tempfile
import time

import pytest

from conftest import BPFFS, REPO, VENV_BIN
from support import hostenv

APPS = os.path.join(REPO, 'benchmarks', 'apps.py')


def load_apps():
    spec = importlib.util.spec_from_file_location('sockredir_apps', APPS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


apps = load_apps()


def processes_of(made):
    """Processes of a run: in one of its cgroups, or naming its temp dir."""
    cgroups = ['/%s\n' % os.path.basename(path) for path in made['cgroups'].values()]
    found = []
    for pid in os.listdir('/proc'):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open('/proc/%s/cmdline' % pid, 'rb') as f:
                cmdline = f.read().decode(errors='replace').replace('\0', ' ').strip()
            with open('/proc/%s/cgroup' % pid) as f:
                cgroup = f.read()
        except OSError:
            continue
        if any(c in cgroup for c in cgroups) or made['workdir'] in cmdline:
            found.append((int(pid), cmdline))
    return found


def made_by(stderr):
    """What a run says it made (its first log lines): names random per run, so runs of this test
    elsewhere on the machine at the same time are told apart."""
    found = re.search(r'made: (\{.*\})$', stderr, re.M)
    assert found, stderr[-3000:]
    return json.loads(found.group(1))


def left_of(made):
    """What still exists of what a run made."""
    netns = subprocess.run(['ip', 'netns', 'list'], capture_output=True, text=True, check=True).stdout
    paths = list(made['cgroups'].values()) + [made['pin_dir'], made['workdir'], made['record']]
    return dict(netns=[made['netns']] if made['netns'] in netns.split() else [],
                paths=[p for p in paths if os.path.exists(p)],
                processes=processes_of(made))


def command(out):
    return [os.path.join(VENV_BIN, 'python'), APPS, '--quick', '--out', str(out)]


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp('apps')
    start = time.monotonic()
    proc = subprocess.run(command(out), capture_output=True, text=True, timeout=600, check=False)
    seconds = time.monotonic() - start
    made = made_by(proc.stderr)
    left = left_of(made)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / 'results.json') as f:
        result = json.load(f)
    with open(out / 'results.md') as f:
        md = f.read()
    return dict(result=result, md=md, stdout=proc.stdout, stderr=proc.stderr, seconds=seconds,
                made=made, left=left)


def cells(result):
    return {c['name']: c for c in result['cells']}


def test_every_application_completes_without_errors(quick):
    result = quick['result']
    assert result['mode'] == 'quick' and result['repeats'] >= 1
    assert set(cells(result)) == {'redis P1', 'redis P16', 'nginx 1k.bin', 'nginx 1m.bin',
                                  'nginx 1m.bin-nopush-off', 'nginx 1m.bin-sendfile-off',
                                  'iperf3 default', 'iperf3 1K'}
    for name, cell in cells(result).items():
        for path in apps.PATHS:
            samples = cell['samples'][path]
            assert len(samples) == result['repeats'], (name, path)
            for s in samples:
                assert s['errors'] and not any(s['errors'].values()), (name, path, s['errors'], s.get('stderr'))
                assert s['integrity']['ok'], (name, path, s['integrity'])
                if cell['app'] == 'redis':
                    assert set(s['tests']) == {'SET', 'GET'}
                    for t in s['tests'].values():
                        assert t['rps'] > 0 and 0 < t['p50_ms'] <= t['p99_ms'], (name, path, t)
                elif cell['app'] == 'nginx':
                    wrk = s['wrk']
                    assert wrk['status'] == 0 and s['errors']['non_2xx'] == 0
                    assert wrk['requests'] > 0 and s['requests_per_s'] > 0
                    # wrk read at least a whole file per request
                    assert wrk['bytes'] >= wrk['requests'] * s['file_size'], (name, path)
                else:
                    assert s['gbit_per_s'] > 0 and s['received_bytes'] > 0, (name, path)
                    assert isinstance(s['retransmits'], int)


def test_every_redirect_sample_proves_the_path_its_bytes_took(quick):
    build = quick['result']['build']
    # the role's build: BCC on this host (no small-write switch, every cell redirected)
    assert build == apps.BUILDS[0] == 'bcc'
    for name, cell in cells(quick['result']).items():
        for s in cell['samples']['redirect']:
            proof, c = s['proof'], s['counters']
            assert proof['ok'] and proof['path'] == cell['expect'], (name, proof)
            assert all(proof['checks'].values()), (name, proof)
            # both sockets of every connection the namespace opened went in the sockhash
            assert s['tcp']['active_opens'] > 0 and c['inserted'] == 2 * s['tcp']['active_opens']
            assert c['not_admitted_peer'] == c['not_admitted_early_data'] == 0, name
            assert c['insert_full'] == c['insert_failed'] == c['demotion_refused'] == 0, name
            assert c['redirected_bytes'] > 0 and c['redirected_msgs'] > 0, name
            small_writes = cell['app'] == 'iperf3' and cell['variant'] == '1K'
            if not small_writes or build == 'bcc':
                assert cell['expect'] == apps.PATH_REDIRECTED
                low, high = proof['app_bytes']
                assert low <= c['redirected_bytes'] <= high, (name, c, proof['app_bytes'])
                assert c['demoted_small_writes'] == 0, name
                # only a socket whose peer closed first may have gone TCP and left
                assert c['removed'] <= 2 * c['tcp_peer_absent'] <= 4 * s['tcp']['active_opens'], name
                assert s['tcp']['lo_packets'] <= proof['lo_packet_budget'], name
            else:
                # iperf3 -l 1K: the data connection's small writes went TCP, for good,
                # and its sender left the map (its receiver may follow once drained)
                assert cell['expect'] == apps.PATH_DEMOTED
                assert c['demoted_small_writes'] == 1 and 1 <= c['removed'] <= 2, (name, c)
                assert c['redirected_bytes'] < s['received_bytes'] / 2, name
                assert s['tcp']['lo_bytes'] >= s['received_bytes'] - c['redirected_bytes'], name


def test_loopback_samples_never_touch_the_programs(quick):
    for name, cell in cells(quick['result']).items():
        redirect_lo = max(s['tcp']['lo_packets'] for s in cell['samples']['redirect'])
        for s in cell['samples']['loopback']:
            assert s['proof']['ok'], (name, s['proof'])
            assert not any(s['counters'].values()), (name, s['counters'])
            if cell['expect'] == apps.PATH_REDIRECTED:
                # the same load over TCP: lo carried the data the redirect kept off it
                assert s['tcp']['lo_packets'] > 10 * redirect_lo, name


def test_the_report_has_every_table_and_a_ratio_for_every_proven_cell(quick):
    md = quick['md']
    assert quick['stdout'].strip() == md.strip()
    for heading in ('## redis-server + redis-benchmark', '## nginx + wrk', '## iperf3',
                    "## Which path the bytes took"):
        assert heading in md
    # 4 redis rows, 4 nginx rows, 2 iperf3 rows: each with a ratio, since each proof held
    assert md.count('x** |') == 10, md
    assert 'UNPROVEN' not in md and 'FAILED' not in md
    for cell in quick['result']['cells']:
        assert '| %s |' % cell['name'] in md
    print('\n' + md)  # the figures, for the log: not asserted
    print('quick run took %.0f s' % quick['seconds'])


def test_nothing_is_left_behind(quick):
    made = quick['made']
    assert made == quick['result']['made']
    assert made['netns'].startswith(apps.PREFIX + '-')
    assert made['pin_dir'].startswith(os.path.join(BPFFS, apps.PREFIX + '-'))
    assert made['workdir'].startswith(os.path.join(tempfile.gettempdir(), apps.PREFIX + '-'))
    for path in made['cgroups'].values():
        assert os.path.dirname(path) == hostenv.cgroup2_mount()
    # netns, cgroups, pins, bpf_program's record, temp dir, processes
    assert quick['left'] == dict(netns=[], paths=[], processes=[])


def read_until(proc, marker, timeout):
    """The stderr lines of proc up to the first holding marker; fails after timeout seconds."""
    seen = ''
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stderr, selectors.EVENT_READ)
        while marker not in seen:
            left = deadline - time.monotonic()
            assert left > 0 and selector.select(left), 'no %r in time: %s' % (marker, seen)
            line = proc.stderr.readline().decode(errors='replace')
            assert line, 'exited before %r: %s' % (marker, seen)
            seen += line
    return seen


def test_an_interrupted_run_removes_everything(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the applications run."""
    # unbuffered bytes: select() sees every line not yet read
    proc = subprocess.Popen(command(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            bufsize=0, start_new_session=True)
    try:
        seen = read_until(proc, ' repeat 1 ', timeout=300)
        made = made_by(seen)
        # the first sample ran: servers, cgroups, netns, pins all exist
        during = left_of(made)
        assert during['netns'] and during['processes'], during
        expected = set(made['cgroups'].values()) | {made['pin_dir'], made['workdir'], made['record']}
        assert set(during['paths']) == expected, during
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.stderr.read().decode(errors='replace')
        assert proc.wait(timeout=120) == 130, seen + rest
        assert 'interrupted' in rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert left_of(made) == dict(netns=[], paths=[], processes=[])
    assert not os.path.exists(tmp_path / 'results.json')


# ---- the proof logic, on made-up samples -------------------------------------------------

def made_up(app, expect, **counters):
    cell = dict(next(c for c in apps.CELLS if c['app'] == app
                     and expect in (c['expect'], c.get('expect_switch'))), expect=expect)
    c = {k: 0 for k in ('redirected_msgs', 'redirected_bytes', 'passed_msgs', 'passed_bytes',
                        'inserted', 'insert_full', 'insert_failed', 'not_admitted_peer',
                        'not_admitted_early_data', 'demoted_small_writes', 'tcp_peer_absent',
                        'removed', 'demotion_refused')}
    sample = dict(tcp=dict(active_opens=51, lo_packets=400, lo_bytes=40000, in_segs=0, retrans_segs=0))
    if app == 'nginx':
        sample.update(wrk=dict(bytes=100 * apps.MIB, requests=100), file_size=apps.MIB)
        c.update(inserted=102, redirected_msgs=1000, redirected_bytes=100 * apps.MIB + 30000)
    else:  # iperf3 -l 1K
        sample.update(tcp=dict(active_opens=2, lo_packets=3000, lo_bytes=200 * apps.MIB,
                               in_segs=0, retrans_segs=0),
                      received_bytes=200 * apps.MIB, sent_bytes=200 * apps.MIB, length=apps.KIB)
        c.update(inserted=4, redirected_msgs=20, redirected_bytes=15000, passed_msgs=1,
                 passed_bytes=1024, demoted_small_writes=1, removed=1)
    c.update(counters)
    sample['counters'] = c
    return cell, sample


@pytest.mark.parametrize('app, expect, change, failed', [
    ('nginx', apps.PATH_REDIRECTED, {}, []),
    # a socket missing from the sockhash
    ('nginx', apps.PATH_REDIRECTED, dict(inserted=101), ['every_socket_inserted']),
    # more bytes counted than wrk can have caused
    ('nginx', apps.PATH_REDIRECTED, dict(redirected_bytes=300 * apps.MIB),
     ['redirected_bytes_match_the_app']),
    # fewer than wrk read
    ('nginx', apps.PATH_REDIRECTED, dict(redirected_bytes=50 * apps.MIB),
     ['redirected_bytes_match_the_app']),
    # a connection's whole stream over TCP, not just a last reply
    ('nginx', apps.PATH_REDIRECTED, dict(tcp_peer_absent=2, passed_msgs=40, passed_bytes=60 * apps.MIB),
     ['passed_only_a_last_reply']),
    ('nginx', apps.PATH_REDIRECTED, dict(not_admitted_peer=1), ['no_other_decision']),
    ('nginx', apps.PATH_REDIRECTED, dict(demoted_small_writes=1, removed=1), ['nothing_demoted']),
    ('nginx', apps.PATH_REDIRECTED, dict(removed=1), ['removed_only_after_tcp']),
    ('nginx', apps.PATH_REDIRECTED, dict(tcp_peer_absent=1, passed_msgs=1, passed_bytes=100,
                                         removed=2), []),
    ('iperf3', apps.PATH_DEMOTED, {}, []),
    ('iperf3', apps.PATH_DEMOTED, dict(demoted_small_writes=0, removed=0),
     ['stream_demoted_once', 'demoted_socket_left_the_map']),
    ('iperf3', apps.PATH_DEMOTED, dict(removed=2), []),
    ('iperf3', apps.PATH_DEMOTED, dict(removed=3), ['demoted_socket_left_the_map',
                                                    'removed_only_after_tcp']),
    ('iperf3', apps.PATH_DEMOTED, dict(redirected_bytes=250 * apps.MIB),
     ['counted_no_more_than_written', 'most_bytes_over_tcp']),
])
def test_redirect_proof_fails_on_the_counters_that_contradict_it(app, expect, change, failed):
    cell, sample = made_up(app, expect, **change)
    proof = apps.redirect_proof(cell, copy.deepcopy(sample))
    assert proof['failed'] == sorted(failed), proof
    assert proof['ok'] == (not failed)
    assert proof['path'] == (None if failed else expect)


def test_lo_carrying_the_data_contradicts_a_redirect():
    cell, sample = made_up('nginx', apps.PATH_REDIRECTED)
    sample['tcp']['lo_packets'] = 20000
    assert apps.redirect_proof(cell, sample)['failed'] == ['lo_only_handshakes']
    cell, sample = made_up('iperf3', apps.PATH_DEMOTED)
    sample['tcp']['lo_bytes'] = 1000
    assert apps.redirect_proof(cell, sample)['failed'] == ['rest_on_lo']
