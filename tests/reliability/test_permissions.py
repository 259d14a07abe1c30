"""Permissions: an unprivileged user can neither read nor replace the pins, and nothing is world-writable.

Checked as the user nobody, through runuser and through setpriv (no
capabilities, no supplementary groups), against what the role made on this
host: the pin root and its pins, the sources, the engine's records and
bpf_program's records and header cache.
"""

import os
import stat
import subprocess

import pytest

import conftest
from support import hostenv

from ansible_collections.ebpf.sockredir.plugins.module_utils import instance

from . import kit

AS_NOBODY = {
    'runuser': ['runuser', '-u', 'nobody', '--'],
    'setpriv': ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', '--inh-caps=-all', '--'],
}


@pytest.fixture(scope='module')
def converged(tmp_path_factory):
    workdir = tmp_path_factory.mktemp('permissions')
    with hostenv.child_cgroup(kit.PREFIX) as cg:
        role = kit.RoleInstance(workdir, cg)
        try:
            run = role.run('present')
            assert run.rc == 0, run
            yield role
        finally:
            role.cleanup()


def test_pin_root_and_pins_belong_to_root_alone(converged):
    root = os.stat(converged.pin_root)
    assert root.st_uid == 0 and stat.S_IMODE(root.st_mode) & 0o077 == 0, oct(root.st_mode)
    names = os.listdir(converged.pin_root)
    assert names
    for name in names:
        info = os.lstat(os.path.join(converged.pin_root, name))
        assert info.st_uid == 0 and stat.S_IMODE(info.st_mode) & 0o077 == 0, (name, oct(info.st_mode))


def attempts(pin_root):
    pin = os.path.join(pin_root, 'sockredir_ops')
    return {
        'list the pin root': ['ls', pin_root],
        'read a pin': ['cat', os.path.join(pin_root, 'sockredir_hash')],
        'remove a pin': ['rm', '-f', pin],
        'rename a pin': ['mv', pin, pin + '.moved'],
        'plant a symlink': ['ln', '-sf', '/sys/fs/bpf', pin],
        'make a directory': ['mkdir', os.path.join(pin_root, 'squat')],
        'open the map through bpf()': ['bpftool', 'map', 'show', 'pinned', os.path.join(pin_root, 'sockredir_hash')],
        'open the program through bpf()': ['bpftool', 'prog', 'show', 'pinned', pin],
    }


@pytest.mark.parametrize('how', sorted(AS_NOBODY))
def test_an_unprivileged_user_can_neither_read_nor_replace_pins(converged, how):
    before = converged.program_ids()
    pins_before = sorted(os.listdir(converged.pin_root))
    # the control: the user can run commands at all, and is who we think
    whoami = subprocess.run(AS_NOBODY[how] + ['id', '-u'], capture_output=True, text=True, timeout=30, check=False)
    assert whoami.returncode == 0 and whoami.stdout.strip() == '65534', whoami
    allowed = {}
    for what, command in sorted(attempts(converged.pin_root).items()):
        proc = subprocess.run(AS_NOBODY[how] + command, capture_output=True, text=True, timeout=30, check=False)
        if proc.returncode == 0:
            allowed[what] = proc.stdout[-300:]
    assert allowed == {}
    assert sorted(os.listdir(converged.pin_root)) == pins_before
    assert converged.program_ids() == before
    assert converged.attached() == (['sockredir_ops'], 'sockredir_msg')


def made_by_the_role(role):
    yield role.pin_root
    for top in (role.src_dir, os.path.dirname(instance.RECORD_DIR), '/run/ebpf-sockredir', '/var/cache/ebpf-sockredir'):
        if not os.path.exists(top):
            continue
        yield top
        for directory, dirs, files in os.walk(top):
            for name in dirs + files:
                yield os.path.join(directory, name)


def test_nothing_the_role_made_is_world_writable(converged):
    writable, sources_writable = [], []
    for path in made_by_the_role(converged):
        try:
            info = os.lstat(path)
        except FileNotFoundError:  # another run of the role on this host removed it meanwhile
            continue
        if stat.S_ISLNK(info.st_mode):
            continue
        if info.st_mode & stat.S_IWOTH:
            writable.append((path, oct(info.st_mode)))
        # compiled and loaded as root: nobody else may change them
        if path.startswith(converged.src_dir) and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            sources_writable.append((path, oct(info.st_mode)))
    assert writable == []
    assert sources_writable == []


def test_a_pin_root_made_by_an_unprivileged_user_is_refused(tmp_path):
    pin_root = os.path.join(conftest.BPFFS, hostenv.unique_name(kit.PREFIX + '-squat'))
    with hostenv.child_cgroup(kit.PREFIX) as cg:
        subprocess.run(AS_NOBODY['runuser'] + ['mkdir', pin_root], check=True, timeout=30)
        try:
            assert os.stat(pin_root).st_uid == 65534
            result = kit.run_tasks(tmp_path, conftest.converge_tasks(pin_root, cg), name='squat')
            load = result.tasks.get('load', {})
            assert load.get('failed') and 'pin_dir' in str(load.get('msg')), load
            assert os.listdir(pin_root) == []
        finally:
            kit.run_tasks(tmp_path, conftest.teardown_tasks(pin_root, cg), name='squat-teardown')
            conftest.remove_pin_dir(pin_root)   # pins and bpf_program's record
