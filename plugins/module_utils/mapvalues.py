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


def write_array(path, values, check_mode=False, want_diff=False, param='map'):
    """Set array[index] = bytes for each item of values ({index: bytes}).

    Returns dict(changed, map=<map info>, [diff]). Checks everything (kind,
    type, indices, value sizes) before the first write.
    """
    found = pins.require_kind(path, 'map', param)
    if found is None:
        raise BpfError('%s: no map is pinned at %s (load the programs first)' % (param, path), param=param)
    if found['type'] not in ('array', 'percpu_array') or found['key_size'] != 4:
        raise BpfError('%s: %s is a %s with %d-byte keys, expected an array (u32 keys)'
                       % (param, path, found['type'], found['key_size']), param=param)
    if found['type'] != 'array':
        raise BpfError('%s: %s is a per-CPU array; settings belong in a plain array' % (param, path),
                       param=param)
    for index, value in sorted(values.items()):
        if not 0 <= index < found['max_entries']:
            raise BpfError('%s: index %d is outside %s (max_entries %d)'
                           % (param, index, path, found['max_entries']), param=param)
        if len(value) != found['value_size']:
            raise BpfError('%s: the value for index %d is %d bytes, the map\'s values are %d bytes'
                           % (param, index, len(value), found['value_size']), param=param)
    with libbpf.Fd(libbpf.obj_get(path)) as fd:
        before = {i: libbpf.map_lookup(fd, _key(i), found['value_size']) for i in values}
        differ = sorted(i for i, v in values.items() if before[i] != v)
        if differ and not check_mode:
            for i in differ:
                libbpf.map_update(fd, _key(i), values[i])
    result = dict(changed=bool(differ), map=dict(found, pin=path), updated=differ)
    if want_diff:
        result['diff'] = dict(before={i: before[i].hex() for i in sorted(values)},
                              after={i: values[i].hex() for i in sorted(values)})
    return result
