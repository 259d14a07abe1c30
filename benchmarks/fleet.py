"""A fleet of managed hosts on this machine: sshd in N network namespaces, for rollout runs.

    benchmarks/fleet.py demo [--hosts 16] [--forks 8]
        brings a fleet up, times `ansible -m ping` and a trivial playbook over
        all hosts, tears it down; prints the wall times as JSON.
    benchmarks/fleet.py run [--hosts 16] -- COMMAND...
        brings a fleet up, runs COMMAND with FLEET_INVENTORY (and FLEET_DIR,
        ANSIBLE_SSH_ARGS) in its environment, tears it down; exits with its status.
        e.g.  benchmarks/fleet.py run -- sh -c 'ansible-playbook -f 8 -i "$FLEET_INVENTORY" examples/rollout.yml'
    benchmarks/fleet.py up [--hosts 16]      prints the state directory; the fleet stays up
    benchmarks/fleet.py down STATE_DIR       tears down what `up` (or a killed run) left

Each host NN is: a network namespace fleet-<id>-NN with one veth end (eth0,
10.231.<k>.<10+NN>/24) whose other end sits on a bridge fl<id> in this
namespace (10.231.<k>.1), an sshd listening there only, with its own
authorized key (generated here; the controller uses the host's private key),
and its own host_vars: a cgroup <cgroup2>/fleet-<id>-NN (created here), a pin
root /sys/fs/bpf/fleet-<id>-NN and a source directory under the state dir.
All hosts share this machine's kernel, bpffs and filesystem, which is why those
three must differ per host, and why the inventory sets
sockredir_install_packages=false (one dpkg lock for all: install the packages
once, scripts/bootstrap.sh does). The inventory's group is sockredir_hosts, as
in examples/inventory.yml.

Teardown removes, in order: the ssh control masters, every process in each
namespace (sshd and its sessions), the namespaces (their veth ends go with
them), the bridge, the cgroups (after killing what is in them), the pin
directories and bpf_program's records of them, the state directory (keys,
configs, inventory). It runs on failure and on SIGINT/SIGTERM too, and
`down STATE_DIR` redoes it from the state file after a crash.
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(REPO, '.venv', 'bin')
COLLECTIONS = os.path.join(REPO, '.venv', 'collections')
BPFFS = '/sys/fs/bpf'
STATE_ROOT = '/run'  # root-owned and not world-writable: sshd's StrictModes accepts the key files
SSHD = '/usr/sbin/sshd'
RECORD_DIR = '/run/ebpf-sockredir'

sys.path.insert(0, os.path.join(REPO, 'tests'))
from support.hostenv import _kill_pids as kill_now, cgroup2_mount, kill_cgroup  # noqa: E402


def sh(*cmd, check=True, capture=False):
    return subprocess.run(cmd, check=check, capture_output=capture, text=True)


def free_subnet():
    """A 10.231.<k>.0/24 no interface of this namespace uses."""
    used = sh('ip', '-o', '-4', 'addr', capture=True).stdout
    for _attempt in range(100):
        k = secrets.randbelow(250) + 1
        if ' 10.231.%d.' % k not in used:
            return '10.231.%d' % k
    raise RuntimeError('no free 10.231.x.0/24 subnet')


class Fleet(object):
    """The fleet's names live in state.json from the first step on, so down() can always undo."""

    def __init__(self, hosts=16, state_dir=None):
        if state_dir:
            self.dir = state_dir
            with open(os.path.join(state_dir, 'state.json')) as f:
                self.state = json.load(f)
            return
        fid = secrets.token_hex(3)
        self.dir = tempfile.mkdtemp(prefix='sockredir-fleet-%s-' % fid, dir=STATE_ROOT)
        os.chmod(self.dir, 0o700)
        subnet = free_subnet()
        self.state = dict(id=fid, bridge='fl%s' % fid, subnet=subnet, cgroup2=cgroup2_mount(),
                          made_sshd_dir=not os.path.isdir('/run/sshd'), hosts=[], pids={})
        for i in range(1, hosts + 1):
            name = 'fleet-%s-%02d' % (fid, i)
            self.state['hosts'].append(dict(
                name='host%02d' % i, netns=name, veth='fv%s%02d' % (fid, i), addr='%s.%d' % (subnet, 10 + i),
                cgroup=os.path.join(self.state['cgroup2'], name), pin_root=os.path.join(BPFFS, name),
                dir=os.path.join(self.dir, 'host%02d' % i)))
        self.save()

    def save(self):
        tmp = os.path.join(self.dir, 'state.json.tmp')
        with open(tmp, 'w') as f:
            json.dump(self.state, f, indent=1)
        os.replace(tmp, os.path.join(self.dir, 'state.json'))

    @property
    def inventory(self):
        return os.path.join(self.dir, 'inventory.yml')

    @property
    def control_dir(self):
        return os.path.join(self.dir, 'cp')

    def env(self):
        """Environment for ansible against the fleet (own control sockets, its known_hosts)."""
        ssh_args = ('-o ControlMaster=auto -o ControlPersist=60s -o ControlPath=%s/%%C '
                    '-o UserKnownHostsFile=%s/known_hosts -o StrictHostKeyChecking=yes'
                    % (self.control_dir, self.dir))
        return dict(os.environ, ANSIBLE_SSH_ARGS=ssh_args, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS,
                    ANSIBLE_NOCOLOR='1', FLEET_INVENTORY=self.inventory, FLEET_DIR=self.dir,
                    PATH=VENV_BIN + os.pathsep + os.environ.get('PATH', ''))

    # -- up ----------------------------------------------------------------

    def up(self):
        st = self.state
        os.makedirs(self.control_dir, mode=0o700)
        if st['made_sshd_dir']:
            os.makedirs('/run/sshd', mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        hostkey = os.path.join(self.dir, 'ssh_host_ed25519_key')
        sh('ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C', 'fleet-%s' % st['id'], '-f', hostkey)
        with open(hostkey + '.pub') as f:
            hostpub = ' '.join(f.read().split()[:2])
        sh('ip', 'link', 'add', st['bridge'], 'type', 'bridge')
        sh('ip', 'addr', 'add', st['subnet'] + '.1/24', 'dev', st['bridge'])
        sh('ip', 'link', 'set', st['bridge'], 'up')
        known = []
        for h in st['hosts']:
            os.makedirs(h['dir'], mode=0o700)
            sh('ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C', h['name'], '-f', os.path.join(h['dir'], 'id'))
            shutil.copy(os.path.join(h['dir'], 'id.pub'), os.path.join(h['dir'], 'authorized_keys'))
            sh('ip', 'netns', 'add', h['netns'])
            sh('ip', 'link', 'add', h['veth'], 'type', 'veth', 'peer', 'name', 'eth0', 'netns', h['netns'])
            sh('ip', 'link', 'set', h['veth'], 'master', st['bridge'], 'up')
            for cmd in (['ip', 'addr', 'add', h['addr'] + '/24', 'dev', 'eth0'],
                        ['ip', 'link', 'set', 'eth0', 'up'], ['ip', 'link', 'set', 'lo', 'up']):
                sh('ip', 'netns', 'exec', h['netns'], *cmd)
            os.mkdir(h['cgroup'])
            config = os.path.join(h['dir'], 'sshd_config')
            with open(config, 'w') as f:
                f.write('\n'.join([
                    'ListenAddress %s' % h['addr'], 'Port 22', 'HostKey %s' % hostkey,
                    'AuthorizedKeysFile %s' % os.path.join(h['dir'], 'authorized_keys'),
                    'PermitRootLogin prohibit-password', 'PasswordAuthentication no',
                    'KbdInteractiveAuthentication no', 'UsePAM no', 'PidFile %s' % os.path.join(h['dir'], 'sshd.pid'),
                    'Subsystem sftp internal-sftp', 'MaxSessions 32', 'MaxStartups 64', '']))
            # nsenter, not `ip netns exec`: that one also remounts /sys, which would hide this
            # machine's cgroup2 and bpffs mounts from the sessions.
            proc = subprocess.Popen(['nsenter', '--net=/run/netns/' + h['netns'], SSHD, '-D', '-e', '-f', config],
                                    stdout=subprocess.DEVNULL,
                                    stderr=open(os.path.join(h['dir'], 'sshd.log'), 'w'))
            st['pids'][h['name']] = proc.pid
            self.save()
            known.append('%s %s' % (h['addr'], hostpub))
        with open(os.path.join(self.dir, 'known_hosts'), 'w') as f:
            f.write('\n'.join(known) + '\n')
        self._write_inventory()
        self._wait_for_sshd()
        return self

    def _write_inventory(self):
        hosts = {}
        for h in self.state['hosts']:
            hosts[h['name']] = dict(
                ansible_host=h['addr'], ansible_user='root',
                ansible_ssh_private_key_file=os.path.join(h['dir'], 'id'),
                sockredir_cgroup=h['cgroup'], sockredir_pin_root=h['pin_root'],
                sockredir_src_dir=os.path.join(h['dir'], 'bpf'))
        # One dpkg database behind all hosts: 16 concurrent apt runs would fight over its lock.
        # Install once on this machine (scripts/bootstrap.sh); a play may override per host.
        inventory = dict(sockredir_hosts=dict(
            hosts=hosts, vars=dict(ansible_python_interpreter='/usr/bin/python3',
                                   sockredir_install_packages=False)))
        with open(self.inventory, 'w') as f:
            json.dump(inventory, f, indent=1)  # JSON is YAML

    def _wait_for_sshd(self, timeout=20):
        deadline = time.monotonic() + timeout
        for h in self.state['hosts']:
            while True:
                r = subprocess.run(['ip', 'netns', 'exec', h['netns'], 'ss', '-Hltn', 'src', h['addr'],
                                    'sport', '= :22'], capture_output=True, text=True, check=False)
                if r.stdout.strip():
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError('sshd of %s did not listen within %ss: %s' % (
                        h['name'], timeout, open(os.path.join(h['dir'], 'sshd.log')).read()))
                time.sleep(0.05)

    # -- down --------------------------------------------------------------

    def down(self):
        """Undo everything; every step runs even when an earlier one fails. Returns what failed."""
        st = self.state
        errors = []

        def step(what, fn, *args):
            try:
                fn(*args)
            except Exception as e:  # keep going: leave as little as possible behind
                errors.append('%s: %s' % (what, e))

        if os.path.isdir(self.control_dir):
            for sock in os.listdir(self.control_dir):
                subprocess.run(['ssh', '-o', 'ControlPath=%s' % os.path.join(self.control_dir, sock),
                                '-O', 'exit', 'fleet'], capture_output=True, check=False)
        # Whatever still names the state dir was started for this fleet (an interrupted ansible's
        # workers and their ssh): end those by pid.
        step('end processes of the fleet', _kill_pids, _pids_naming(self.dir))
        for h in st['hosts']:
            pid = st['pids'].get(h['name'])
            if pid:
                step('stop sshd of %s' % h['name'], _kill_wait, pid)
            if os.path.exists('/run/netns/' + h['netns']):
                step('kill processes in %s' % h['netns'], _kill_netns, h['netns'])
                step('delete netns %s' % h['netns'], sh, 'ip', 'netns', 'del', h['netns'])
            if os.path.isdir(h['cgroup']):
                step('remove cgroup %s' % h['cgroup'], _remove_cgroup, h['cgroup'])
            step('remove pins %s' % h['pin_root'], _remove_pin_root, h['pin_root'])
        if subprocess.run(['ip', 'link', 'show', st['bridge']], capture_output=True, check=False).returncode == 0:
            step('delete bridge', sh, 'ip', 'link', 'del', st['bridge'])
        if st.get('made_sshd_dir') and os.path.isdir('/run/sshd'):
            step('remove /run/sshd', _rmdir_if_empty, '/run/sshd')
        if not errors:
            shutil.rmtree(self.dir, ignore_errors=True)
        return errors


def _kill_wait(pid, timeout=5):
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:  # not our child (down from another process): poll
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def _pids_naming(text):
    pids = []
    for pid in os.listdir('/proc'):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open('/proc/%s/cmdline' % pid, 'rb') as f:
                if text.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def _kill_pids(pids):
    kill_now(pids)  # SIGKILL
    for _attempt in range(50):
        if not [p for p in pids if os.path.exists('/proc/%d' % p) and not _zombie(p)]:
            return
        time.sleep(0.1)
    raise RuntimeError('pids %s did not exit' % pids)


def _zombie(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except OSError:
        return True


def _kill_netns(netns):
    for _attempt in range(50):
        pids = [int(p) for p in sh('ip', 'netns', 'pids', netns, capture=True).stdout.split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise RuntimeError('processes remain in %s' % netns)


def _remove_cgroup(path):
    kill_cgroup(path)
    for _attempt in range(50):
        try:
            os.rmdir(path)
            return
        except OSError:
            time.sleep(0.1)
    os.rmdir(path)


def _remove_pin_root(pin_root):
    """Unpin what a play left under the host's pin root, and bpf_program's records of it."""
    import hashlib
    if not os.path.isdir(pin_root):
        return
    for top, dirs, files in os.walk(pin_root, topdown=False):
        for name in files:
            os.unlink(os.path.join(top, name))
            record = os.path.join(RECORD_DIR, hashlib.sha256(top.encode()).hexdigest()[:16] + '.json')
            if os.path.exists(record):
                os.unlink(record)
        os.rmdir(top)


def _rmdir_if_empty(path):
    if not os.listdir(path):
        os.rmdir(path)


def run_group(cmd, env, capture=True):
    """subprocess.run in a process group of its own: interrupted, the whole group is killed."""
    kw = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) if capture else {}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, **kw)
    try:
        out, err = proc.communicate()
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def timed(cmd, env):
    start = time.monotonic()
    proc = run_group(cmd, env)
    return proc, round(time.monotonic() - start, 2)


def demo(fleet, forks):
    env = fleet.env()
    n = len(fleet.state['hosts'])
    out = dict(hosts=n, forks=forks)
    for label in ('ping_cold', 'ping_warm'):
        proc, secs = timed(['ansible', 'all', '-i', fleet.inventory, '-m', 'ansible.builtin.ping',
                            '-f', str(forks)], env)
        ok = proc.stdout.count(' | SUCCESS')
        if proc.returncode or ok != n:
            raise RuntimeError('ping: %d of %d hosts answered:\n%s%s' % (ok, n, proc.stdout, proc.stderr))
        out[label + '_s'] = secs
    play = os.path.join(fleet.dir, 'trivial.yml')
    with open(play, 'w') as f:
        json.dump([dict(name='Trivial play', hosts='sockredir_hosts', gather_facts=False, tasks=[
            dict(name='Which namespace answers', **{'ansible.builtin.command': 'ip -o -4 addr show dev eth0'},
                 register='addr', changed_when=False),
            dict(name='It is the host inventory says', **{'ansible.builtin.assert': dict(
                that=["ansible_host + '/24' in addr.stdout"], quiet=True)}),
            dict(name='Its own cgroup exists', **{'ansible.builtin.stat': dict(path='{{ sockredir_cgroup }}')},
                 register='cg', failed_when='not cg.stat.isdir')])], f)
    proc, secs = timed(['ansible-playbook', '-i', fleet.inventory, '-f', str(forks), play], env)
    recap = [line for line in proc.stdout.splitlines() if ' ok=' in line]
    if proc.returncode or len(recap) != n or any('failed=0' not in line for line in recap):
        raise RuntimeError('trivial play failed:\n%s%s' % (proc.stdout[-3000:], proc.stderr[-2000:]))
    out['playbook_s'] = secs
    return out


def leftovers(fid, settle=10.0):
    """Names of this fleet still present anywhere: must be [] after down().

    The kernel removes a namespace's links in a work item after `ip netns delete`
    returns, so what is still there is looked at again for up to `settle` seconds.
    """
    deadline = time.monotonic() + settle
    while True:
        found = _present(fid)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _present(fid):
    found = []
    found += [n for n in sh('ip', 'netns', 'list', capture=True).stdout.split() if fid in n]
    links = sh('ip', '-o', 'link', capture=True).stdout.splitlines()
    found += [line.split(':')[1].strip().split('@')[0] for line in links if fid in line]
    found += [n for n in os.listdir(cgroup2_mount()) if fid in n]
    found += [n for n in os.listdir(BPFFS) if fid in n]
    found += [n for n in os.listdir(STATE_ROOT) if fid in n]
    found += ['pid %s' % p for p in sh('pgrep', '-f', 'fleet-%s' % fid, check=False, capture=True).stdout.split()
              if int(p) != os.getpid()]  # `down STATE_DIR` names the fleet itself
    return found


def _on_signal(signum, frame):
    raise SystemExit(128 + signum)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
    sub = ap.add_subparsers(dest='cmd', required=True)
    for name in ('demo', 'run', 'up'):
        p = sub.add_parser(name)
        p.add_argument('--hosts', type=int, default=16)
        p.add_argument('--forks', type=int, default=8)
        if name == 'run':
            p.add_argument('command', nargs=argparse.REMAINDER)
    p = sub.add_parser('down')
    p.add_argument('state_dir')
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit('fleet.py: run as root (network namespaces, sshd, cgroups)')
    signal.signal(signal.SIGTERM, _on_signal)

    if args.cmd == 'down':
        fleet = Fleet(state_dir=args.state_dir)
        errors = fleet.down()
        print(json.dumps(dict(down=fleet.state['id'], errors=errors, leftovers=leftovers(fleet.state['id']))))
        sys.exit(1 if errors else 0)

    start = time.monotonic()
    fleet = Fleet(args.hosts)
    keep = False
    rc = 0
    result = dict(state_dir=fleet.dir)
    try:
        fleet.up()
        result['up_s'] = round(time.monotonic() - start, 2)
        if args.cmd == 'up':
            keep = True
            print(json.dumps(dict(result, inventory=fleet.inventory, env=dict(
                ANSIBLE_SSH_ARGS=fleet.env()['ANSIBLE_SSH_ARGS']))))
            return
        if args.cmd == 'demo':
            result.update(demo(fleet, args.forks))
        else:
            command = args.command[1:] if args.command[:1] == ['--'] else args.command
            rc = run_group(command, fleet.env(), capture=False).returncode
            result['command_rc'] = rc
    finally:
        if not keep:
            t = time.monotonic()
            result['down_errors'] = fleet.down()
            result['down_s'] = round(time.monotonic() - t, 2)
            result['leftovers'] = leftovers(fleet.state['id'])
            print(json.dumps(result), file=sys.stderr if args.cmd == 'run' else sys.stdout)
            if result['down_errors'] or result['leftovers']:
                rc = rc or 1
    sys.exit(rc)


if __name__ == '__main__':
    main()
