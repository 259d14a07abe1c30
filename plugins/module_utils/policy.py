# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The run-time settings of the collection's programs: the port policy and the switches.

Both loaders' programs read them from two pinned maps (files/bpf/sockredir.h):

    sockredir_ports  HASH  u32 port (host byte order) -> u32 verdict (1 allow, 2 deny)
    sockredir_cfg    ARRAY key 0 -> struct sockredir_settings
                     {u32 small_bytes; u32 small_streak; u32 flags; u32 instance}

A change is a map write (mapvalues): no program is loaded or attached again,
and established connections keep their path.
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import hashlib
import struct

from ansible_collections.ebpf.sockredir.plugins.module_utils import libbpf, mapvalues, pins

CFG, PORTS = 'sockredir_cfg', 'sockredir_ports'
ALLOW, DENY = 1, 2
SET_ALLOW_LISTED, SET_DEBUG = 1 << 0, 1 << 1
MAX_PORTS = 1024  # SOCKREDIR_MAX_PORTS, the size of sockredir_ports
SETTINGS = struct.Struct('=IIII')
DEFAULT_SMALL_BYTES, DEFAULT_SMALL_STREAK = 4294967295, 16  # what the programs use for 0


def instance_id(pin_root):
    """The id the debug lines show for an instance: the first 8 hex digits of sha256(pin_root)."""
    return int(hashlib.sha256(pin_root.encode()).hexdigest()[:8], 16)


def wanted(pin_root, allow_ports, deny_ports, debug=False, small_write_bytes=0, small_write_streak=0):
    """(settings bytes, {port key bytes: verdict bytes}) for these options. Deny wins over allow."""
    ports = dict((int(p), ALLOW) for p in allow_ports)
    ports.update((int(p), DENY) for p in deny_ports)
    flags = (SET_ALLOW_LISTED if allow_ports else 0) | (SET_DEBUG if debug else 0)
    settings = SETTINGS.pack(small_write_bytes or 0, small_write_streak or 0, flags, instance_id(pin_root))
    return settings, {struct.pack('=I', p): struct.pack('=I', v) for p, v in ports.items()}


def decode(settings, ports):
    """What a user reads: the settings and the port lists."""
    small_bytes, small_streak, flags, inst = SETTINGS.unpack(settings) if settings else (0, 0, 0, 0)
    verdicts = dict((struct.unpack('=I', k)[0], struct.unpack('=I', v)[0]) for k, v in ports.items())
    return dict(small_write_bytes=small_bytes, small_write_streak=small_streak,
                effective_small_write_bytes=small_bytes or DEFAULT_SMALL_BYTES,
                effective_small_write_streak=small_streak or DEFAULT_SMALL_STREAK,
                flags=flags, allow_listed=bool(flags & SET_ALLOW_LISTED), debug=bool(flags & SET_DEBUG),
                instance='%08x' % inst,
                allow_ports=sorted(p for p, v in verdicts.items() if v == ALLOW),
                deny_ports=sorted(p for p, v in verdicts.items() if v == DENY))


def read(at):
    """decode() of the maps in the pins.PinDir at, or None when it holds no sockredir_cfg."""
    cfg = at.describe(CFG)
    if not cfg or cfg['kind'] != 'map':
        return None
    with libbpf.Fd(libbpf.obj_get(at.at(CFG))) as fd:
        settings = libbpf.map_lookup(fd, struct.pack('=I', 0), cfg['value_size'])
    found = at.describe(PORTS)
    ports = {}
    if found and found['kind'] == 'map':
        ports = mapvalues.read_hash(at.at(PORTS), found['key_size'], found['value_size'])
    return decode(settings if cfg['value_size'] == SETTINGS.size else None, ports)


def read_path(pin_dir):
    """read() of a pin directory given by path (bpf_info)."""
    with pins.PinDir(pin_dir, 'pin_dir') as at:
        return read(at) if at.exists else None


def converge(at, settings, ports, check_mode=False):
    """Write the maps so they hold exactly settings and ports; dict(changed, what=[...])."""
    what = []
    got = mapvalues.write_array(at.at(CFG), {0: settings}, check_mode=check_mode, param='settings',
                                shown=at.show(CFG))
    if got['changed']:
        what.append('settings')
    got = mapvalues.write_hash(at.at(PORTS), ports, check_mode=check_mode, param='allow_ports',
                               shown=at.show(PORTS))
    if got['changed']:
        what.append('port policy (%d set, %d removed)' % (len(got['updated']), len(got['deleted'])))
    return dict(changed=bool(what), what=what)
