"""README's installation and quick start, run as written in an empty directory.

The three blocks marked <!-- quickstart:... --> in README.md are taken from the
file (so the test follows the README, not a copy of it): the install commands,
site.yml, and the two ansible-playbook commands. Only two things are swapped:
the checkout's path for /path/to/ebpf.sockredir, and a child cgroup of this
test's own for system.slice/myapp.service; the pin root gets a name of its
own too (-e), so nothing shared on the host is touched.
"""

import os
import re
import subprocess

import pytest

from conftest import REPO, VENV_BIN
from support import hostenv


def block(name):
    text = open(os.path.join(REPO, 'README.md')).read()
    found = re.search(r'<!-- quickstart:%s -->\n```\w*\n(.*?)```' % re.escape(name), text, re.S)
    assert found, 'README.md has no quickstart:%s block' % name
    return found.group(1)


def commands(name):
    return [line for line in block(name).splitlines() if line.strip() and not line.startswith('#')]


def run(line, cwd, extra=''):
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ['PATH'], ANSIBLE_NOCOLOR='1',
               ANSIBLE_LOCALHOST_WARNING='false', ANSIBLE_INVENTORY_UNPARSED_WARNING='false')
    env.pop('ANSIBLE_COLLECTIONS_PATH', None)   # the quick start sets its own
    proc = subprocess.run(line + extra, shell=True, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    return proc


def recap_changed(out):
    found = re.findall(r'^localhost\s*:.*?changed=(\d+).*?failed=(\d+)', out, re.M)
    assert found, out[-3000:]
    changed, failed = found[-1]
    assert failed == '0', out[-3000:]
    return int(changed)


@pytest.fixture
def cgroup():
    with hostenv.child_cgroup('srreadme') as path:
        yield path


def test_readme_install_and_quick_start_as_written(tmp_path, cgroup):
    for line in commands('install'):
        proc = run(line.replace('/path/to/ebpf.sockredir', REPO), tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / 'collections' / 'ansible_collections' / 'ebpf' / 'sockredir' / 'galaxy.yml').exists() or \
        (tmp_path / 'collections' / 'ansible_collections' / 'ebpf' / 'sockredir' / 'MANIFEST.json').exists()

    relative = os.path.relpath(cgroup, hostenv.cgroup2_mount())
    site = block('site.yml').replace('system.slice/myapp.service', relative)
    assert relative in site
    (tmp_path / 'site.yml').write_text(site)

    pin_root = '/sys/fs/bpf/' + hostenv.unique_name('srreadme')
    extra = ' -e sockredir_pin_root=' + pin_root
    present, absent = commands('run')
    try:
        first = run(present, tmp_path, extra)
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
        assert recap_changed(first.stdout) > 0
        assert os.path.exists(os.path.join(pin_root, 'sockredir_hash'))
        with open(os.path.join(cgroup, 'cgroup.procs')):
            pass
        attached = subprocess.run(['bpftool', '-j', 'cgroup', 'show', cgroup], capture_output=True,
                                  text=True, check=True).stdout
        assert 'sockredir_ops' in attached

        second = run(present, tmp_path, extra)
        assert second.returncode == 0, second.stdout[-4000:]
        assert recap_changed(second.stdout) == 0
    finally:
        gone = run(absent, tmp_path, extra)
    assert gone.returncode == 0, gone.stdout[-4000:] + gone.stderr[-2000:]
    assert not os.path.exists(pin_root)
    attached = subprocess.run(['bpftool', '-j', 'cgroup', 'show', cgroup], capture_output=True,
                              text=True, check=True).stdout
    assert 'sockredir_ops' not in attached
