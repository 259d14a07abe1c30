"""Bad input to the role's variables and the modules' parameters.

Every case must fail with a message that names the variable or parameter,
and leave the host as it was: the pin root and source directory of the case,
the engine's record of it and bpf_program's record, the attachments
and child cgroups of the test's cgroup, and mounts on the test's paths are
compared before and after. (tests/test_bad_input.py covers further module
cases: missing cgroup, cgroup v1, broken source, unknown program, long
program names, unsupported type, bad kernel_headers, squatted pin.)

All role cases run in one ansible-playbook, each in a block whose rescue
records the failure (the play goes on, the host is looked at once); the
module cases likewise, with ignore_errors. Cases the product gets wrong
today are strict xfails naming the bug (docs/reliability.md): fix the bug,
then drop the mark.
"""

import json
import os
import re
import subprocess

import pytest

import conftest
from support import hostenv

from ansible_collections.ebpf.sockredir.plugins.module_utils import facts, instance, policy, program

from . import kit

ROLE = 'ebpf.sockredir.sockredir'
TOO_LONG = 'n' * 300   # a path component longer than NAME_MAX (255)

# name: (overrides of the valid baseline, words the message must contain, known bug or None)
ROLE_CASES = {
    'state not a choice': (dict(sockredir_state='enabled'), ['sockredir_state'], None),
    'cgroup a list': (dict(sockredir_cgroup=['x']), ['sockredir_cgroup'], None),
    'cgroup with ..': (dict(sockredir_cgroup='../../etc'), ['sockredir_cgroup', '..'], None),
    'cgroup outside cgroup v2': (dict(sockredir_cgroup='/tmp'), ['sockredir_cgroup', 'cgroup v2'], None),
    'cgroup on cgroup v1': (dict(sockredir_cgroup='/sys/fs/cgroup/memory'),
                            ['sockredir_cgroup', 'cgroup v2'], None),
    'cgroup that does not exist': (dict(sockredir_cgroup='srrel-no-such-cgroup'),
                                   ['sockredir_cgroup', 'does not exist'], None),
    # the whole host is never the default: naming both variables, nothing attached to the root cgroup
    'cgroup empty without whole_host': (dict(sockredir_cgroup=''), ['sockredir_cgroup', 'sockredir_whole_host'],
                                        None),
    'pin_root outside bpffs': (dict(sockredir_pin_root='/tmp/srrel-pin'), ['sockredir_pin_root'], None),
    'pin_root with ..': (dict(sockredir_pin_root='/sys/fs/bpf/../srrel-escape'), ['sockredir_pin_root'], None),
    'pin_root is the bpffs mount': (dict(sockredir_pin_root='/sys/fs/bpf'), ['sockredir_pin_root'], None),
    'pin_root name too long': (dict(sockredir_pin_root='/sys/fs/bpf/' + TOO_LONG), ['sockredir_pin_root'], None),
    'map_size 0': (dict(sockredir_map_size=0), ['sockredir_map_size'], None),
    'map_size other than the object\'s': (dict(sockredir_map_size=4096), ['sockredir_map_size'], None),
    'loader unknown': (dict(sockredir_loader='llvm'), ['sockredir_loader'], None),
    'debug not a boolean': (dict(sockredir_debug='maybe'), ['sockredir_debug'], None),
    'port both allowed and denied': (dict(sockredir_allow_ports=[80], sockredir_deny_ports=[80]),
                                     ['sockredir_allow_ports'], None),
    'map_size not a number': (dict(sockredir_map_size='many'), ['sockredir_map_size'], None),
    'map_size above u32': (dict(sockredir_map_size=1 << 32), ['sockredir_map_size'], None),
    'map_size above the kernel maximum': (dict(sockredir_map_size=(1 << 32) - 1), ['sockredir_map_size'], None),
    'allow port 0': (dict(sockredir_allow_ports=[0]), ['sockredir_allow_ports'], None),
    'deny ports a word': (dict(sockredir_deny_ports='ssh'), ['sockredir_deny_ports'], None),
    'allow 1025 ports': (dict(sockredir_allow_ports=list(range(1000, 2025))), ['sockredir_allow_ports'], None),
    'install_packages not a boolean': (dict(sockredir_install_packages='maybe'),
                                       ['sockredir_install_packages'], None),
    'bpffs_mount relative': (dict(sockredir_bpffs_mount='sys/fs/bpf'), ['sockredir_bpffs_mount'], None),
    'kernel_headers not a header tree': (dict(sockredir_loader='bcc', sockredir_kernel_headers='/nonexistent/headers'),
                                         ['sockredir_kernel_headers'], None),
    'src_dir empty': (dict(sockredir_src_dir=''), ['sockredir_src_dir'], None),
}


def role_case_vars(workdir, cgroup, tag, index, overrides):
    out = dict(sockredir_cgroup=cgroup, sockredir_pin_root='/sys/fs/bpf/%s-%d' % (tag, index),
               sockredir_src_dir=os.path.join(str(workdir), 'src%d' % index), sockredir_install_packages=False)
    out.update(overrides)
    return out


def rescued_case(name, role_vars):
    record = "{{ srrel_results | default({}) | combine({%r: %s}) }}"
    return dict(name='case: %s' % name, block=[
        {'ansible.builtin.include_role': dict(name=ROLE), 'vars': role_vars},
        {'ansible.builtin.set_fact': dict(srrel_results=record % (name, "{'failed': false}"))},
    ], rescue=[
        {'ansible.builtin.set_fact': dict(srrel_results=record % (
            name, "{'failed': true, 'task': ansible_failed_task.name, "
                  "'msg': ansible_failed_result.msg | default('') | string}"))},
    ])


def names(message, word):
    """word is in message; an identifier only as a whole word (not inside __sockredir_cgroup_path)."""
    if re.fullmatch(r'\w+', word):
        return re.search(r'(?<!\w)%s(?!\w)' % re.escape(word), message) is not None
    return word in message


def exists(path):
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):
        return False


def instance_record(pin_root):
    """The engine's record of pin_root, or None."""
    try:
        with open(instance.record_path(os.path.normpath(pin_root))) as f:
            return json.load(f)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def case_state(pin_root, src_dir):
    """What one case could have changed (only the existence of a pin root that is not ours)."""
    ours = isinstance(pin_root, str) and pin_root.startswith('/sys/fs/bpf/srrel-bad-')
    return dict(pin_root=exists(pin_root) and (sorted(os.listdir(pin_root)) if ours else True),
                src_dir=bool(src_dir) and exists(src_dir),
                role_record=instance_record(pin_root),
                module_record=bool(pin_root) and exists(program.record_path(os.path.normpath(pin_root))))


def shared_state(cgroup, workdir, tag, case_pins=()):
    """What any case could have changed outside its own paths (those are in case_state).

    The attachments and child cgroups of the test's cgroup, mounts on the
    test's paths, and pins or files under other names than the cases' own.
    """
    with open('/proc/self/mountinfo') as f:
        mounts = sorted(line.split()[4] for line in f if 'srrel' in line.split()[4]
                        or line.split()[4].startswith(str(workdir)))
    return dict(attached=[p['id'] for p in facts.cgroup_attachments(cgroup)['sock_ops']],
                children=sorted(d for d in os.listdir(cgroup) if os.path.isdir(os.path.join(cgroup, d))),
                mounts=mounts,
                pins=sorted(n for n in os.listdir(conftest.BPFFS)
                            if n.startswith(tag) and os.path.join(conftest.BPFFS, n) not in case_pins),
                files=sorted(n for n in os.listdir(str(workdir))
                             if not n.endswith('.json') and not re.match(r'src\d+$', n)))


def clean_up_role_cases(workdir, cases):
    """Undo what the role left for failed cases: state=absent for each, then by hand."""
    leftovers = [(name, v) for name, v in cases
                 if exists(v['sockredir_pin_root']) or instance_record(v['sockredir_pin_root']) is not None]
    if leftovers:
        kit.run_tasks(workdir, [rescued_case('cleanup ' + name, dict(v, sockredir_state='absent'))
                                for name, v in leftovers], name='cleanup')
    for _name, v in cases:
        pin_root = v['sockredir_pin_root']
        if isinstance(pin_root, str) and pin_root.startswith('/sys/fs/bpf/srrel-bad') and exists(pin_root):
            conftest.remove_pin_dir(pin_root)
        # records an absent run could not remove
        if isinstance(pin_root, str) and instance_record(pin_root) is not None:
            os.unlink(instance.record_path(os.path.normpath(pin_root)))


@pytest.fixture(scope='module')
def role_outcomes(tmp_path_factory):
    workdir = tmp_path_factory.mktemp('bad-role')
    tag = hostenv.unique_name('srrel-bad')
    with hostenv.child_cgroup(kit.PREFIX) as cg:
        cases = [(name, role_case_vars(workdir, cg, tag, i, ROLE_CASES[name][0]))
                 for i, name in enumerate(sorted(ROLE_CASES))]
        before = {name: case_state(v['sockredir_pin_root'], v['sockredir_src_dir']) for name, v in cases}
        case_pins = {v['sockredir_pin_root'] for _name, v in cases}
        shared_before = shared_state(cg, workdir, tag, case_pins)
        try:
            tasks = [rescued_case(name, v) for name, v in cases]
            tasks.append({'name': 'save', 'ansible.builtin.copy': dict(
                content='{{ srrel_results | to_nice_json }}', dest=str(workdir / 'results.json'))})
            play = kit.run_tasks(workdir, tasks, name='bad-role')
            with open(str(workdir / 'results.json')) as f:
                results = json.load(f)
            after = {name: case_state(v['sockredir_pin_root'], v['sockredir_src_dir']) for name, v in cases}
            shared_after = shared_state(cg, workdir, tag, case_pins)
            yield dict(results=results, before=before, after=after, play=play,
                       shared=(shared_before, shared_after))
        finally:
            clean_up_role_cases(workdir, cases)


def case_params(cases):
    for name in sorted(cases):
        bug = cases[name][-1]
        yield pytest.param(name, marks=[pytest.mark.xfail(reason=bug, strict=True)] if bug else [])


@pytest.mark.parametrize('case', list(case_params(ROLE_CASES)))
def test_bad_role_variable(role_outcomes, case):
    _overrides, words, _bug = ROLE_CASES[case]
    result = role_outcomes['results'][case]
    assert result['failed'], 'the role accepted it'
    for word in words:
        assert names(result['msg'], word), result
    assert role_outcomes['after'][case] == role_outcomes['before'][case], 'the host changed'


def test_bad_role_variables_leave_shared_state_alone(role_outcomes):
    before, after = role_outcomes['shared']
    assert after == before


def test_variables_given_as_strings_on_the_command_line(tmp_path):
    """`-e name=value` makes every value a string: "false" and "8" must work as false and 8."""
    with hostenv.child_cgroup(kit.PREFIX) as cg:
        role = kit.RoleInstance(tmp_path, cg)
        try:
            command = kit.role_command(tmp_path, dict(
                sockredir_cgroup=cg, sockredir_pin_root=role.pin_root, sockredir_src_dir=role.src_dir))
            command += ['-e', 'sockredir_install_packages=false', '-e', 'sockredir_map_size=65535',
                        '-e', 'sockredir_small_write_streak=8', '-e', 'sockredir_debug=false',
                        '-e', 'sockredir_recreate_maps=false', '-e', 'sockredir_bpffs_persist=false']
            proc = subprocess.run(command, capture_output=True, text=True, env=kit.role_env(), timeout=300,
                                  cwd=str(tmp_path), check=False)
            run = kit.RoleRun(proc.returncode, proc.stdout + proc.stderr)
            if run.rc != 0:
                assert 'sockredir_install_packages' in run.output, run
            assert run.rc == 0, run
            assert facts.pin_dir_facts(role.pin_root)['maps']['sockredir_hash']['max_entries'] == 65535
            settings = policy.read_path(role.pin_root)
            assert settings['small_write_streak'] == 8 and settings['debug'] is False, settings
        finally:
            role.cleanup()


# -- modules -----------------------------------------------------------------

def load(**over):
    def task(pin, cgroup):
        args = dict(src=conftest.SRC, pin_dir=pin, programs=conftest.PROGRAMS, maps=conftest.MAPS)
        args.update(over)
        return {'ebpf.sockredir.bpf_program': args}
    return task


def attach(**over):
    def task(pin, cgroup):
        args = dict(program=pin + '/sockredir_ops', cgroup=cgroup)
        args.update({k: v(pin, cgroup) if callable(v) else v for k, v in over.items()})
        return {'ebpf.sockredir.bpf_attach': args}
    return task


def module(name, **args):
    def task(pin, cgroup):
        return {name: {k: v(pin, cgroup) if callable(v) else v for k, v in args.items()}}
    return task


# name: (task builder (pin dir of the case, cgroup), words the message must contain, known bug or None)
MODULE_CASES = {
    'bpf_program programs a string': (load(programs='sockredir_ops'), ['programs'],
                                      'ansible-core\'s "dictionary requested, could not parse JSON or '
                                      'key=value" does not name the option (no suboptions spec)'),
    'bpf_program programs empty': (load(programs=[]), ['programs'], None),
    'bpf_program defines a list': (load(defines=['SOCKREDIR_MAP_SIZE=8']), ['defines'], None),
    'bpf_program state not a choice': (load(state='maybe'), ['state'], None),
    'bpf_program pin_dir empty': (load(pin_dir=''), ['pin_dir'], None),
    'bpf_program pin_dir relative': (load(pin_dir='srrel-relative'), ['pin_dir'], None),
    'bpf_program pin_dir name too long': (load(pin_dir='/sys/fs/bpf/' + TOO_LONG), ['pin_dir'], None),
    'bpf_program src empty': (load(src=''), ['src'], None),
    'bpf_program map name too long': (load(maps=['sockredir_hash_with_a_long_name']), ['maps'], None),
    'bpf_program map size 0': (load(defines={'SOCKREDIR_MAP_SIZE': 0}), ['SOCKREDIR_MAP_SIZE'], None),
    'bpf_program map size above the kernel maximum': (
        load(defines={'SOCKREDIR_MAP_SIZE': (1 << 32) - 1}), ['SOCKREDIR_MAP_SIZE', 'maps'], None),
    'bpf_attach cgroup empty': (attach(cgroup=''), ['cgroup'], None),
    'bpf_attach program with ..': (attach(program='/sys/fs/bpf/../srrel/sockredir_ops'), ['program'], None),
    'bpf_attach map outside bpffs': (module('ebpf.sockredir.bpf_attach', program=lambda p, c: p + '/sockredir_msg',
                                            map='/tmp/srrel-map'), ['map', 'bpffs'], None),
    'bpf_attach both targets': (attach(map=lambda p, c: p + '/sockredir_hash'), ['cgroup', 'map'], None),
    'bpf_attach no target': (module('ebpf.sockredir.bpf_attach', program=lambda p, c: p + '/sockredir_ops'),
                             ['cgroup', 'map'], None),
    'bpf_attach state not a choice': (attach(state='on'), ['state'], None),
    'bpf_info pin_dir outside bpffs': (module('ebpf.sockredir.bpf_info', pin_dir='/tmp'), ['pin_dir'], None),
    'bpf_info cgroup with ..': (module('ebpf.sockredir.bpf_info', cgroup=lambda p, c: c + '/../..'),
                                ['cgroup'], None),
    'bpf_info unknown option': (module('ebpf.sockredir.bpf_info', pin='/sys/fs/bpf'), ['pin'], None),
}


@pytest.fixture(scope='module')
def module_outcomes(tmp_path_factory):
    workdir = tmp_path_factory.mktemp('bad-modules')
    tag = hostenv.unique_name('srrel-bad')
    pins = {name: '/sys/fs/bpf/%s-%d' % (tag, i) for i, name in enumerate(sorted(MODULE_CASES))}
    with hostenv.child_cgroup(kit.PREFIX) as cg:
        before = {name: case_state(pins[name], None) for name in MODULE_CASES}
        shared_before = shared_state(cg, workdir, tag, set(pins.values()))
        try:
            play = kit.run_tasks(workdir, [dict(name=name, ignore_errors=True, **MODULE_CASES[name][0](pins[name], cg))
                                           for name in sorted(MODULE_CASES)], name='bad-modules')
            after = {name: case_state(pins[name], None) for name in MODULE_CASES}
            yield dict(tasks=play.tasks, play=play, before=before, after=after,
                       shared=(shared_before, shared_state(cg, workdir, tag, set(pins.values()))))
        finally:
            for pin in pins.values():
                if exists(pin):
                    conftest.remove_pin_dir(pin)


@pytest.mark.parametrize('case', list(case_params(MODULE_CASES)))
def test_bad_module_parameter(module_outcomes, case):
    _task, words, _bug = MODULE_CASES[case]
    result = module_outcomes['tasks'].get(case)
    assert result is not None, module_outcomes['play']
    assert result.get('failed'), 'the module accepted it: %s' % result
    for word in words:
        assert names(str(result.get('msg')), word), result.get('msg')
    assert module_outcomes['after'][case] == module_outcomes['before'][case], 'the host changed'


def test_bad_module_parameters_leave_shared_state_alone(module_outcomes):
    before, after = module_outcomes['shared']
    assert after == before
