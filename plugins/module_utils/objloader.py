# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Engine of bpf_program's object path: load a prebuilt BPF ELF object through libbpf.

No compiler, kernel headers or bcc on the host: libbpf (ctypes) opens the
object, every map the object defines (not .rodata/.bss) is reused from its pin
at <pin_dir>/<map name> when one of the same shape exists, or created and
pinned there; then the programs are loaded and pinned beside the old ones and
renamed over them (pins.pin_staged), as on the BCC path.

Identity, record, drift checks and removal are ProgramSet's (program.py): the
digest here is the object's bytes, the programs and maps chosen and the libbpf
version (libbpf relocates the instructions, so another libbpf may load other
bytecode).
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import hashlib
import json
import os
import stat

from ansible_collections.ebpf.sockredir.plugins.module_utils import libbpf, pins, program
from ansible_collections.ebpf.sockredir.plugins.module_utils.capture import captured_output
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError

SHAPE = ('type', 'key_size', 'value_size', 'max_entries', 'flags')
HEADERS = dict(kind='none (prebuilt object)')  # what the record notes instead of kernel headers


def _tail(text, lines=40):
    kept = [line for line in text.splitlines() if line.strip()]
    return '\n'.join(kept[-lines:])


class ObjectSet(program.ProgramSet):
    changed_reason = 'object or options changed'

    def __init__(self, pin_dir, obj_path, programs=None, maps=None, recreate_maps=False,
                 record=None, pin_set=None, obj_bytes=None):
        self.obj_path = obj_path
        # obj_bytes: what the caller is about to write at obj_path (the instance engine)
        self.obj_bytes = read_trusted(obj_path) if obj_bytes is None else obj_bytes
        declared_progs, self.declared_maps = self._inspect()
        if programs:
            for i, p in enumerate(programs):
                if p.get('name') not in declared_progs:
                    raise BpfError('programs[%d].name: %s has no program %r (it has %s)'
                                   % (i, obj_path, p.get('name'), ', '.join(sorted(declared_progs))),
                                   param='programs')
                if declared_progs[p['name']] != p.get('type'):
                    raise BpfError('programs[%d].type: %s declares %s as %s (its SEC() name), not %s'
                                   % (i, obj_path, p['name'], declared_progs[p['name']], p.get('type')),
                                   param='programs')
            # All of them: a map only an unlisted program used would be pinned yet unused, and an
            # unused pinned map is how a replaced map shows (ProgramSet.reload_reasons).
            missing = sorted(set(declared_progs) - set(p['name'] for p in programs))
            if missing:
                raise BpfError('programs: %s also has %s; list every program of the object, or leave '
                               'programs out to load them all' % (obj_path, ', '.join(missing)),
                               param='programs')
        # Listed or not, the same load: the same digest.
        programs = [dict(name=n, type=t) for n, t in sorted(declared_progs.items())]
        for i, m in enumerate(maps or []):
            if m not in self.declared_maps:
                raise BpfError('maps[%d]: %s defines no map %r (it defines %s)'
                               % (i, obj_path, m, ', '.join(sorted(self.declared_maps))), param='maps')
        # Every map of the object is pinned: a reload must find all of them again.
        super(ObjectSet, self).__init__(pin_dir, programs=programs, maps=sorted(self.declared_maps),
                                        recreate_maps=recreate_maps, record=record, pin_set=pin_set)

    def _open(self):
        with captured_output() as out:
            try:
                obj = libbpf.BpfObject(self.obj_path, self.obj_bytes)
                err = None
            except BpfError as e:
                err = e
        if err is not None:
            err.msg += '. libbpf said:\n%s' % _tail(out.text)
            raise err
        return obj

    def _inspect(self):
        """({program: type}, {map: shape}) as the object declares them; nothing is loaded."""
        with self._open() as obj:
            progs = {n: obj.program_type(p) for n, p in obj.programs().items()}
            maps = {n: obj.map_shape(m) for n, m in obj.maps().items()}
        return progs, maps

    def digest(self, headers=None):
        h = hashlib.sha256(self.obj_bytes)
        meta = dict(loader='libbpf', libbpf=libbpf.version(), programs=self.programs, maps=self.maps)
        h.update(json.dumps(meta, sort_keys=True).encode())
        return h.hexdigest()

    def reshaped_maps(self):
        """{name: why} for pinned maps whose shape differs from the object's definition."""
        out = {}
        for m in self.maps:
            pinned = self.pins.require_kind(m, 'map', 'maps')
            want = self.declared_maps[m]
            differ = [k for k in SHAPE if pinned is not None and pinned[k] != want[k]]
            if differ:
                out[m] = ('the pinned map %s is %s, the object defines %s'
                          % (self.pin(m), program.shape_text(pinned, differ), program.shape_text(want, differ)))
        return out

    def check_shapes(self):
        """Fail, before anything changes, on a reshaped map unless recreate_maps; else its reasons."""
        reshaped = self.reshaped_maps()
        if reshaped and not self.recreate_maps:
            raise BpfError('maps: %s; a pinned map cannot be changed in place. Set recreate_maps=true '
                           'to replace it: its sockets fall back to plain TCP once the new programs '
                           'are attached' % '; '.join(reshaped[m] for m in sorted(reshaped)), param='maps')
        return ['map %s changed shape, it will be recreated' % m for m in sorted(reshaped)]

    def load_and_pin(self, headers=None):
        """Open, reuse or pin maps, load, pin programs. On failure, pins this call made are removed.

        Every pin is reached through the opened pin directory (pins.PinDir), so
        a directory swapped after its check is never used.
        """
        if not self.pins.exists:
            self.pins.close()
            self.pins = pins.PinDir(self.pin_dir, self.pins.param, create=True)
        at = self.pins
        made = []
        set_aside = []
        obj = None
        try:
            self.check_shapes()  # raises unless recreate_maps; the state may have moved since the plan
            for m in sorted(self.reshaped_maps()):  # set aside, restored if anything below fails
                at.rename(m, m + '__replaced')
                set_aside.append(m)
            obj = self._open()
            progs = obj.programs()
            maps = obj.maps()
            reused = set()
            for m in self.maps:
                if at.lexists(m):
                    at.require_kind(m, 'map', 'maps')
                    with libbpf.Fd(libbpf.obj_get(at.at(m))) as fd:
                        obj.reuse_map(maps[m], fd)
                    reused.add(m)
            with captured_output() as out:
                try:
                    obj.load()
                    err = None
                except BpfError as e:
                    err = e
            if err is not None:
                log = obj.verifier_log() or out.text
                raise BpfError('object: the kernel refused %s (%s). Verifier and libbpf output:\n%s'
                               % (self.obj_path, err.msg, _tail(log)), param='object',
                               details=dict(err.details, verifier_output=log.splitlines()))
            for m in self.maps:
                if m not in reused:
                    libbpf.obj_pin(obj.map_fd(maps[m]), at.at(m))
                    made.append(m)
            pins.pin_staged(at, [(p['name'], obj.program_fd(progs[p['name']])) for p in self.programs], made)
            for m in set_aside:
                at.unlink(m + '__replaced')
            self.recreated = list(set_aside)
            return ''
        except BaseException:
            pins.undo(at, made, set_aside)
            raise
        finally:
            if obj is not None:
                obj.close()  # the pins hold programs and maps now

    def reload(self, result):
        """Load and pin, then record the load; ProgramSet.reload's contract without headers."""
        self.load_and_pin()
        if self.recreated:
            result['recreated_maps'] = self.recreated
        return self.write_record(self.digest(), HEADERS)


def read_trusted(path):
    """The bytes of the object file, if root may load it: a regular file (no symlink) that only
    root (or we) can write. Loading what another user could swap in would be theirs to choose."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0))
    except OSError as e:
        raise BpfError('object: cannot open %s: %s (expected the path of a BPF ELF object on the '
                       'managed host, e.g. built by scripts/build-bpf.sh; not a symbolic link)'
                       % (path, e.strerror), param='object')
    with os.fdopen(fd, 'rb') as f:
        st = os.fstat(f.fileno())
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = 'is not a regular file'
        elif st.st_uid not in (0, os.geteuid()):
            problem = 'is owned by uid %d' % st.st_uid
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem = 'is writable by group or others (mode %o)' % stat.S_IMODE(st.st_mode)
        if problem:
            raise BpfError('object: %s %s; a program root loads must come from a file only root can '
                           'write' % (path, problem), param='object')
        return f.read()


def execute(params, check_mode, want_diff):
    """bpf_program with object=: the same contract as program.execute for src=."""
    if params['state'] == 'absent':
        return program.execute(params, check_mode, want_diff)  # pins and record only
    ps = ObjectSet(params['pin_dir'], params['object'], programs=params['programs'],
                   maps=params['maps'], recreate_maps=params['recreate_maps'])
    try:
        return _execute(ps, check_mode, want_diff)
    finally:
        ps.pins.close()


def _execute(ps, check_mode, want_diff):
    result = dict(changed=False, pin_dir=ps.pin_dir, object=ps.obj_path)
    now = ps.current()
    digest = ps.digest()
    reasons = ps.reload_reasons(now, ps.read_record(), digest) + ps.check_shapes()
    result.update(digest=digest, reasons=reasons)
    after = now
    if reasons:
        result['changed'] = True
        after = None
        if not check_mode:
            after = ps.reload(result)
    program.report(ps, result, now, after, reasons, want_diff)
    return result
