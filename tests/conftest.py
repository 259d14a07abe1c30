"""Shared fixtures: a child cgroup, a private pin directory, and a playbook runner.

Every test gets its own names, and every fixture undoes what it made, also when
the test fails. Nothing attaches to the root cgroup.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(REPO, '.venv', 'bin')
COLLECTIONS = os.path.join(REPO, '.venv', 'collections')
BPFFS = '/sys/fs/bpf'

sys.path.insert(0, os.path.join(REPO, 'tests'))
sys.path.insert(0, COLLECTIONS)

from support import hostenv  # noqa: E402
# MAPS, OBJECT, PROGRAMS: imported from here by the test modules
from support.plays import MAPS, OBJECT, PROGRAMS, SRC, converge_tasks, remove_pin_dir, teardown_tasks  # noqa: E402,F401,E501 # pylint: disable=unused-import


def _is_mountpoint(path):
    return subprocess.run(['mountpoint', '-q', path], check=False).returncode == 0


@pytest.fixture(scope='session', autouse=True)
def bpffs():
    """bpffs at /sys/fs/bpf for the session; unmounted after if we mounted it."""
    mounted_here = False
    if not _is_mountpoint(BPFFS):
        subprocess.run(['mount', '-t', 'bpf', 'bpf', BPFFS], check=True)
        mounted_here = True
    yield BPFFS
    if mounted_here:
        subprocess.run(['umount', BPFFS], check=False)


def bpftool_json(*args):
    out = subprocess.run(['bpftool', '-j'] + list(args), check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip() or '[]')


def loaded_sockmap_prog_ids():
    return sorted(p['id'] for p in bpftool_json('prog', 'show')
                  if p.get('type') in ('sock_ops', 'sk_msg'))


@pytest.fixture
def pin_dir(request):
    path = os.path.join(BPFFS, hostenv.unique_name('srtest'))
    yield path
    remove_pin_dir(path)


@pytest.fixture
def cgroup():
    # Removing the cgroup releases whatever is attached to it.
    with hostenv.child_cgroup('srtest') as cg:
        yield cg


class PlayResult(object):
    def __init__(self, proc, data):
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.data = data
        self.stats = data['stats']['localhost'] if data else {}
        self.tasks = {}
        for play in (data or {}).get('plays', []):
            for task in play['tasks']:
                self.tasks[task['task']['name']] = task['hosts'].get('localhost', {})

    @property
    def changed(self):
        return self.stats.get('changed')

    def __repr__(self):
        return 'PlayResult(rc=%s, stats=%s, stderr=%s)' % (self.rc, self.stats, self.stderr[-2000:])


def run_play(tmp_path, tasks, *args, name='play'):
    """Run tasks on localhost through ansible-playbook; results by task name."""
    play = [dict(hosts='localhost', gather_facts=False, tasks=tasks)]
    path = tmp_path / ('%s.yml' % name)
    path.write_text(json.dumps(play, indent=1))
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK='ansible.posix.json',
               ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_NOCOLOR='1',
               ANSIBLE_LOCALHOST_WARNING='false', ANSIBLE_INVENTORY_UNPARSED_WARNING='false')
    proc = subprocess.run([os.path.join(VENV_BIN, 'ansible-playbook'), '-i', 'localhost,', '-c', 'local',
                           '-e', 'ansible_python_interpreter=/usr/bin/python3', str(path)] + list(args),
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        data = None
    return PlayResult(proc, data)


@pytest.fixture
def play(tmp_path):
    counter = [0]

    def _run(tasks, *args):
        counter[0] += 1
        return run_play(tmp_path, tasks, *args, name='play%d' % counter[0])
    return _run


@pytest.fixture
def redirected(play, pin_dir, cgroup):
    """Redirection converged on a fresh child cgroup; yields (pin_dir, cgroup)."""
    result = play(converge_tasks(pin_dir, cgroup))
    assert result.rc == 0, result
    yield pin_dir, cgroup
    # detach msg from the map explicitly (the map would keep it while pinned)
    play(teardown_tasks(pin_dir, cgroup))


def copy_sources(tmp_path):
    """A private copy of files/bpf, for tests that edit the source."""
    dst = tmp_path / 'bpf'
    shutil.copytree(os.path.dirname(SRC), dst)
    return str(dst / os.path.basename(SRC))
