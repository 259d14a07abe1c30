# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Engine of bpf_program: compile, load and pin a source's programs, idempotently.

Identity of what is pinned: a digest of everything that shapes the bytecode
(source, headers it includes, defines, program list, bcc version, which kernel
headers) is recorded with the kernel ids and tags of the programs it produced.
A later run trusts the record only if the kernel still reports those same
programs at the pins, using the pinned maps; otherwise it reloads. So an
unchanged run never needs the compiler, and a hand-made change is noticed.

Maps pin themselves (BPF_TABLE_PINNED in the source, under BPF_PIN_DIR), so a
reload reuses them: sockets already in the sockhash stay redirected. New
programs are pinned beside the old ones and renamed over them; the old ones
stay attached (and working) until bpf_attach swaps them atomically.
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import glob
import hashlib
import json
import os

from ansible_collections.ebpf.sockredir.plugins.module_utils import headers as kheaders
from ansible_collections.ebpf.sockredir.plugins.module_utils import libbpf, loader, pins
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError

RECORD_DIR = '/run/ebpf-sockredir'
NAME_MAX = 15  # BPF_OBJ_NAME_LEN - 1: longer names are cut by the kernel
SHAPE = ('type', 'key_size', 'value_size', 'max_entries', 'flags')


def record_path(pin_dir, record_dir=RECORD_DIR):
    return os.path.join(record_dir, hashlib.sha256(pin_dir.encode()).hexdigest()[:16] + '.json')


def write_json(path, data, mode=0o600):
    """Atomically: a temp file beside path, then os.replace."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = '%s.%d.tmp' % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, 'w') as f:
        json.dump(data, f, sort_keys=True, indent=1)
        f.write('\n')
    os.replace(tmp, path)


class FileRecord(object):
    """bpf_program's own record of a load: one JSON file per pin directory under /run."""

    def __init__(self, pin_dir, record_dir=RECORD_DIR):
        self.path = record_path(pin_dir, record_dir)

    def read(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def write(self, record):
        write_json(self.path, record)

    def drop(self):
        if os.path.exists(self.path):
            os.unlink(self.path)
            try:
                os.rmdir(os.path.dirname(self.path))
            except OSError:
                pass  # records of other pin directories remain

    def exists(self):
        return os.path.exists(self.path)


class ProgramSet(object):
    """Programs and maps of one source in one pin directory.

    pins: a pins.PinDir already open (the instance engine passes its own);
    record: where the load is recorded (default: FileRecord under /run).
    """

    changed_reason = 'source or options changed'

    def __init__(self, pin_dir, programs=None, maps=None, src=None, defines=None,
                 include_dirs=None, kernel_headers='auto', headers_cache=kheaders.DEFAULT_CACHE,
                 recreate_maps=False, record=None, pin_set=None):
        self.pins = pin_set or pins.PinDir(pin_dir, 'pin_dir')
        self.pin_dir = self.pins.path
        self.programs = programs or []
        self.maps = maps or []
        self.src = src
        self.defines = defines or {}
        self.include_dirs = include_dirs
        self.kernel_headers = kernel_headers
        self.headers_cache = headers_cache
        self.recreate_maps = recreate_maps
        self.recreated = []
        self.record = record or FileRecord(self.pin_dir)
        self._validate_names()

    # -- reading -----------------------------------------------------------

    def _validate_names(self):
        for i, p in enumerate(self.programs):
            name = p.get('name') or ''
            if not name.isidentifier() or len(name) > NAME_MAX:
                raise BpfError('programs[%d].name must be a C identifier of at most %d characters '
                               '(the kernel\'s name limit), got %r' % (i, NAME_MAX, name),
                               param='programs')
            if p.get('type') not in loader.PROG_TYPES:
                raise BpfError('programs[%d].type must be one of %s, got %r'
                               % (i, ', '.join(sorted(loader.PROG_TYPES)), p.get('type')),
                               param='programs')
        for i, name in enumerate(self.maps):
            if not name.isidentifier() or len(name) > NAME_MAX:
                raise BpfError('maps[%d] must be a C identifier of at most %d characters, got %r'
                               % (i, NAME_MAX, name), param='maps')

    def pin(self, name):
        """The pin's path as the user knows it (messages, results); syscalls go through self.pins."""
        return os.path.join(self.pin_dir, name)

    def read_record(self):
        return self.record.read()

    @staticmethod
    def record_at(pin_dir, record_dir=RECORD_DIR):
        return FileRecord(pin_dir, record_dir).read()

    def current(self):
        """What the kernel has at our pins now."""
        progs = {p['name']: self.pins.require_kind(p['name'], 'prog', 'programs') for p in self.programs}
        maps = {m: self.pins.require_kind(m, 'map', 'maps') for m in self.maps}
        return dict(programs=progs, maps=maps)

    def _source_files(self):
        dirs = self.include_dirs or [os.path.dirname(os.path.abspath(self.src))]
        headers = sorted(set(h for d in dirs for h in glob.glob(os.path.join(d, '*.h'))))
        return [self.src] + headers

    def cflags(self, pin_path=None):
        """Compiler flags; BPF_PIN_DIR is pin_path (the opened directory) when given."""
        dirs = self.include_dirs or [os.path.dirname(os.path.abspath(self.src))]
        flags = ['-I%s' % d for d in dirs]
        defines = dict(self.defines, BPF_PIN_DIR='"%s"' % (pin_path or self.pin_dir))
        flags += ['-D%s=%s' % (k, defines[k]) for k in sorted(defines)]
        return flags

    def digest(self, headers):
        h = hashlib.sha256()
        for path in self._source_files():
            try:
                with open(path, 'rb') as f:
                    h.update(path.encode() + b'\0' + f.read() + b'\0')
            except OSError as e:
                raise BpfError('src: cannot read %s: %s (expected a readable BPF C source and headers)'
                               % (path, e.strerror), param='src')
        meta = dict(cflags=self.cflags(), programs=self.programs, bcc=loader.bcc_version(),
                    headers=[headers['kind'], headers['path']])
        h.update(json.dumps(meta, sort_keys=True).encode())
        return h.hexdigest()

    def reload_reasons(self, now, record, digest):
        """Why the pinned state is not what this source and these options make; [] if it is."""
        reasons = []
        if record is None:
            reasons.append('no record of a load into %s' % self.pin_dir)
        elif record.get('digest') != digest:
            reasons.append(self.changed_reason)
        for p in self.programs:
            got = now['programs'][p['name']]
            if got is None:
                reasons.append('program pin %s is missing' % self.pin(p['name']))
            elif got['type'] != p['type']:
                reasons.append('%s is a %s program, expected %s' % (self.pin(p['name']), got['type'], p['type']))
            elif record and record.get('programs', {}).get(p['name']) != dict(id=got['id'], tag=got['tag']):
                reasons.append('program at %s is not the one recorded' % self.pin(p['name']))
        # Not every program uses every map (a config map may be read by one only).
        used = set(i for got in now['programs'].values() if got for i in got['map_ids'])
        for m, info in now['maps'].items():
            if info is None:
                reasons.append('map pin %s is missing' % self.pin(m))
            elif all(now['programs'].values()) and info['id'] not in used:
                reasons.append('no program at the pins uses the pinned map %s' % m)
        return reasons

    # -- changing ----------------------------------------------------------

    def _compile(self, headers):
        return loader.Compiled(self.src, self.cflags(self.pins.at()), headers['env'])

    def load_and_pin(self, headers):
        """Compile, load, pin. On failure, pins this call created are removed again."""
        for path in [self.src] + (self.include_dirs or []):
            if not os.path.exists(path):
                param = 'src' if path == self.src else 'include_dirs'
                raise BpfError('%s: %s does not exist' % (param, path), param=param)
        if not self.pins.exists:
            self.pins.close()
            self.pins = pins.PinDir(self.pin_dir, self.pins.param, create=True)
        at = self.pins
        maps_before = set(m for m in self.maps if at.lexists(m))
        made = []
        set_aside = []
        compiled = None
        try:
            compiled = self._compile(headers)
            missing = [m for m in self.maps if not at.lexists(m)]
            if missing:
                raise BpfError('maps: the source did not pin %s in %s; declare each with '
                               'BPF_TABLE_PINNED(..., BPF_PIN_DIR "/<name>")'
                               % (', '.join(missing), self.pin_dir), param='maps')
            reshaped = self._reshaped_maps(compiled)
            if reshaped:
                if not self.recreate_maps:
                    raise BpfError('maps: %s; a pinned map cannot be changed in place. Set '
                                   'recreate_maps=true to replace it: its sockets fall back to plain '
                                   'TCP once the new programs are attached' % '; '.join(reshaped.values()),
                                   param='maps')
                compiled.close()
                compiled = None
                for m in reshaped:  # set aside, restored if anything below fails
                    at.rename(m, m + '__replaced')
                    set_aside.append(m)
                compiled = self._compile(headers)
            fds = [(p['name'], compiled.load(p['name'], p['type'])) for p in self.programs]
            pins.pin_staged(at, fds, made)
            for m in set_aside:
                at.unlink(m + '__replaced')
            self.recreated = list(set_aside)
            return compiled.warnings
        except BaseException:
            # includes maps a failed compile pinned before it gave up
            made += [m for m in self.maps if m not in maps_before or m in set_aside]
            pins.undo(at, made, set_aside)
            raise
        finally:
            if compiled is not None:
                compiled.close()

    def _reshaped_maps(self, compiled):
        """{name: why} for pinned maps whose shape differs from the source's declaration."""
        out = {}
        for m in self.maps:
            declared = compiled.declared_map(m)
            pinned = self.pins.describe(m)
            if declared is None or pinned is None:
                continue
            declared = dict(declared, type=libbpf.MAP_TYPE_NAMES.get(declared['type'], str(declared['type'])))
            differ = [k for k in SHAPE if declared[k] != pinned[k]]
            if differ:
                out[m] = ('the pinned map %s is %s, the source declares %s'
                          % (self.pin(m), shape_text(pinned, differ), shape_text(declared, differ)))
        return out

    def reload(self, result):
        """Load and pin with the kernel headers resolved for real, then record the load.

        Adds kernel_headers, compiler_warnings and recreated_maps to result;
        returns what the kernel has at the pins afterwards.
        """
        headers = kheaders.resolve(self.kernel_headers, self.headers_cache)
        result['kernel_headers'] = headers
        warnings = self.load_and_pin(headers)
        if warnings.strip():
            result['compiler_warnings'] = warnings.splitlines()
        if self.recreated:
            result['recreated_maps'] = self.recreated
        return self.write_record(self.digest(headers), headers)

    def write_record(self, digest, headers):
        now = self.current()
        self.record.write(dict(digest=digest, pin_dir=self.pin_dir, headers=headers['kind'],
                               programs={n: dict(id=i['id'], tag=i['tag']) for n, i in now['programs'].items()},
                               maps=list(self.maps)))
        return now

    def _names(self):
        record = self.read_record() or {}
        names = [p['name'] for p in self.programs] or list(record.get('programs', {}))
        return names, list(self.maps) or list(record.get('maps', []))

    def remove(self):
        """Unpin our programs and maps, drop the record; ids still loaded afterwards."""
        names, maps = self._names()
        still = []
        for stale in ['%s__staging' % n for n in names] + ['%s__replaced' % m for m in maps]:
            if self.pins.lexists(stale):  # left by a run that was killed mid-swap
                self.pins.unlink(stale)
        for name, kind in [(n, 'prog') for n in names] + [(m, 'map') for m in maps]:
            found = self.pins.require_kind(name, kind, 'programs' if kind == 'prog' else 'maps')
            if found is None:
                continue
            self.pins.unlink(name)
            if kind == 'prog':
                try:
                    with libbpf.Fd(libbpf.prog_fd_by_id(found['id'])):
                        still.append(dict(name=name, id=found['id']))
                except BpfError:
                    pass
        self.record.drop()
        self.pins.rmdir_if_empty()
        return still

    def removable(self):
        names, maps = self._names()
        return [self.pin(n) for n in names + maps if self.pins.lexists(n)] + \
            ([self.record.path] if self.record.exists() else [])


def shape_text(info, keys):
    """'a sockhash of 1024 entries', plus the other fields that differ ('with key size 40, flags 0')."""
    more = ['%s %s' % (k.replace('_', ' '), info[k]) for k in keys if k not in ('type', 'max_entries')]
    return 'a %s of %d entries%s' % (info['type'], info['max_entries'], ' with ' + ', '.join(more) if more else '')


def execute(params, check_mode, want_diff):
    """bpf_program's whole job; returns the module result."""
    ps = ProgramSet(params['pin_dir'], programs=params['programs'], maps=params['maps'],
                    src=params['src'], defines=params['defines'],
                    include_dirs=params['include_dirs'], kernel_headers=params['kernel_headers'],
                    headers_cache=params['headers_cache'], recreate_maps=params['recreate_maps'])
    try:
        return _execute(ps, params, check_mode, want_diff)
    finally:
        ps.pins.close()


def _execute(ps, params, check_mode, want_diff):
    result = dict(changed=False, pin_dir=ps.pin_dir)
    if params['state'] == 'absent':
        gone = ps.removable()
        result['changed'] = bool(gone)
        if want_diff:
            result['diff'] = dict(before=dict(pins=sorted(gone)), after=dict(pins=[]))
        if gone and not check_mode:
            still = ps.remove()
            if still:
                result['warnings'] = ['program %s (id %d) is unpinned but still loaded: either it is '
                                      'still attached (detach it with ebpf.sockredir.bpf_attach '
                                      'state=absent), or connections established while it ran still '
                                      'hold it; those keep being redirected until they close'
                                      % (s['name'], s['id']) for s in still]
        return result

    if not ps.programs:
        raise BpfError('programs must list at least one program with state=present', param='programs')
    now = ps.current()
    plan_headers = kheaders.resolve(ps.kernel_headers, ps.headers_cache, check_mode=True)
    digest = ps.digest(plan_headers)
    reasons = ps.reload_reasons(now, ps.read_record(), digest)
    result.update(digest=digest, reasons=reasons, kernel_headers=plan_headers)
    if reasons:
        result['changed'] = True
        if not check_mode:
            after = ps.reload(result)
        else:
            after = None
    else:
        after = now
    report(ps, result, now, after, reasons, want_diff)
    return result


def report(ps, result, now, after, reasons, want_diff):
    """result's diff, programs and maps, from the state before and after (None in check mode)."""
    if want_diff:
        result['diff'] = dict(before=_summary(now), after=_summary(after) if after else
                              dict(reload=reasons))
    final = after or now
    result['programs'] = {n: dict(id=i['id'], tag=i['tag'], type=i['type'], pin=ps.pin(n),
                                  map_ids=i['map_ids'])
                          for n, i in final['programs'].items() if i}
    result['maps'] = {n: dict(id=i['id'], type=i['type'], max_entries=i['max_entries'], pin=ps.pin(n))
                      for n, i in final['maps'].items() if i}


def _summary(state):
    return dict(programs={n: (i and '%s id=%d tag=%s' % (i['type'], i['id'], i['tag']))
                          for n, i in state['programs'].items()},
                maps={n: (i and '%s id=%d max_entries=%d' % (i['type'], i['id'], i['max_entries']))
                      for n, i in state['maps'].items()})
