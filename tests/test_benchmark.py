"""benchmarks/run.py --quick: it runs, every planned cell is there, and its redirect proofs hold.

Its speed is not asserted: the figures depend on the machine and its load.
"""

import glob
import importlib.util
import json
import os
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


def leftovers():
    netns = subprocess.run(['ip', 'netns', 'list'], capture_output=True, text=True, check=False).stdout
    return dict(
        netns=sorted(line.split()[0] for line in netns.splitlines() if line.startswith('sockbench-')),
        cgroups=sorted(glob.glob(os.path.join(hostenv.cgroup2_mount(), 'sockbench-*'))),
        pins=sorted(glob.glob(os.path.join(BPFFS, 'sockbench-*'))))


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    before = leftovers()
    start = time.monotonic()
    proc = subprocess.run([os.path.join(VENV_BIN, 'python'), RUN, '--quick', '--out', str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / 'results.json') as f:
        result = json.load(f)
    return dict(out=out, result=result, stdout=proc.stdout, seconds=seconds, before=before)


def test_quick_mode_measures_every_planned_cell(quick):
    bench = load_bench()
    result = quick['result']
    assert result['mode'] == 'quick'
    expected = {bench.cell_key(g['workload'], g['size'], g['nodelay'], g['pairs'], path, g['placement'])
                for g in bench.plan('quick') for path in g['paths']}
    assert {c['key'] for c in result['cells']} == expected
    for cell in result['cells']:
        assert len(cell['samples']) == result['repeats'], cell['key']
        for sample in cell['samples']:
            # every byte the client wrote was read by the server
            assert sample['server']['recv_bytes'] == sample['client']['sent_bytes'] > 0, cell['key']
            if cell['workload'] == 'pingpong':
                assert sample['tps'] > 0 and 0 < sample['p50_us'] <= sample['p99_us']
            else:
                assert sample['bytes_per_s'] > 0


def test_every_redirect_sample_carries_a_proof_that_holds(quick):
    cells = quick['result']['cells']
    redirect = [c for c in cells if c['path'] == 'redirect']
    assert redirect
    for cell in redirect:
        assert cell['proven'] is True, cell['key']
        for sample in cell['samples']:
            proof = sample['proof']
            assert proof['ok'] and all(proof['checks'].values()), (cell['key'], proof)
            assert proof['redirected_bytes'] > 0 and proof['lo_packets'] <= proof['lo_packet_budget']


def test_the_proof_tells_redirect_from_loopback(quick):
    """The same cells without the programs: lo carries the data and no counter moves."""
    cells = {c['key']: c for c in quick['result']['cells']}
    for key, cell in cells.items():
        if cell['path'] != 'redirect':
            continue
        plain = cells[key.rsplit('/', 1)[0] + '/loopback']
        assert all(s['counters']['redirected_bytes'] == 0 for s in plain['samples'])
        for s in plain['samples']:
            # at least one packet per 64 KiB (the MTU of lo) when TCP carries the bytes
            written = s['client']['sent_bytes'] + s['server']['sent_bytes']
            assert s['lo_packets'] >= written // 65536
        assert max(s['lo_packets'] for s in cell['samples']) < min(s['lo_packets'] for s in plain['samples'])


def test_ansible_cost_was_measured_through_playbooks(quick):
    cycles = quick['result']['ansible']['cycles']
    assert len(cycles) == 1
    cycle = cycles[0]
    assert cycle['first_converge']['changed'] == 3
    assert cycle['idempotent_rerun']['changed'] == 0
    assert cycle['absent']['changed'] == 3
    assert all(cycle[step]['seconds'] > 0 for step in ('first_converge', 'idempotent_rerun', 'absent'))


def test_reports_are_written_and_targets_evaluated(quick):
    out, result = quick['out'], quick['result']
    md = (out / 'results.md').read_text()
    assert md in quick['stdout']
    assert '| 64 B | off |' in md and '## Targets of issue 5' in md
    assert set(result['targets']) == {'never_slower_than_loopback', 'stream_64k_vs_unix',
                                      'pingpong_64_vs_loopback'}
    with open(out / 'throughput.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_quick_mode_is_quick_and_leaves_nothing_behind(quick):
    assert quick['seconds'] < 60, quick['seconds']
    now = leftovers()
    for kind, names in now.items():
        assert set(names) <= set(quick['before'][kind]), (kind, names)
