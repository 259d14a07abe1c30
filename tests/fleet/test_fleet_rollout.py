"""benchmarks/fleet_rollout.py: a canary that fails its preflight stops rollout.yml before any other host."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLEET = os.path.join(REPO, 'benchmarks', 'fleet.py')
DRIVER = os.path.join(REPO, 'benchmarks', 'fleet_rollout.py')


def test_a_failed_canary_stops_the_rollout_and_the_fleet_is_left_clean():
    proc = subprocess.run([sys.executable, FLEET, 'run', '--hosts', '3', '--', sys.executable, DRIVER, 'canary'],
                          capture_output=True, text=True, timeout=600, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out['problems'] == []
    assert out['canary'] == 'host01' and out['rollout_rc'] != 0
    # only the canary ran, it failed in the preflight and changed nothing
    assert list(out['recap']) == ['host01']
    assert out['recap']['host01']['failures'] == 1 and out['recap']['host01']['changed'] == 0
    assert any('does not exist' in m and out['canary_cgroup'] in m for m in out['failures'])
    assert out['hosts_with_pin_root_after'] == [] and out['remove_rc'] == 0
    # the timing callback saw the engine call on the canary
    assert out['canary_engine_s'] > 0
    down = json.loads(proc.stderr.strip().splitlines()[-1])
    assert down['down_errors'] == [] and down['leftovers'] == []
    assert not os.path.exists(down['state_dir'])
