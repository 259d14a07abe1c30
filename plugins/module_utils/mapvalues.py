# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Runtime settings in a pinned BPF ARRAY map: write values idempotently.

The programs read their policy (ports, switches) from a config map, so a
policy change is a map write: no program is loaded, replaced or detached, and
established connections keep their path. A value is a struct given as its
bytes (the caller packs it, e.g. with struct.pack, in the layout the BPF C
side declares); an entry is written only when its bytes differ.
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import struct

from ansible_collections.ebpf.sockredir.plugins.module_utils import libbpf, pins
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError


def _key(index):
    return struct.pack('=I', index)  # array keys are u32 in host byte order


def _pinned(path, param, shown):
    found = pins.require_kind(path, 'map', param)
    if found is None:
        raise BpfError('%s: no map is pinned at %s (load the programs first)' % (param, shown or path),
                       param=param)
    return found


def write_array(path, values, check_mode=False, want_diff=False, param='map', shown=None):
    """Set array[index] = bytes for each item of values ({index: bytes}).

    Returns dict(changed, map=<map info>, [diff]). Checks everything (kind,
    type, indices, value sizes) before the first write. path may be a
    pins.PinDir.at() path; shown is then the path as the user knows it.
    """
    found = _pinned(path, param, shown)
    path_shown = shown or path
    if found['type'] not in ('array', 'percpu_array') or found['key_size'] != 4:
        raise BpfError('%s: %s is a %s with %d-byte keys, expected an array (u32 keys)'
                       % (param, path_shown, found['type'], found['key_size']), param=param)
    if found['type'] != 'array':
        raise BpfError('%s: %s is a per-CPU array; settings belong in a plain array' % (param, path_shown),
                       param=param)
    for index, value in sorted(values.items()):
        if not 0 <= index < found['max_entries']:
            raise BpfError('%s: index %d is outside %s (max_entries %d)'
                           % (param, index, path_shown, found['max_entries']), param=param)
        if len(value) != found['value_size']:
            raise BpfError('%s: the value for index %d is %d bytes, the map\'s values are %d bytes'
                           % (param, index, len(value), found['value_size']), param=param)
    with libbpf.Fd(libbpf.obj_get(path)) as fd:
        before = {i: libbpf.map_lookup(fd, _key(i), found['value_size']) for i in values}
        differ = sorted(i for i, v in values.items() if before[i] != v)
        if differ and not check_mode:
            for i in differ:
                libbpf.map_update(fd, _key(i), values[i])
    result = dict(changed=bool(differ), map=dict(found, pin=path_shown), updated=differ)
    if want_diff:
        result['diff'] = dict(before={i: before[i].hex() for i in sorted(values)},
                              after={i: values[i].hex() for i in sorted(values)})
    return result


def read_hash(path, key_size, value_size):
    """{key bytes: value bytes} of a hash map."""
    with libbpf.Fd(libbpf.obj_get(path)) as fd:
        out = {}
        for k in libbpf.map_keys(fd, key_size):
            v = libbpf.map_lookup(fd, k, value_size)
            if v is not None:  # deleted while we looked
                out[k] = v
        return out


def write_hash(path, values, check_mode=False, want_diff=False, param='map', shown=None):
    """Make a hash map hold exactly values ({key bytes: value bytes}).

    Adds or updates only the entries whose value differs and deletes only
    the keys not in values: an entry that is already right is never
    touched, so a reader never sees it missing. Checks sizes and room
    before the first write. Returns dict(changed, map, updated, deleted, [diff]).
    """
    found = _pinned(path, param, shown)
    path_shown = shown or path
    if found['type'] != 'hash':
        raise BpfError('%s: %s is a %s, expected a hash map' % (param, path_shown, found['type']), param=param)
    for k, v in values.items():
        if len(k) != found['key_size'] or len(v) != found['value_size']:
            raise BpfError('%s: entries of %s are %d-byte keys and %d-byte values, got %d and %d'
                           % (param, path_shown, found['key_size'], found['value_size'], len(k), len(v)),
                           param=param)
    if len(values) > found['max_entries']:
        raise BpfError('%s: %d entries do not fit in %s (max_entries %d)'
                       % (param, len(values), path_shown, found['max_entries']), param=param)
    before = read_hash(path, found['key_size'], found['value_size'])
    updated = sorted(k for k, v in values.items() if before.get(k) != v)
    deleted = sorted(k for k in before if k not in values)
    if (updated or deleted) and not check_mode:
        with libbpf.Fd(libbpf.obj_get(path)) as fd:
            for k in deleted:  # first: the map has room for the new ones
                libbpf.map_delete(fd, k)
            for k in updated:
                libbpf.map_update(fd, k, values[k])
    result = dict(changed=bool(updated or deleted), map=dict(found, pin=path_shown),
                  updated=updated, deleted=deleted)
    if want_diff:
        result['diff'] = dict(before={k.hex(): v.hex() for k, v in sorted(before.items())},
                              after={k.hex(): v.hex() for k, v in sorted(values.items())})
    return result
