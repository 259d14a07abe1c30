"""The role and its playbooks: syntax, lint, and the checks that run before
anything changes on a host (argument specs, preflight).

Nothing here changes the host: the role runs only in check mode, and only up
to a failure that is the point of the test.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROLE = os.path.join(REPO, 'roles', 'sockredir')
INVENTORY = os.path.join(REPO, 'examples', 'inventory.yml')

PLAYBOOKS = [
    'examples/rollout.yml',
    'examples/remove.yml',
    'molecule/default/create.yml',
    'molecule/default/prepare.yml',
    'molecule/default/converge.yml',
    'molecule/default/verify.yml',
    'molecule/default/cleanup.yml',
    'molecule/default/destroy.yml',
]


def tool(name):
    """A tool of the venv pytest runs from, else from PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    found = beside if os.access(beside, os.X_OK) else shutil.which(name)
    if not found:
        pytest.skip('%s is not installed (run scripts/bootstrap.sh)' % name)
    return found


@pytest.fixture(scope='module')
def ansible_env(tmp_path_factory):
    """The collection as Ansible looks for it, linked from this tree, so the
    tests check the files here and not some installed copy."""
    root = tmp_path_factory.mktemp('collections')
    os.makedirs(os.path.join(root, 'ansible_collections', 'ebpf'))
    os.symlink(REPO, os.path.join(root, 'ansible_collections', 'ebpf', 'sockredir'))
    env = dict(os.environ)
    env.update(ANSIBLE_COLLECTIONS_PATH=str(root), ANSIBLE_NOCOLOR='1', ANSIBLE_FORCE_COLOR='0',
               ANSIBLE_DEPRECATION_WARNINGS='0', NO_COLOR='1',
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', ''))
    return env


def run(argv, env, cwd=REPO, timeout=600):
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize('playbook', PLAYBOOKS)
def test_syntax_check(playbook, ansible_env):
    rc, out = run([tool('ansible-playbook'), '--syntax-check', '-i', INVENTORY, playbook], ansible_env)
    assert rc == 0, out


def test_ansible_lint(ansible_env):
    rc, out = run([tool('ansible-lint'), '--offline', '--nocolor',
                   'examples', 'roles/sockredir', 'molecule/default'], ansible_env)
    assert rc == 0, out


def test_every_variable_is_documented_and_validated():
    with open(os.path.join(ROLE, 'defaults', 'main.yml')) as f:
        defaults = yaml.safe_load(f)
    with open(os.path.join(ROLE, 'meta', 'argument_specs.yml')) as f:
        options = yaml.safe_load(f)['argument_specs']['main']['options']
    assert sorted(defaults) == sorted(options)
    for name, spec in options.items():
        assert name.startswith('sockredir_'), name
        assert spec.get('description') and spec.get('type'), name
        assert spec.get('default') == defaults[name], name


def write_play(tmp_path, role_vars):
    """A one-host play of the role on this host, variables given typed (JSON)."""
    play = [dict(name='role under test', hosts='all', gather_facts=False,
                 roles=[dict(role='ebpf.sockredir.sockredir')])]
    (tmp_path / 'play.yml').write_text(yaml.safe_dump(play))
    (tmp_path / 'vars.json').write_text(json.dumps(role_vars))
    return [tool('ansible-playbook'), '-i', 'localhost,', '-c', 'local',
            '-e', 'ansible_python_interpreter=/usr/bin/python3',
            '-e', '@' + str(tmp_path / 'vars.json'), '--check', str(tmp_path / 'play.yml')]


@pytest.mark.parametrize('name,value,expected', [
    ('sockredir_state', 'maybe', 'value of sockredir_state must be one of: present, absent'),
    ('sockredir_map_size', 'lots', "argument 'sockredir_map_size' is of type"),
    ('sockredir_allow_ports', ['http'], 'sockredir_allow_ports'),
    ('sockredir_bpffs_persist', 'sometimes', "argument 'sockredir_bpffs_persist' is of type"),
])
def test_a_wrong_variable_fails_with_its_name(tmp_path, ansible_env, name, value, expected):
    rc, out = run(write_play(tmp_path, {name: value}), ansible_env)
    assert rc != 0, out
    assert 'Validation of arguments failed' in out, out
    assert expected in out, out


def test_preflight_reports_every_problem_at_once(tmp_path, ansible_env):
    bad = dict(sockredir_pin_root='/tmp/not-on-bpffs',
               sockredir_allow_ports=[0, 80, 70000],
               sockredir_deny_ports=list(range(1000, 2030)),
               sockredir_cgroup='app/../../escape',
               sockredir_map_size=0,
               sockredir_install_packages=False)
    rc, out = run(write_play(tmp_path, bad), ansible_env)
    assert rc != 0, out
    assert 'sockredir cannot run on localhost, nothing was changed' in out, out
    for expected in ('sockredir_pin_root: /tmp/not-on-bpffs must be a directory below bpffs_mount (/sys/fs/bpf)',
                     'ports must be 1-65535, got 0, 70000',
                     'sockredir_allow_ports/sockredir_deny_ports: at most 1024 ports in all (the size of the sockredir_ports map), got 1033',
                     'sockredir_cgroup: app/../../escape must not contain ".."',
                     'sockredir_map_size: must be 1-134217728 (the largest sockhash the kernel creates), got 0'):
        assert expected in out, out
    # the failure comes before the first task that could change anything
    assert 'Install what the loader needs' not in out and 'TASK [ebpf.sockredir.sockredir : Mount]' not in out, out
