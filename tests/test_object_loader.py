"""bpf_program object=: a prebuilt libbpf-style object loaded through libbpf, on the real kernel.

The object is tests/data/bpf/redir_test.bpf.o (scripts/build-bpf.sh). Each case
runs check mode, real, check mode again, real again where it changes
something; bpftool is the independent witness of program and map ids.
"""

import os
import shutil
import struct
import subprocess

import pytest

from conftest import REPO, bpftool_json, hostenv
from ansible_collections.ebpf.sockredir.plugins.module_utils import mapvalues, program
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError

OBJ = os.path.join(REPO, 'tests', 'data', 'bpf', 'redir_test.bpf.o')
PROGS = ['test_msg', 'test_ops']
MAPS = ['test_config', 'test_hash', 'test_stats']


def load(pin_dir, obj=OBJ, **extra):
    return dict(name='load', **{'ebpf.sockredir.bpf_program': dict(object=obj, pin_dir=pin_dir, **extra)})


def attach(pin_dir, cgroup):
    ops = dict(program=pin_dir + '/test_ops', cgroup=cgroup)
    msg = dict(program=pin_dir + '/test_msg', map=pin_dir + '/test_hash')
    return [dict(name='attach ops', **{'ebpf.sockredir.bpf_attach': ops}),
            dict(name='attach msg', **{'ebpf.sockredir.bpf_attach': msg})]


def detach(pin_dir, cgroup):
    msg = dict(program=pin_dir + '/test_msg', map=pin_dir + '/test_hash', state='absent')
    ops = dict(program=pin_dir + '/test_ops', cgroup=cgroup, state='absent')
    return [dict(name='detach msg', **{'ebpf.sockredir.bpf_attach': msg}),
            dict(name='detach ops', **{'ebpf.sockredir.bpf_attach': ops}),
            dict(name='unload', **{'ebpf.sockredir.bpf_program': dict(pin_dir=pin_dir, state='absent')})]


def kernel_ids(pin_dir):
    """{pin name: id} as bpftool sees the pins."""
    out = {}
    for name in sorted(os.listdir(pin_dir)):
        kind = 'prog' if name in PROGS else 'map'
        out[name] = bpftool_json(kind, 'show', 'pinned', os.path.join(pin_dir, name))['id']
    return out


def test_load_is_idempotent_in_check_and_real_mode(play, pin_dir):
    check = play([load(pin_dir)], '--check', '--diff')
    assert check.rc == 0, check
    assert check.tasks['load']['changed'] and not os.path.exists(pin_dir)
    assert check.tasks['load']['diff']['after']['reload']

    first = play([load(pin_dir)], '--diff')
    assert first.rc == 0, first
    res = first.tasks['load']
    assert res['changed'] and sorted(os.listdir(pin_dir)) == sorted(PROGS + MAPS)
    assert {n: p['type'] for n, p in res['programs'].items()} == {'test_ops': 'sock_ops', 'test_msg': 'sk_msg'}
    assert kernel_ids(pin_dir) == dict({n: res['programs'][n]['id'] for n in PROGS},
                                       **{n: res['maps'][n]['id'] for n in MAPS})
    assert res['diff']['before']['programs'] == {'test_msg': None, 'test_ops': None}
    assert 'sk_msg id=%d' % res['programs']['test_msg']['id'] in res['diff']['after']['programs']['test_msg']

    for args in (['--check'], []):
        again = play([load(pin_dir)], *args)
        assert again.rc == 0, again
        assert not again.tasks['load']['changed'] and again.tasks['load']['reasons'] == []
    assert kernel_ids(pin_dir)['test_ops'] == res['programs']['test_ops']['id']

    gone = play(detach(pin_dir, '/nonexistent')[2:])
    assert gone.rc == 0 and gone.tasks['unload']['changed'], gone
    assert not os.path.exists(pin_dir) and not os.path.exists(program.record_path(pin_dir))
    assert play(detach(pin_dir, '/nonexistent')[2:]).changed == 0


def test_deleted_pin_and_changed_object_are_reloaded_keeping_maps(play, pin_dir, tmp_path):
    first = play([load(pin_dir)])
    assert first.rc == 0, first
    maps = {n: m['id'] for n, m in first.tasks['load']['maps'].items()}

    os.unlink(pin_dir + '/test_msg')
    check = play([load(pin_dir)], '--check')
    assert check.tasks['load']['changed'] and not os.path.exists(pin_dir + '/test_msg')
    fixed = play([load(pin_dir)])
    assert fixed.rc == 0, fixed
    assert fixed.tasks['load']['changed']
    assert any('test_msg is missing' in r for r in fixed.tasks['load']['reasons'])
    assert kernel_ids(pin_dir)['test_msg'] == fixed.tasks['load']['programs']['test_msg']['id']
    assert {n: m['id'] for n, m in fixed.tasks['load']['maps'].items()} == maps

    # Another object (trailing bytes change its digest, not its programs): reload, same maps.
    other = tmp_path / 'other.bpf.o'
    other.write_bytes(open(OBJ, 'rb').read() + b'\0' * 8)
    swapped = play([load(pin_dir, obj=str(other))])
    assert swapped.rc == 0, swapped
    assert swapped.tasks['load']['reasons'] == ['object or options changed']
    assert swapped.tasks['load']['programs']['test_ops']['id'] != fixed.tasks['load']['programs']['test_ops']['id']
    assert {n: m['id'] for n, m in swapped.tasks['load']['maps'].items()} == maps
    assert play([load(pin_dir, obj=str(other))]).changed == 0


def test_reshaped_pinned_map_fails_or_is_recreated(play, pin_dir):
    os.makedirs(pin_dir, mode=0o700)
    subprocess.run(['bpftool', 'map', 'create', pin_dir + '/test_config', 'type', 'array',
                    'key', '4', 'value', '16', 'entries', '1', 'name', 'test_config'], check=True)
    old_id = bpftool_json('map', 'show', 'pinned', pin_dir + '/test_config')['id']

    for args in (['--check'], []):
        refused = play([load(pin_dir)], *args)
        assert refused.rc != 0
        msg = refused.tasks['load']['msg']
        assert 'test_config' in msg and 'value size 16' in msg and 'value size 8' in msg and 'recreate_maps' in msg
        assert sorted(os.listdir(pin_dir)) == ['test_config']

    check = play([load(pin_dir, recreate_maps=True)], '--check')
    assert check.rc == 0 and check.tasks['load']['changed'], check
    assert bpftool_json('map', 'show', 'pinned', pin_dir + '/test_config')['id'] == old_id
    done = play([load(pin_dir, recreate_maps=True)])
    assert done.rc == 0, done
    assert done.tasks['load']['recreated_maps'] == ['test_config']
    new = bpftool_json('map', 'show', 'pinned', pin_dir + '/test_config')
    assert new['id'] != old_id and new['bytes_value'] == 8
    assert sorted(os.listdir(pin_dir)) == sorted(PROGS + MAPS)  # no __replaced left
    assert play([load(pin_dir, recreate_maps=True)]).changed == 0


@pytest.mark.parametrize('extra, words', [
    (dict(programs=[dict(name='nope', type='sk_msg')]), "has no program 'nope'"),
    (dict(programs=[dict(name='test_ops', type='sk_msg')]), 'declares test_ops as sock_ops'),
    (dict(maps=['nope']), "defines no map 'nope'"),
    (dict(defines={'X': 1}), 'object is already compiled'),
])
def test_bad_input_fails_naming_the_parameter_and_changes_nothing(play, pin_dir, extra, words):
    result = play([load(pin_dir, **extra)])
    assert result.rc != 0
    assert words in result.tasks['load']['msg'], result.tasks['load']
    assert not os.path.exists(pin_dir)


def test_not_an_object_or_a_file_others_can_write_is_refused(play, pin_dir, tmp_path):
    bogus = tmp_path / 'x.bpf.o'
    bogus.write_text('not elf')
    writable = tmp_path / 'w.bpf.o'
    shutil.copy(OBJ, writable)
    os.chmod(writable, 0o666)
    link = tmp_path / 'l.bpf.o'
    link.symlink_to(OBJ)
    for obj, words in ((bogus, 'libbpf cannot open'), (writable, 'writable by group or others'),
                       (link, 'not a symbolic link')):
        result = play([load(pin_dir, obj=str(obj))])
        assert result.rc != 0 and words in result.tasks['load']['msg'], result.tasks['load']
        assert result.tasks['load']['param'] == 'object'
        assert not os.path.exists(pin_dir)


def test_listed_programs_must_be_the_objects_programs(play, pin_dir):
    both = [dict(name='test_ops', type='sock_ops'), dict(name='test_msg', type='sk_msg')]
    result = play([load(pin_dir, programs=both)])
    assert result.rc == 0, result
    assert sorted(os.listdir(pin_dir)) == sorted(PROGS + MAPS)
    assert play([load(pin_dir)]).changed == 0  # the same as leaving programs out
    partial = play([load(pin_dir, programs=both[:1])])
    assert partial.rc != 0 and 'also has test_msg' in partial.tasks['load']['msg']


# -- the config map: a policy change writes the map, reloads nothing ----------------------------

# Both ends of one connection in one process in the cgroup; each stdin line makes a round trip
# (client -> server -> client) and prints "ok".
ECHO = r'''
import socket, sys
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(1)
cli = socket.create_connection(lst.getsockname()); srv, _ = lst.accept()
print("port", lst.getsockname()[1], flush=True)
for line in sys.stdin:
    msg = line.strip().encode() * 1000
    cli.sendall(msg); got = b""
    while len(got) < len(msg): got += srv.recv(65536)
    srv.sendall(got); back = b""
    while len(back) < len(msg): back += cli.recv(65536)
    print("ok" if back == msg else "bad", flush=True)
'''


def counters(pin_dir):
    fd_path = pin_dir + '/test_stats'
    from ansible_collections.ebpf.sockredir.plugins.module_utils import libbpf
    with libbpf.Fd(libbpf.obj_get(fd_path)) as fd:
        return [libbpf.percpu_u64_sum(fd, i) for i in range(3)]  # redirected, passed, inserted


def config(pass_all, deny_port=0):
    return {0: struct.pack('=II', pass_all, deny_port)}


def test_config_map_update_keeps_programs_and_the_redirected_connection(play, pin_dir, cgroup):
    up = play([load(pin_dir)] + attach(pin_dir, cgroup))
    assert up.rc == 0, up
    ids_before = kernel_ids(pin_dir)
    loaded_before = sorted(p['id'] for p in bpftool_json('prog', 'show'))
    echo = subprocess.Popen(['/bin/sh', '-c', 'echo $$ > "$0" && exec "$@"', cgroup + '/cgroup.procs',
                             '/usr/bin/python3', '-c', ECHO],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        assert echo.stdout.readline().startswith('port')

        def round_trip():
            echo.stdin.write('hello\n')
            echo.stdin.flush()
            line = echo.stdout.readline().strip()
            assert line == 'ok', (line, echo.poll())

        hostenv._wait_until(lambda: counters(pin_dir)[2] >= 2, 10, 'both sockets inserted')
        c0 = counters(pin_dir)
        round_trip()
        c1 = counters(pin_dir)
        assert c1[0] - c0[0] == 2 and c1[1] == c0[1], (c0, c1)  # both sends redirected

        path = pin_dir + '/test_config'
        check = mapvalues.write_array(path, config(1), check_mode=True, want_diff=True)
        assert check['changed'] and check['diff'] == {'before': {0: '00' * 8}, 'after': {0: '0100000000000000'}}
        assert mapvalues.write_array(path, config(1), check_mode=True)['changed']  # nothing written
        assert mapvalues.write_array(path, config(1))['changed']
        assert not mapvalues.write_array(path, config(1))['changed']
        assert bpftool_json('map', 'lookup', 'pinned', path, 'key', '0', '0', '0', '0')['value'][:1] == ['0x01']

        round_trip()  # same connection, now over TCP
        c2 = counters(pin_dir)
        assert c2[0] == c1[0] and c2[1] - c1[1] == 2, (c1, c2)

        assert mapvalues.write_array(path, config(0))['changed']
        round_trip()  # and redirected again
        c3 = counters(pin_dir)
        assert c3[0] - c2[0] == 2 and c3[1] == c2[1], (c2, c3)
        assert c3[2] == c0[2]  # no reconnect happened

        assert kernel_ids(pin_dir) == ids_before
        assert sorted(p['id'] for p in bpftool_json('prog', 'show')) == loaded_before
        assert play([load(pin_dir)] + attach(pin_dir, cgroup)).changed == 0
    finally:
        echo.kill()
        echo.wait()
        play(detach(pin_dir, cgroup))


@pytest.mark.parametrize('values, words', [
    ({0: b'\0' * 4}, 'is 4 bytes, the map\'s values are 8 bytes'),
    ({1: b'\0' * 8}, 'index 1 is outside'),
])
def test_config_write_refuses_a_bad_value_before_writing(play, pin_dir, values, words):
    assert play([load(pin_dir)]).rc == 0
    with pytest.raises(BpfError) as err:
        mapvalues.write_array(pin_dir + '/test_config', values)
    assert words in err.value.msg
    with pytest.raises(BpfError, match='expected an array'):
        mapvalues.write_array(pin_dir + '/test_hash', {0: b'\0' * 8})


def test_an_object_the_verifier_refuses_fails_with_its_log_and_leaves_nothing(play, pin_dir):
    bad = os.path.join(REPO, 'tests', 'data', 'bpf', 'verifier_reject.bpf.o')
    result = play([load(pin_dir, obj=bad)])
    assert result.rc != 0
    res = result.tasks['load']
    assert res['param'] == 'object' and 'the kernel refused' in res['msg'], res
    assert 'invalid access to packet' in res['msg'] and 'verifier_reject.bpf.c:24' in res['msg'], res
    assert 'invalid access to packet, off=0 size=1, R2(id=0,off=0,r=0)' in res['verifier_output']
    assert not os.path.exists(pin_dir) and not os.path.exists(program.record_path(pin_dir))
