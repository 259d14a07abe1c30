"""Quality gates: ansible-lint (production profile), ansible-test sanity over the whole tree and
units, the module docs built by antsibull-docs, and the oldest and newest ansible-core this
collection supports (meta/runtime.yml), each on its own controller Python.

ansible-test sanity runs on the whole collection, as a user or Galaxy-side CI runs it on the
tarball (which ships benchmarks/, molecule/, scripts/ and tests/), with both ends of the
supported range: the oldest on Python 3.11, the newest on Python 3.13. tests/sanity/ignore-*.txt
holds only entries with a reason.

Offline: ansible-test builds one virtualenv per sanity test and bootstraps pip in it with
get-pip.py from ci-files.testing.ansible.com, which this network cannot reach, then installs
the test's pinned requirements from an index. Here, before ansible-test runs, pip (our own,
once per ansible-core and Python) downloads the pip wheel and every pinned requirement of
ansible-test's sanity tests into a wheelhouse; a stand-in get-pip.py installs pip from its
wheel, and a pip.conf in ansible-test's $HOME (tests/output/.ansible-test-home, git- and
build-ignored) says no-index, find-links=the wheelhouse. So ansible-test's virtualenvs never
reach an index; they are made once and reused.
"""

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import BPFFS, COLLECTIONS, REPO, VENV_BIN, converge_tasks, remove_pin_dir, teardown_tasks
from support import hostenv
from test_boot import run_role

OUTPUT = os.path.join(REPO, 'tests', 'output')
TEST_HOME = os.path.join(OUTPUT, '.ansible-test-home')
COMPAT = os.path.join(OUTPUT, 'compat')
MODULES = ['bpf_program', 'bpf_attach', 'bpf_info', 'sockredir_instance']


def pyenv_python(version):
    found = sorted(glob.glob('/root/.pyenv/versions/%s.*/bin/python' % version))
    return found[-1] if found else None


# The two ends of meta/runtime.yml's range, each with the controller Python it runs on:
# 2.16, the oldest kept (the ansible-core Ubuntu 24.04 LTS packages), on Debian 12's Python 3.11;
# 2.21, the newest release, which needs Python 3.12+ on the controller, on pyenv's Python 3.13.
# The .venv in between (2.19, Python 3.11) runs everything else.
CORES = {
    'oldest': ('2.16', '/usr/bin/python3'),
    'newest': ('2.21', pyenv_python('3.13')),
}
OLDEST_CORE = CORES['oldest'][0]

GET_PIP_STAND_IN = '''\
"""Stand-in for get-pip.py: pip, run from its own wheel, installs that wheel."""
import os
import runpy
import sys

wheel = os.path.join(os.path.dirname(os.path.abspath(__file__)), %r)
args = [a for a in sys.argv[1:] if a not in ('--no-setuptools', '--no-wheel') and not a.startswith('pip==')]
sys.path.insert(0, wheel)
sys.argv = ['pip', 'install', '--no-index', '--force-reinstall'] + args + [wheel]
runpy.run_module('pip', run_name='__main__', alter_sys=True)
'''


def tool(name):
    path = os.path.join(VENV_BIN, name)
    if not os.access(path, os.X_OK):
        pytest.fail('%s is missing from .venv: run scripts/bootstrap.sh (tests/requirements.txt)' % name)
    return path


def run(argv, cwd=REPO, env=None, timeout=600):
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def controller_env(**extra):
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_NOCOLOR='1', NO_COLOR='1',
               PATH=VENV_BIN + os.pathsep + os.environ.get('PATH', ''))
    env.update(extra)
    return env


# -- ansible-lint -------------------------------------------------------------------------------

def test_ansible_lint_production_profile_passes_on_the_repository():
    rc, out = run([tool('ansible-lint'), '--nocolor', '--profile', 'production'], env=controller_env())
    assert rc == 0, out
    assert "Profile 'production' was required, and it passed" in out, out


# -- ansible-test --------------------------------------------------------------------------------

def compat_bin(end):
    """Controller bin directory with the ansible-core of `end` ('oldest' or 'newest') in a venv of
    its own, made from that end's Python; None: the .venv (ansible-core 2.19)."""
    if end is None:
        return VENV_BIN
    version, python = CORES[end]
    if python is None:
        pytest.fail('ansible-core %s needs a Python 3.13 controller: none in /root/.pyenv/versions' % version)
    venv = os.path.join(COMPAT, 'ansible-core-%s' % version)
    marker = os.path.join(venv, '.installed')
    if not os.path.exists(marker):
        shutil.rmtree(venv, ignore_errors=True)
        rc, out = run([python, '-m', 'venv', venv])
        assert rc == 0, out
        major, minor = version.split('.')
        rc, out = run([os.path.join(venv, 'bin', 'pip'), 'install', '-q', '--disable-pip-version-check',
                       'ansible-core>=%s,<%s.%d' % (version, major, int(minor) + 1)], timeout=600)
        assert rc == 0, out
        open(marker, 'w').close()
    return os.path.join(venv, 'bin')


def ansible_test_dir(bindir):
    rc, out = run([os.path.join(bindir, 'python'), '-c', 'import ansible_test, os; print(os.path.dirname(ansible_test.__file__))'])
    assert rc == 0, out
    return out.strip()


def prepare_test_home(bindir, wheels=True):
    """$HOME for ansible-test of bindir: the get-pip stand-in and the pip wheel it installs, a
    wheelhouse with every pinned requirement of ansible-test's sanity tests, and a pip.conf that
    makes the sanity virtualenvs install from it only."""
    package = ansible_test_dir(bindir)
    with open(os.path.join(package, '_internal', 'python_requirements.py')) as f:
        text = f.read()
    version = re.search(r"pip='([0-9.]+)'", text).group(1)
    # older ansible-test (2.16) also bootstraps these next to pip
    bootstrap = ['%s==%s' % (name, found.group(1)) for name, found in
                 ((n, re.search(r"%s='([0-9.]+)'" % n, text)) for n in ('setuptools', 'wheel')) if found]
    cache = os.path.join(TEST_HOME, '.ansible', 'test', 'cache')
    wheelhouse = os.path.join(TEST_HOME, 'wheelhouse')
    os.makedirs(cache, exist_ok=True)
    os.makedirs(wheelhouse, exist_ok=True)
    wheel = 'pip-%s-py3-none-any.whl' % version
    if not os.path.exists(os.path.join(cache, wheel)):
        rc, out = run([os.path.join(VENV_BIN, 'pip'), 'download', '--no-deps', '--disable-pip-version-check',
                       '-d', cache, 'pip==%s' % version])
        assert rc == 0, 'cannot download pip %s for ansible-test: %s' % (version, out)
    with open(os.path.join(cache, 'get_pip_%s.py' % version.replace('.', '_')), 'w') as f:
        f.write(GET_PIP_STAND_IN % wheel)
    # downloaded by bindir's own Python, so the wheels fit the interpreter the virtualenvs use
    requirements = sorted(glob.glob(os.path.join(package, '_data', 'requirements', 'sanity.*.txt')))
    assert requirements, package
    digest = hashlib.sha256()
    for req in requirements:
        with open(req, 'rb') as f:
            digest.update(f.read())
    marker = os.path.join(wheelhouse, '.done-%s-%s' % (core_version(bindir)[1], digest.hexdigest()[:16]))
    if wheels and not os.path.exists(marker):
        if bootstrap:
            rc, out = run([os.path.join(bindir, 'python'), '-m', 'pip', 'download', '-q', '--no-deps',
                           '--disable-pip-version-check', '-d', wheelhouse] + bootstrap, timeout=600)
            assert rc == 0, 'cannot download %s for ansible-test: %s' % (bootstrap, out)
        for req in requirements:
            rc, out = run([os.path.join(bindir, 'python'), '-m', 'pip', 'download', '-q',
                           '--disable-pip-version-check', '-d', wheelhouse, '-r', req], timeout=600)
            assert rc == 0, 'cannot download the requirements of %s: %s' % (req, out)
        open(marker, 'w').close()
    pip_conf = os.path.join(TEST_HOME, '.config', 'pip', 'pip.conf')
    os.makedirs(os.path.dirname(pip_conf), exist_ok=True)
    with open(pip_conf, 'w') as f:
        f.write('[global]\nno-index = true\nfind-links = %s\n' % wheelhouse)
    return TEST_HOME


@pytest.fixture(scope='module')
def collection_copy(tmp_path_factory):
    """The working tree as ansible-test wants it: .../ansible_collections/ebpf/sockredir."""
    root = tmp_path_factory.mktemp('ansible-test') / 'ansible_collections' / 'ebpf' / 'sockredir'
    shutil.copytree(REPO, root, symlinks=True, ignore=shutil.ignore_patterns(
        '.git', '.venv', 'output', '__pycache__', '.pytest_cache', '.cache', '.ansible', '*.tar.gz'))
    return str(root)


def ansible_test(collection, bindir, *args):
    env = controller_env(HOME=prepare_test_home(bindir, wheels=args[0] == 'sanity'),
                         PATH=bindir + os.pathsep + os.environ.get('PATH', ''))
    env.pop('ANSIBLE_COLLECTIONS_PATH')  # ansible-test finds the collection from the working directory
    rc, out = run([os.path.join(bindir, 'python'), '-c', 'import sys; print("%d.%d" % sys.version_info[:2])'])
    return run([os.path.join(bindir, 'ansible-test')] + list(args) + ['--python', out.strip(), '--color', 'no'],
               cwd=collection, env=env, timeout=1200)


@pytest.mark.parametrize('end', sorted(CORES))
def test_ansible_test_sanity_passes_on_the_whole_tree(collection_copy, end):
    rc, out = ansible_test(collection_copy, compat_bin(end), 'sanity')
    assert rc == 0, out
    for test in ('validate-modules', 'pylint', 'pep8', 'shellcheck', 'yamllint', 'ansible-doc', 'import', 'shebang'):
        assert 'Running sanity test "%s"' % test in out, out
    assert 'Required program' not in out, out  # no test skipped for a missing tool
    # the virtualenvs were filled from the wheelhouse, not from an index
    assert not re.search(r'^\s*Downloading ', out, re.M), out


def passed_count(out):
    found = re.findall(r'(\d+) passed', out)
    assert found, out
    return int(found[-1])


def test_unit_tests_pass_the_same_under_ansible_test_and_pytest(collection_copy):
    for plugin in ('xdist', 'pytest_mock', 'mock'):   # what ansible-test units loads
        try:
            __import__(plugin)
        except ImportError:
            pytest.fail('ansible-test units needs %s: add pytest-xdist, pytest-mock and mock to '
                        'tests/requirements.txt and run scripts/bootstrap.sh' % plugin)
    rc, out = ansible_test(collection_copy, VENV_BIN, 'units')
    assert rc == 0, out
    under_ansible_test = passed_count(out)
    rc, out = run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/unit'],
                  env=controller_env())
    assert rc == 0, out
    assert passed_count(out) == under_ansible_test > 0, out


# -- docs ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def own_collections(tmp_path_factory):
    """A collections path with only this collection and its dependency ansible.posix (from the
    ansible package in .venv): what a user installs, for antsibull-docs (which otherwise reads
    the hundred collections of the ansible package) and for the oldest ansible-core."""
    from ansible_collections.ansible import posix
    root = tmp_path_factory.mktemp('collections')
    for name, target in (('ebpf/sockredir', REPO), ('ansible/posix', list(posix.__path__)[0])):
        os.makedirs(root / 'ansible_collections' / os.path.dirname(name), exist_ok=True)
        os.symlink(target, root / 'ansible_collections' / name)
    return root


@pytest.fixture(scope='module')
def docs_env(own_collections):
    return (controller_env(ANSIBLE_COLLECTIONS_PATH=str(own_collections), ANSIBLE_COLLECTIONS_SCAN_SYS_PATH='false'),
            own_collections)


def test_antsibull_docs_lints_the_module_and_role_docs(docs_env):
    env, root = docs_env
    rc, out = run([tool('antsibull-docs'), 'lint-collection-docs', '--plugin-docs', '--validate-collection-refs',
                   'all', '--disallow-unknown-collection-refs',
                   str(root / 'ansible_collections' / 'ebpf' / 'sockredir')], env=env)
    assert rc == 0 and not out.strip(), out


def test_antsibull_docs_renders_every_module_and_the_role(docs_env, tmp_path):
    env, _root = docs_env
    rc, out = run([tool('antsibull-docs'), 'collection', '--use-current', '--dest-dir', str(tmp_path),
                   'ebpf.sockredir'], env=env)
    assert rc == 0, out
    pages = tmp_path / 'collections' / 'ebpf' / 'sockredir'
    for module in MODULES:
        rst = (pages / ('%s_module.rst' % module)).read_text()
        with open(os.path.join(REPO, 'plugins', 'modules', '%s.py' % module)) as f:
            doc = yaml.safe_load(f.read().split("DOCUMENTATION = r'''", 1)[1].split("'''", 1)[0])
        for option in doc['options']:
            assert option in rst, '%s: option %s is not in the rendered page' % (module, option)
    role = (pages / 'sockredir_role.rst').read_text()
    with open(os.path.join(REPO, 'roles', 'sockredir', 'meta', 'argument_specs.yml')) as f:
        for option in yaml.safe_load(f)['argument_specs']['main']['options']:
            assert option in role, 'role: %s is not in the rendered page' % option


# -- ansible-core versions -----------------------------------------------------------------------

def test_requires_ansible_admits_the_oldest_tested_version():
    with open(os.path.join(REPO, 'meta', 'runtime.yml')) as f:
        requires = yaml.safe_load(f)['requires_ansible']
    assert requires == '>=%s.0' % OLDEST_CORE, requires  # and no upper bound: the newest is tested


def core_version(bindir):
    rc, out = run([os.path.join(bindir, 'ansible'), '--version'])
    assert rc == 0, out
    return re.search(r'core ([0-9.]+)', out).group(1), re.search(r'python version = ([0-9.]+)', out).group(1)


@pytest.mark.parametrize('end', sorted(CORES))
def test_module_lifecycle_on_the_oldest_and_newest_ansible_core(end, tmp_path, pin_dir, cgroup):
    bindir = compat_bin(end)
    core, python = core_version(bindir)
    assert core.startswith(CORES[end][0] + '.'), core
    if end == 'newest':
        assert python.startswith('3.13.'), python
    env = controller_env(PATH=bindir + os.pathsep + os.environ.get('PATH', ''),
                         ANSIBLE_LOCALHOST_WARNING='false', ANSIBLE_INVENTORY_UNPARSED_WARNING='false')

    rc, out = run([os.path.join(bindir, 'ansible-doc'), '--json'] + ['ebpf.sockredir.' + m for m in MODULES], env=env)
    assert rc == 0, out
    docs = json.loads(out)
    assert sorted(docs) == sorted('ebpf.sockredir.' + m for m in MODULES), out

    results = tmp_path / 'results.json'
    tasks = []
    for round_, steps in (('first', converge_tasks(pin_dir, cgroup)), ('second', converge_tasks(pin_dir, cgroup)),
                          ('absent', teardown_tasks(pin_dir, cgroup))):
        for i, task in enumerate(steps):
            tasks.append(dict(task, name='%s: %s' % (round_, task['name']), register='%s_%d' % (round_, i)))
    names = [t['register'] for t in tasks]
    tasks.append(dict(name='save the results', **{'ansible.builtin.copy': dict(
        dest=str(results), mode='0600',
        content='{{ {%s} | to_json }}' % ', '.join("'%s': %s" % (n, n) for n in names))}))
    play = tmp_path / 'lifecycle.yml'
    play.write_text(yaml.safe_dump([dict(hosts='localhost', gather_facts=False, tasks=tasks)]))
    rc, out = run([os.path.join(bindir, 'ansible-playbook'), '-i', 'localhost,', '-c', 'local',
                   '-e', 'ansible_python_interpreter=/usr/bin/python3', str(play)], env=env)
    assert rc == 0, out
    with open(results) as f:
        done = json.load(f)
    changed = {name: done[name]['changed'] for name in names}
    assert all(changed['first_%d' % i] for i in range(3)), changed
    assert not any(changed['second_%d' % i] for i in range(3)), changed
    assert all(changed['absent_%d' % i] for i in range(3)), changed
    assert not os.path.exists(pin_dir)


@pytest.mark.parametrize('end', sorted(CORES))
def test_the_role_converges_idempotently_and_goes_away_on_the_oldest_and_newest_ansible_core(
        end, tmp_path, cgroup, own_collections):
    """The role's Jinja, argument specs and ansible.posix tasks at both ends of the range."""
    bindir = compat_bin(end)
    pin_root = os.path.join(BPFFS, hostenv.unique_name('srcompat'))
    role_vars = dict(sockredir_cgroup=cgroup, sockredir_pin_root=pin_root, sockredir_src_dir=str(tmp_path / 'src'),
                     sockredir_install_packages=False)
    try:
        first = run_role(tmp_path, role_vars, 'first', bindir, str(own_collections))
        assert first.rc == 0 and first.changed > 0, first
        second = run_role(tmp_path, role_vars, 'second', bindir, str(own_collections))
        assert second.rc == 0, second
        assert second.changed == 0, [n for n, t in second.tasks.items() if t.get('changed')]
        gone = run_role(tmp_path, dict(role_vars, sockredir_state='absent'), 'absent', bindir, str(own_collections))
        assert gone.rc == 0 and gone.changed > 0, gone
        assert not os.path.exists(pin_root)
    finally:
        if os.path.exists(pin_root):
            run_role(tmp_path, dict(role_vars, sockredir_state='absent'), 'cleanup', bindir, str(own_collections))
            remove_pin_dir(pin_root)
