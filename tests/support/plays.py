"""The module tasks the role runs, as playbook task lists: shared by the tests and the benchmark."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRC = os.path.join(REPO, 'files', 'bpf', 'sockredir.bpf.c')
PROGRAMS = [dict(name='sockredir_ops', type='sock_ops'), dict(name='sockredir_msg', type='sk_msg')]
MAPS = ['sockredir_hash', 'sockredir_stats']


def converge_tasks(pin_dir, cgroup, src=SRC, defines=None):
    """The three steps the role runs: load+pin, attach sock_ops, attach sk_msg."""
    return [
        dict(name='load', **{'ebpf.sockredir.bpf_program': dict(
            src=src, pin_dir=pin_dir, programs=PROGRAMS, maps=MAPS, defines=defines or {})}),
        dict(name='attach ops', **{'ebpf.sockredir.bpf_attach': dict(
            program=pin_dir + '/sockredir_ops', cgroup=cgroup)}),
        dict(name='attach msg', **{'ebpf.sockredir.bpf_attach': dict(
            program=pin_dir + '/sockredir_msg', map=pin_dir + '/sockredir_hash')}),
    ]


def teardown_tasks(pin_dir, cgroup):
    return [
        dict(name='detach msg', **{'ebpf.sockredir.bpf_attach': dict(
            program=pin_dir + '/sockredir_msg', map=pin_dir + '/sockredir_hash', state='absent')}),
        dict(name='detach ops', **{'ebpf.sockredir.bpf_attach': dict(
            program=pin_dir + '/sockredir_ops', cgroup=cgroup, state='absent')}),
        dict(name='unload', **{'ebpf.sockredir.bpf_program': dict(pin_dir=pin_dir, state='absent')}),
    ]
