"""Interrupted converge: ansible-playbook killed (SIGKILL, the whole process group) mid-role.

Each killed run leaves whatever it had done so far; the next complete run
must bring the host to the full intended state (pins, attachments, record,
redirected traffic, idempotent), and state: absent after it must leave
nothing (pin root, attachments, record, sources, and no program with an id
this test saw). The kill points: named tasks of the role (the kill lands
a random fraction of a second after the task's banner, so inside the module
run), and random moments after the start. SRREL_SEED=<n> reproduces a run;
the seed is in every assertion message.
"""

import json
import os
import random
import subprocess

import pytest

from support import hostenv
from support.plays import MAPS

from ansible_collections.ebpf.sockredir.plugins.module_utils import facts

from . import kit

SEED = int(os.environ.get('SRREL_SEED') or random.SystemRandom().randrange(1 << 30))
PINS = set(MAPS) | {'sockredir_msg', 'sockredir_ops'}

# The role makes one engine call; a kill lands at a random moment inside it
# (before, during and after the compile), each killed run continuing from the
# partial state the previous one left. tests/test_instance.py kills the
# engine at each of its steps exactly.
TASK_KILL_POINTS = [
    ('Converge the sockredir instance', 0.0, 0.4),
    ('Converge the sockredir instance', 0.3, 1.5),
    ('Converge the sockredir instance', 0.5, 1.5),
    ('Converge the sockredir instance', 0.8, 2.0),
]


def programs_using(map_id):
    """Ids of every loaded program that uses map_id (whoever loaded it)."""
    out = subprocess.run(['bpftool', '-j', 'prog', 'show'], capture_output=True, text=True, check=True)
    return sorted(p['id'] for p in json.loads(out.stdout) if map_id in p.get('map_ids', []))


def assert_full_state(role, netns, why):
    pins = set(os.listdir(role.pin_root))
    assert pins == PINS, (why, pins)
    ids = role.program_ids()
    assert role.attached() == (['sockredir_ops'], 'sockredir_msg'), why
    info = facts.pin_dir_facts(role.pin_root)
    hash_id = info['maps']['sockredir_hash']['id']
    # no program of a killed run is left holding the maps
    assert programs_using(hash_id) == sorted(ids.values()), why
    assert info['maps']['sockredir_hash']['msg_verdict']['id'] == ids['sockredir_msg'], why
    ops = facts.cgroup_attachments(role.cgroup)['sock_ops']
    assert [p['id'] for p in ops] == [ids['sockredir_ops']], why
    assert role.recorded() == dict(cgroup=role.cgroup, src_dir=role.src_dir), why
    assert {'sockredir.bpf.o'} <= set(os.listdir(role.src_dir)), why
    # and it does its job
    before = kit.counters(role.pin_root)
    with kit.SocketFactory(role.cgroup, netns) as factory:
        listener = factory.listen('127.0.0.1')
        client, server = kit.connected_pair(listener, factory, '4', '127.0.0.1')
        try:
            assert kit.exchange(client, server, b'u' * 70000, b'd' * 70000) == (b'u' * 70000, b'd' * 70000)
        finally:
            for sock in (client, server, listener):
                sock.close()
    change = kit.delta(before, kit.counters(role.pin_root))
    assert change['inserted'] == 2 and change['redirected_bytes'] == 140000, (why, change)
    return ids, hash_id


def assert_nothing_left(role, ids, why):
    assert role.leftovers() == [], why
    assert role.attached() == ([], None), why
    gone = kit.wait_until(lambda: not any(kit.program_exists(i) for i in ids), 10,
                          'programs %s to be unloaded (%s)' % (sorted(ids), why))
    assert gone


@pytest.fixture
def role(tmp_path):
    with hostenv.child_cgroup(kit.PREFIX) as cg:
        instance = kit.RoleInstance(tmp_path, cg)
        try:
            yield instance
        finally:
            instance.cleanup()


def test_killed_at_each_step_of_the_role(role, netns):
    rng = random.Random(SEED)
    seen_ids = set()
    for task, low, high in TASK_KILL_POINTS:
        run = role.run_killed('present', task=task, after=rng.uniform(low, high))
        # a run with little left to do may finish before the kill lands
        assert run.killed_at is not None or run.rc == 0, 'the role never reached a task named %r (seed %d): %r' % (
            task, SEED, run)
        seen_ids.update(role.program_ids().values())
    full = role.run('present')
    assert full.rc == 0, (SEED, full)
    ids, hash_id = assert_full_state(role, netns, 'seed %d, after the killed runs' % SEED)
    seen_ids.update(ids.values())
    again = role.run('present')
    assert again.rc == 0 and again.changed == 0, (SEED, again)

    # state: absent interrupted too, then completed
    run = role.run_killed('absent', task='Converge the sockredir instance', after=rng.uniform(0.0, 0.4))
    assert run.killed_at is not None, (SEED, run)
    done = role.run('absent')
    assert done.rc == 0, (SEED, done)
    assert_nothing_left(role, seen_ids, 'seed %d' % SEED)


def test_killed_at_random_moments(role, netns):
    rng = random.Random(SEED + 1)
    seen_ids = set()
    for _attempt in range(2):
        run = role.run_killed('present', after=rng.uniform(1.0, 6.0))
        seen_ids.update(role.program_ids().values())
    why = 'seed %d, last kill at %s' % (SEED, run.killed_at)
    full = role.run('present')
    assert full.rc == 0, (why, full)
    ids = assert_full_state(role, netns, why)[0]
    seen_ids.update(ids.values())
    run = role.run_killed('absent', after=rng.uniform(1.0, 3.5))
    done = role.run('absent')
    assert done.rc == 0, (why, run.killed_at, done)
    assert_nothing_left(role, seen_ids, why)
