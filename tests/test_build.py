"""The collection as users get it: built, installed into a fresh path, documented."""

import json
import os
import subprocess

import pytest

from conftest import REPO, VENV_BIN

MODULES = ['bpf_program', 'bpf_attach', 'bpf_info', 'sockredir_instance']


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    build = tmp_path_factory.mktemp('build')
    subprocess.run([os.path.join(VENV_BIN, 'ansible-galaxy'), 'collection', 'build', REPO,
                    '--output-path', str(build)], check=True, capture_output=True)
    tarballs = list(build.glob('ebpf-sockredir-*.tar.gz'))
    assert len(tarballs) == 1
    path = tmp_path_factory.mktemp('collections')
    # --force: the checkout itself is on ANSIBLE_COLLECTIONS_PATH, and would count as installed
    subprocess.run([os.path.join(VENV_BIN, 'ansible-galaxy'), 'collection', 'install', '--offline',
                    '--no-deps', '--force', '-p', str(path), str(tarballs[0])], check=True,
                   capture_output=True, env=dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(path)))
    root = path / 'ansible_collections' / 'ebpf' / 'sockredir'
    assert (root / 'files' / 'bpf' / 'sockredir.bpf.c').is_file()
    assert not (root / '.venv').exists()
    return path


@pytest.mark.parametrize('module', MODULES)
def test_ansible_doc_prints_complete_docs(installed, module):
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(installed))
    out = subprocess.run([os.path.join(VENV_BIN, 'ansible-doc'), 'ebpf.sockredir.' + module],
                         check=True, capture_output=True, text=True, env=env).stdout
    for section in ('OPTIONS', 'EXAMPLES', 'RETURN VALUES', 'ATTRIBUTES'):
        assert section in out, '%s lacks %s' % (module, section)
    assert 'ebpf.sockredir.%s' % module in out
    assert 'WARNING' not in out


def test_installed_collection_runs_a_module(installed):
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(installed))
    out = subprocess.run([os.path.join(VENV_BIN, 'ansible'), 'localhost', '-c', 'local',
                          '-e', 'ansible_python_interpreter=/usr/bin/python3',
                          '-m', 'ebpf.sockredir.bpf_info'],
                         capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"sockredir_ready": true' in out.stdout


def test_module_respawns_under_the_python_that_has_bcc(tmp_path, pin_dir):
    """Started by an interpreter without bcc, bpf_program re-runs itself under /usr/bin/python3."""
    bare = tmp_path / 'bare'
    subprocess.run(['/usr/bin/python3', '-m', 'venv', '--without-pip', str(bare)], check=True)
    python = str(bare / 'bin' / 'python')
    assert subprocess.run([python, '-c', 'import bcc'], capture_output=True, check=False).returncode != 0
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=os.path.join(REPO, '.venv', 'collections'))
    args = json.dumps(dict(src=os.path.join(REPO, 'files/bpf/sockredir.bpf.c'), pin_dir=pin_dir,
                           programs=[dict(name='sockredir_ops', type='sock_ops')]))
    out = subprocess.run([os.path.join(VENV_BIN, 'ansible'), 'localhost', '-c', 'local', '--check',
                          '-e', 'ansible_python_interpreter=' + python,
                          '-m', 'ebpf.sockredir.bpf_program', '-a', args],
                         capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"changed": true' in out.stdout and 'no record of a load' in out.stdout


def test_changelog_is_valid():
    out = subprocess.run([os.path.join(VENV_BIN, 'antsibull-changelog'), 'lint'], cwd=REPO,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == '', out.stdout + out.stderr
