"""Bad input: a clear error naming the parameter, and the host exactly as before."""

import os
import subprocess

import pytest

from conftest import BPFFS, MAPS, PROGRAMS, SRC, bpftool_json, copy_sources, loaded_sockmap_prog_ids


def host_state(cgroup):
    pins = sorted(os.path.join(d, f) for d, _dirs, files in os.walk(BPFFS) for f in files)
    records = sorted(os.listdir('/run/ebpf-sockredir')) if os.path.isdir('/run/ebpf-sockredir') else []
    return dict(pins=pins, records=records, progs=loaded_sockmap_prog_ids(),
                attached=bpftool_json('cgroup', 'show', cgroup))


def load(pin_dir, **over):
    args = dict(src=SRC, pin_dir=pin_dir, programs=PROGRAMS, maps=MAPS)
    args.update(over)
    return {'ebpf.sockredir.bpf_program': args}


def broken_source(tmp_path):
    src = copy_sources(tmp_path)
    with open(src, 'a') as f:
        f.write('\nint broken(struct bpf_sock_ops *skops) { return undeclared_thing; }\n')
    return src


CASES = {
    'cgroup that does not exist': (
        lambda p, cg, tmp: {'ebpf.sockredir.bpf_attach': dict(
            program=p + '/sockredir_ops', cgroup=cg + '/no-such-child')},
        'cgroup', 'does not exist'),
    'cgroup on cgroup v1': (
        lambda p, cg, tmp: {'ebpf.sockredir.bpf_attach': dict(
            program=p + '/sockredir_ops', cgroup='/sys/fs/cgroup/memory')},
        'cgroup', 'cgroup v2'),
    'cgroup outside any cgroup fs': (
        lambda p, cg, tmp: {'ebpf.sockredir.bpf_attach': dict(program=p + '/sockredir_ops', cgroup='/tmp')},
        'cgroup', 'cgroup v2'),
    'pin_dir not on bpffs': (
        lambda p, cg, tmp: load(str(tmp / 'not-bpffs')),
        'pin_dir', 'below a mounted bpffs'),
    'pin_dir with ..': (
        lambda p, cg, tmp: load(p + '/../escape'),
        'pin_dir', '".."'),
    'source that does not compile': (
        lambda p, cg, tmp: load(p, src=broken_source(tmp)),
        'src', "use of undeclared identifier 'undeclared_thing'"),
    'source that does not exist': (
        lambda p, cg, tmp: load(p, src=str(tmp / 'missing.c')),
        'src', 'cannot read'),
    'program name not in the source': (
        lambda p, cg, tmp: load(p, programs=[dict(name='not_there', type='sock_ops')]),
        'programs', "'not_there' is not a function"),
    'program name too long for the kernel': (
        lambda p, cg, tmp: load(p, programs=[dict(name='a_name_longer_than_fifteen', type='sock_ops')]),
        'programs', 'at most 15 characters'),
    'program type not supported': (
        lambda p, cg, tmp: load(p, programs=[dict(name='sockredir_ops', type='xdp')]),
        'type', 'sock_ops, sk_msg'),
    'kernel headers directory that is not one': (
        lambda p, cg, tmp: load(p, kernel_headers=str(tmp)),
        'kernel_headers', 'not a kernel header tree'),
    'program pin that does not exist': (
        lambda p, cg, tmp: {'ebpf.sockredir.bpf_attach': dict(program=p + '/sockredir_ops', cgroup=cg)},
        'program', 'nothing is pinned'),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_input_fails_clearly_and_changes_nothing(play, pin_dir, cgroup, tmp_path, case):
    make, param, words = CASES[case]
    before = host_state(cgroup)
    result = play([dict(name='bad', **make(pin_dir, cgroup, tmp_path))])
    assert result.rc != 0
    bad = result.tasks['bad']
    assert bad.get('failed'), bad
    assert param in bad['msg'] and words in bad['msg'], bad['msg']
    assert host_state(cgroup) == before


def test_pin_of_another_type_is_refused_and_kept(play, pin_dir, cgroup):
    os.mkdir(pin_dir, 0o700)
    squatter = pin_dir + '/sockredir_ops'
    subprocess.run(['bpftool', 'map', 'create', squatter, 'type', 'array', 'key', '4', 'value', '4',
                    'entries', '1', 'name', 'squatter'], check=True)
    before = host_state(cgroup)
    result = play([dict(name='bad', **load(pin_dir))])
    assert result.rc != 0
    msg = result.tasks['bad']['msg']
    assert 'programs' in msg and squatter in msg and 'holds a map, expected a program' in msg
    assert host_state(cgroup) == before
    assert bpftool_json('map', 'show', 'pinned', squatter)['name'] == 'squatter'


def test_a_failed_load_removes_the_maps_it_created(play, pin_dir, cgroup):
    """The compile pins the maps before the loader sees a bad program name: they are removed again."""
    result = play([dict(name='bad', **load(pin_dir, programs=[dict(name='nope', type='sk_msg')]))])
    assert result.rc != 0
    assert not os.path.exists(pin_dir)
