# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one converge of a sockredir instance: pin root + cgroup + options.

The role (through the sockredir_instance module), the boot command and the
tests call this, and nothing else does these steps. A run holds an flock on
LOCK_FILE from start to end, so two runs on a host never interleave.

present, in this order, each step only when the kernel's state asks for it:

    sources -> load + pin -> attach sk_msg to the sockhash -> attach sock_ops
    to the cgroup -> detach sock_ops from earlier cgroups -> record

sk_msg goes first: a socket takes the sockhash's verdict program when sock_ops
inserts it, and never later, so with this order every inserted socket is
redirected. The record (one JSON file per pin root, RECORD_DIR) is written
ahead of every step with what a later run or state=absent must undo: the
cgroups we may be attached to (an earlier cgroup leaves it only after its
detach succeeded), the source files we wrote, the mounts the role made. The
same record is the boot spec (boot: true).

plan() collects every refusal before anything changes: preflight.PREFLIGHT is
the list of checks, one function each, each returning one line per problem.
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import base64
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time

from ansible_collections.ebpf.sockredir.plugins.module_utils import attach, facts, libbpf, loader, mounts, pins, \
    policy, program
from ansible_collections.ebpf.sockredir.plugins.module_utils import headers as kheaders
from ansible_collections.ebpf.sockredir.plugins.module_utils.preflight import BOOT_LIB, BOOT_UNIT, PREFLIGHT
from ansible_collections.ebpf.sockredir.plugins.module_utils.sources import SourceDir
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError

# The contract with files/bpf/: what the instance loads and pins. Add programs
# and maps here (and nowhere else) when the source gains them.
SOCK_OPS, SK_MSG, SOCKHASH = 'sockredir_ops', 'sockredir_msg', 'sockredir_hash'
PROGRAMS = [dict(name=SOCK_OPS, type='sock_ops'), dict(name=SK_MSG, type='sk_msg')]
MAPS = [SOCKHASH, 'sockredir_stats', 'sockredir_flows', 'sockredir_gates', 'sockredir_reqs',
        policy.CFG, policy.PORTS]
SOURCE = 'sockredir.bpf.c'
OBJECT = 'sockredir.bpf.o'  # SOURCE built by scripts/build-bpf.sh
OBJECT_MAP_SIZE = 65535  # SOCKREDIR_MAP_SIZE the object was built with
LOADERS = ('object', 'bcc')

RECORD_DIR = '/var/lib/ebpf-sockredir/instances'
RECORD_FORMAT = 2
LOCK_FILE = '/run/ebpf-sockredir.lock'
BPFFS_OPTS = 'nosuid,nodev,noexec,mode=0700'
# Test hook: "<step>:<file>" makes a run stop after <step>, create <file>.reached
# and wait (up to 120 s) until <file> is removed.
PAUSE_ENV = 'SOCKREDIR_PAUSE'
STEPS = ('record', 'sources', 'load', 'settings', 'attach sk_msg', 'attach sock_ops', 'detach previous', 'done')

DEFAULTS = dict(state='present', pin_root='/sys/fs/bpf/sockredir', cgroup='', whole_host=False,
                bpffs_mount='/sys/fs/bpf',
                bpffs_persist=False, cgroup2_mount='', src_dir='/usr/local/share/ebpf-sockredir/bpf',
                sources=None, object_b64=None, loader='object', map_size=65535, allow_ports=[], deny_ports=[],
                debug=False, small_write_bytes=0, small_write_streak=0, kernel_headers='auto',
                headers_cache=kheaders.DEFAULT_CACHE, recreate_maps=False, boot=False,
                boot_python='/usr/bin/python3', mounted=[], lock_timeout=600)
# what a boot needs again, kept in the record
BOOT_PARAMS = ('pin_root', 'cgroup', 'whole_host', 'bpffs_mount', 'src_dir', 'loader', 'map_size', 'allow_ports', 'deny_ports',
               'debug', 'small_write_bytes', 'small_write_streak', 'kernel_headers', 'headers_cache',
               'recreate_maps', 'boot', 'boot_python')


def record_path(pin_root, record_dir=RECORD_DIR):
    name = re.sub(r'[^A-Za-z0-9_.-]', '_', os.path.basename(pin_root))
    return os.path.join(record_dir, '%s-%s.json' % (name, hashlib.sha256(pin_root.encode()).hexdigest()[:12]))


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise BpfError('record: %s is not valid JSON (%s); move it away to start over' % (path, e))


def all_records(record_dir=RECORD_DIR):
    """{path: record} of every instance on the host."""
    if not os.path.isdir(record_dir):
        return {}
    return {os.path.join(record_dir, n): read_json(os.path.join(record_dir, n))
            for n in sorted(os.listdir(record_dir)) if n.endswith('.json')}


class Lock(object):
    """flock on LOCK_FILE for a whole run: a second run waits, then fails with a message."""

    def __init__(self, timeout, exclusive=True, path=LOCK_FILE):
        self.timeout, self.exclusive, self.path, self.fd = timeout, exclusive, path, None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.timeout
        mode = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        while True:
            try:
                fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                holder = os.pread(self.fd, 64, 0).decode(errors='replace').strip()
                os.close(self.fd)
                raise BpfError('lock_timeout: another sockredir run (%s) has held %s for more than %d s; '
                               'nothing was changed. Run again when it has finished.'
                               % (holder or 'pid unknown', self.path, self.timeout), param='lock_timeout')
            time.sleep(0.1)
        if self.exclusive:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, ('pid %d' % os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the flock


def pause(step):
    hook = os.environ.get(PAUSE_ENV, '')
    if not hook.startswith(step + ':'):
        return
    path = hook.split(':', 1)[1]
    with open(path + '.reached', 'w'):
        pass
    deadline = time.monotonic() + 120
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


# -- the instance ---------------------------------------------------------------

class Instance(object):
    SOURCE = SOURCE

    def __init__(self, params, record_dir=RECORD_DIR):
        p = dict(DEFAULTS)
        p.update((k, v) for k, v in params.items() if v is not None)
        self.refused = []  # found while reading the parameters; plan() reports them with the rest
        for name in ('pin_root', 'bpffs_mount'):
            try:
                p[name] = mounts.require_normalized(p[name], name)
            except BpfError as e:
                self.refused.append(e.msg)
        self.params = p
        self.record_file = record_path(p['pin_root'], record_dir)
        self.record = read_json(self.record_file)
        if self.record is not None and self.record.get('format') != RECORD_FORMAT:
            raise BpfError('record: %s is not a record of format %d' % (self.record_file, RECORD_FORMAT))
        self.features = facts.features()
        mounted = mounts.mounts()
        self.bpffs_mounted = (p['bpffs_mount'], 'bpf') in mounted
        cg2 = [mp for mp, fs in mounted if fs == 'cgroup2']
        self.cgroup2_mounted = bool(cg2)
        if cg2:
            self.cgroup2_root = cg2[0]
        elif p['cgroup2_mount']:
            self.cgroup2_root = p['cgroup2_mount']
        else:
            self.cgroup2_root = '/sys/fs/cgroup/unified' if any(m[0] == '/sys/fs/cgroup' for m in mounted) \
                else '/sys/fs/cgroup'
        cgroup = p['cgroup']
        if '..' in cgroup.split('/'):
            self.refused.append('cgroup: %s must not contain ".."' % cgroup)
        else:
            cgroup = os.path.normpath(cgroup if os.path.isabs(cgroup) else os.path.join(self.cgroup2_root, cgroup))
        self.cgroup = cgroup or self.cgroup2_root
        rec = self.record or {}
        self.src = SourceDir(p['src_dir'] if p['state'] == 'present' else rec.get('src_dir', p['src_dir']),
                             self._files(), rec.get('src_files'))
        self.pins = None

    def _files(self):
        """{name: bytes} to write into src_dir: the sources (bcc) or the object (object), if given."""
        p = self.params
        if p['sources'] is None and p['object_b64'] is None:
            return None  # use what src_dir has (the boot)
        files = {}
        if p['loader'] == 'bcc':
            files.update((n, t.encode()) for n, t in (p['sources'] or {}).items())
        elif p['object_b64'] is not None:
            try:
                files[OBJECT] = base64.b64decode(p['object_b64'], validate=True)
            except (TypeError, ValueError) as e:
                self.refused.append('object_b64: not base64 (%s)' % e)
        return files

    # -- what there is, what is missing ------------------------------------

    def plan(self):
        """(refusals, needs): refusals are one line per reason the host cannot run this; needs are
        the packages and mounts the role provides before apply()."""
        refusals = list(self.refused)
        for check in PREFLIGHT:
            refusals += [r for r in check(self) if r not in refusals]
        return refusals, self.needs()

    def needs(self):
        p = self.params
        out = dict(packages=[], mounts=[])
        if p['state'] != 'present':
            return out
        if p['loader'] == 'bcc':
            if loader.import_bcc() is not None:
                out['packages'].append('bcc')
            try:
                kheaders.resolve(p['kernel_headers'], p['headers_cache'], check_mode=True)
            except BpfError:
                if p['kernel_headers'] == 'auto':
                    out['packages'].append('kernel-headers')
        else:
            try:
                libbpf.typed()
            except BpfError:
                out['packages'].append('libbpf')
        if not shutil.which('bpftool', path=os.pathsep.join([os.environ.get('PATH', ''), '/usr/sbin', '/sbin'])):
            out['packages'].append('bpftool')
        fstab_state = 'mounted' if p['bpffs_persist'] else 'ephemeral'
        if not self.bpffs_mounted:
            out['mounts'].append(dict(path=p['bpffs_mount'], src='bpf', fstype='bpf', opts=BPFFS_OPTS,
                                      state=fstab_state))
        elif p['bpffs_persist'] and not _in_fstab(p['bpffs_mount'], 'bpf'):
            out['mounts'].append(dict(path=p['bpffs_mount'], src='bpf', fstype='bpf', opts=BPFFS_OPTS,
                                      state='present'))
        if not self.cgroup2_mounted:
            out['mounts'].append(dict(path=self.cgroup2_root, src='cgroup2', fstype='cgroup2',
                                      opts='nosuid,nodev,noexec', state='ephemeral'))
        return out

    def loader_line(self):
        """Which path this host takes, for the plan."""
        if self.params['loader'] == 'object':
            return 'loader: object (the prebuilt %s through libbpf; no compiler, headers or bcc needed)' % OBJECT
        return 'loader: bcc (compiles %s on the host: python3-bpfcc and kernel headers needed)' % SOURCE

    def defines(self):
        # The port policy and the switches are run-time settings (policy.py), not -D.
        return dict(SOCKREDIR_MAP_SIZE=self.params['map_size'])

    def settings(self):
        p = self.params
        return policy.wanted(p['pin_root'], p['allow_ports'], p['deny_ports'], p['debug'],
                             p['small_write_bytes'], p['small_write_streak'])

    def program_set(self):
        p = self.params
        if p['loader'] == 'object':
            from ansible_collections.ebpf.sockredir.plugins.module_utils import objloader
            return objloader.ObjectSet(p['pin_root'], os.path.join(self.src.path, OBJECT), programs=PROGRAMS,
                                       maps=MAPS, recreate_maps=p['recreate_maps'], record=LoadRecord(self),
                                       pin_set=self.pins,
                                       obj_bytes=(self.src.sources or {}).get(OBJECT))
        return program.ProgramSet(p['pin_root'], programs=PROGRAMS, maps=MAPS,
                                  src=os.path.join(self.src.path, SOURCE), defines=self.defines(),
                                  kernel_headers=p['kernel_headers'], headers_cache=p['headers_cache'],
                                  recreate_maps=p['recreate_maps'], record=LoadRecord(self), pin_set=self.pins)

    def removal_set(self):
        """The pins and the load record, for unpinning: no object or source is read (they may be gone)."""
        return program.ProgramSet(self.params['pin_root'], programs=PROGRAMS, maps=MAPS,
                                  record=LoadRecord(self), pin_set=self.pins)

    def _attachment(self, name, cgroup=None):
        load = (self.record or {}).get('load') or {}
        recorded = (load.get('programs') or {}).get(name, {}).get('id')
        opened = {self.pins.path: self.pins}
        if name == SK_MSG:
            return attach.Attachment(self.pins.show(SK_MSG), map_pin=self.pins.show(SOCKHASH),
                                     opened=opened, recorded_id=recorded)
        return attach.Attachment(self.pins.show(SOCK_OPS), cgroup=cgroup, opened=opened, recorded_id=recorded)

    def _undo_cgroups(self):
        rec = self.record or {}
        return sorted(set(rec.get('cgroups', [])) - {self.cgroup})

    # -- the record ----------------------------------------------------------

    def write_record(self, **changes):
        rec = dict(self.record or {}, format=RECORD_FORMAT, pin_root=self.params['pin_root'],
                   managed_by='ebpf.sockredir (plugins/module_utils/instance.py)')
        rec.update(changes)
        program.write_json(self.record_file, rec, mode=0o644)
        self.record = rec

    # -- present ---------------------------------------------------------------

    def present(self, check_mode):
        p = self.params
        self.pins = pins.PinDir(p['pin_root'], 'pin_root', create=False)
        ps = self.program_set()
        changed_sources = self.src.changes() if self.src.sources is not None else []
        actions = []
        if changed_sources:
            actions.append('write %s in %s' % (', '.join(changed_sources), self.src.path))
        if p['loader'] == 'bcc':
            plan_headers = kheaders.resolve(p['kernel_headers'], p['headers_cache'], check_mode=True)
        else:
            plan_headers = dict(kind='none (prebuilt object)', path='', env={})
        if changed_sources and p['loader'] == 'bcc':
            reasons = ['the sources changed']
        else:  # the object's digest is that of the bytes about to be written
            reasons = ps.reload_reasons(ps.current(), ps.read_record(), ps.digest(plan_headers))
            if p['loader'] == 'object':
                reasons += [r for r in ps.check_shapes() if r not in reasons]
        if reasons:
            actions.append('load and pin (%s)' % '; '.join(reasons))
        settings, ports = self.settings()
        try:
            if not (self.pins.exists and self.pins.describe(policy.CFG) and self.pins.describe(policy.PORTS)):
                raise BpfError('no settings maps yet')
            actions += ['write %s' % w for w in policy.converge(self.pins, settings, ports, check_mode=True)['what']]
        except BpfError:  # not there yet, or of another shape: the reload makes them
            actions.append('write settings and port policy')
        attach_plan = self._attach_plan(ps)
        actions += attach_plan
        record_changes = self._record_changes()
        if record_changes and not actions:
            actions.append('update the record (%s)' % ', '.join(sorted(record_changes)))
        result = dict(changed=bool(actions), actions=actions, reload_reasons=reasons, loader=self.loader_line(),
                      kernel_headers={k: v for k, v in plan_headers.items() if k != 'env'} if p['loader'] == 'object'
                      else plan_headers, record=self.record_file)
        if check_mode or not actions:
            result['digest'] = ((self.record or {}).get('load') or {}).get('digest', '')
            return result

        # the record first: whatever happens next, a later run knows what to undo
        self.write_record(**dict(record_changes, src_files=sorted(self.src.recorded | set(changed_sources)),
                                 cgroups=sorted(set((self.record or {}).get('cgroups', [])) | {self.cgroup})))
        pause('record')
        if changed_sources:
            created = self.src.write(changed_sources)
            if created:
                self.write_record(src_created_dirs=sorted(set(self.record.get('src_created_dirs', [])) | set(created)))
        pause('sources')
        if reasons:
            if not self.pins.exists:
                self.pins.close()
                self.pins = pins.PinDir(p['pin_root'], 'pin_root', create=True)
                ps = self.program_set()
            ps.reload(result)
        pause('load')
        # before the attaches: the first socket admitted already meets the policy
        policy.converge(self.pins, settings, ports)
        pause('settings')
        self._converge_attachment(SK_MSG)
        pause('attach sk_msg')
        self._converge_attachment(SOCK_OPS, self.cgroup)
        pause('attach sock_ops')
        for old in self._undo_cgroups():
            self._detach_cgroup(old)
            self.write_record(cgroups=sorted(set(self.record['cgroups']) - {old}))
        pause('detach previous')
        self.write_record(cgroup=self.cgroup)
        pause('done')
        result['digest'] = self.record['load']['digest']
        return result

    def _record_changes(self):
        """Fields of the record this run's parameters change."""
        p = self.params
        want = dict(cgroup=self.cgroup, src_dir=self.src.path, params={k: p[k] for k in BOOT_PARAMS},
                    cgroups=sorted(set((self.record or {}).get('cgroups', [])) | {self.cgroup}))
        want['params']['cgroup'] = self.cgroup
        mounts_now = dict((self.record or {}).get('mounts', {}))
        for m in p['mounted']:
            mounts_now[m['path']] = dict(mounts_now.get(m['path'], {}), **{k: v for k, v in m.items() if k != 'path'})
        want['mounts'] = mounts_now
        rec = self.record or {}
        return {k: v for k, v in want.items() if rec.get(k) != v}

    def _attach_plan(self, ps):
        """What attaching would do now, as lines (a reload will swap the programs in as well)."""
        out = []
        if not self.pins.exists or ps.current()['programs'][SK_MSG] is None:
            return ['attach %s to %s' % (SK_MSG, self.pins.show(SOCKHASH)),
                    'attach %s to %s' % (SOCK_OPS, self.cgroup)] + \
                ['detach %s from %s' % (SOCK_OPS, c) for c in self._undo_cgroups() if os.path.isdir(c)]
        for name, cgroup in ((SK_MSG, None), (SOCK_OPS, self.cgroup)):
            att = self._attachment(name, cgroup)
            try:
                actions = att.plan('present')[0]
            finally:
                att.close()
            out += ['%s %s on %s' % (kind, name, att.target) for kind, _info in actions]
        for c in self._undo_cgroups():
            if os.path.isdir(c):
                att = self._attachment(SOCK_OPS, c)
                try:
                    if att.plan('absent')[0]:
                        out.append('detach %s from %s' % (SOCK_OPS, c))
                finally:
                    att.close()
        return out

    def _converge_attachment(self, name, cgroup=None, state='present'):
        att = self._attachment(name, cgroup)
        try:
            actions = att.plan(state)[0]
            if actions:
                att.apply(actions)
        finally:
            att.close()

    def _detach_cgroup(self, cgroup):
        if os.path.isdir(cgroup):  # a removed cgroup took its attachments with it
            self._converge_attachment(SOCK_OPS, cgroup, state='absent')

    # -- absent ----------------------------------------------------------------

    def absent(self, check_mode):
        p = self.params
        rec = self.record or {}
        result = dict(changed=False, actions=[], unmount=[], record=self.record_file)
        self.pins = pins.PinDir(p['pin_root'], 'pin_root') if mounts.lexical_mount(p['pin_root'], 'bpf') else None
        cgroups = sorted(set(rec.get('cgroups', [])) | {self.cgroup} | ({rec['cgroup']} if rec.get('cgroup') else set()))
        actions = result['actions']
        if self.pins is not None and self.pins.exists:
            if self.pins.describe(SOCKHASH) and self.pins.describe(SK_MSG):
                att = self._attachment(SK_MSG)
                try:
                    if att.plan('absent')[0]:
                        actions.append('detach %s from %s' % (SK_MSG, att.target))
                finally:
                    att.close()
            for c in cgroups:
                if os.path.isdir(c) and mounts.fs_of(c)[1] == 'cgroup2':
                    att = self._attachment(SOCK_OPS, c)
                    try:
                        if att.plan('absent')[0]:
                            actions.append('detach %s from %s' % (SOCK_OPS, c))
                    finally:
                        att.close()
            ps = self.removal_set()
            actions += ['unpin %s' % x for x in ps.removable() if x != self.record_file]
        ours = sorted(set(rec.get('src_files', [])))
        actions += ['remove %s' % os.path.join(self.src.path, n) for n in ours]
        if self.record is not None:
            actions.append('remove the record %s' % self.record_file)
        result['unmount'] = self._mounts_to_undo()
        result['changed'] = bool(actions)
        if check_mode or not actions:
            return result
        if self.record is not None:  # a run stopped from here on must not come back at boot
            self.write_record(params=dict(self.record.get('params') or {}, boot=False))
        if self.pins is not None and self.pins.exists:
            if self.pins.describe(SOCKHASH) and self.pins.describe(SK_MSG):
                self._converge_attachment(SK_MSG, state='absent')
            for c in cgroups:
                if os.path.isdir(c) and mounts.fs_of(c)[1] == 'cgroup2':
                    self._detach_cgroup(c)
                    if self.record is not None:
                        self.write_record(cgroups=sorted(set(self.record.get('cgroups', [])) - {c}))
            still = self.removal_set().remove()
            if still:
                result['warnings'] = ['program %s (id %d) is unpinned but still loaded: connections '
                                      'established while it ran still hold it and stay redirected until '
                                      'they close' % (s['name'], s['id']) for s in still]
        self.src.remove(ours, rec.get('src_created_dirs'))
        self._hand_over_mounts(result['unmount'])
        if os.path.exists(self.record_file):
            os.unlink(self.record_file)
        for d in (os.path.dirname(self.record_file), os.path.dirname(os.path.dirname(self.record_file))):
            try:
                os.rmdir(d)  # when empty: the last instance of the host is gone
            except OSError:
                break
        return result

    def _mounts_to_undo(self):
        """Mounts the role made for this instance that nothing else needs now: [{path, fstype, fstab, created_dir}]."""
        out = []
        others = [r for path, r in all_records(os.path.dirname(self.record_file)).items()
                  if path != self.record_file and r]
        for path, m in sorted(((self.record or {}).get('mounts') or {}).items()):
            used = any(_below(r.get('pin_root', ''), path) or _below(r.get('cgroup', ''), path) for r in others)
            if used:
                continue
            if m.get('fstype') == 'bpf' and [n for n in _listdir(path) if n not in ('maps.debug', 'progs.debug')
                                             and not _below(self.params['pin_root'], os.path.join(path, n))]:
                continue  # pins of other tools: unmounting would drop them
            out.append(dict(path=path, **m))
        return out

    def _hand_over_mounts(self, undone):
        """Mounts of ours still in use by another instance go into that instance's record."""
        done = set(m['path'] for m in undone)
        for path, m in ((self.record or {}).get('mounts') or {}).items():
            if path in done:
                continue
            for rpath, r in all_records(os.path.dirname(self.record_file)).items():
                if rpath != self.record_file and r and (_below(r.get('pin_root', ''), path)
                                                        or _below(r.get('cgroup', ''), path)):
                    r.setdefault('mounts', {})[path] = m
                    program.write_json(rpath, r, mode=0o644)
                    break

    # -- results -----------------------------------------------------------------

    def facts(self, result):
        p = self.params
        out = dict(state=p['state'], pin_root=p['pin_root'], cgroup=self.cgroup, cgroup2_mount=self.cgroup2_root,
                   src_dir=self.src.path, record=self.record_file)
        if p['state'] != 'present':
            return out
        out.update(loader=p['loader'], settings=None,
                   reloaded=any(a.startswith('load') for a in result.get('actions', [])),
                   reload_reasons=result.get('reload_reasons', []), digest=result.get('digest', ''),
                   kernel_headers=result.get('kernel_headers', {}), features=self.features,
                   programs={}, maps={}, sockets=0, counters={}, attached=dict(cgroup=[], sockhash=None))
        if not os.path.isdir(p['pin_root']):
            return out
        info = facts.pin_dir_facts(p['pin_root'])
        hashmap = info['maps'].get(SOCKHASH) or {}
        if self.pins is not None and self.pins.exists:
            out['settings'] = policy.read(self.pins)
        out.update(programs=info['programs'], maps=info['maps'], counters=info.get('counters', {}),
                   sockets=hashmap.get('entries', 0), attached=dict(sockhash=hashmap.get('msg_verdict')))
        out['attached']['cgroup'] = [a for a in facts.cgroup_attachments(self.cgroup)['sock_ops']
                                     if a['name'] == SOCK_OPS] if os.path.isdir(self.cgroup) else []
        return out

    def boot(self):
        wanted = any(r and r.get('params', {}).get('boot')
                     for r in all_records(os.path.dirname(self.record_file)).values())
        return dict(wanted=wanted, unit=BOOT_UNIT, lib=BOOT_LIB, python=self.params['boot_python'],
                    installed=os.path.exists(BOOT_UNIT) or os.path.exists(BOOT_LIB))

    def close(self):
        if self.pins is not None:
            self.pins.close()


class LoadRecord(object):
    """The 'load' part of the instance record, as ProgramSet reads and writes it."""

    def __init__(self, inst):
        self.inst = inst
        self.path = inst.record_file

    def read(self):
        return (self.inst.record or {}).get('load')

    def write(self, load):
        self.inst.write_record(load=load)

    def drop(self):
        if self.inst.record is not None:
            self.inst.write_record(load=None)

    def exists(self):
        return bool(self.read())


def _below(path, top):
    return bool(path) and (path == top or path.startswith(top.rstrip('/') + '/'))


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


def _in_fstab(path, fstype, fstab='/etc/fstab'):
    try:
        with open(fstab) as f:
            return any(len(line.split()) > 2 and line.split()[1] == path and line.split()[2] == fstype
                       for line in f if not line.lstrip().startswith('#'))
    except OSError:
        return False


def converge(params, check_mode=False, record_dir=RECORD_DIR, lock_file=LOCK_FILE):
    """The whole job for one instance, under the lock; returns the result (facts included).

    Refusals raise BpfError with every reason, one per line, and details
    {'refusals': [...]}; missing packages or mounts return needs (nothing changed).
    """
    timeout = params.get('lock_timeout') or DEFAULTS['lock_timeout']
    with Lock(timeout, exclusive=not check_mode, path=lock_file):
        inst = Instance(params, record_dir)
        try:
            refusals, needs = inst.plan()
            if refusals:
                raise BpfError('\n'.join(refusals), details=dict(refusals=refusals))
            if needs['packages'] or needs['mounts']:
                return dict(changed=False, needs=needs, actions=[], facts=inst.facts({}), boot=inst.boot(),
                            loader=inst.loader_line())
            result = inst.absent(check_mode) if inst.params['state'] == 'absent' else inst.present(check_mode)
            result.update(needs=needs, facts=inst.facts(result), boot=inst.boot())
            return result
        except OSError as e:
            raise BpfError('%s: %s' % (getattr(e, 'filename', None) or 'sockredir', e.strerror or e))
        finally:
            inst.close()
