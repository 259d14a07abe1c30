"""The VM scenarios (molecule/vm, molecule/vm-nosockmap) without booting them:
syntax, lint, the image script, the kernel matrix's suites, the collection
found through ANSIBLE_COLLECTIONS_PATH (installed with ansible-galaxy), and the
guest-side helpers.

The scenarios themselves boot a qemu guest and take minutes; scripts/test.sh
runs them with molecule, once per suite of the kernel matrix (see docs/vm.md).
Nothing here starts a VM or builds an image.
"""

import glob
import os
import re
import subprocess

import pytest
import yaml

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
# The kernel matrix: SOCKREDIR_VM_SUITE -> the kernel series its guest runs.
SUITES = {'bookworm': '6.1', 'trixie': '6.12'}
GUEST_SCRIPTS = [
    'molecule/vm-nosockmap/files/deny_sockmap.py',
    'molecule/vm-nosockmap/files/snapshot.py',
    'molecule/vm/files/package_sizes.py',
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
    """They run under the guests' Python (3.11 in bookworm, 3.13 in trixie);
    the host's compiles them the same."""
    with open(os.path.join(REPO, path)) as f:
        compile(f.read(), path, 'exec')


def test_image_script_parses():
    proc = subprocess.run(['bash', '-n', SCRIPT], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def image_script(*args, suite=None, cache=None):
    env = dict(os.environ)
    env.pop('SOCKREDIR_VM_SUITE', None)
    if suite is not None:
        env['SOCKREDIR_VM_SUITE'] = suite
    if cache is not None:
        env['SOCKREDIR_VM_CACHE'] = str(cache)
    return subprocess.run(['bash', SCRIPT, *args], capture_output=True, text=True, env=env, timeout=120,
                          check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason='the image script runs as root')
@pytest.mark.parametrize('suite', sorted(SUITES))
def test_image_cache_key_is_stable(tmp_path, suite):
    """--path names the cache entry without building: the same one twice,
    under $SOCKREDIR_VM_CACHE, <suite>-<16 hex digits>; SOCKREDIR_VM_SUITE and
    --suite name the same one."""
    first = image_script('--path', suite=suite, cache=tmp_path)
    assert first.returncode == 0, first.stderr
    second = image_script('--suite', suite, '--path', cache=tmp_path)
    assert second.returncode == 0, second.stderr
    assert first.stdout == second.stdout
    assert re.fullmatch(re.escape(str(tmp_path)) + '/' + suite + r'-[0-9a-f]{16}\n', first.stdout)
    assert os.listdir(tmp_path) == []  # nothing built, nothing locked


@pytest.mark.skipif(os.geteuid() != 0, reason='the image script runs as root')
def test_each_suite_has_its_own_image(tmp_path):
    """Building one suite must not replace another's image: different cache
    entries, and bookworm when no suite is given."""
    paths = {suite: image_script('--path', suite=suite, cache=tmp_path).stdout for suite in SUITES}
    assert len(set(paths.values())) == len(SUITES)
    assert image_script('--path', cache=tmp_path).stdout == paths['bookworm']
    assert image_script('--path', suite='', cache=tmp_path).stdout == paths['bookworm']


@pytest.mark.skipif(os.geteuid() != 0, reason='the image script runs as root')
@pytest.mark.parametrize('suite', sorted(SUITES))
def test_image_sources_are_the_suites_own(suite):
    """The guest's mirror entries: the host's Debian mirrors, for the guest's
    suite only (trixie's are derived from a bookworm host's entries)."""
    proc = image_script('--sources', suite=suite)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines
    for line in lines:
        deb, uri, dist, component = line.split()
        assert (deb, component) == ('deb', 'main'), line
        assert uri.startswith(('http://', 'https://')), line
        assert dist == suite or dist.startswith(suite + '-'), line
    assert any(line.split()[2] == suite for line in lines)  # the suite itself, not only its updates


@pytest.mark.skipif(os.geteuid() != 0, reason='the image script runs as root')
def test_image_script_refuses_an_unknown_suite(tmp_path):
    proc = image_script('--path', suite='sid', cache=tmp_path)
    assert proc.returncode == 2
    assert "unknown suite 'sid'" in proc.stderr and 'bookworm trixie' in proc.stderr
    assert os.listdir(tmp_path) == []


def test_suites_agree():
    """The scenarios' suite table (vars/guest.yml) and the image script's
    list name the same suites, with the kernels SUITES expects."""
    with open(os.path.join(REPO, 'molecule', 'vm', 'vars', 'guest.yml')) as f:
        guest = yaml.safe_load(f)
    assert {name: v['kernel_series'] for name, v in guest['vm_suites'].items()} == SUITES
    with open(SCRIPT) as f:
        listed = re.search(r'^GUEST_SUITES=\(([^)]*)\)$', f.read(), re.M).group(1).split()
    assert sorted(listed) == sorted(SUITES)


def image_lists():
    """The image script's package lists: base, per suite, and what a suite must not have."""
    with open(SCRIPT) as f:
        text = f.read()
    base = re.search(r'^GUEST_PACKAGES=\(([^)]*)\)$', text, re.M).group(1).split()
    per_suite = dict(re.findall(r'^  \[(\w+)\]="([^"]*)"$', re.search(
        r'^declare -A SUITE_PACKAGES=\((.*?)^\)$', text, re.M | re.S).group(1), re.M))
    absent = dict(re.findall(r'^  \[(\w+)\]="([^"]*)"$', re.search(
        r'^declare -A SUITE_ABSENT=\((.*?)^\)$', text, re.M | re.S).group(1), re.M))
    return base, {k: v.split() for k, v in per_suite.items()}, absent


def test_each_suite_has_the_packages_of_its_loader():
    """bookworm's converge uses the bcc loader, its image has BCC and the
    kernel's headers; trixie's uses the prebuilt object, its image has
    neither, and the build refuses a compiler, LLVM, headers or BCC pulled in
    as a dependency (the same pattern as verify's check in the guest).
    bpftool (verify's witness) is in both."""
    with open(os.path.join(REPO, 'molecule', 'vm', 'vars', 'guest.yml')) as f:
        suites = yaml.safe_load(f)['vm_suites']
    with open(os.path.join(REPO, 'molecule', 'vm', 'vars', 'scenario.yml')) as f:
        scenario = yaml.safe_load(f)
    base, per_suite, absent = image_lists()
    assert {name: v['loader'] for name, v in suites.items()} == {'bookworm': 'bcc', 'trixie': 'object'}
    assert sorted(per_suite) == sorted(absent) == sorted(SUITES)
    assert 'bpftool' in base
    assert not {'python3-bpfcc', 'linux-headers-amd64', 'clang', 'llvm'} & set(base)
    assert {'python3-bpfcc', 'linux-headers-amd64'} <= set(per_suite['bookworm'])
    assert per_suite['trixie'] == [] and absent['bookworm'] == ''
    assert scenario['sockredir_loader'] == '{{ vm_suites[vm_suite].loader }}'
    assert absent['trixie'] == scenario['scenario_compiler_packages']
    refused = re.compile(absent['trixie'])
    for name in ['clang', 'clang-19', 'libclang-cpp19', 'llvm-19', 'libllvm19', 'linux-headers-amd64',
                 'linux-headers-6.12.118+deb13-amd64', 'linux-headers-6.12.118+deb13-common', 'python3-bpfcc',
                 'libbpfcc', 'bpfcc-tools', 'gcc', 'gcc-14', 'gcc-14-x86-64-linux-gnu', 'cpp', 'cpp-14',
                 'cpp-14-x86-64-linux-gnu', 'linux-compiler-gcc-12-x86']:
        assert refused.search(name), name
    for name in ['bpftool', 'libbpf1', 'gcc-14-base', 'libgcc-s1', 'python3', 'linux-image-amd64',
                 'iproute2']:
        assert not refused.search(name), name


@pytest.fixture(scope='module')
def installed_collection(tmp_path_factory):
    """The collection built and installed with ansible-galaxy, as a user gets it."""
    root = tmp_path_factory.mktemp('galaxy')
    env = dict(os.environ, ANSIBLE_NOCOLOR='1')
    rc, out = run([tool('ansible-galaxy'), 'collection', 'build', '--output-path', str(root), REPO], env)
    assert rc == 0, out
    artifact, = glob.glob(str(root / 'ebpf-sockredir-*.tar.gz'))
    # ansible.posix (the one dependency) comes with the ansible package; no Galaxy here
    # --force: the checkout itself may be on ANSIBLE_COLLECTIONS_PATH (scripts/test.sh puts it
    # there), and would count as installed already
    rc, out = run([tool('ansible-galaxy'), 'collection', 'install', '--no-deps', '--force',
                   '-p', str(root / 'collections'), artifact], env)
    assert rc == 0, out
    path = root / 'collections' / 'ansible_collections' / 'ebpf' / 'sockredir'
    assert (path / 'molecule' / 'vm' / 'molecule.yml').is_file()
    assert (path / 'scripts' / 'vm-image.sh').is_file()
    assert not (path / '.venv').exists()
    return root / 'collections', path


@pytest.mark.parametrize('scenario', ['vm', 'vm-nosockmap'])
def test_scenarios_run_against_the_installed_collection(installed_collection, tmp_path, scenario):
    """From the installed copy (no .venv there): molecule's dependency and
    syntax steps find the role through ANSIBLE_COLLECTIONS_PATH; without it
    the repository's fallback, .venv/collections, does not exist there and
    the role is not found -- so the variable, not a hard-coded path, did it."""
    collections, project = installed_collection
    env = dict(os.environ, MOLECULE_EPHEMERAL_DIRECTORY=str(tmp_path / 'ephemeral'), NO_COLOR='1',
               ANSIBLE_NOCOLOR='1', ANSIBLE_FORCE_COLOR='0', ANSIBLE_COLLECTIONS_PATH=str(collections))
    env.pop('SOCKREDIR_VM_SUITE', None)
    for step in ('dependency', 'syntax'):
        rc, out = run([tool('molecule'), step, '-s', scenario], env, cwd=str(project))
        assert rc == 0, out
    assert str(project) in out  # the installed playbooks were checked
    env.pop('ANSIBLE_COLLECTIONS_PATH')
    rc, out = run([tool('molecule'), 'syntax', '-s', scenario], env, cwd=str(project))
    assert rc != 0 and "the role 'ebpf.sockredir.sockredir' was not found" in out, out
