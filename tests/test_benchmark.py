"""benchmarks/run.py --quick: it runs, every planned cell is there, and the proof of the path each
redirect sample took holds; and the proof logic itself on made-up counters.

Its speed is not asserted: the figures depend on the machine and its load.
"""

import glob
import importlib.util
import json
import os
import re
import subprocess
import time

import pytest

from conftest import BPFFS, REPO, VENV_BIN
from support import hostenv

RUN = os.path.join(REPO, 'benchmarks', 'run.py')


def load_bench():
    spec = importlib.util.spec_from_file_location('sockredir_bench', RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def leftovers():
    netns = subprocess.run(['ip', 'netns', 'list'], capture_output=True, text=True, check=False).stdout
    return dict(
        netns=sorted(line.split()[0] for line in netns.splitlines() if line.startswith('sockbench-')),
        cgroups=sorted(glob.glob(os.path.join(hostenv.cgroup2_mount(), 'sockbench-*'))),
        pins=sorted(glob.glob(os.path.join(BPFFS, 'sockbench-*'))))


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    start = time.monotonic()
    proc = subprocess.run([os.path.join(VENV_BIN, 'python'), RUN, '--quick', '--out', str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / 'results.json') as f:
        result = json.load(f)
    return dict(out=out, result=result, stdout=proc.stdout, stderr=proc.stderr, seconds=seconds)


def expected_path(cell, result):
    """The path the programs must choose for a redirect cell of the quick plan."""
    if cell['workload'] == 'remote':
        return bench.PATH_NOT_ADMITTED
    if cell['workload'] == 'pingpong':
        # each side's sends follow a receive: no streak, no demotion
        return bench.PATH_REDIRECTED
    if result['build'] == 'bcc':
        # the BCC build has no small-write switch
        return bench.PATH_REDIRECTED
    return (bench.PATH_REDIRECTED if cell['size'] >= result['small_write_policy']['small_bytes']
            else bench.PATH_DEMOTED)


def test_quick_mode_measures_every_planned_cell(quick):
    result = quick['result']
    assert result['mode'] == 'quick'
    expected = {bench.cell_key(g['workload'], g['size'], g['nodelay'], g['pairs'], path, g['placement'])
                for g in bench.plan('quick') for path in g['paths']}
    assert {c['key'] for c in result['cells']} == expected
    assert {c['workload'] for c in result['cells']} == {'stream', 'pingpong', 'remote'}
    for cell in result['cells']:
        assert len(cell['samples']) == result['repeats'], cell['key']
        for sample in cell['samples']:
            # every byte the client wrote was read by the server
            assert sample['server']['recv_bytes'] == sample['client']['sent_bytes'] > 0, cell['key']
            assert set(sample['errors']) == {'client_eagain_read', 'client_eagain_write',
                                             'server_eagain_read', 'server_eagain_write', 'bad_replies'}
            if cell['workload'] == 'pingpong':
                assert sample['tps'] > 0 and 0 < sample['p50_us'] <= sample['p99_us']
            else:
                assert sample['bytes_per_s'] > 0
            if cell['workload'] == 'remote':
                # the server answered the byte count, the client read and checked it
                assert sample['server']['sent_bytes'] == 8 and sample['client']['replies'] == 1


def test_every_redirect_sample_proves_the_path_the_programs_chose(quick):
    result = quick['result']
    # the default: the prebuilt object, the programs' own small-write policy
    assert result['build'] == 'object'
    assert result['small_write_policy'] == dict(small_bytes=0xffffffff, small_streak=16, set_by_run=False)
    redirect = [c for c in result['cells'] if c['path'] == 'redirect']
    assert redirect
    taken = set()
    for cell in redirect:
        assert cell['proven'] is True, (cell['key'], [s['proof'] for s in cell['samples']])
        path = expected_path(cell, result)
        assert cell['paths_taken'] == {path: result['repeats']}, cell['key']
        taken.add(path)
        for sample in cell['samples']:
            proof = sample['proof']
            assert proof['ok'] and proof['path'] == path and all(proof['checks'].values()), (cell['key'], proof)
            if path == bench.PATH_REDIRECTED:
                assert proof['redirected_bytes'] == proof['bytes_moved'] > 0
                assert proof['lo_packets'] <= proof['lo_packet_budget']
            elif path == bench.PATH_DEMOTED:
                assert proof['demoted'] == proof['removed'] == cell['pairs']
                assert 0 < proof['redirected_bytes'] <= 16 * cell['size'] * cell['pairs']
                rest = proof['bytes_moved'] - proof['redirected_bytes']
                assert proof['lo_packets'] >= rest // 65536 > 0
            else:
                assert proof['not_admitted_peer'] == cell['pairs'] and proof['inserted'] == 0
    # the quick plan exercises all three paths
    assert taken == {bench.PATH_REDIRECTED, bench.PATH_DEMOTED, bench.PATH_NOT_ADMITTED}


def test_the_proof_tells_the_paths_from_loopback(quick):
    """The same cells without the programs: lo carries the data and no counter moves."""
    cells = {c['key']: c for c in quick['result']['cells']}
    for key, cell in cells.items():
        if cell['path'] != 'redirect' or cell['workload'] == 'remote':
            continue
        plain = cells[key.rsplit('/', 1)[0] + '/loopback']
        assert all(s['counters']['redirected_bytes'] == 0 for s in plain['samples'])
        for s in plain['samples']:
            # at least one packet per 64 KiB (the MTU of lo) when TCP carries the bytes
            written = s['client']['sent_bytes'] + s['server']['sent_bytes']
            assert s['lo_packets'] >= written // 65536
        if cell['paths_taken'] == {bench.PATH_REDIRECTED: len(cell['samples'])}:
            assert max(s['lo_packets'] for s in cell['samples']) < min(s['lo_packets'] for s in plain['samples'])


def test_peer_on_another_host_goes_over_the_veth_and_is_never_admitted(quick):
    cells = {c['key']: c for c in quick['result']['cells']}
    for size in bench.MODES['quick']['remote_sizes']:
        plain = cells[bench.cell_key('remote', size, False, 1, 'plain')]
        mine = cells[bench.cell_key('remote', size, False, 1, 'redirect')]
        for s in plain['samples'] + mine['samples']:
            moved = s['client']['sent_bytes'] + s['server']['sent_bytes']
            assert s['veth_packets'] >= moved // 65536 > 0
            assert s['lo_packets'] <= bench.LO_PACKETS_SLACK
        for s in plain['samples']:
            assert not any(s['counters'].values())
        for s in mine['samples']:
            c = s['counters']
            assert c['not_admitted_peer'] == 1 and c['inserted'] == 0
            assert c['redirected_msgs'] == c['passed_msgs'] == 0
        # a socket the programs never admitted reads like any TCP socket
        assert mine['errors'] == 0, mine['error_kinds']


def test_ansible_cost_was_measured_through_playbooks(quick):
    cycles = quick['result']['ansible']['cycles']
    assert len(cycles) == 1
    cycle = cycles[0]
    assert cycle['first_converge']['changed'] == 3
    assert cycle['idempotent_rerun']['changed'] == 0
    assert cycle['absent']['changed'] == 3
    assert all(cycle[step]['seconds'] > 0 for step in ('first_converge', 'idempotent_rerun', 'absent'))


def test_reports_are_written_and_targets_evaluated_from_the_data(quick):
    out, result = quick['out'], quick['result']
    md = (out / 'results.md').read_text()
    assert md in quick['stdout']
    assert '| 64 B | off |' in md and '## Targets of issue 11' in md
    assert '## Peer on another host' in md and 'Errors (reads or writes that failed with EAGAIN' in md
    assert 'demoted to TCP (2/2)' in md and 'redirected (2/2)' in md and 'not admitted (TCP) (2/2)' in md
    t = result['targets']
    assert set(t) == {'stream_vs_loopback', 'stream_64k', 'pingpong_64', 'remote_peer'}
    # all four measured in quick mode, each judged from this run's ratios
    assert all(t[k]['met'] in (True, False) for k in t)
    cells = result['cells']
    rows = t['stream_vs_loopback']['rows']
    assert len(rows) == sum(1 for c in cells if c['workload'] == 'stream' and c['path'] == 'redirect')
    for row in rows:
        lb = bench.find(cells, 'stream', row['size'], row['nodelay'], row['pairs'], 'loopback')
        rd = bench.find(cells, 'stream', row['size'], row['nodelay'], row['pairs'], 'redirect')
        assert row['ratio'] == pytest.approx(rd['bytes_per_s']['median'] / lb['bytes_per_s']['median'])
    assert t['stream_vs_loopback']['met'] == all(r['ratio'] >= 0.95 for r in rows)
    remote = t['remote_peer']['rows']
    assert [r['size'] for r in remote] == [64 * 1024, 1024]
    assert t['remote_peer']['met'] == all(r['ratio'] >= 0.97 and r['errors_with'] == 0 for r in remote)
    pp = t['pingpong_64']
    assert pp['met'] == (pp['tps_ratio_same_cpu'] >= 1.8 and
                         pp['p99']['same']['redirect_us'] <= pp['p99']['same']['loopback_us'])
    with open(out / 'throughput.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_quick_mode_is_quick_and_leaves_nothing_behind(quick):
    assert quick['seconds'] < 60, quick['seconds']
    # the names this run logged (another run may be going on meanwhile, with its own)
    made = re.search(r'netns (\S+) \(remote peer: (\S+)\), cgroups (\S+) and (\S+), pins (\S+)', quick['stderr'])
    assert made, quick['stderr'][-2000:]
    netns, peer, plain, redirect, pins = made.groups()
    now = leftovers()
    assert netns not in now['netns'] and peer not in now['netns']
    assert plain not in now['cgroups'] and redirect not in now['cgroups']
    assert pins not in now['pins']


# ---- the proof logic on made-up counters -----------------------------------------------------

def made_up_sample(size, pairs, written, lo_packets, veth_packets=0, **deltas):
    counters = {name: 0 for name in bench.facts.COUNTERS}
    counters.update(deltas)
    return dict(client=dict(sent_bytes=written), server=dict(sent_bytes=0), counters=counters,
                lo_packets=lo_packets, veth_packets=veth_packets)


MIB = 1 << 20
# (what, pairs, size, sample, path the proof must find or None)
PROOF_CASES = [
    ('every byte redirected', 1, 65536,
     made_up_sample(65536, 1, 100 * MIB, 6, redirected_bytes=100 * MIB, redirected_msgs=1600, inserted=2),
     bench.PATH_REDIRECTED),
    ('demoted after 15 redirected writes, the rest on lo', 1, 64,
     made_up_sample(64, 1, 10 * MIB, 3000, redirected_bytes=15 * 64, passed_bytes=64, inserted=2,
                    demoted_small_writes=1, removed=1),
     bench.PATH_DEMOTED),
    ('8 connections demoted, each removed', 8, 16384,
     made_up_sample(16384, 8, 500 * MIB, 9000, redirected_bytes=8 * 15 * 16384, inserted=16,
                    demoted_small_writes=8, removed=8),
     bench.PATH_DEMOTED),
    ('redirected, but some bytes were passed to TCP', 1, 65536,
     made_up_sample(65536, 1, 100 * MIB, 6, redirected_bytes=99 * MIB, passed_bytes=MIB, inserted=2),
     None),
    ('demoted but never removed from the sockhash', 1, 64,
     made_up_sample(64, 1, 10 * MIB, 3000, redirected_bytes=15 * 64, inserted=2, demoted_small_writes=1),
     None),
    ('demoted, but more redirected than the streak allows', 1, 64,
     made_up_sample(64, 1, 10 * MIB, 3000, redirected_bytes=MIB, inserted=2, demoted_small_writes=1,
                    removed=1),
     None),
    ('demoted, but lo did not carry the rest', 1, 4096,
     made_up_sample(4096, 1, 100 * MIB, 7, redirected_bytes=15 * 4096, inserted=2, demoted_small_writes=1,
                    removed=1),
     None),
    ('only one of two connections demoted', 2, 64,
     made_up_sample(64, 2, 10 * MIB, 3000, redirected_bytes=2 * 15 * 64, inserted=4, demoted_small_writes=1,
                    removed=1),
     None),
    ('demoted because the peer was gone, not for small writes', 1, 64,
     made_up_sample(64, 1, 10 * MIB, 3000, redirected_bytes=15 * 64, inserted=2, demoted_small_writes=1,
                    removed=1, tcp_peer_absent=1),
     None),
    ('never inserted', 1, 65536,
     made_up_sample(65536, 1, 100 * MIB, 1700, passed_bytes=100 * MIB, not_admitted_peer=1),
     None),
]


@pytest.mark.parametrize('what,pairs,size,sample,path', PROOF_CASES, ids=[c[0] for c in PROOF_CASES])
def test_the_proof_accepts_a_path_only_when_every_counter_fits_it(what, pairs, size, sample, path):
    proof = bench.redirect_proof(sample, pairs, size, small_streak=16)
    assert proof['path'] == path and proof['ok'] == (path is not None), proof
    if path is None:
        # both paths were tried and the failed checks are named
        assert set(proof['failed_checks']) == {bench.PATH_REDIRECTED, bench.PATH_DEMOTED}
        assert all(proof['failed_checks'].values())


REMOTE_CASES = [
    ('not admitted, over the veth', made_up_sample(1024, 1, 50 * MIB, 0, veth_packets=40000, not_admitted_peer=1),
     True),
    ('admitted after all', made_up_sample(1024, 1, 50 * MIB, 0, veth_packets=40000, not_admitted_peer=0,
                                          inserted=1), False),
    ('not admitted, yet sk_msg ran', made_up_sample(1024, 1, 50 * MIB, 0, veth_packets=40000,
                                                    not_admitted_peer=1, passed_msgs=10, passed_bytes=10240),
     False),
    ('the bytes did not cross the veth', made_up_sample(1024, 1, 50 * MIB, 0, veth_packets=3,
                                                        not_admitted_peer=1), False),
]


@pytest.mark.parametrize('what,sample,ok', REMOTE_CASES, ids=[c[0] for c in REMOTE_CASES])
def test_the_remote_proof(what, sample, ok):
    proof = bench.remote_proof(sample, 1)
    assert proof['ok'] is ok and proof['path'] == (bench.PATH_NOT_ADMITTED if ok else None), proof


def test_a_cell_with_one_unproven_sample_has_no_figure():
    good = made_up_sample(65536, 1, 100 * MIB, 6, redirected_bytes=100 * MIB, inserted=2)
    bad = made_up_sample(65536, 1, 100 * MIB, 6, redirected_bytes=50 * MIB, inserted=2)
    samples = []
    for s in (good, bad):
        s.update(bytes_per_s=1e9, load=dict(others=0.0, steal=0.0), proof=bench.redirect_proof(s, 1, 65536, 16),
                 errors=dict(client_eagain_read=0, bad_replies=0))
        s['client'].update(writes=1600, elapsed=0.1)
        s['server'].update(reads=1600)
        samples.append(s)
    cell = dict(key='stream/65536/nagle/1/split/redirect', workload='stream', size=65536, nodelay=False,
                pairs=1, placement='split', path='redirect', samples=samples)
    bench.summarize(cell)
    assert cell['proven'] is False and cell['paths_taken'] == {bench.PATH_REDIRECTED: 1, 'unproven': 1}
    assert bench.figure(cell) is None and bench.fmt_rate(cell) == 'unproven'
    assert bench.fmt_proof(cell).startswith('UNPROVEN (1 of 2 samples fit no path)')
