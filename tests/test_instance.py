"""The instance engine (plugins/module_utils/instance.py): the one converge the role, the
boot unit and these tests share.

Real kernel, each test with its own child cgroups, pin root, source directory and
record, all removed afterwards also on failure. Runs go through tests/support/engine.py:
a process of their own, so two can run at once, and one can be held between two steps
(instance.PAUSE_ENV) or killed there with SIGKILL.
"""

import contextlib
import json
import os
import shutil
import subprocess

import pytest

from conftest import BPFFS, bpftool_json, remove_pin_dir
from support import engine, hostenv
from reliability import kit

from ansible_collections.ebpf.sockredir.plugins.module_utils import facts, instance, libbpf, preflight

PREFIX = 'srinst'
NOBODY = 65534


class Instance(object):
    """Parameters of an instance of the test's own, and what the kernel says about it."""

    def __init__(self, tmp_path, cgroup, name='a'):
        self.pin_root = os.path.join(BPFFS, hostenv.unique_name(PREFIX))
        self.cgroup = cgroup
        self.src_dir = str(tmp_path / ('src-' + name))
        self.params = dict(pin_root=self.pin_root, cgroup=cgroup, src_dir=self.src_dir,
                           object_b64=engine.object_b64(), lock_timeout=300)
        self.workdir = tmp_path

    def run(self, **changes):
        return engine.run(dict(self.params, **changes), workdir=self.workdir)

    def start(self, pause_at=None, **changes):
        return engine.Run(dict(self.params, **changes), pause_at=pause_at, workdir=self.workdir)

    def record(self):
        path = instance.record_path(self.pin_root)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def ops_on(self, cgroup):
        return [p['name'] for p in facts.cgroup_attachments(cgroup)['sock_ops']]

    def verdict(self):
        if not os.path.exists(os.path.join(self.pin_root, instance.SOCKHASH)):
            return None
        v = facts.pin_dir_facts(self.pin_root)['maps'][instance.SOCKHASH]['msg_verdict']
        return v and v['name']

    def cleanup(self):
        self.run(state='absent')
        remove_pin_dir(self.pin_root)


@pytest.fixture
def cgroups():
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(hostenv.child_cgroup(PREFIX)) for _n in range(2)]


@pytest.fixture
def make(tmp_path, cgroups):
    made = []

    def _make(name='a', cgroup=None):
        inst = Instance(tmp_path, cgroup or cgroups[0], name)
        made.append(inst)
        return inst
    yield _make
    for inst in made:
        inst.cleanup()


def assert_converged(inst, why=''):
    assert inst.ops_on(inst.cgroup) == [instance.SOCK_OPS], why
    assert inst.verdict() == instance.SK_MSG, why
    rec = inst.record()
    assert rec['cgroup'] == inst.cgroup and rec['cgroups'] == [inst.cgroup], (why, rec)


def assert_nothing_left(inst, cgroups, why=''):
    assert not os.path.exists(inst.pin_root), why
    assert inst.record() is None, why
    assert not os.path.exists(inst.src_dir), why
    for cg in cgroups:
        assert inst.ops_on(cg) == [], (why, cg)


# -- one lock, one record --------------------------------------------------------

def test_two_instances_at_the_same_time(make, cgroups):
    a, b = make('a', cgroups[0]), make('b', cgroups[1])
    runs = [a.start(), b.start()]
    results = [r.result() for r in runs]
    for rc, data, err in results:
        assert rc == 0 and data['changed'], (data, err)
        assert 'Traceback' not in err, err
    assert_converged(a)
    assert_converged(b)


def test_the_same_instance_twice_at_the_same_time(make):
    a = make()
    first, second = a.start(), a.start()
    results = [first.result(), second.result()]
    assert [res[0] for res in results] == [0, 0], results
    assert sorted(res[1]['changed'] for res in results) == [False, True], results
    assert all('Traceback' not in res[2] for res in results)
    assert_converged(a)
    assert a.run()[1]['changed'] is False


def test_a_second_run_fails_clearly_when_the_first_holds_the_lock_too_long(make):
    a = make()
    holder = a.start(pause_at='load')
    try:
        holder.wait_paused()
        rc, data, err = a.run(lock_timeout=1)
        assert rc == 1 and 'Traceback' not in err, (data, err)
        assert 'another sockredir run (pid %d)' % holder.proc.pid in data['msg'], data
        assert 'nothing was changed' in data['msg']
    finally:
        holder.resume()
    assert holder.result()[0] == 0
    assert_converged(a)


# -- order and interruptions -----------------------------------------------------

@pytest.mark.parametrize('step', instance.STEPS)
def test_killed_at_each_step_of_a_cgroup_change(make, cgroups, step):
    a = make()
    assert a.run()[0] == 0
    old, new = cgroups
    # killed on its way from the old cgroup to the new one, then run again
    run = a.start(pause_at=step, cgroup=new)
    run.wait_paused()
    run.kill()
    a.cgroup = new
    rc, data, err = a.run(cgroup=new)
    assert rc == 0, (step, data, err)
    assert a.ops_on(old) == [], step
    assert_converged(a, step)
    # killed again at the same step on the way back, then removed
    run = a.start(pause_at=step, cgroup=old)
    run.wait_paused()
    run.kill()
    rc, data, err = a.run(state='absent', cgroup=old)
    assert rc == 0, (step, data, err)
    assert_nothing_left(a, cgroups, step)


def test_sk_msg_is_attached_before_sock_ops_and_no_socket_is_left_without_it(make, tmp_path):
    """Held between the two attaches: the sockhash has its verdict program, the cgroup has no
    sock_ops yet. A connection established then is never inserted (so never sits in the map
    without the verdict program, which would keep it from ever being redirected); it works
    over plain TCP, and every connection after the run is redirected."""
    a = make()
    run = a.start(pause_at='attach sk_msg')
    with hostenv.netns(PREFIX) as ns, kit.SocketFactory(a.cgroup, ns) as factory:
        try:
            run.wait_paused()
            assert a.verdict() == instance.SK_MSG
            assert a.ops_on(a.cgroup) == []
            listener = factory.listen('127.0.0.1')
            early = kit.connected_pair(listener, factory, '4', '127.0.0.1')
        finally:
            run.resume()
        assert run.result()[0] == 0
        before = kit.counters(a.pin_root)
        assert kit.sockhash_entries(a.pin_root) == 0
        assert kit.exchange(early[0], early[1], b'e' * 50000, b'f' * 50000) == (b'e' * 50000, b'f' * 50000)
        assert kit.delta(before, kit.counters(a.pin_root))['redirected_bytes'] == 0
        late = kit.connected_pair(listener, factory, '4', '127.0.0.1')
        assert kit.exchange(late[0], late[1], b'l' * 50000, b'm' * 50000) == (b'l' * 50000, b'm' * 50000)
        change = kit.delta(before, kit.counters(a.pin_root))
        assert change['inserted'] == 2 and change['redirected_bytes'] == 100000, change
        for sock in early + late + (listener,):
            sock.close()


# -- paths -------------------------------------------------------------------------

def test_src_dir_with_files_of_others(make, tmp_path):
    app = tmp_path / 'app'
    app.mkdir()
    (app / 'app.conf').write_text('theirs\n')
    a = make()
    a.src_dir = a.params['src_dir'] = str(app)
    assert a.run()[0] == 0
    assert sorted(os.listdir(app)) == ['app.conf', 'sockredir.bpf.o']
    rc, data, _err = a.run(state='absent')
    assert rc == 0, data
    assert sorted(os.listdir(app)) == ['app.conf'] and (app / 'app.conf').read_text() == 'theirs\n'

    # a file of theirs under one of our names is not overwritten
    (app / 'sockredir.bpf.o').write_text('/* theirs */\n')
    rc, data, _err = a.run()
    assert rc == 1 and 'already holds a sockredir.bpf.o that this collection did not write' in data['msg'], data
    assert (app / 'sockredir.bpf.o').read_text() == '/* theirs */\n'
    (app / 'sockredir.h').write_text('/* theirs */\n')
    rc, data, _err = a.run(loader='bcc', sources=engine.sources())
    assert rc == 1 and 'already holds a sockredir.h that this collection did not write' in data['msg'], data
    assert (app / 'sockredir.h').read_text() == '/* theirs */\n'
    assert not os.path.exists(a.pin_root) and a.record() is None


@pytest.fixture
def user_venv(tmp_path):
    home = tmp_path / 'home'
    home.mkdir()
    os.chmod(tmp_path, 0o755)
    subprocess.run([engine.PYTHON, '-m', 'venv', '--system-site-packages', '--without-pip', str(home / 'venv')],
                   check=True)
    subprocess.run(['chown', '-R', '%d:%d' % (NOBODY, NOBODY), str(home)], check=True)
    yield str(home / 'venv' / 'bin' / 'python3')
    shutil.rmtree(home)


def test_the_boot_unit_refuses_a_user_owned_venv(make, user_venv):
    a = make()
    rc, data, _err = a.run(boot=True, boot_python=user_venv)
    assert rc == 1, data
    assert 'boot_python: %s is owned by uid %d' % (os.path.dirname(os.path.dirname(os.path.dirname(user_venv))), NOBODY) \
        in data['msg'], data
    assert 'root would run code a non-root user can change' in data['msg']
    assert not os.path.exists(a.pin_root) and a.record() is None


def test_a_pin_root_swapped_between_runs_is_refused(make, tmp_path):
    a = make()
    decoy = os.path.join(BPFFS, hostenv.unique_name(PREFIX + '-decoy'))
    os.mkdir(decoy, 0o700)
    try:
        os.symlink(decoy, a.pin_root)
        rc, data, _err = a.run()
        assert rc == 1 and '%s is a symbolic link; refusing to use it' % a.pin_root in data['msg'], data
        assert os.listdir(decoy) == []
        os.unlink(a.pin_root)
        os.mkdir(a.pin_root, 0o700)
        os.chown(a.pin_root, NOBODY, NOBODY)
        rc, data, _err = a.run()
        assert rc == 1 and '%s is owned by uid %d, not by root' % (a.pin_root, NOBODY) in data['msg'], data
        assert os.listdir(a.pin_root) == []
    finally:
        if os.path.islink(a.pin_root):
            os.unlink(a.pin_root)
        os.rmdir(decoy)


def test_a_pin_root_swapped_during_a_run_is_never_used(make, tmp_path):
    """Made into a symbolic link while the run is held: the run refuses to create its pin root
    through it (first run), or keeps using the directory it opened (a reload)."""
    a = make()
    decoy = os.path.join(BPFFS, hostenv.unique_name(PREFIX + '-decoy'))
    os.mkdir(decoy, 0o700)
    try:
        run = a.start(pause_at='sources')
        run.wait_paused()
        os.symlink(decoy, a.pin_root)
        run.resume()
        rc, data, _err = run.result()
        assert rc == 1 and 'is a symbolic link; refusing to use it' in data['msg'], data
        assert os.listdir(decoy) == []
        os.unlink(a.pin_root)

        assert a.run()[0] == 0
        moved = a.pin_root + '-moved'
        run = a.start(pause_at='sources', loader='bcc', sources=engine.sources(), map_size=2048, recreate_maps=True)
        run.wait_paused()
        os.rename(a.pin_root, moved)
        os.symlink(decoy, a.pin_root)
        run.resume()
        run.result()
        assert os.listdir(decoy) == [], 'something was loaded through the swapped pin root'
        os.unlink(a.pin_root)
        remove_pin_dir(moved)
    finally:
        if os.path.islink(a.pin_root):
            os.unlink(a.pin_root)
        os.rmdir(decoy)


def test_the_object_loader_needs_no_bcc_and_the_plan_says_so(make):
    """On a host without bcc the object path converges; the bcc path asks for the package."""
    a = make()
    rc, data, _err = engine.run(dict(a.params, _check=True), workdir=a.workdir, hide_bcc=True)
    assert rc == 0 and 'bcc' not in data['needs']['packages'] and 'kernel-headers' not in data['needs']['packages'], data
    assert data['loader'].startswith('loader: object (') and 'no compiler, headers or bcc needed' in data['loader']
    rc, data, _err = engine.run(a.params, workdir=a.workdir, hide_bcc=True)
    assert rc == 0 and data['needs'] == dict(packages=[], mounts=[]), data
    assert_converged(a)
    assert a.record()['params']['loader'] == 'object'
    rc, data, _err = engine.run(dict(a.params, loader='bcc', sources=engine.sources()), workdir=a.workdir,
                                hide_bcc=True)
    assert rc == 0 and 'bcc' in data['needs']['packages'] and data['actions'] == [], data
    assert data['loader'].startswith('loader: bcc')
    assert a.record()['params']['loader'] == 'object'  # nothing changed


def test_absent_needs_neither_the_object_nor_the_sources(make, cgroups):
    a = make()
    assert a.run()[0] == 0
    shutil.rmtree(a.src_dir)
    rc, data, _err = a.run(state='absent', object_b64=None)
    assert rc == 0, data
    assert_nothing_left(a, cgroups)


def test_a_pinned_map_with_another_key_size_is_noticed(make):
    a = make()
    os.mkdir(a.pin_root, 0o700)
    subprocess.run(['bpftool', 'map', 'create', os.path.join(a.pin_root, instance.SOCKHASH), 'type', 'sockhash',
                    'key', '40', 'value', '4', 'entries', '1024', 'name', instance.SOCKHASH], check=True)
    rc, data, _err = a.run()
    assert rc == 1, data
    assert 'is a sockhash of 1024 entries with key size 40' in data['msg'] and 'recreate_maps' in data['msg'], data
    assert sorted(os.listdir(a.pin_root)) == [instance.SOCKHASH]
    rc, data, _err = a.run(recreate_maps=True)
    assert rc == 0, data
    pinned = bpftool_json('map', 'show', 'pinned', os.path.join(a.pin_root, instance.SOCKHASH))
    assert pinned['bytes_key'] != 40
    assert_converged(a)


# -- the role, as users run it --------------------------------------------------

def test_role_runs_at_the_same_time_on_two_instances_and_on_one_twice(tmp_path, cgroups):
    roles = [kit.RoleInstance(tmp_path / name, cg) for name, cg in (('a', cgroups[0]), ('b', cgroups[1]))]
    for role in roles:
        os.makedirs(str(role.workdir))
    try:
        with kit.concurrent_calls(workers=3, timeout=600) as calls:
            calls.submit(roles[0].run)
            calls.submit(roles[0].run)
            calls.submit(roles[1].run)
        for run in calls.results:
            assert run.rc == 0, run
            assert 'Traceback' not in run.output, run
            # this host has the packages and the mounts: the role never gets to them
            assert 'Install the packages the engine asked for' not in run.output, run
        assert sorted(run.changed for run in calls.results[:2]) == [0, 1], calls.results
        for role in roles:
            assert role.attached() == (['sockredir_ops'], 'sockredir_msg')
            assert role.recorded() == dict(cgroup=role.cgroup, src_dir=role.src_dir)
            assert role.run().changed == 0
    finally:
        for role in roles:
            role.cleanup()


# -- what the engine refuses before it changes anything (issue 12) ----------------------

def assert_untouched(inst):
    assert not os.path.exists(inst.pin_root)
    assert inst.record() is None
    assert inst.ops_on(inst.cgroup) == []


def test_an_empty_cgroup_needs_the_whole_host_chosen(make):
    """The whole host is never the default: redirected sockets differ from TCP in corners."""
    inst = make()
    rc, out, err = inst.run(cgroup='')
    assert rc != 0, (out, err)
    assert any(r.startswith('cgroup: empty, which is the whole host') and 'whole_host: true' in r
               for r in out['refusals']), out
    assert_untouched(inst)
    # the root cgroup was not touched either (tests never attach there)
    assert 'sockredir_ops' not in [p['name'] for p in facts.cgroup_attachments(hostenv.cgroup2_mount())['sock_ops']]


def test_a_kernel_without_prog_query_on_a_sockmap_is_refused(make):
    """5.15-5.18: sock_ops, sk_msg and the sockhash are there, BPF_PROG_QUERY on a sockmap is not."""
    inst = make()
    rc, out, _err = engine.run(inst.params, workdir=inst.workdir,
                               env_extra=dict(SRTEST_FEATURES_OFF='sockmap_prog_query'))
    assert rc != 0
    assert any('BPF_PROG_QUERY on a sockmap' in r and '5.19' in r for r in out['refusals']), out
    assert_untouched(inst)


def test_a_libbpf_without_the_functions_the_engine_calls_is_refused(make):
    """libbpf 0.x has another soname; a libbpf.so.1 lacking a function is named, not a traceback."""
    inst = make()
    rc, out, _err = engine.run(inst.params, workdir=inst.workdir,
                               env_extra=dict(SRTEST_LIBBPF_MISSING='bpf_prog_attach_opts,bpf_object__open_mem'))
    assert rc != 0
    line = [r for r in out['refusals'] if r.startswith('libbpf:')]
    assert line and 'bpf_prog_attach_opts, bpf_object__open_mem' in line[0] and 'libbpf 1.0' in line[0], out
    assert_untouched(inst)


def test_this_kernel_has_prog_query_on_a_sockmap():
    """The probe itself, on the real kernel (6.18 here): the feature the refusal above fakes away."""
    assert facts.features()['sockmap_prog_query'] is True
    assert preflight.check_libbpf in preflight.PREFLIGHT  # the plan runs it
    assert libbpf.missing_functions() == []
