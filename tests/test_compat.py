"""The compatibility report (module_utils/compat.py) on this host's real kernel, and its renderer.

The checks run through the prebuilt object in a throwaway pin directory,
cgroups and network namespace; every test verifies those are gone again
(pins, cgroups, programs by id, the helper process, its namespace), also when
a check raises. The cache of these tests lives in a directory of their own;
the bpf_info case uses the real one and restores it.
"""

import glob
import importlib.util
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from conftest import BPFFS, OBJECT, REPO, hostenv, remove_pin_dir, run_play
from ansible_collections.ebpf.sockredir.plugins.module_utils import compat, libbpf, objloader
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError

RELEASE = os.uname().release
KERNEL = tuple(int(x) for x in RELEASE.split('.')[:2])
SCRIPT = os.path.join(REPO, 'scripts', 'compat-report.py')
REPORTS = sorted(glob.glob(os.path.join(REPO, 'docs', 'compat-reports', '*.json')))

# What 6.18 measured (docs/reliability.md, ../shared/BPF-NOTES.md): FIONREAD on
# redirected data was fixed upstream in 2026; TFO flows are never admitted.
DIFFER_ON_6_18 = ['msg_waitall', 'reset_then_send', 'so_rcvlowat', 'splice_reader']


def _netns_in_use(inode):
    for pid in os.listdir('/proc'):
        if pid.isdigit():
            try:
                if os.stat('/proc/%s/ns/net' % pid).st_ino == inode:
                    return pid
            except OSError:
                continue
    return None


def _socket_fds():
    out = set()
    for fd in os.listdir('/proc/self/fd'):
        try:
            if os.readlink('/proc/self/fd/%s' % fd).startswith('socket:'):
                out.add(fd)
        except OSError:
            continue
    return out


def _program_exists(prog_id):
    try:
        os.close(libbpf.prog_fd_by_id(prog_id))
        return True
    except BpfError:
        return False


def assert_nothing_left(made, timeout=10):
    assert len(made.get('cgroups', [])) == 2, made
    assert not os.path.lexists(made.get('pin_dir', '/nonexistent'))
    for cg in made['cgroups']:
        assert not os.path.exists(cg)
    if 'helper_pid' in made:
        assert not os.path.exists('/proc/%d' % made['helper_pid'])
    if 'netns_inode' in made:
        assert _netns_in_use(made['netns_inode']) is None
    # programs are freed once nothing holds them (pins, attachments, fds): after an RCU grace period
    deadline = time.monotonic() + timeout
    while any(_program_exists(i) for i in made.get('program_ids', [])) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [i for i in made.get('program_ids', []) if _program_exists(i)]


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('compat-cache'))


@pytest.fixture(scope='module')
def measured(cache_dir):
    """The first report() on an empty cache: measured now; (report, what it made, seconds)."""
    made = {}
    before = _socket_fds()
    start = time.monotonic()
    rep = compat.report(OBJECT, cache_dir=cache_dir, made=made)
    return rep, made, time.monotonic() - start, before


def test_report_shows_the_known_differences_and_tfo_as_tcp(measured):
    rep, _made, _took, _calls = measured
    assert rep['kernel'] == RELEASE and rep['from_cache'] is False
    checks = rep['checks']
    assert sorted(checks) == sorted(compat.CHECKS)
    splice = checks['splice_reader']
    assert (splice['same_as_tcp'], splice['redirected'], splice['tcp']) == \
        (False, dict(bytes_spliced=0, of=4096), dict(bytes_spliced=4096, of=4096))
    waitall = checks['msg_waitall']
    assert waitall['same_as_tcp'] is False
    assert waitall['tcp']['first_recv_bytes'] == 8000
    assert 0 < waitall['redirected']['first_recv_bytes'] < 8000
    tfo = checks['tcp_fastopen_order']
    assert tfo['same_as_tcp'] is True
    assert tfo['redirected'] == tfo['tcp'] == dict(data_in_syn=True, order='SYN data first')
    assert tfo['counters'].get('not_admitted_early_data', 0) >= 1, tfo['counters']
    # the other checks really went through the programs, not TCP against itself
    for name, check in checks.items():
        if name != 'tcp_fastopen_order':
            assert check['counters'].get('redirected_bytes', 0) > 0, (name, check)
        assert check['affects'] and check['what']
    assert rep['differs'] == sorted(n for n, c in checks.items() if not c['same_as_tcp'])
    if KERNEL >= (6, 18):
        assert rep['differs'] == DIFFER_ON_6_18


def test_nothing_left_after_a_run(measured):
    _rep, made, _took, sockets_before = measured
    assert len(made['program_ids']) == 2 and made['pin_dir']
    assert_nothing_left(made)
    assert _socket_fds() <= sockets_before


def test_cache_is_used_then_refresh_measures_again(measured, cache_dir, monkeypatch):
    first = measured[0]
    path = os.path.join(cache_dir, compat.cache_name(RELEASE))
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    with open(path) as f:
        stored = json.load(f)
    assert 'from_cache' not in stored and stored['checked_at'] == first['checked_at']

    runs = []
    real = compat.run_checks
    monkeypatch.setattr(compat, 'run_checks', lambda *a, **kw: runs.append(1) or real(*a, **kw))
    start = time.monotonic()
    again = compat.report(OBJECT, cache_dir=cache_dir)
    assert time.monotonic() - start < 1.0
    assert runs == [] and again['from_cache'] is True
    assert dict(again, from_cache=False) == first
    assert compat.report(cache_dir=cache_dir)['checked_at'] == first['checked_at']  # no object: cache
    assert compat.report(cache_dir=cache_dir, check_mode=True)['from_cache'] is True

    made = {}
    fresh = compat.report(OBJECT, refresh=True, cache_dir=cache_dir, made=made)
    assert runs == [1] and fresh['from_cache'] is False
    assert fresh['checked_at'] > first['checked_at']
    assert fresh['differs'] == first['differs']
    assert compat.cached(cache_dir)['checked_at'] == fresh['checked_at']
    assert_nothing_left(made)
    assert [n for n in os.listdir(cache_dir) if n != compat.cache_name(RELEASE)] == []  # no temp files


def test_check_mode_without_a_cache_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(compat, 'run_checks', lambda *a, **kw: pytest.fail('check mode ran the checks'))
    empty = str(tmp_path / 'none')
    assert compat.report(OBJECT, check_mode=True, cache_dir=empty) is None
    assert not os.path.exists(empty)
    with pytest.raises(BpfError) as e:
        compat.report(cache_dir=str(tmp_path))
    assert e.value.param == 'compat_object' and 'no report of kernel %s is cached' % RELEASE in e.value.msg


def test_a_check_that_raises_leaves_nothing_behind():
    def boom(net):
        net.pair()  # sockets open, helper busy: the teardown has all of it to undo
        raise RuntimeError('injected failure')

    made = {}
    before = _socket_fds()
    checks = dict(fionread=compat.CHECKS['fionread'], zz_boom=(boom, 'nobody'))
    with pytest.raises(RuntimeError, match='injected failure'):
        compat.run_checks(OBJECT, checks=checks, made=made)
    assert 'helper_pid' in made and len(made['program_ids']) == 2
    assert_nothing_left(made)
    assert _socket_fds() <= before


def test_a_helper_that_fails_leaves_nothing_behind(monkeypatch):
    monkeypatch.setattr(compat, 'HELPER', 'import sys; sys.exit("no namespace for you")')
    made = {}
    with pytest.raises(BpfError, match='no namespace for you'):
        compat.run_checks(OBJECT, made=made)
    assert_nothing_left(made)


def test_a_helper_that_dies_during_the_checks_is_an_error_not_an_observation(monkeypatch):
    # ready, then gone at the first request (in the caller's namespace: no namespace of its own to check)
    monkeypatch.setattr(compat, 'HELPER', 'import os, socket, sys\n'
                        'ctl = socket.socket(fileno=int(sys.argv[1]))\n'
                        'ctl.send(b"ready %d" % os.stat("/proc/self/ns/net").st_ino)\n'
                        'ctl.recv(16)\n'
                        'sys.exit("helper gone")\n')
    made = {}
    with pytest.raises(BpfError, match='helper process failed .*helper gone'):
        compat.run_checks(OBJECT, made=made)
    assert made.pop('netns_inode') == os.stat('/proc/self/ns/net').st_ino
    assert_nothing_left(made)


def test_sock_ops_programs_inherited_from_above_are_refused():
    # sockredir scoped to a parent (the whole host, say) would redirect the plain TCP control too
    pin_dir = os.path.join(BPFFS, hostenv.unique_name('compat'))
    with hostenv.child_cgroup('compat') as parent:
        try:
            objloader.ObjectSet(pin_dir, OBJECT).load_and_pin()
            with libbpf.Fd(libbpf.obj_get(os.path.join(pin_dir, compat.OPS))) as pfd, \
                    libbpf.Fd(os.open(parent, os.O_RDONLY | os.O_DIRECTORY)) as cfd:
                libbpf.prog_attach(pfd, cfd, libbpf.ATTACH_CGROUP_SOCK_OPS, libbpf.F_ALLOW_MULTI)
                ours = libbpf.prog_info(pfd)['id']
            made = {}
            with pytest.raises(BpfError, match='would not be plain TCP') as e:
                compat.run_checks(OBJECT, made=made, parent=parent)
            assert e.value.details['effective_sock_ops'] == [ours]
            assert 'program_ids' not in made  # refused before loading anything
            assert_nothing_left(made)
        finally:
            remove_pin_dir(pin_dir)


def test_a_timeout_is_an_observation_not_a_hang():
    def never(net):
        _client, server = net.pair()
        server.recv(1)  # nothing is ever sent: times out after compat.WAIT

    made = {}
    start = time.monotonic()
    rep = compat.run_checks(OBJECT, checks=dict(never=(never, 'nobody')), made=made)
    assert time.monotonic() - start < 4 * compat.WAIT + 5
    assert rep['checks']['never']['redirected'] == rep['checks']['never']['tcp'] == dict(error='TimeoutError')
    assert_nothing_left(made)


def test_bpf_info_returns_the_report(tmp_path):
    path = os.path.join(compat.CACHE_DIR, compat.cache_name(RELEASE))
    existed = os.path.exists(path)
    info = 'ebpf.sockredir.bpf_info'
    try:
        result = run_play(tmp_path, [
            dict(name='measure', **{info: dict(compat=True, compat_object=OBJECT, compat_refresh=True)}),
            dict(name='cached', **{info: dict(compat=True, compat_object=OBJECT)}),
            dict(name='check mode', check_mode=True, **{info: dict(compat=True)}),
            dict(name='no compat', **{info: dict()}),
        ])
        assert result.rc == 0, result
        measured, cached, checked = (result.tasks[n]['compat'] for n in ('measure', 'cached', 'check mode'))
        assert measured['from_cache'] is False and measured['kernel'] == RELEASE
        assert 'splice_reader' in measured['differs'] and 'tcp_fastopen_order' not in measured['differs']
        assert cached['from_cache'] is True and cached['checked_at'] == measured['checked_at']
        assert checked == cached
        assert 'compat' not in result.tasks['no compat']
        assert not any(result.tasks[n].get('changed') for n in result.tasks)
        st = os.stat(compat.CACHE_DIR)
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) & 0o022 == 0
    finally:
        if not existed and os.path.exists(path):
            os.unlink(path)


# -- the renderer (scripts/compat-report.py) ---------------------------------

def _renderer():
    spec = importlib.util.spec_from_file_location('compat_report', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(kernel, checked_at, **checks):
    out = dict(kernel=kernel, checked_at=checked_at, object_sha256='ab' * 32, checks={})
    for name, (red, tcp) in checks.items():
        out['checks'][name] = dict(same_as_tcp=red == tcp, redirected=red, tcp=tcp,
                                   affects='%s users' % name, what='%s checked' % name)
    return out


def test_renderer_table():
    r = _renderer()
    old = _report('6.12.48+deb13-amd64', '2026-01-01T00:00:00Z', fionread=(dict(queued=1), dict(queued=1)))
    reports = [
        _report('6.18.44', '2026-12-01T00:00:00Z', fionread=(dict(queued=6000), dict(queued=6000)),
                splice_reader=(dict(bytes_spliced=0, of=4096), dict(bytes_spliced=4096, of=4096))),
        _report('6.12.48+deb13-amd64', '2026-12-01T00:00:00Z',
                fionread=(dict(queued=0, after=0), dict(queued=6000, after=4500)),
                splice_reader=(dict(bytes_spliced=0, of=4096), dict(bytes_spliced=4096, of=4096))),
        old,  # older report of the same kernel: not used
        _report('6.1.0-26-amd64', '2026-12-01T00:00:00Z',
                reset_then_send=(dict(sends=['ok', 'EPIPE']), dict(sends=['ECONNRESET', 'EPIPE']))),
    ]
    text = r.render(reports, ['a.json', 'b.json'])
    table, evidence = text.split('## Evidence')
    lines = table.splitlines()
    header = [l for l in lines if l.startswith('| Check |')]
    assert header == ['| Check | What is checked | Linux 6.1.0-26-amd64 | Linux 6.12.48+deb13-amd64 | '
                      'Linux 6.18.44 | Affects (when it differs) |']
    rows = {l.split('|')[1].strip(): [c.strip() for c in l.split('|')[2:-1]] for l in lines
            if l.startswith('| `')}
    assert rows['`fionread`'] == ['fionread checked', 'not measured',
                                  '**differs**: after 0 / 4500; queued 0 / 6000', 'same', 'fionread users']
    assert rows['`splice_reader`'][1:4] == ['not measured', '**differs**: bytes spliced 0 / 4096',
                                            '**differs**: bytes spliced 0 / 4096']
    assert rows['`reset_then_send`'][1] == '**differs**: sends [ok, EPIPE] / [ECONNRESET, EPIPE]'
    assert '| `splice_reader` | not measured | none | none |' in evidence
    assert 'generated by scripts/compat-report.py from a.json, b.json' in text.lower()
    assert 'Linux 6.1.0-26-amd64, measured 2026-12-01T00:00:00Z' in text
    assert '2026-01-01' not in text


def test_renderer_reads_bpf_info_results_and_refuses_other_json(tmp_path):
    r = _renderer()
    rep = _report('6.18.44', '2026-12-01T00:00:00Z', fionread=(dict(queued=1), dict(queued=1)))
    registered = tmp_path / 'registered.json'
    registered.write_text(json.dumps(dict(changed=False, features={}, compat=rep)))
    assert r.load(str(registered)) == rep
    other = tmp_path / 'other.json'
    other.write_text(json.dumps(dict(changed=False)))
    with pytest.raises(SystemExit, match='not a compatibility report'):
        r.load(str(other))


def test_docs_compatibility_is_what_the_committed_reports_render_to():
    assert REPORTS, 'docs/compat-reports/ holds no report'
    rel = [os.path.relpath(p, REPO) for p in REPORTS]
    proc = subprocess.run([sys.executable, SCRIPT] + rel + ['-o', 'docs/compatibility.md', '--check'],
                          cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
