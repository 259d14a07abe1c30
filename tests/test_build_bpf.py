"""scripts/build-bpf.sh: committed BPF objects match their sources, builds are reproducible, BTF kept."""

import glob
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'build-bpf.sh')
TEST_SRC_DIR = os.path.join(REPO, 'tests', 'data', 'bpf')
OBJECTS = sorted(glob.glob(os.path.join(REPO, 'files', 'bpf', '*.bpf.o')) +
                 glob.glob(os.path.join(TEST_SRC_DIR, '*.bpf.o')))


def build(*args):
    return subprocess.run(['bash', SCRIPT] + list(args), capture_output=True, text=True, check=False)


def test_there_is_a_committed_object_to_check():
    assert os.path.join(TEST_SRC_DIR, 'redir_test.bpf.o') in OBJECTS


@pytest.mark.parametrize('obj', OBJECTS, ids=lambda p: os.path.relpath(p, REPO))
def test_committed_object_matches_its_source(obj):
    src = obj[:-len('.o')] + '.c'
    assert os.path.exists(src), 'committed %s has no source %s' % (obj, src)
    proc = build('--check', src)
    assert proc.returncode == 0, proc.stderr


def test_two_builds_in_different_directories_give_the_same_bytes(tmp_path):
    a, b = tmp_path / 'a' / 'x', tmp_path / 'elsewhere'
    for d in (a, b):
        shutil.copytree(TEST_SRC_DIR, d)
        for o in d.glob('*.bpf.o'):
            o.unlink()
        proc = build(str(d))
        assert proc.returncode == 0, proc.stderr
    one, two = (d / 'redir_test.bpf.o' for d in (a, b))
    assert one.read_bytes() == two.read_bytes()
    assert one.read_bytes() == (open(os.path.join(TEST_SRC_DIR, 'redir_test.bpf.o'), 'rb').read())
    assert str(tmp_path).encode() not in one.read_bytes()


def test_check_names_an_object_its_source_no_longer_builds(tmp_path):
    d = tmp_path / 'bpf'
    shutil.copytree(TEST_SRC_DIR, d)
    src = d / 'redir_test.bpf.c'
    src.write_text(src.read_text().replace('__uint(max_entries, 1024);', '__uint(max_entries, 2048);'))
    proc = build('--check', str(d))
    assert proc.returncode == 1
    assert 'redir_test.bpf.o does not match' in proc.stderr


def test_object_keeps_btf_and_drops_dwarf():
    out = subprocess.run(['llvm-objdump', '-h', os.path.join(TEST_SRC_DIR, 'redir_test.bpf.o')],
                         capture_output=True, text=True, check=True).stdout
    sections = [line.split()[1] for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert {'.BTF', '.BTF.ext', '.maps', 'sockops', 'sk_msg', 'license'} <= set(sections)
    assert not [s for s in sections if s.startswith('.debug')]


def test_a_bad_argument_is_refused():
    proc = build('/nonexistent.c')
    assert proc.returncode == 2 and 'neither a directory nor a *.bpf.c file' in proc.stderr
