# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Read what is pinned in bpffs: kind and kernel-reported info of each pin."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import os
import stat

from ansible_collections.ebpf.sockredir.plugins.module_utils import libbpf, mounts
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
    return _require_kind(describe(path), path, kind, param)


def _require_kind(found, path, kind, param):
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


class PinDir(object):
    """A directory below a bpffs mount, opened safely (mounts.open_dir) and held open.

    Every pin in it is reached as /proc/self/fd/<fd>/<name>: the kernel resolves
    that through the directory this process opened and checked, so a directory
    swapped for a symbolic link or someone else's after the check is never
    used. This includes bcc, which pins and reuses maps by path.
    """

    def __init__(self, path, param, create=False):
        path = mounts.require_normalized(path, param)
        found = mounts.lexical_mount(path, 'bpf')
        if found is None:
            mounts.require_bpffs(path, param)  # raises with what is mounted where
            raise BpfError('%s: %s is not on a bpffs mount' % (param, path), param=param)
        top, dev = found
        if path == top:
            raise BpfError('%s must be a directory below the bpffs mount, not the mount itself '
                           '(%s); e.g. %s/sockredir' % (param, path, path.rstrip('/')), param=param)
        self.path, self.param, self.mount = path, param, top
        self.fd, self.created = mounts.open_dir(path, param, top=top, top_dev=dev, create=create)

    @property
    def exists(self):
        return self.fd is not None

    def at(self, name=''):
        """A path for syscalls and bcc that goes through the opened directory."""
        if self.fd is None:
            raise BpfError('%s: %s does not exist' % (self.param, self.path), param=self.param)
        return '/proc/self/fd/%d/%s' % (self.fd, name) if name else '/proc/self/fd/%d' % self.fd

    def show(self, name=''):
        """The same path as the user knows it, for messages and results."""
        return os.path.join(self.path, name) if name else self.path

    def names(self):
        return sorted(os.listdir(self.fd)) if self.fd is not None else []

    def lexists(self, name):
        if self.fd is None:
            return False
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def describe(self, name):
        """describe() of a pin in this directory (None: nothing there)."""
        if not self.lexists(name):
            return None
        if stat.S_ISLNK(os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode):
            return dict(kind='symlink')
        return describe(self.at(name))

    def require_kind(self, name, kind, param):
        return _require_kind(self.describe(name), self.show(name), kind, param)

    def unlink(self, name):
        os.unlink(name, dir_fd=self.fd)

    def rename(self, old, new):
        os.rename(old, new, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def rmdir_if_empty(self):
        """Remove the directory when nothing is left in it; True if removed."""
        if self.fd is None or os.listdir(self.fd):
            return False
        parent = mounts.open_dir(os.path.dirname(self.path), self.param, top=self.mount)[0]
        try:
            os.rmdir(os.path.basename(self.path), dir_fd=parent)
        except OSError:
            return False
        finally:
            os.close(parent)
        return True

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pin_staged(at, fds, made):
    """Pin each (name, fd) at <name>__staging in the PinDir at, then rename all over <name>.

    bpffs renames atomically, so a reader of a pin sees the old or the new
    object, never nothing. Every staging pin's name is appended to made (the
    caller's undo list) as soon as it exists.
    """
    staged = []
    for name, fd in fds:
        tmp = '%s__staging' % name
        if at.lexists(tmp):
            at.unlink(tmp)
        libbpf.obj_pin(fd, at.at(tmp))
        made.append(tmp)
        staged.append((tmp, name))
    for tmp, final in staged:
        at.rename(tmp, final)


def undo(at, made, set_aside):
    """After a failed load: remove the pins named in made, put set-aside maps (<name>__replaced)
    back, remove the directory if this load created it (at.created) and nothing is left in it."""
    for name in made:
        if at.lexists(name):
            at.unlink(name)
    for m in set_aside:
        at.rename(m + '__replaced', m)
    if at.created:
        at.rmdir_if_empty()
