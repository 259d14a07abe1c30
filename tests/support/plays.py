"""The module tasks the role runs, as playbook task lists, and the last-resort cleanup of a pin dir:
shared by the tests and the benchmark."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRC = os.path.join(REPO, 'files', 'bpf', 'sockredir.bpf.c')
OBJECT = os.path.join(REPO, 'files', 'bpf', 'sockredir.bpf.o')   # SRC built by scripts/build-bpf.sh
PROGRAMS = [dict(name='sockredir_ops', type='sock_ops'), dict(name='sockredir_msg', type='sk_msg')]
# The role on this host, as a playbook (tests and benchmarks/rerun.py).
ROLE_PLAY = '''- hosts: localhost
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: /usr/bin/python3
  roles:
    - role: ebpf.sockredir.sockredir
'''

MAPS = ['sockredir_hash', 'sockredir_stats', 'sockredir_flows', 'sockredir_gates',
        'sockredir_reqs', 'sockredir_cfg', 'sockredir_ports']


def converge_tasks(pin_dir, cgroup, src=SRC, defines=None, obj=None):
    """The building blocks (generic modules) put together: load+pin, attach sk_msg, attach sock_ops.

    The programs come from src compiled by BCC, or from the prebuilt object obj.
    sk_msg first: a socket takes the sockhash's verdict program when it is
    inserted. The role does not use these: it makes one engine call
    (sockredir_instance), see instance_task().
    """
    load = (dict(object=obj, pin_dir=pin_dir, programs=PROGRAMS, maps=MAPS) if obj else
            dict(src=src, pin_dir=pin_dir, programs=PROGRAMS, maps=MAPS, defines=defines or {}))
    return [
        dict(name='load', **{'ebpf.sockredir.bpf_program': load}),
        dict(name='attach msg', **{'ebpf.sockredir.bpf_attach': dict(
            program=pin_dir + '/sockredir_msg', map=pin_dir + '/sockredir_hash')}),
        dict(name='attach ops', **{'ebpf.sockredir.bpf_attach': dict(
            program=pin_dir + '/sockredir_ops', cgroup=cgroup)}),
    ]


def teardown_tasks(pin_dir, cgroup):
    return [
        dict(name='detach msg', **{'ebpf.sockredir.bpf_attach': dict(
            program=pin_dir + '/sockredir_msg', map=pin_dir + '/sockredir_hash', state='absent')}),
        dict(name='detach ops', **{'ebpf.sockredir.bpf_attach': dict(
            program=pin_dir + '/sockredir_ops', cgroup=cgroup, state='absent')}),
        dict(name='unload', **{'ebpf.sockredir.bpf_program': dict(pin_dir=pin_dir, state='absent')}),
    ]


def remove_pin_dir(pin_dir):
    """Last resort after a test or run: unpin everything in pin_dir, drop its records (bpf_program's, the instance's).

    Unpinning the map drops its sk_msg attachment with it; a cgroup attachment
    goes with the cgroup.
    """
    from ansible_collections.ebpf.sockredir.plugins.module_utils import instance, program
    if os.path.isdir(pin_dir):
        for name in os.listdir(pin_dir):
            os.unlink(os.path.join(pin_dir, name))
        os.rmdir(pin_dir)
    for record in (program.record_path(pin_dir), instance.record_path(pin_dir)):
        if os.path.exists(record):
            os.unlink(record)
