"""Redirection after a reboot: the role's boot unit, run the way systemd runs it.

PID 1 here is not systemd, so the unit cannot be started with systemctl. The
test does what a reboot and systemd would do instead: converge the role with
sockredir_boot_persist on a child cgroup and a private bpffs, then drop all
kernel state by hand (detach with bpftool, unmount the bpffs: what a reboot
loses; the instance's record in /var/lib stays), parse the installed unit file and run its
ExecStartPre= and ExecStart= commands in order, as root, in systemd's
environment. bpftool is the witness that the programs are pinned and attached
again, and a transfer in the cgroup shows the bytes redirected. A second
converge then changes nothing (the boot made the role's own engine call with
the role's parameters), and state=absent removes the unit and the engine.
"""

import json
import os
import secrets
import shlex
import shutil
import subprocess

import pytest
import yaml

from conftest import COLLECTIONS, PlayResult, REPO, VENV_BIN, bpftool_json
from support import hostenv

from ansible_collections.ebpf.sockredir.plugins.module_utils import facts, instance

UNIT = '/etc/systemd/system/ebpf-sockredir.service'
WANTS = '/etc/systemd/system/multi-user.target.wants/ebpf-sockredir.service'
LIB = '/usr/local/lib/ebpf-sockredir'
ENGINE = os.path.join(LIB, 'ansible_collections/ebpf/sockredir/plugins/module_utils')
CLI = os.path.join(REPO, 'files', 'boot', 'sockredir-apply.py')
# the environment systemd gives a system service (systemd.exec(5))
SYSTEMD_ENV = {'PATH': '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', 'LANG': 'C.UTF-8'}
MIB = 1 << 20


def run_role(tmp_path, role_vars, name, bindir=VENV_BIN, collections=COLLECTIONS):
    """The role on this host, as demo/site.yml runs it; PlayResult of the run."""
    play = [dict(name='sockredir', hosts='localhost', connection='local', gather_facts=True,
                 vars=dict(ansible_python_interpreter='/usr/bin/python3'),
                 roles=[dict(role='ebpf.sockredir.sockredir')])]
    (tmp_path / ('%s.yml' % name)).write_text(yaml.safe_dump(play))
    (tmp_path / ('%s.json' % name)).write_text(json.dumps(role_vars))
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK='ansible.posix.json', ANSIBLE_COLLECTIONS_PATH=collections,
               ANSIBLE_NOCOLOR='1', ANSIBLE_LOCALHOST_WARNING='false',
               ANSIBLE_INVENTORY_UNPARSED_WARNING='false')
    proc = subprocess.run([os.path.join(bindir, 'ansible-playbook'), '-i', 'localhost,',
                           '-e', '@%s' % (tmp_path / ('%s.json' % name)), str(tmp_path / ('%s.yml' % name))],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        data = None
    return PlayResult(proc, data)


def unit_commands(path):
    """ExecStartPre=, ExecStart=, ExecStartPost= of a unit file, in the order systemd runs them.

    Each is (argv, may_fail); '-' lets a command fail. Lines continued with a
    trailing backslash are joined; '%' specifiers must not appear (none are
    expanded here).
    """
    commands = {'ExecStartPre': [], 'ExecStart': [], 'ExecStartPost': []}
    section = None
    with open(path) as f:
        text = f.read().replace('\\\n', ' ')
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in '#;':
            continue
        if line.startswith('['):
            section = line
            continue
        key, _sep, value = line.partition('=')
        if section == '[Service]' and key.strip() in commands:
            value = value.strip()
            may_fail = False
            while value and value[0] in '-@:+!':
                may_fail = may_fail or value[0] == '-'
                assert value[0] in '-', 'prefix %r is not handled by this test' % value[0]
                value = value[1:]
            assert '%' not in value, 'unit specifiers are not expanded here: %s' % value
            commands[key.strip()].append((shlex.split(value), may_fail))
    return commands['ExecStartPre'] + commands['ExecStart'] + commands['ExecStartPost']


def run_as_systemd(path):
    """Run the unit's start commands as systemd would: root, cwd /, stdin /dev/null, its env."""
    outputs = []
    for argv, may_fail in unit_commands(path):
        proc = subprocess.run(argv, cwd='/', env=SYSTEMD_ENV, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=300, check=False)
        outputs.append((argv, proc))
        assert proc.returncode == 0 or may_fail, '%s failed (%d): %s%s' % (
            argv, proc.returncode, proc.stdout, proc.stderr)
    return outputs


def is_mountpoint(path):
    return subprocess.run(['mountpoint', '-q', path], check=False).returncode == 0


def attached_to_cgroup(cgroup):
    return [p for p in bpftool_json('cgroup', 'show', cgroup) if p.get('attach_type') == 'cgroup_sock_ops']


def pinned(path):
    return bpftool_json('prog' if os.path.basename(path) in ('sockredir_ops', 'sockredir_msg') else 'map',
                        'show', 'pinned', path)


def our_boot_files():
    return [p for p in (UNIT, WANTS, LIB) if os.path.lexists(p)]


def boot_records():
    return {path: r for path, r in instance.all_records().items() if r and r.get('params', {}).get('boot')}


@pytest.fixture
def boot_instance(tmp_path, cgroup):
    """Role variables for a persisted instance on a private bpffs; everything removed afterwards."""
    if boot_records():
        pytest.skip('this host persists sockredir instances of its own (%s): not touching them'
                    % ', '.join(boot_records()))
    had_boot_files = our_boot_files()
    root = '/run/srboot-%s' % secrets.token_hex(4)
    role_vars = dict(sockredir_cgroup=cgroup,
                     sockredir_bpffs_mount=root + '/bpf',
                     sockredir_pin_root=root + '/bpf/sockredir',
                     sockredir_src_dir=str(tmp_path / 'src'),
                     sockredir_install_packages=False,
                     sockredir_boot_persist=True)
    yield role_vars
    # the role's own removal first, then by hand whatever a failure left
    run_role(tmp_path, dict(role_vars, sockredir_state='absent'), 'cleanup')
    for prog in attached_to_cgroup(cgroup):
        subprocess.run(['bpftool', 'cgroup', 'detach', cgroup, 'sock_ops', 'id', str(prog['id'])], check=False)
    if is_mountpoint(root + '/bpf'):
        subprocess.run(['umount', root + '/bpf'], check=False)
    shutil.rmtree(root, ignore_errors=True)
    record = instance.record_path(role_vars['sockredir_pin_root'])
    if os.path.exists(record):
        os.unlink(record)
    if not had_boot_files:
        subprocess.run(['systemctl', 'disable', 'ebpf-sockredir.service'], capture_output=True, check=False)
        for path in our_boot_files():
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)


def test_the_boot_unit_brings_redirection_back_after_a_reboot(tmp_path, boot_instance, cgroup):
    pin_root = boot_instance['sockredir_pin_root']
    bpffs = boot_instance['sockredir_bpffs_mount']

    first = run_role(tmp_path, boot_instance, 'converge')
    assert first.rc == 0, first
    assert os.path.isfile(UNIT) and os.path.islink(WANTS), 'unit not installed and enabled'
    records = list(boot_records().values())
    assert len(records) == 1
    assert records[0]['params']['pin_root'] == pin_root and records[0]['params']['cgroup'] == cgroup
    assert os.path.isfile(os.path.join(ENGINE, 'instance.py'))
    if shutil.which('systemd-analyze'):   # works without a running systemd
        verify = subprocess.run(['systemd-analyze', 'verify', UNIT], capture_output=True, text=True, check=False)
        assert verify.returncode == 0 and not verify.stdout + verify.stderr, verify
    before = {name: pinned(os.path.join(pin_root, name))['id'] for name in ('sockredir_ops', 'sockredir_msg')}

    # what a reboot loses: attachments and pins (the bpffs mount itself)
    for prog in attached_to_cgroup(cgroup):
        subprocess.run(['bpftool', 'cgroup', 'detach', cgroup, 'sock_ops', 'id', str(prog['id'])], check=True)
    subprocess.run(['umount', bpffs], check=True)
    os.rmdir(bpffs)
    assert not attached_to_cgroup(cgroup)
    hostenv._wait_until(lambda: not set(before.values()) & {p['id'] for p in bpftool_json('prog', 'show')},
                        10.0, 'the kernel to free the programs')

    outputs = run_as_systemd(UNIT)
    assert len(outputs) == 2, [argv for argv, _proc in outputs]
    assert is_mountpoint(bpffs), 'ExecStartPre did not mount bpffs'
    ops = pinned(os.path.join(pin_root, 'sockredir_ops'))
    msg = pinned(os.path.join(pin_root, 'sockredir_msg'))
    assert ops['type'] == 'sock_ops' and msg['type'] == 'sk_msg'
    assert ops['id'] not in before.values(), 'the old program cannot be back'
    assert [p['id'] for p in attached_to_cgroup(cgroup)] == [ops['id']]
    info = facts.pin_dir_facts(pin_root)
    assert info['maps']['sockredir_hash']['msg_verdict']['id'] == msg['id'], info['maps']
    assert 'load and pin' in outputs[-1][1].stdout, outputs[-1][1].stdout

    with hostenv.netns('srboot') as ns:
        result = hostenv.transfer(cgroup, ns, '127.0.0.1', '127.0.0.1', 0, MIB, seed=5)
    assert result['recv_sha256'] == result['sent_sha256']
    # both sockets admitted and the first writes redirected (a one-way MiB switches to TCP after
    # 16 writes by the programs' default policy, so not all of it)
    counters = facts.pin_dir_facts(pin_root)['counters']
    assert counters['inserted'] >= 2 and counters['redirected_bytes'] > 0, counters

    # The boot ran the role's engine with the role's parameters: nothing to redo.
    second = run_role(tmp_path, boot_instance, 'reconverge')
    assert second.rc == 0, second
    assert second.changed == 0, [n for n, t in second.tasks.items() if t.get('changed')]

    gone = run_role(tmp_path, dict(boot_instance, sockredir_state='absent'), 'absent')
    assert gone.rc == 0, gone
    assert not our_boot_files(), our_boot_files()
    assert not attached_to_cgroup(cgroup)
    assert not os.path.exists(pin_root) and not is_mountpoint(bpffs)


def engine_copy(tmp_path):
    """The layout the role installs, in tmp_path: the CLI beside the engine's package path."""
    lib = tmp_path / 'lib'
    engine = lib / 'ansible_collections' / 'ebpf' / 'sockredir' / 'plugins' / 'module_utils'
    shutil.copytree(os.path.join(REPO, 'plugins', 'module_utils'), engine,
                    ignore=shutil.ignore_patterns('__pycache__'))
    for parent in engine.parents:
        if parent == lib:
            break
        (parent / '__init__.py').touch()
    shutil.copy(CLI, lib)
    return str(lib / os.path.basename(CLI))


def apply(cli, *args):
    return subprocess.run(['/usr/bin/python3', '-I', cli] + list(args), cwd='/', env=SYSTEMD_ENV,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_boot_command_needs_nothing_of_ansible(tmp_path):
    cli = engine_copy(tmp_path)
    probe = subprocess.run(['/usr/bin/python3', '-I', '-c', 'import ansible'], capture_output=True, check=False)
    if probe.returncode == 0:
        pytest.skip('/usr/bin/python3 has ansible installed: cannot show the command does without it')
    (tmp_path / 'specs').mkdir()
    done = apply(cli, '--check', str(tmp_path / 'specs'))
    assert done.returncode == 0, done.stderr
    assert 'nothing to do' in done.stdout


def test_a_broken_record_fails_naming_it_and_the_others_still_run(tmp_path):
    cli = engine_copy(tmp_path)
    records = tmp_path / 'records'
    records.mkdir()
    for name in ('x', 'y'):
        params = dict(pin_root='/tmp/not-bpffs/%s' % name, cgroup='/sys/fs/cgroup', src_dir=str(tmp_path / 'src'),
                      boot=True)
        (records / ('%s.json' % name)).write_text(json.dumps(dict(format=instance.RECORD_FORMAT, params=params)))
    done = apply(cli, '--check', str(records))
    assert done.returncode == 1, done
    for name in ('x', 'y'):   # both were tried, each failure names its pin root and parameter
        assert '/tmp/not-bpffs/%s: FAILED: pin_root: /tmp/not-bpffs/%s must be a directory below bpffs_mount' \
            % (name, name) in done.stderr, done.stderr
    (records / 'c.json').write_text('{"format": 99}')
    done = apply(cli, str(records / 'c.json'))
    assert done.returncode == 2 and 'not a sockredir instance record' in done.stderr, done


def doc_options(module):
    with open(os.path.join(REPO, 'plugins', 'modules', '%s.py' % module)) as f:
        source = f.read()
    return yaml.safe_load(source.split("DOCUMENTATION = r'''", 1)[1].split("'''", 1)[0])['options']


def test_the_record_keeps_every_option_a_boot_needs():
    """A new option of sockredir_instance must either reach the record (and so the boot) or be
    named here as one a boot does without."""
    per_run = {'state', 'sources', 'object_b64', 'mounted', 'lock_timeout', 'bpffs_persist', 'cgroup2_mount'}
    assert sorted(set(doc_options('sockredir_instance')) - per_run) == sorted(instance.BOOT_PARAMS)
