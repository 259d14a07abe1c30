"""benchmarks/fleet.py: a small fleet answers over SSH, and nothing of it is left afterwards."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLEET = os.path.join(REPO, 'benchmarks', 'fleet.py')


def fleet(*args):
    return subprocess.run([sys.executable, FLEET] + list(args), capture_output=True, text=True, timeout=600, check=False)


def test_ping_and_a_play_reach_every_host_and_teardown_leaves_nothing():
    proc = fleet('demo', '--hosts', '4', '--forks', '4')
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out['hosts'] == 4 and out['ping_warm_s'] > 0 and out['playbook_s'] > 0
    assert out['down_errors'] == [] and out['leftovers'] == []
    assert not os.path.exists(out['state_dir'])


def test_a_failing_command_still_tears_down():
    proc = fleet('run', '--hosts', '2', '--', 'sh', '-c',
                 'test -s "$FLEET_INVENTORY" && ansible all -i "$FLEET_INVENTORY" -m ping >/dev/null && exit 3')
    assert proc.returncode == 3, proc.stderr[-3000:]
    out = json.loads(proc.stderr.strip().splitlines()[-1])
    assert out['command_rc'] == 3 and out['leftovers'] == [] and out['down_errors'] == []
    assert not os.path.exists(out['state_dir'])


def test_down_undoes_a_fleet_left_up():
    up = fleet('up', '--hosts', '2')
    assert up.returncode == 0, up.stderr[-3000:]
    state = json.loads(up.stdout)['state_dir']
    try:
        assert os.path.exists(os.path.join(state, 'inventory.yml'))
    finally:
        down = fleet('down', state)
    assert down.returncode == 0, down.stdout + down.stderr
    assert json.loads(down.stdout)['leftovers'] == []
    assert not os.path.exists(state)
