# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where bpffs and cgroup v2 are mounted, read from /proc/self/mountinfo."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import os
import stat

from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError

NAME_MAX = 255


def _unescape(field):
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...)
    return field.encode().decode('unicode_escape')


def mounts(mountinfo='/proc/self/mountinfo'):
    """[(mount point, fstype)] in mount order."""
    out = []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            sep = fields.index('-')
            out.append((_unescape(fields[4]), fields[sep + 1]))
    return out


def mount_points(fstype, mountinfo='/proc/self/mountinfo'):
    return [mp for mp, fs in mounts(mountinfo) if fs == fstype]


def cgroup2_mount(mountinfo='/proc/self/mountinfo'):
    """The cgroup v2 mount point (unified or hybrid layout), or None."""
    points = mount_points('cgroup2', mountinfo)
    return points[0] if points else None


def fs_of(path, mountinfo='/proc/self/mountinfo'):
    """(mount point, fstype) of the mount that holds path (longest prefix)."""
    path = os.path.realpath(path)
    best = ('/', None)
    for mp, fs in mounts(mountinfo):
        if path == mp or path.startswith(mp.rstrip('/') + '/'):
            if len(mp) >= len(best[0]):
                best = (mp, fs)
    return best


def require_normalized(path, param):
    if not os.path.isabs(path):
        raise BpfError('%s must be an absolute path, got %r' % (param, path), param=param)
    if '..' in path.split('/'):
        raise BpfError('%s must not contain "..", got %r' % (param, path), param=param)
    long_parts = [p for p in path.split('/') if len(p.encode()) > NAME_MAX]
    if long_parts:
        raise BpfError('%s: each path component must be at most %d bytes; %r is %d'
                       % (param, NAME_MAX, long_parts[0][:40] + '...', len(long_parts[0].encode())),
                       param=param)
    return os.path.normpath(path)


def require_private_dir(path, param):
    """An existing path must be a real directory of ours that no one else can write.

    bpffs is often mounted mode 1777: any user may create a directory there
    before us and then swap our pins for links or objects of their own.
    """
    if not os.path.lexists(path):
        return
    st = os.lstat(path)
    problem = None
    if stat.S_ISLNK(st.st_mode):
        problem = 'is a symbolic link'
    elif not stat.S_ISDIR(st.st_mode):
        problem = 'is not a directory'
    elif st.st_uid != os.geteuid():
        problem = 'is owned by uid %d, not by us (uid %d)' % (st.st_uid, os.geteuid())
    elif st.st_mode & 0o022:
        problem = 'is writable by group or others (mode %o)' % stat.S_IMODE(st.st_mode)
    if problem:
        raise BpfError('%s: %s %s, so another user could replace its pins; refusing to use it. '
                       'Remove it, or give it to root with mode 0700.' % (param, path, problem),
                       param=param)


def require_bpffs(path, param):
    """path (existing or not) lies on a mounted bpffs; returns the normalized path."""
    path = require_normalized(path, param)
    mp, fs = fs_of(path)
    if fs != 'bpf':
        found = mount_points('bpf')
        raise BpfError(
            '%s must be below a mounted bpffs (mount -t bpf bpf /sys/fs/bpf); %s is on %s (%s).%s'
            % (param, path, mp, fs or 'unknown',
               ' bpffs is mounted at: %s' % ', '.join(found) if found else ' No bpffs is mounted.'),
            param=param)
    return path


def require_cgroup2_dir(path, param):
    """path is an existing directory on cgroup v2; returns the normalized path."""
    path = require_normalized(path, param)
    if not os.path.isdir(path):
        raise BpfError('%s must be an existing cgroup v2 directory; %s does not exist'
                       % (param, path), param=param)
    mp, fs = fs_of(path)
    if fs != 'cgroup2':
        raise BpfError('%s must be a directory on cgroup v2 (mounted at %s); %s is on %s (%s)'
                       % (param, cgroup2_mount() or 'nowhere', path, mp, fs),
                       param=param)
    return path
