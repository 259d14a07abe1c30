"""The VM scenarios (molecule/vm, molecule/vm-nosockmap) without booting them:
syntax, lint, the image script and the guest-side helpers.

The scenarios themselves boot a qemu guest and take minutes; scripts/test.sh
runs them with molecule (see docs/vm.md). Nothing here starts a VM or builds
an image.
"""

import os
import re
import subprocess

import pytest

# ansible_env is a fixture
from test_role import INVENTORY, REPO, ansible_env, run, tool  # noqa: F401 # pylint: disable=unused-import

SCRIPT = os.path.join(REPO, 'scripts', 'vm-image.sh')
PLAYBOOKS = [
    'molecule/vm/create.yml',
    'molecule/vm/prepare.yml',
    'molecule/vm/converge.yml',
    'molecule/vm/verify.yml',
    'molecule/vm/cleanup.yml',
    'molecule/vm/destroy.yml',
    'molecule/vm-nosockmap/prepare.yml',
    'molecule/vm-nosockmap/verify.yml',
    'molecule/vm-nosockmap/role.yml',
    'molecule/vm-nosockmap/destroy.yml',
]
GUEST_SCRIPTS = [
    'molecule/vm-nosockmap/files/deny_sockmap.py',
    'molecule/vm-nosockmap/files/snapshot.py',
]


@pytest.mark.parametrize('playbook', PLAYBOOKS)
def test_syntax_check(playbook, ansible_env):
    rc, out = run([tool('ansible-playbook'), '--syntax-check', '-i', INVENTORY, playbook], ansible_env)
    assert rc == 0, out


def test_ansible_lint(ansible_env):
    # vm-nosockmap's files one by one: given as a directory, ansible-lint takes
    # it for a role (it has vars/ and files/) and objects to the name
    nosockmap = sorted(os.path.relpath(os.path.join(d, f), REPO)
                       for d, _dirs, files in os.walk(os.path.join(REPO, 'molecule', 'vm-nosockmap'))
                       for f in files if f.endswith('.yml'))
    rc, out = run([tool('ansible-lint'), '--offline', '--nocolor', 'molecule/vm'] + nosockmap, ansible_env)
    assert rc == 0, out


@pytest.mark.parametrize('path', GUEST_SCRIPTS)
def test_guest_scripts_compile(path):
    """They run under the guest's Python 3.11; the host's compiles them the same."""
    with open(os.path.join(REPO, path)) as f:
        compile(f.read(), path, 'exec')


def test_image_script_parses():
    proc = subprocess.run(['bash', '-n', SCRIPT], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason='the image script runs as root')
def test_image_cache_key_is_stable(tmp_path):
    """--path names the cache entry without building: the same one twice,
    under $SOCKREDIR_VM_CACHE, keyed by 16 hex digits."""
    env = dict(os.environ, SOCKREDIR_VM_CACHE=str(tmp_path))
    first = subprocess.run(['bash', SCRIPT, '--path'], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(['bash', SCRIPT, '--path'], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert first.stdout == second.stdout
    assert re.fullmatch(re.escape(str(tmp_path)) + r'/[0-9a-f]{16}\n', first.stdout)
    assert os.listdir(tmp_path) == []  # nothing built, nothing locked
