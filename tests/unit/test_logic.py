"""Pure logic: mount parsing, header selection, reload decisions, program identity."""

import hashlib
import os
import re
import tarfile

import pytest

from ansible_collections.ebpf.sockredir.plugins.module_utils import attach, headers, mounts, policy, program
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError

HYBRID = """\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
30 22 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
40 22 0:35 / /sys/fs/bpf rw - bpf bpf rw,mode=700
41 1 0:40 / /srv/with\\040space rw - ext4 /dev/vdb rw
"""
UNIFIED = "31 22 0:27 / /sys/fs/cgroup rw shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"


@pytest.fixture
def mountinfo(tmp_path):
    def make(text):
        path = tmp_path / 'mountinfo'
        path.write_text(text)
        return str(path)
    return make


@pytest.mark.parametrize('text, expected', [(HYBRID, '/sys/fs/cgroup/unified'),
                                            (UNIFIED, '/sys/fs/cgroup'), ('', None)])
def test_cgroup2_mount_in_hybrid_and_unified_layouts(mountinfo, text, expected):
    assert mounts.cgroup2_mount(mountinfo(text)) == expected


def test_longest_mount_prefix_wins_and_escapes_are_decoded(mountinfo):
    path = mountinfo(HYBRID)
    assert mounts.fs_of('/sys/fs/cgroup/unified/x', path) == ('/sys/fs/cgroup/unified', 'cgroup2')
    assert mounts.fs_of('/sys/fs/cgroup/memory', path) == ('/sys/fs/cgroup/memory', 'cgroup')
    assert mounts.fs_of('/sys/fs/bpfx', path) == ('/sys', 'sysfs')
    assert mounts.mount_points('ext4', path) == ['/srv/with space']


@pytest.mark.parametrize('bad, words', [('relative/dir', 'absolute'), ('/sys/fs/bpf/../x', '".."')])
def test_paths_must_be_absolute_and_without_dotdot(bad, words):
    with pytest.raises(BpfError) as e:
        mounts.require_normalized(bad, 'pin_dir')
    assert 'pin_dir' in e.value.msg and words in e.value.msg


def _tree(root, *parts):
    path = os.path.join(str(root), *parts)
    os.makedirs(path)
    return path


def test_running_kernel_headers_are_preferred(tmp_path):
    _tree(tmp_path, 'modules', '6.1.0-9-amd64', 'build', 'include')
    got = headers.resolve(modules_root=str(tmp_path / 'modules'), src_root=str(tmp_path / 'src'),
                          release='6.1.0-9-amd64')
    assert got['kind'] == 'running-kernel' and got['env'] == {}


def test_generic_debian_headers_are_merged_newest_first(tmp_path):
    src = tmp_path / 'src'
    for ver in ('6.1.0-9', '6.1.0-56'):
        _tree(src, 'linux-headers-%s-common' % ver, 'include', 'uapi')
        open(os.path.join(str(src), 'linux-headers-%s-common' % ver, 'Makefile'), 'w').close()
        _tree(src, 'linux-headers-%s-amd64' % ver, 'include', 'generated')
    cache = tmp_path / 'cache'
    got = headers.resolve(modules_root=str(tmp_path / 'none'), src_root=str(src), release='6.18.0-custom',
                          cache_dir=str(cache))
    assert got['kind'] == 'generic'
    assert got['path'] == str(cache / 'linux-headers-6.1.0-56-amd64')
    assert got['env'] == {'BCC_KERNEL_SOURCE': got['path']}
    assert os.path.isdir(os.path.join(got['path'], 'include', 'generated'))
    assert os.path.islink(os.path.join(got['path'], 'Makefile'))


def test_no_headers_names_the_packages_to_install(tmp_path):
    with pytest.raises(BpfError) as e:
        headers.resolve(modules_root=str(tmp_path), src_root=str(tmp_path), release='6.2.0-x',
                        kheaders_archive=str(tmp_path / 'kheaders.tar.xz'))
    assert e.value.param == 'kernel_headers'
    assert 'linux-headers-6.2.0-x' in e.value.msg and 'linux-headers-amd64' in e.value.msg
    assert 'kernel-devel-6.2.0-x' in e.value.msg and 'CONFIG_IKHEADERS' in e.value.msg


def _kheaders_archive(tmp_path):
    """A stand-in for /sys/kernel/kheaders.tar.xz (this host's kernel has no CONFIG_IKHEADERS;
    the real archive is unpacked and compiled against in molecule/vm's Debian 12 guest)."""
    tree = _tree(tmp_path, 'kh', 'include', 'generated', 'uapi')
    open(os.path.join(tree, 'version.h'), 'w').close()
    archive = str(tmp_path / 'kheaders.tar.xz')
    with tarfile.open(archive, 'w:xz') as tar:
        tar.add(str(tmp_path / 'kh'), arcname='.')
    return archive


def test_kheaders_are_the_last_resort_and_unpacked_once(tmp_path):
    archive = _kheaders_archive(tmp_path)
    cache = tmp_path / 'cache'
    kw = dict(modules_root=str(tmp_path / 'none'), src_root=str(tmp_path / 'none'), release='6.12.9-x',
              cache_dir=str(cache), kheaders_archive=archive)
    planned = headers.resolve(check_mode=True, **kw)
    assert planned['kind'] == 'kheaders' and not cache.exists()  # check mode unpacks nothing
    got = headers.resolve(**kw)
    assert got['path'] == planned['path'] == str(cache / 'kheaders-6.12.9-x')
    assert got['env'] == {'BCC_KERNEL_SOURCE': got['path']}
    assert os.path.isfile(os.path.join(got['path'], 'include', 'generated', 'uapi', 'version.h'))
    os.remove(archive)  # unpacked once per release: the cache serves without the archive
    assert headers.resolve(**kw)['path'] == got['path']
    # a running kernel's own headers still come first
    _tree(tmp_path, 'none', '6.12.9-x', 'build', 'include')
    assert headers.resolve(**kw)['kind'] == 'running-kernel'


def test_kheaders_module_counts_as_available_until_modprobe_fails(tmp_path):
    modules = _tree(tmp_path, 'modules', '6.1.0-9-amd64')
    with open(os.path.join(modules, 'modules.dep'), 'w') as dep:
        dep.write('kernel/kernel/kheaders.ko.xz:\nkernel/net/ipv4/tcp_bic.ko.xz:\n')
    kw = dict(kernel_headers='kheaders', modules_root=str(tmp_path / 'modules'), src_root=str(tmp_path),
              release='6.1.0-9-amd64', cache_dir=str(tmp_path / 'cache'),
              kheaders_archive=str(tmp_path / 'absent.tar.xz'))
    assert headers.resolve(check_mode=True, **kw)['archive'].endswith('(module kheaders)')
    with pytest.raises(BpfError) as e:  # modprobe cannot make an archive appear at this path
        headers.resolve(**kw)
    assert e.value.param == 'kernel_headers' and 'modprobe kheaders' in e.value.msg
    assert not os.path.exists(str(tmp_path / 'cache'))  # nothing half-unpacked is left


def test_kheaders_asked_for_on_a_kernel_without_them(tmp_path):
    with pytest.raises(BpfError) as e:
        headers.resolve('kheaders', modules_root=str(tmp_path), src_root=str(tmp_path), release='6.2.0-x',
                        kheaders_archive=str(tmp_path / 'kheaders.tar.xz'))
    assert e.value.param == 'kernel_headers' and 'CONFIG_IKHEADERS' in e.value.msg


class FakePins(object):
    def __init__(self, path):
        self.path = path

    def show(self, name=''):
        return os.path.join(self.path, name)


class FakeSet(program.ProgramSet):
    def __init__(self):  # no bpffs needed for the decision logic
        self.pin_dir = '/sys/fs/bpf/x'
        self.pins = FakePins(self.pin_dir)
        self.programs = [dict(name='p', type='sock_ops')]
        self.maps = ['m']


PROG = dict(id=5, tag='aa', type='sock_ops', map_ids=[9])
MAP = dict(id=9)


@pytest.mark.parametrize('now, record, digest, expected', [
    (dict(programs={'p': PROG}, maps={'m': MAP}), dict(digest='d', programs={'p': dict(id=5, tag='aa')}),
     'd', []),
    (dict(programs={'p': PROG}, maps={'m': MAP}), None, 'd', ['no record']),
    (dict(programs={'p': PROG}, maps={'m': MAP}), dict(digest='old', programs={'p': dict(id=5, tag='aa')}),
     'd', ['source or options changed']),
    (dict(programs={'p': None}, maps={'m': MAP}), dict(digest='d', programs={}), 'd', ['is missing']),
    (dict(programs={'p': PROG}, maps={'m': MAP}), dict(digest='d', programs={'p': dict(id=6, tag='aa')}),
     'd', ['not the one recorded']),
    (dict(programs={'p': PROG}, maps={'m': dict(id=10)}), dict(digest='d', programs={'p': dict(id=5, tag='aa')}),
     'd', ['no program at the pins uses the pinned map m']),
    (dict(programs={'p': PROG}, maps={'m': None}), dict(digest='d', programs={'p': dict(id=5, tag='aa')}),
     'd', ['map pin /sys/fs/bpf/x/m is missing']),
])
def test_reload_decision(now, record, digest, expected):
    reasons = FakeSet().reload_reasons(now, record, digest)
    assert len(reasons) == len(expected)
    for reason, words in zip(reasons, expected):
        assert words in reason


def test_a_map_needs_one_program_using_it_not_every_program():
    two = FakeSet()
    two.programs = [dict(name='p', type='sock_ops'), dict(name='q', type='sk_msg')]
    now = dict(programs={'p': dict(PROG, map_ids=[9]), 'q': dict(PROG, id=6, type='sk_msg', map_ids=[10])},
               maps={'m': MAP, 'n': dict(id=10)})
    record = dict(digest='d', programs={'p': dict(id=5, tag='aa'), 'q': dict(id=6, tag='aa')})
    assert two.reload_reasons(now, record, 'd') == []
    now['maps']['o'] = dict(id=11)
    assert two.reload_reasons(now, record, 'd') == ['no program at the pins uses the pinned map o']


class FakeAttachment(attach.Attachment):
    def __init__(self, pinned):
        self.pinned = pinned
        self.program = '/sys/fs/bpf/x/sockredir_ops'
        self.prog_type = 'sock_ops'


@pytest.mark.parametrize('other, ours', [
    (dict(id=1, name='sockredir_ops', type='sock_ops', map_ids=[9]), True),    # the pinned one
    (dict(id=2, name='sockredir_ops', type='sock_ops', map_ids=[9, 3]), True),  # older version
    (dict(id=3, name='sockredir_ops', type='sock_ops', map_ids=[4]), False),    # same name, other maps
    (dict(id=4, name='cilium_sockops', type='sock_ops', map_ids=[9]), False),   # another tool
])
def test_older_versions_are_ours_other_tools_are_not(other, ours):
    pinned = dict(id=1, name='sockredir_ops', type='sock_ops', map_ids=[9])
    assert FakeAttachment(pinned)._is_ours(other) is ours


def test_without_the_pin_only_the_recorded_id_is_ours(monkeypatch):
    att = FakeAttachment(None)
    monkeypatch.setattr(att, '_recorded_id', lambda: 7)
    assert att._is_ours(dict(id=7, name='sockredir_ops', type='sock_ops', map_ids=[]))
    # same name, but another instance's program: never detached on a guess
    assert not att._is_ours(dict(id=8, name='sockredir_ops', type='sock_ops', map_ids=[]))


# -- run-time settings (policy.py) -------------------------------------------------

@pytest.mark.parametrize('allow, deny, debug, flags', [
    ([], [], False, 0),
    ([80], [], False, policy.SET_ALLOW_LISTED),
    ([], [22], True, policy.SET_DEBUG),
    ([80, 443], [22], True, policy.SET_ALLOW_LISTED | policy.SET_DEBUG),
])
def test_settings_pack_the_flags_and_the_port_verdicts(allow, deny, debug, flags):
    settings, ports = policy.wanted('/sys/fs/bpf/x', allow, deny, debug, 1000, 4)
    assert len(settings) == 16  # struct sockredir_settings: four u32
    back = policy.decode(settings, ports)
    assert back['flags'] == flags and back['debug'] is debug and back['allow_listed'] is bool(allow)
    assert back['allow_ports'] == sorted(allow) and back['deny_ports'] == sorted(deny)
    assert back['small_write_bytes'] == 1000 and back['small_write_streak'] == 4
    assert back['instance'] == hashlib.sha256(b'/sys/fs/bpf/x').hexdigest()[:8]
    assert all(len(k) == 4 and len(v) == 4 for k, v in ports.items())


def test_zero_small_write_settings_mean_the_programs_defaults():
    """0 means the programs' own defaults, which policy.py must state as sockredir.h has them:
    every send size counts (0xffffffff), 16 sends in a row."""
    header = os.path.join(os.path.dirname(__file__), '..', '..', 'files', 'bpf', 'sockredir.h')
    with open(header) as f:
        defines = dict(re.findall(r'^#define (SOCKREDIR_SMALL_\w+) (\w+?)U?$', f.read(), re.M))
    back = policy.decode(*policy.wanted('/sys/fs/bpf/x', [], []))
    assert back['small_write_bytes'] == 0 and back['small_write_streak'] == 0
    assert back['effective_small_write_bytes'] == int(defines['SOCKREDIR_SMALL_BYTES'], 0) == 0xffffffff
    assert back['effective_small_write_streak'] == int(defines['SOCKREDIR_SMALL_STREAK'], 0) == 16
