# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where bpffs and cgroup v2 are mounted, read from /proc/self/mountinfo."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import os

from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError


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
    return os.path.normpath(path)


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
