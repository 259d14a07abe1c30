# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Thin ctypes wrapper over libbpf (libbpf.so.1) for what bcc's Python API lacks.

bcc compiles and loads; everything about objects that already live in the
kernel (pins, ids, tags, attachments, queries, map contents, feature probes)
goes through libbpf here. libbpf is a dependency of Debian's libbpfcc, so it is
present wherever python3-bpfcc is. libbpf 1.x returns -errno from every call.
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import ctypes
import errno
import os

from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError

# enum bpf_prog_type / bpf_map_type / bpf_attach_type / bpf_func_id (uapi/linux/bpf.h)
PROG_TYPE_SOCK_OPS = 13
PROG_TYPE_SK_MSG = 16
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_SOCKMAP = 15
MAP_TYPE_SOCKHASH = 18
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_SK_MSG_VERDICT = 7
FUNC_MSG_REDIRECT_HASH = 71
FUNC_GET_NETNS_COOKIE = 122

# attach flags
F_ALLOW_OVERRIDE = 1
F_ALLOW_MULTI = 2
F_REPLACE = 4
F_QUERY_EFFECTIVE = 1  # query flag

PROG_TYPE_NAMES = {PROG_TYPE_SOCK_OPS: 'sock_ops', PROG_TYPE_SK_MSG: 'sk_msg'}
MAP_TYPE_NAMES = {1: 'hash', 2: 'array', MAP_TYPE_PERCPU_ARRAY: 'percpu_array',
                  MAP_TYPE_SOCKMAP: 'sockmap', MAP_TYPE_SOCKHASH: 'sockhash'}


class _ProgInfo(ctypes.Structure):
    # struct bpf_prog_info up to name[]; the kernel accepts a larger, zeroed tail.
    _fields_ = [
        ('type', ctypes.c_uint32), ('id', ctypes.c_uint32), ('tag', ctypes.c_uint8 * 8),
        ('jited_prog_len', ctypes.c_uint32), ('xlated_prog_len', ctypes.c_uint32),
        ('jited_prog_insns', ctypes.c_uint64), ('xlated_prog_insns', ctypes.c_uint64),
        ('load_time', ctypes.c_uint64), ('created_by_uid', ctypes.c_uint32),
        ('nr_map_ids', ctypes.c_uint32), ('map_ids', ctypes.c_uint64),
        ('name', ctypes.c_char * 16), ('_tail', ctypes.c_uint8 * 176),
    ]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ('type', ctypes.c_uint32), ('id', ctypes.c_uint32), ('key_size', ctypes.c_uint32),
        ('value_size', ctypes.c_uint32), ('max_entries', ctypes.c_uint32),
        ('map_flags', ctypes.c_uint32), ('name', ctypes.c_char * 16),
        ('_tail', ctypes.c_uint8 * 96),
    ]


class _AttachOpts(ctypes.Structure):
    # struct bpf_prog_attach_opts as of libbpf 1.1; newer libbpf accepts this
    # smaller size (the sz field tells it which fields we know).
    _fields_ = [('sz', ctypes.c_size_t), ('flags', ctypes.c_uint32),
                ('replace_prog_fd', ctypes.c_int)]


_lib = None

# libbpf 1.x only: 0.x (libbpf.so.0) returns -1 and sets errno, which _check
# would read as EPERM. So the versioned name, never find_library('bpf').
LIBBPF = 'libbpf.so.1'

_u32p = ctypes.POINTER(ctypes.c_uint32)
_SIGNATURES = {
    'bpf_obj_get': ([ctypes.c_char_p], ctypes.c_int),
    'bpf_obj_pin': ([ctypes.c_int, ctypes.c_char_p], ctypes.c_int),
    'bpf_prog_get_fd_by_id': ([ctypes.c_uint32], ctypes.c_int),
    'bpf_map_get_fd_by_id': ([ctypes.c_uint32], ctypes.c_int),
    'bpf_obj_get_info_by_fd': ([ctypes.c_int, ctypes.c_void_p, _u32p], ctypes.c_int),
    'bpf_prog_query': ([ctypes.c_int, ctypes.c_int, ctypes.c_uint32, _u32p, _u32p, _u32p], ctypes.c_int),
    'bpf_prog_attach_opts': ([ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
    'bpf_prog_detach2': ([ctypes.c_int, ctypes.c_int, ctypes.c_int], ctypes.c_int),
    'bpf_map_get_next_key': ([ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int),
    'bpf_map_lookup_elem': ([ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int),
    'libbpf_num_possible_cpus': ([], ctypes.c_int),
    'libbpf_probe_bpf_prog_type': ([ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
    'libbpf_probe_bpf_map_type': ([ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
    'libbpf_probe_bpf_helper': ([ctypes.c_int, ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
}


def _open_libbpf():
    try:
        return ctypes.CDLL(LIBBPF, use_errno=True)
    except OSError as e:
        raise BpfError('libbpf (%s) could not be loaded: %s. Install the package libbpf1 '
                       '(a dependency of python3-bpfcc).' % (LIBBPF, e))


def missing_functions():
    """Functions the engine calls that the installed libbpf.so.1 does not export, in a list."""
    loaded = _open_libbpf()
    return sorted(name for name in list(_SIGNATURES) + list(_OBJECT_API) + ['bpf_map_create']
                  if not hasattr(loaded, name))


def loaded_version():
    loaded = _open_libbpf()
    if not hasattr(loaded, 'libbpf_version_string'):
        return 'version unknown'
    loaded.libbpf_version_string.restype = ctypes.c_char_p
    return 'version ' + loaded.libbpf_version_string().decode()


def lib():
    global _lib
    if _lib is None:
        loaded = _open_libbpf()
        missing = [name for name in _SIGNATURES if not hasattr(loaded, name)]
        if missing:
            raise BpfError('libbpf: %s lacks %s; install libbpf 1.0 or later' % (LIBBPF, ', '.join(missing)))
        for name, (argtypes, restype) in _SIGNATURES.items():
            fn = getattr(loaded, name)
            fn.argtypes, fn.restype = argtypes, restype
        _lib = loaded
    return _lib


def probe_sockmap_query():
    """Does BPF_PROG_QUERY work on a sockmap (5.19+)? A throwaway sockhash is asked."""
    create = _open_libbpf().bpf_map_create
    create.restype = ctypes.c_int
    create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
                       ctypes.c_void_p]
    fd = create(MAP_TYPE_SOCKHASH, b'sr_probe', 4, 4, 1, None)
    if fd < 0:
        return False
    try:
        prog_query(fd, ATTACH_SK_MSG_VERDICT)
        return True
    except BpfError:
        return False
    finally:
        os.close(fd)


def _check(rc, what):
    if rc < 0:
        raise BpfError('%s failed: %s' % (what, os.strerror(-rc)),
                       details={'errno': errno.errorcode.get(-rc, str(-rc))})
    return rc


def errno_of(exc):
    """The errno name carried by a BpfError from this module, or None."""
    return exc.details.get('errno') if isinstance(exc, BpfError) else None


def obj_get(path):
    """fd of the object pinned at path (caller closes it)."""
    return _check(lib().bpf_obj_get(path.encode()), 'opening pin %s' % path)


def obj_pin(fd, path):
    _check(lib().bpf_obj_pin(fd, path.encode()), 'pinning at %s' % path)


def prog_fd_by_id(prog_id):
    return _check(lib().bpf_prog_get_fd_by_id(prog_id),
                  'opening program id %d' % prog_id)


def map_fd_by_id(map_id):
    return _check(lib().bpf_map_get_fd_by_id(map_id),
                  'opening map id %d' % map_id)


def _info(fd, info, what):
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), what)
    return info


def prog_info(fd):
    """dict(id, type, name, tag, map_ids) of a program fd, as the kernel reports it."""
    info = _info(fd, _ProgInfo(), 'reading program info')
    map_ids = []
    if info.nr_map_ids:
        ids = (ctypes.c_uint32 * info.nr_map_ids)()
        again = _ProgInfo()
        again.nr_map_ids = info.nr_map_ids
        again.map_ids = ctypes.addressof(ids)
        _info(fd, again, 'reading program map ids')
        map_ids = sorted(ids[:min(again.nr_map_ids, info.nr_map_ids)])
    return dict(id=info.id, type=PROG_TYPE_NAMES.get(info.type, str(info.type)),
                name=info.name.decode(errors='replace'), tag=bytes(info.tag).hex(),
                map_ids=map_ids)


def map_info(fd):
    info = _info(fd, _MapInfo(), 'reading map info')
    return dict(id=info.id, type=MAP_TYPE_NAMES.get(info.type, str(info.type)),
                name=info.name.decode(errors='replace'), key_size=info.key_size,
                value_size=info.value_size, max_entries=info.max_entries,
                flags=info.map_flags)


def fd_kind(fd):
    """'prog', 'map' or 'link': read from the kernel's fdinfo of the object."""
    with open('/proc/self/fdinfo/%d' % fd) as f:
        for line in f:
            key = line.split(':', 1)[0]
            if key in ('prog_type', 'map_type', 'link_type'):
                return key.split('_', 1)[0]
    return 'other'


def prog_query(target_fd, attach_type, query_flags=0):
    """(attach_flags, [prog ids]) attached directly to target for attach_type (with
    query_flags=F_QUERY_EFFECTIVE: those that run for it, inherited from ancestors too)."""
    count = 64
    while True:
        ids = (ctypes.c_uint32 * count)()
        cnt = ctypes.c_uint32(count)
        flags = ctypes.c_uint32(0)
        rc = lib().bpf_prog_query(target_fd, attach_type, query_flags, ctypes.byref(flags),
                                  ctypes.cast(ids, _u32p), ctypes.byref(cnt))
        if rc == -errno.ENOSPC:
            count *= 4
            continue
        _check(rc, 'querying attached programs')
        return flags.value, list(ids[:cnt.value])


def attached_programs(target_fd, attach_type):
    """(attach_flags, [prog_info]) of the programs attached directly to target."""
    flags, ids = prog_query(target_fd, attach_type)
    infos = []
    for prog_id in ids:
        try:
            with Fd(prog_fd_by_id(prog_id)) as fd:
                infos.append(prog_info(fd))
        except BpfError:
            continue  # detached and freed while we looked
    return flags, infos


def prog_attach(prog_fd, target_fd, attach_type, flags, replace_fd=None):
    opts = _AttachOpts(sz=ctypes.sizeof(_AttachOpts), flags=flags, replace_prog_fd=0)
    if replace_fd is not None:
        opts.flags |= F_REPLACE
        opts.replace_prog_fd = replace_fd
    _check(lib().bpf_prog_attach_opts(prog_fd, target_fd, attach_type, ctypes.byref(opts)),
           'attaching program')


def prog_detach(prog_fd, target_fd, attach_type):
    _check(lib().bpf_prog_detach2(prog_fd, target_fd, attach_type), 'detaching program')


def map_keys(fd, key_size):
    """All keys of a hash-like map (sockhash included), read with get_next_key."""
    keys = []
    prev = None
    key = ctypes.create_string_buffer(key_size)
    while True:
        rc = lib().bpf_map_get_next_key(fd, prev, key)
        if rc == -errno.ENOENT:
            return keys
        _check(rc, 'iterating map keys')
        keys.append(key.raw)
        prev = ctypes.create_string_buffer(key.raw, key_size)


def possible_cpus():
    return _check(lib().libbpf_num_possible_cpus(), 'counting possible CPUs')


def percpu_u64_sum(fd, index):
    """Sum over CPUs of a u64 value in a per-CPU array."""
    ncpu = possible_cpus()
    values = (ctypes.c_uint64 * ncpu)()
    key = ctypes.c_uint32(index)
    _check(lib().bpf_map_lookup_elem(fd, ctypes.byref(key), values), 'reading counter %d' % index)
    return sum(values)


def probe_prog_type(prog_type):
    return lib().libbpf_probe_bpf_prog_type(prog_type, None) == 1


def probe_map_type(map_type):
    return lib().libbpf_probe_bpf_map_type(map_type, None) == 1


def probe_helper(prog_type, helper):
    return lib().libbpf_probe_bpf_helper(prog_type, helper, None) == 1


class Fd(object):
    """Context manager that closes a BPF object fd."""

    def __init__(self, fd):
        self.fd = fd

    def __enter__(self):
        return self.fd

    def __exit__(self, *exc):
        os.close(self.fd)


# -- ELF objects (bpf_object__*), for the object path of bpf_program ----------

MAP_TYPE_ARRAY = 2
MAP_TYPE_NAMES.setdefault(MAP_TYPE_ARRAY, 'array')


class _ObjectOpenOpts(ctypes.Structure):
    # struct bpf_object_open_opts of libbpf 1.1 (libbpf.h); sz tells newer
    # versions which fields we know.
    _fields_ = [
        ('sz', ctypes.c_size_t), ('object_name', ctypes.c_char_p),
        ('relaxed_maps', ctypes.c_bool), ('pin_root_path', ctypes.c_char_p),
        ('_attach_prog_fd', ctypes.c_uint32), ('kconfig', ctypes.c_char_p),
        ('btf_custom_path', ctypes.c_char_p), ('kernel_log_buf', ctypes.c_void_p),
        ('kernel_log_size', ctypes.c_size_t), ('kernel_log_level', ctypes.c_uint32),
    ]


_P = ctypes.c_void_p
_OBJECT_API = {
    # name: (restype, argtypes)
    'libbpf_version_string': (ctypes.c_char_p, []),
    'bpf_object__open_mem': (_P, [_P, ctypes.c_size_t, ctypes.POINTER(_ObjectOpenOpts)]),
    'bpf_object__load': (ctypes.c_int, [_P]),
    'bpf_object__close': (None, [_P]),
    'bpf_object__next_program': (_P, [_P, _P]),
    'bpf_object__next_map': (_P, [_P, _P]),
    'bpf_program__name': (ctypes.c_char_p, [_P]),
    'bpf_program__section_name': (ctypes.c_char_p, [_P]),
    'bpf_program__type': (ctypes.c_int, [_P]),
    'bpf_program__fd': (ctypes.c_int, [_P]),
    'bpf_map__name': (ctypes.c_char_p, [_P]),
    'bpf_map__type': (ctypes.c_int, [_P]),
    'bpf_map__key_size': (ctypes.c_uint32, [_P]),
    'bpf_map__value_size': (ctypes.c_uint32, [_P]),
    'bpf_map__max_entries': (ctypes.c_uint32, [_P]),
    'bpf_map__map_flags': (ctypes.c_uint32, [_P]),
    'bpf_map__is_internal': (ctypes.c_bool, [_P]),
    'bpf_map__reuse_fd': (ctypes.c_int, [_P, ctypes.c_int]),
    'bpf_map__fd': (ctypes.c_int, [_P]),
    'bpf_map_lookup_elem': (ctypes.c_int, [ctypes.c_int, _P, _P]),
    'bpf_map_update_elem': (ctypes.c_int, [ctypes.c_int, _P, _P, ctypes.c_uint64]),
    'bpf_map_delete_elem': (ctypes.c_int, [ctypes.c_int, _P]),
}
_typed = None


def typed():
    """libbpf with argtypes/restype declared for the object API (pointers stay pointers)."""
    global _typed
    if _typed is None:
        handle = _open_libbpf()  # a handle of its own: these types do not change lib()'s callers
        for func, (restype, argtypes) in _OBJECT_API.items():
            fn = getattr(handle, func)
            fn.restype = restype
            fn.argtypes = argtypes
        _typed = handle
    return _typed


def version():
    return typed().libbpf_version_string().decode()


class BpfObject(object):
    """An ELF object opened by libbpf from its bytes: programs and maps before load, fds after.

    From bytes, not a path: what is loaded is exactly what the caller read,
    checked and digested (libbpf re-opening a path could find another file).

    libbpf's own messages (and the verifier log it prints on a failed load) go
    to stderr; the caller captures fd 2 around open() and load().
    """

    LOG_SIZE = 1 << 20

    def __init__(self, path, data):
        self.path = path
        self.buf = ctypes.create_string_buffer(data, len(data))  # alive as long as the object
        self.name = ctypes.c_char_p(os.path.basename(path).split('.')[0].encode())
        self.log = ctypes.create_string_buffer(self.LOG_SIZE)
        # level 0: no log on success; on a failed load libbpf retries with
        # level 1 into this buffer (the verifier's reasons).
        opts = _ObjectOpenOpts(sz=ctypes.sizeof(_ObjectOpenOpts), object_name=self.name,
                               kernel_log_buf=ctypes.addressof(self.log),
                               kernel_log_size=self.LOG_SIZE, kernel_log_level=0)
        ctypes.set_errno(0)
        self.obj = typed().bpf_object__open_mem(self.buf, len(data), ctypes.byref(opts))
        if not self.obj:
            err = ctypes.get_errno() or errno.EINVAL
            raise BpfError('object: libbpf cannot open %s: %s (expected a BPF ELF object built with '
                           'clang -target bpf, with BTF map definitions)' % (path, os.strerror(err)),
                           param='object', details={'errno': errno.errorcode.get(err, str(err))})

    def _walk(self, nxt):
        item = nxt(self.obj, None)
        while item:
            yield item
            item = nxt(self.obj, item)

    def programs(self):
        """{name: handle} of every program in the object."""
        return {typed().bpf_program__name(p).decode(): p for p in self._walk(typed().bpf_object__next_program)}

    def maps(self):
        """{name: handle} of the object's own maps (not .rodata/.bss/.data)."""
        api = typed()
        return {api.bpf_map__name(m).decode(): m for m in self._walk(api.bpf_object__next_map)
                if not api.bpf_map__is_internal(m)}

    @staticmethod
    def program_type(prog):
        return PROG_TYPE_NAMES.get(typed().bpf_program__type(prog), str(typed().bpf_program__type(prog)))

    @staticmethod
    def section(prog):
        return typed().bpf_program__section_name(prog).decode()

    @staticmethod
    def map_shape(m):
        """The declared shape, in map_info()'s terms."""
        api = typed()
        return dict(type=MAP_TYPE_NAMES.get(api.bpf_map__type(m), str(api.bpf_map__type(m))),
                    key_size=api.bpf_map__key_size(m), value_size=api.bpf_map__value_size(m),
                    max_entries=api.bpf_map__max_entries(m), flags=api.bpf_map__map_flags(m))

    @staticmethod
    def reuse_map(m, fd):
        """Make the object use the existing map fd (libbpf dups it) instead of creating one."""
        _check(typed().bpf_map__reuse_fd(m, fd), 'reusing a pinned map')

    def load(self):
        rc = typed().bpf_object__load(self.obj)
        if rc < 0:
            raise BpfError('bpf_object__load: %s' % os.strerror(-rc),
                           details={'errno': errno.errorcode.get(-rc, str(-rc))})

    def verifier_log(self):
        return self.log.value.decode('utf-8', 'replace')

    @staticmethod
    def program_fd(prog):
        return _check(typed().bpf_program__fd(prog), 'program fd')

    @staticmethod
    def map_fd(m):
        return _check(typed().bpf_map__fd(m), 'map fd')

    def close(self):
        if self.obj:
            typed().bpf_object__close(self.obj)
            self.obj = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def map_lookup(fd, key, value_size):
    """The value bytes at key (bytes) of a map, or None when there is none."""
    value = ctypes.create_string_buffer(value_size)
    kbuf = ctypes.create_string_buffer(key, len(key))
    rc = typed().bpf_map_lookup_elem(fd, kbuf, value)
    if rc == -errno.ENOENT:
        return None
    _check(rc, 'reading a map value')
    return value.raw


def map_update(fd, key, value, flags=0):
    kbuf = ctypes.create_string_buffer(key, len(key))
    vbuf = ctypes.create_string_buffer(value, len(value))
    _check(typed().bpf_map_update_elem(fd, kbuf, vbuf, flags), 'writing a map value')


def map_delete(fd, key):
    """Delete key (bytes) from a hash map; False when it was not there."""
    kbuf = ctypes.create_string_buffer(key, len(key))
    rc = typed().bpf_map_delete_elem(fd, kbuf)
    if rc == -errno.ENOENT:
        return False
    _check(rc, 'deleting a map value')
    return True
