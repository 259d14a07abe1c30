"""Time examples/rollout.yml and examples/remove.yml over a fleet from benchmarks/fleet.py.

    benchmarks/fleet.py run -- .venv/bin/python benchmarks/fleet_rollout.py measure --loader object
    benchmarks/fleet.py run -- .venv/bin/python benchmarks/fleet_rollout.py canary

Runs inside `fleet.py run` (it reads FLEET_INVENTORY and the ssh settings
from the environment that sets). `measure`: ansible -m ping, then
rollout.yml (first converge), rollout.yml again (rerun), remove.yml, each
timed (wall, monotonic); per host, the duration of the role's
"Converge the sockredir instance" task (the one sockredir_instance call),
taken from the json stdout callback's per-host start/end. It checks the
recaps (first converge: every host changed; rerun: changed=0 on every host;
removal: no failure) and exits 1 when one does not hold. `canary`: the first
host of the play gets a cgroup that does not exist (-e does not fit: it
would reach every host, so an extra inventory file overrides the canary's
host_var), rollout.yml must fail on it in the preflight and no other host
may be touched; then remove.yml cleans. Prints one JSON document.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_TASK = 'Converge the sockredir instance'


def loadavg():
    with open('/proc/loadavg') as f:
        return ' '.join(f.read().split()[:3])


def run(cmd, json_out=False, extra_env=None):
    env = dict(os.environ, **(extra_env or {}))
    if json_out:
        env['ANSIBLE_STDOUT_CALLBACK'] = 'ansible.posix.json'
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=REPO)
    return proc, round(time.monotonic() - start, 2)


# Neither the json callback nor profile_tasks time a task per host; this one does: from
# v2_runner_on_start (the worker starts on the host) to the host's result, i.e. the
# module's transfer and run over the (multiplexed) ssh connection. Written at run time
# into the fleet's state dir, which teardown removes.
TIMING_PLUGIN = '''
import json, os, time
from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = 'aggregate'
    CALLBACK_NAME = 'fleet_timing'
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.started = {}
        self.out = open(os.environ['FLEET_TIMING_OUT'], 'a')

    def v2_runner_on_start(self, host, task):
        self.started[(host.get_name(), task._uuid)] = time.monotonic()

    def _done(self, result):
        key = (result._host.get_name(), result._task._uuid)
        start = self.started.pop(key, None)
        if start is not None:
            self.out.write(json.dumps(dict(host=key[0], task=result._task.get_name(),
                                           secs=time.monotonic() - start,
                                           on_host=result._result.get('engine_seconds'))) + "\\n")
            self.out.flush()

    def v2_runner_on_ok(self, result, **kw):
        self._done(result)

    def v2_runner_on_failed(self, result, **kw):
        self._done(result)
'''


def timing_env(tag):
    plugdir = os.path.join(os.environ['FLEET_DIR'], 'callbacks')
    os.makedirs(plugdir, exist_ok=True)
    with open(os.path.join(plugdir, 'fleet_timing.py'), 'w') as f:
        f.write(TIMING_PLUGIN)
    out = os.path.join(os.environ['FLEET_DIR'], 'timing-%s.jsonl' % tag)
    if os.path.exists(out):
        os.unlink(out)
    return dict(ANSIBLE_CALLBACK_PLUGINS=plugdir, ANSIBLE_CALLBACKS_ENABLED='fleet_timing',
                FLEET_TIMING_OUT=out), out


def engine_times(path, field='secs'):
    """Per host, seconds of the engine task (summed if the role called it twice): as the
    controller sees it (secs), or the module's own engine_seconds on the host (on_host)."""
    out = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec['task'].endswith(ENGINE_TASK) and rec.get(field) is not None:
                out[rec['host']] = round(out.get(rec['host'], 0.0) + rec[field], 3)
    return out


def stats(doc):
    return doc['stats']


def summary(times):
    vals = sorted(times.values())
    if not vals:
        return dict(n=0)
    return dict(n=len(vals), median_s=round(statistics.median(vals), 3), max_s=round(max(vals), 3),
                min_s=round(min(vals), 3))


def playbook(inventory, play, extra, more_inventory=None, tag='x'):
    cmd = ['ansible-playbook', '-i', inventory] + (['-i', more_inventory] if more_inventory else []) + \
          ['-f', '8', os.path.join('examples', play)] + extra
    tenv, tfile = timing_env(tag)
    proc, secs = run(cmd, json_out=True, extra_env=tenv)
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        raise SystemExit('%s: no JSON output (rc %d):\n%s\n%s'
                         % (play, proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:]))
    return proc, secs, doc, (engine_times(tfile), engine_times(tfile, 'on_host'))


def measure(loader):
    inv = os.environ['FLEET_INVENTORY']
    with open(inv) as f:
        hosts = sorted(json.load(f)['sockredir_hosts']['hosts'])
    extra = ['-e', 'sockredir_loader=%s' % loader]
    out = dict(loader=loader, hosts=len(hosts), forks=8, load_before=loadavg())
    problems = []
    proc, secs = run(['ansible', 'sockredir_hosts', '-i', inv, '-m', 'ansible.builtin.ping', '-f', '8'])
    ok = proc.stdout.count(' | SUCCESS')
    if proc.returncode or ok != len(hosts):
        problems.append('ping: %d of %d answered' % (ok, len(hosts)))
    out['ping_s'] = secs
    for label, play in (('first', 'rollout.yml'), ('rerun', 'rollout.yml'), ('remove', 'remove.yml')):
        proc, secs, doc, times = playbook(inv, play, extra, tag=label)
        st = {h: s for h, s in stats(doc).items() if h in hosts}
        out[label + '_s'] = secs
        out[label + '_rc'] = proc.returncode
        out[label + '_changed'] = {h: st[h]['changed'] for h in sorted(st)}
        failed = [h for h in st if st[h]['failures'] or st[h]['unreachable']]
        if proc.returncode or failed or len(st) != len(hosts):
            problems.append('%s: rc %d, failed %s, %d hosts in recap' % (label, proc.returncode, failed, len(st)))
        if label == 'first' and any(st[h]['changed'] == 0 for h in st):
            problems.append('first converge: hosts unchanged: %s' % [h for h in st if not st[h]['changed']])
        if label == 'rerun' and any(st[h]['changed'] for h in st):
            problems.append('rerun: hosts changed: %s' % [h for h in st if st[h]['changed']])
        if label != 'remove':
            out[label + '_engine'] = summary(times[0])
            out[label + '_engine_per_host'] = times[0]
            out[label + '_engine_on_host'] = summary(times[1])
            out[label + '_engine_on_host_per_host'] = times[1]
    out['rerun_over_ping'] = round(out['rerun_s'] / out['ping_s'], 2)
    out['load_after'] = loadavg()
    out['problems'] = problems
    return out


def canary():
    inv = os.environ['FLEET_INVENTORY']
    with open(inv) as f:
        hosts = sorted(json.load(f)['sockredir_hosts']['hosts'])
    first = hosts[0]  # the play's order is the inventory's: host01 is the canary
    bad = os.path.join(os.environ['FLEET_DIR'], 'canary-inventory.yml')
    with open(inv) as f:
        real = json.load(f)['sockredir_hosts']['hosts'][first]['sockredir_cgroup']
    missing = real + '-no-such-cgroup'
    with open(bad, 'w') as f:
        json.dump(dict(sockredir_hosts=dict(hosts={first: dict(sockredir_cgroup=missing)})), f)
    out = dict(canary=first, canary_cgroup=missing, load_before=loadavg())
    proc, secs, doc, times = playbook(inv, 'rollout.yml', [], more_inventory=bad, tag='canary')
    st = stats(doc)
    out['rollout_s'] = secs
    out['rollout_rc'] = proc.returncode
    out['canary_engine_s'] = times[0].get(first)
    out['recap'] = {h: st[h] for h in sorted(st)}
    msgs = []
    for play in doc['plays']:
        for task in play['tasks']:
            for host, res in task['hosts'].items():
                if res.get('failed'):
                    msgs.append('%s | %s | %s' % (host, task['task']['name'], str(res.get('msg'))[:300]))
    out['failures'] = msgs
    out['plays_run'] = [p['play']['name'] for p in doc['plays']]
    pins = [h for h in hosts if os.path.exists('/sys/fs/bpf/%s' % os.path.basename(
        json.load(open(inv))['sockredir_hosts']['hosts'][h]['sockredir_pin_root']))]
    out['hosts_with_pin_root_after'] = pins
    problems = []
    if proc.returncode == 0:
        problems.append('rollout succeeded with a broken canary')
    others = [h for h in hosts if h != first]
    touched = [h for h in others if h in st and (st[h]['ok'] or st[h]['changed'])]
    if touched:
        problems.append('hosts after the canary were run: %s' % touched)
    if first not in st or not st[first]['failures']:
        problems.append('the canary did not fail')
    if first in st and st[first]['changed']:
        problems.append('the canary changed something before failing')
    proc, secs, doc, times = playbook(inv, 'remove.yml', [], tag='canary-remove')
    out['remove_s'] = secs
    out['remove_rc'] = proc.returncode
    out['problems'] = problems
    out['load_after'] = loadavg()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
    sub = ap.add_subparsers(dest='cmd', required=True)
    m = sub.add_parser('measure')
    m.add_argument('--loader', choices=('object', 'bcc'), default='object')
    sub.add_parser('canary')
    args = ap.parse_args()
    out = measure(args.loader) if args.cmd == 'measure' else canary()
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write('\n')
    return 1 if out['problems'] else 0


if __name__ == '__main__':
    sys.exit(main())
