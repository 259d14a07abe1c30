"""The modules through ansible-playbook on this host: idempotence, check mode, drift, teardown.

bpftool is the independent witness of what the kernel has.
"""

import os
import subprocess

from ansible_collections.ebpf.sockredir.plugins.module_utils import program
from conftest import (MAPS, bpftool_json, converge_tasks, copy_sources, loaded_sockmap_prog_ids,
                      teardown_tasks)


def cgroup_prog_ids(cgroup):
    return sorted(p['id'] for p in bpftool_json('cgroup', 'show', cgroup))


def changed_tasks(result):
    return sorted(name for name, r in result.tasks.items() if r.get('changed'))


def load_foreign_sock_ops(tmp_path, name, pin):
    """A sock_ops program of "another tool", loaded and pinned with clang + bpftool."""
    src = tmp_path / (name + '.c')
    src.write_text('__attribute__((section("sockops"), used)) int %s(void *ctx) { return 1; }\n'
                   'char _license[] __attribute__((section("license"), used)) = "GPL";\n' % name)
    obj = tmp_path / (name + '.o')
    subprocess.run(['clang', '-O2', '-target', 'bpf', '-c', str(src), '-o', str(obj)], check=True)
    subprocess.run(['bpftool', 'prog', 'load', str(obj), pin, 'type', 'sockops'], check=True)


def test_first_run_changes_second_does_not_and_check_mode_touches_nothing(play, pin_dir, cgroup):
    check = play(converge_tasks(pin_dir, cgroup)[:1], '--check', '--diff')
    assert check.rc == 0, check
    assert check.tasks['load']['changed'] is True
    assert not os.path.exists(pin_dir), 'check mode created the pin directory'
    assert not os.path.exists(program.record_path(pin_dir)), 'check mode wrote a record'

    first = play(converge_tasks(pin_dir, cgroup))
    assert first.rc == 0, first
    assert changed_tasks(first) == ['attach msg', 'attach ops', 'load']
    ops = first.tasks['load']['programs']['sockredir_ops']
    msg = first.tasks['load']['programs']['sockredir_msg']
    assert cgroup_prog_ids(cgroup) == [ops['id']]
    assert first.tasks['attach msg']['attached'][0]['id'] == msg['id']

    second = play(converge_tasks(pin_dir, cgroup))
    assert second.rc == 0, second
    assert second.changed == 0, second.tasks
    assert second.tasks['load']['programs']['sockredir_ops']['id'] == ops['id']

    check_again = play(converge_tasks(pin_dir, cgroup), '--check', '--diff')
    assert check_again.rc == 0 and check_again.changed == 0, check_again.tasks

    gone = play(teardown_tasks(pin_dir, cgroup))
    assert gone.rc == 0, gone
    assert changed_tasks(gone) == ['detach msg', 'detach ops', 'unload']
    # the independent witness: nothing attached, nothing pinned, nothing of ours loaded
    assert cgroup_prog_ids(cgroup) == []
    assert not os.path.exists(pin_dir)
    loaded = loaded_sockmap_prog_ids()
    assert ops['id'] not in loaded and msg['id'] not in loaded
    assert not os.path.exists(program.record_path(pin_dir))

    again = play(teardown_tasks(pin_dir, cgroup))
    assert again.rc == 0 and again.changed == 0, again.tasks


def test_program_detached_by_hand_is_attached_again(play, redirected):
    pin_dir, cgroup = redirected
    subprocess.run(['bpftool', 'cgroup', 'detach', cgroup, 'sock_ops', 'pinned',
                    pin_dir + '/sockredir_ops'], check=True)
    assert cgroup_prog_ids(cgroup) == []
    result = play(converge_tasks(pin_dir, cgroup))
    assert result.rc == 0, result
    assert changed_tasks(result) == ['attach ops']
    assert result.tasks['attach ops']['actions'] == [{'action': 'attach', 'id': None}]
    assert cgroup_prog_ids(cgroup) == [result.tasks['load']['programs']['sockredir_ops']['id']]
    assert play(converge_tasks(pin_dir, cgroup)).changed == 0


def test_deleted_pin_is_restored(play, redirected):
    pin_dir, cgroup = redirected
    os.unlink(pin_dir + '/sockredir_msg')
    result = play(converge_tasks(pin_dir, cgroup))
    assert result.rc == 0, result
    assert 'load' in changed_tasks(result)
    assert any('sockredir_msg is missing' in r for r in result.tasks['load']['reasons'])
    assert os.path.exists(pin_dir + '/sockredir_msg')
    new_msg = result.tasks['load']['programs']['sockredir_msg']['id']
    assert result.tasks['attach msg']['attached'][0]['id'] == new_msg
    assert play(converge_tasks(pin_dir, cgroup)).changed == 0


def test_changed_source_is_reloaded_and_swapped_in_place(play, pin_dir, cgroup, tmp_path):
    src = copy_sources(tmp_path)
    first = play(converge_tasks(pin_dir, cgroup, src=src))
    assert first.rc == 0, first
    old = first.tasks['load']['programs']
    old_maps = first.tasks['load']['maps']

    with open(src, 'a') as f:
        f.write('\n/* a new revision */\n')
    second = play(converge_tasks(pin_dir, cgroup, src=src))
    assert second.rc == 0, second
    assert changed_tasks(second) == ['attach msg', 'attach ops', 'load']
    assert second.tasks['load']['reasons'] == ['source or options changed']
    new = second.tasks['load']['programs']
    assert new['sockredir_ops']['id'] != old['sockredir_ops']['id']
    # one atomic replace, not attach + detach: the cgroup never had zero programs
    assert second.tasks['attach ops']['actions'] == [
        {'action': 'replace', 'id': old['sockredir_ops']['id']}]
    assert cgroup_prog_ids(cgroup) == [new['sockredir_ops']['id']]
    # the maps (and the sockets in them) are the same objects
    assert {n: m['id'] for n, m in second.tasks['load']['maps'].items()} == \
        {n: m['id'] for n, m in old_maps.items()}
    assert play(converge_tasks(pin_dir, cgroup, src=src)).changed == 0
    play(teardown_tasks(pin_dir, cgroup))


def test_a_changed_define_is_a_changed_build(play, redirected):
    pin_dir, cgroup = redirected
    result = play(converge_tasks(pin_dir, cgroup, defines={'SOCKREDIR_DENY_PORTS': '22'}))
    assert result.rc == 0, result
    assert result.tasks['load']['changed'] is True


def test_coexists_with_another_tools_sock_ops_program(play, pin_dir, cgroup, tmp_path):
    foreign_pin = pin_dir + '-foreign'
    load_foreign_sock_ops(tmp_path, 'foreign', foreign_pin)
    try:
        subprocess.run(['bpftool', 'cgroup', 'attach', cgroup, 'sock_ops', 'pinned', foreign_pin, 'multi'],
                       check=True)
        foreign_id = cgroup_prog_ids(cgroup)[0]

        up = play(converge_tasks(pin_dir, cgroup))
        assert up.rc == 0, up
        ours = up.tasks['load']['programs']['sockredir_ops']['id']
        assert cgroup_prog_ids(cgroup) == sorted([foreign_id, ours])

        down = play(teardown_tasks(pin_dir, cgroup))
        assert down.rc == 0, down
        assert cgroup_prog_ids(cgroup) == [foreign_id]
    finally:
        os.unlink(foreign_pin)


def test_exclusive_foreign_program_is_reported_not_evicted(play, pin_dir, cgroup, tmp_path):
    foreign_pin = pin_dir + '-exclusive'
    load_foreign_sock_ops(tmp_path, 'exclusive', foreign_pin)
    try:
        subprocess.run(['bpftool', 'cgroup', 'attach', cgroup, 'sock_ops', 'pinned', foreign_pin], check=True)
        before = cgroup_prog_ids(cgroup)
        result = play(converge_tasks(pin_dir, cgroup))
        assert result.rc != 0
        msg = result.tasks['attach ops']['msg']
        assert 'without BPF_F_ALLOW_MULTI' in msg and cgroup in msg
        assert cgroup_prog_ids(cgroup) == before
        play(teardown_tasks(pin_dir, cgroup))
    finally:
        os.unlink(foreign_pin)


def test_map_resize_is_refused_unless_recreate_maps(play, redirected):
    pin_dir, cgroup = redirected
    before = play(converge_tasks(pin_dir, cgroup)).tasks['load']['maps']['sockredir_hash']
    tasks = converge_tasks(pin_dir, cgroup, defines={'SOCKREDIR_MAP_SIZE': 1024})
    refused = play(tasks)
    assert refused.rc != 0
    msg = refused.tasks['load']['msg']
    assert 'recreate_maps' in msg and '65535 entries' in msg and 'declares a sockhash of 1024' in msg
    assert sorted(os.listdir(pin_dir)) == sorted(MAPS + ['sockredir_msg', 'sockredir_ops'])

    tasks[0]['ebpf.sockredir.bpf_program']['recreate_maps'] = True
    replaced = play(tasks)
    assert replaced.rc == 0, replaced
    # every map sized by SOCKREDIR_MAP_SIZE
    assert sorted(replaced.tasks['load']['recreated_maps']) == sorted(
        ['sockredir_hash', 'sockredir_flows', 'sockredir_gates', 'sockredir_reqs'])
    now = replaced.tasks['load']['maps']['sockredir_hash']
    assert now['max_entries'] == 1024 and now['id'] != before['id']
    assert replaced.tasks['attach msg']['attached'][0]['id'] == replaced.tasks['load']['programs']['sockredir_msg']['id']
    assert sorted(os.listdir(pin_dir)) == sorted(MAPS + ['sockredir_msg', 'sockredir_ops'])
    assert play(tasks).changed == 0
