# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Engine of bpf_attach: attach a pinned program where its type belongs.

What is attached is always read back from the kernel (BPF_PROG_QUERY on the
cgroup or on the map), never from a state file, so a program detached by hand
is noticed.

"Ours" means: the pinned program itself, or an older version of it, i.e. a
program of the same name and type that shares a map with it (what a reload by
bpf_program leaves attached until this swap). Other programs on the same
cgroup belong to other tools and are never touched.

cgroup attachments use BPF_F_ALLOW_MULTI, so programs of other tools on the
same cgroup keep running; an upgrade uses BPF_F_REPLACE with the old program's
fd, which swaps the two in one step (no window without a program). A sockmap
holds one msg_verdict program; attaching replaces it in one step.
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import os

from ansible_collections.ebpf.sockredir.plugins.module_utils import libbpf, mounts, pins
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError

ATTACH_TYPE = {'sock_ops': libbpf.ATTACH_CGROUP_SOCK_OPS, 'sk_msg': libbpf.ATTACH_SK_MSG_VERDICT}
TARGET_OF = {'sock_ops': 'cgroup', 'sk_msg': 'map'}


class Attachment(object):
    """One program and its target. opened: {directory: pins.PinDir} the caller holds open
    already (the instance engine); recorded_id: the id recorded for the program pin, used
    only when the pin is gone (default: bpf_program's record)."""

    def __init__(self, program, cgroup=None, map_pin=None, opened=None, recorded_id=None):
        if (cgroup is None) == (map_pin is None):
            raise BpfError('exactly one of cgroup and map must be given', param='cgroup')
        self._opened = dict(opened or {})
        self._own = []
        self._recorded = recorded_id
        try:
            self._setup(program, cgroup, map_pin)
        except BaseException:
            self.close()
            raise

    def _dir(self, path, param):
        if path not in self._opened:
            self._opened[path] = pins.PinDir(path, param)
            self._own.append(self._opened[path])
        return self._opened[path]

    def close(self):
        for d in self._own:
            d.close()
        self._own = []

    def _setup(self, program, cgroup, map_pin):
        self.program = mounts.require_normalized(program, 'program')
        self.prog_dir = self._dir(os.path.dirname(self.program), 'program')
        self.prog_name = os.path.basename(self.program)
        if cgroup is not None:
            self.target_kind, self.target = 'cgroup', mounts.require_cgroup2_dir(cgroup, 'cgroup')
        else:
            self.target_kind, self.target = 'map', mounts.require_normalized(map_pin, 'map')
            self.map_dir = self._dir(os.path.dirname(self.target), 'map')
            self.map_name = os.path.basename(self.target)
            found = self.map_dir.require_kind(self.map_name, 'map', 'map')
            if found is None:
                raise BpfError('map: nothing is pinned at %s; load the programs first '
                               '(ebpf.sockredir.bpf_program)' % self.target, param='map')
            if found['type'] not in ('sockhash', 'sockmap'):
                raise BpfError('map: %s is a %s map, expected a sockhash or sockmap'
                               % (self.target, found['type']), param='map')
        self.pinned = self.prog_dir.require_kind(self.prog_name, 'prog', 'program')
        if self.pinned is not None:
            want = TARGET_OF.get(self.pinned['type'])
            if want is None:
                raise BpfError('program: %s is a %s program; supported are sock_ops (on a cgroup) '
                               'and sk_msg (on a sockmap/sockhash)' % (self.program, self.pinned['type']),
                               param='program')
            if want != self.target_kind:
                raise BpfError('program: %s is a %s program, which attaches to a %s, not to a %s; '
                               'give %s instead' % (self.program, self.pinned['type'], want,
                                                    self.target_kind, want), param=self.target_kind)
        self.prog_type = self.pinned['type'] if self.pinned else \
            {'cgroup': 'sock_ops', 'map': 'sk_msg'}[self.target_kind]
        self.attach_type = ATTACH_TYPE[self.prog_type]

    def _open_target(self):
        if self.target_kind == 'cgroup':
            return os.open(self.target, os.O_RDONLY | os.O_DIRECTORY)
        return libbpf.obj_get(self.map_dir.at(self.map_name))

    def attached(self):
        """[prog info] attached directly to the target for our attach type."""
        with libbpf.Fd(self._open_target()) as tfd:
            try:
                return libbpf.attached_programs(tfd, self.attach_type)[1]
            except BpfError as e:
                if self.target_kind == 'map' and libbpf.errno_of(e) == 'EINVAL':
                    raise BpfError('map: this kernel cannot report which program is attached to a '
                                   'sockmap (BPF_PROG_QUERY on maps needs Linux 5.19 or later)',
                                   param='map')
                raise

    def _recorded_id(self):
        """The id recorded for this pin, if any (used only when the pin is gone)."""
        if self._recorded is not None:
            return self._recorded
        from ansible_collections.ebpf.sockredir.plugins.module_utils import program
        record = program.ProgramSet.record_at(os.path.dirname(self.program))
        entry = (record or {}).get('programs', {}).get(self.prog_name)
        return entry and entry['id']

    def _is_ours(self, info):
        if self.pinned is None:
            # pin gone (removed by hand): only the id bpf_program recorded for it
            # is known to be ours; a name match could be another instance's program
            return info['type'] == self.prog_type and info['id'] == self._recorded_id()
        if info['id'] == self.pinned['id']:
            return True
        if info['name'] != self.pinned['name'] or info['type'] != self.pinned['type']:
            return False
        return not self.pinned['map_ids'] or bool(set(info['map_ids']) & set(self.pinned['map_ids']))

    def plan(self, state):
        """(actions, before, after): actions is a list of ('attach'|'replace'|'detach', info)."""
        now = self.attached()
        ours = [i for i in now if self._is_ours(i)]
        current = self.pinned is not None and any(i['id'] == self.pinned['id'] for i in ours)
        stale = [i for i in ours if self.pinned is None or i['id'] != self.pinned['id']]
        actions = []
        if state == 'present':
            if self.pinned is None:
                raise BpfError('program: nothing is pinned at %s; load it first '
                               '(ebpf.sockredir.bpf_program)' % self.program, param='program')
            if not current:
                if stale and self.target_kind == 'cgroup':
                    actions.append(('replace', stale.pop(0)))
                else:
                    actions.append(('attach', None))
            actions += [('detach', i) for i in stale if self.target_kind == 'cgroup']
        else:
            actions += [('detach', i) for i in ours]
        before = [_brief(i) for i in now]
        gone = set(i['id'] for kind, i in actions if i is not None)
        after = [_brief(i) for i in now if i['id'] not in gone]
        if state == 'present' and not current:
            if self.target_kind == 'map':
                after = []  # a sockmap holds one msg_verdict program: attaching replaces it
            after.append(_brief(self.pinned))
        return actions, before, after

    def apply(self, actions):
        with libbpf.Fd(self._open_target()) as tfd:
            for kind, info in actions:
                if kind == 'detach':
                    self._detach(tfd, info)
                    continue
                with libbpf.Fd(libbpf.obj_get(self.prog_dir.at(self.prog_name))) as pfd:
                    flags = libbpf.F_ALLOW_MULTI if self.target_kind == 'cgroup' else 0
                    replace_fd = libbpf.prog_fd_by_id(info['id']) if kind == 'replace' else None
                    try:
                        libbpf.prog_attach(pfd, tfd, self.attach_type, flags, replace_fd)
                    except BpfError as e:
                        raise self._explain(e)
                    finally:
                        if replace_fd is not None:
                            os.close(replace_fd)

    def _detach(self, tfd, info):
        try:
            with libbpf.Fd(libbpf.prog_fd_by_id(info['id'])) as fd:
                libbpf.prog_detach(fd, tfd, self.attach_type)
        except BpfError as e:
            if libbpf.errno_of(e) != 'ENOENT':  # already gone: what we wanted
                raise

    def _explain(self, e):
        if libbpf.errno_of(e) == 'EPERM' and self.target_kind == 'cgroup':
            return BpfError('cgroup: %s already has a sock_ops program attached by another tool '
                            'without BPF_F_ALLOW_MULTI; it is not ours to evict. Detach it or '
                            're-attach it with the "multi" flag, then run again. (%s)'
                            % (self.target, e.msg), param='cgroup')
        return BpfError('attaching %s to %s: %s' % (self.program, self.target, e.msg),
                        param=self.target_kind)


def _brief(info):
    return dict(id=info['id'], name=info['name'], tag=info['tag'], type=info['type'])


def execute(params, check_mode, want_diff):
    """bpf_attach's whole job; returns the module result."""
    if params['state'] == 'absent' and _target_gone(params):
        # nothing can be attached to a cgroup or map that no longer exists
        return dict(changed=False, target=params['cgroup'] or params['map'],
                    attach_type='sock_ops' if params['cgroup'] is not None else 'sk_msg', actions=[], attached=[])
    att = Attachment(params['program'], cgroup=params['cgroup'], map_pin=params['map'])
    try:
        return _execute(att, params, check_mode, want_diff)
    finally:
        att.close()


def _execute(att, params, check_mode, want_diff):
    actions, before, after = att.plan(params['state'])
    result = dict(changed=bool(actions), target=att.target, attach_type=att.prog_type,
                  actions=[dict(action=kind, id=info and info['id']) for kind, info in actions])
    if actions and not check_mode:
        att.apply(actions)
        after = [_brief(i) for i in att.attached()]
    result['attached'] = after
    if want_diff:
        result['diff'] = dict(before=dict(attached=before), after=dict(attached=after))
    return result


def _target_gone(params):
    if params['cgroup'] is not None:
        return not os.path.isdir(mounts.require_normalized(params['cgroup'], 'cgroup'))
    return not os.path.lexists(mounts.require_bpffs(params['map'], 'map'))
