# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Read what is pinned in bpffs: kind and kernel-reported info of each pin."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import os

from ansible_collections.ebpf.sockredir.plugins.module_utils import libbpf
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError


def describe(path):
    """None if nothing is pinned at path, else dict(kind, info...) from the kernel."""
    if not os.path.lexists(path):
        return None
    if os.path.islink(path):
        return dict(kind='symlink')  # never followed: it could point at anyone's object
    try:
        fd = libbpf.obj_get(path)
    except BpfError as e:
        return dict(kind='other', error=e.msg)
    with libbpf.Fd(fd):
        kind = libbpf.fd_kind(fd)
        if kind == 'prog':
            return dict(kind='prog', **libbpf.prog_info(fd))
        if kind == 'map':
            return dict(kind='map', **libbpf.map_info(fd))
        return dict(kind=kind)


def require_kind(path, kind, param):
    """describe(path), failing if something of another kind is pinned there."""
    found = describe(path)
    if found is not None and found['kind'] != kind:
        raise BpfError('%s: %s holds a %s, expected a %s (or nothing). Remove it by hand if it '
                       'is not needed; it is left untouched.'
                       % (param, path, 'symbolic link' if found['kind'] == 'symlink' else found['kind'],
                          {'prog': 'program', 'map': 'map'}[kind]),
                       param=param)
    return found


def list_dir(pin_dir):
    """{name: describe(path)} for every pin directly in pin_dir."""
    if not os.path.isdir(pin_dir):
        return {}
    return {name: describe(os.path.join(pin_dir, name)) for name in sorted(os.listdir(pin_dir))}


def undo(pin_dir, made, set_aside, created_dir):
    """After a failed load: remove the pins in made, put set-aside maps (<name>__replaced) back,
    remove pin_dir if this load created it and nothing is left in it."""
    for path in made:
        if os.path.lexists(path):
            os.unlink(path)
    for m in set_aside:
        os.rename(os.path.join(pin_dir, m + '__replaced'), os.path.join(pin_dir, m))
    if created_dir and os.path.isdir(pin_dir) and not os.listdir(pin_dir):
        os.rmdir(pin_dir)


def pin_staged(pin_dir, fds, made):
    """Pin each (name, fd) at pin_dir/<name>__staging, then rename all over pin_dir/<name>.

    bpffs renames atomically, so a reader of a pin sees the old or the new
    object, never nothing. Every staging pin is appended to made (the
    caller's undo list) as soon as it exists.
    """
    staged = []
    for name, fd in fds:
        tmp = os.path.join(pin_dir, '%s__staging' % name)
        if os.path.lexists(tmp):
            os.unlink(tmp)
        libbpf.obj_pin(fd, tmp)
        made.append(tmp)
        staged.append((tmp, os.path.join(pin_dir, name)))
    for tmp, final in staged:
        os.replace(tmp, final)
