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


def mount_table(mountinfo='/proc/self/mountinfo'):
    """[(mount point, fstype, st_dev)] in mount order."""
    out = []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            sep = fields.index('-')
            major, minor = fields[2].split(':')
            out.append((_unescape(fields[4]), fields[sep + 1], os.makedev(int(major), int(minor))))
    return out


def mounts(mountinfo='/proc/self/mountinfo'):
    """[(mount point, fstype)] in mount order."""
    return [(mp, fs) for mp, fs, _dev in mount_table(mountinfo)]


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


def _unsafe(st):
    """Why a directory root acts in could be swapped by someone else, or None.

    A directory may be world-writable when it is sticky and root-owned, like
    /tmp or a 1777 bpffs: others cannot rename or remove what root made there
    (and what they made themselves is refused as not root's).
    """
    if not stat.S_ISDIR(st.st_mode):
        return 'is not a directory'
    if st.st_uid not in (0, os.geteuid()):
        return 'is owned by uid %d, not by root' % st.st_uid
    if st.st_mode & 0o022 and not (st.st_mode & stat.S_ISVTX and st.st_uid == 0):
        return 'is writable by group or others (mode %o)' % stat.S_IMODE(st.st_mode)
    return None


def lexical_mount(path, fstype, mountinfo='/proc/self/mountinfo'):
    """(mount point, st_dev) of the fstype mount that lexically holds path (no symlink followed)."""
    best = None
    for mp, fs, dev in mount_table(mountinfo):
        if path == mp or path.startswith(mp.rstrip('/') + '/'):
            if best is None or len(mp) >= len(best[0]):
                best = (mp, fs, dev)
    if best is None or best[1] != fstype:
        return None
    return best[0], best[2]


def open_dir(path, param, top='/', top_dev=None, create=False, mode=0o700):
    """(fd, created) of directory path, opened one component at a time from top.

    Each component is opened with O_NOFOLLOW relative to its parent's fd and
    checked on that fd (a real directory, owned by root, not writable by group
    or others), so nothing can be swapped between the check and the use: the
    caller acts through the returned fd (or /proc/self/fd/<fd>/...). A missing
    component is made (mode 0700) when create is true; otherwise (None, [])
    is returned. top_dev: the st_dev top must have (it is a mount point).
    """
    path = require_normalized(path, param)
    rel = os.path.relpath(path, top)
    if rel.startswith('..'):
        raise BpfError('%s: %s is not below %s' % (param, path, top), param=param)
    parts = [] if rel == '.' else rel.split('/')
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(top, flags)
    created = []
    here = top
    try:
        st = os.fstat(fd)
        if top_dev is not None and st.st_dev != top_dev:
            raise BpfError('%s: %s is no longer the mount point it was (device changed)' % (param, top),
                           param=param)
        for part in [None] + parts:
            if part is not None:
                here = os.path.join(here, part)
                try:
                    child = os.open(part, flags, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None, []
                    os.mkdir(part, mode, dir_fd=fd)
                    created.append(here)
                    child = os.open(part, flags, dir_fd=fd)
                except OSError as e:
                    if os.path.islink(here) or e.errno in (40, 20):  # ELOOP, ENOTDIR
                        kind = 'a symbolic link' if os.path.islink(here) else 'not a directory'
                        raise BpfError('%s: %s is %s; refusing to use it (remove it, or choose '
                                       'another path)' % (param, here, kind), param=param)
                    raise
                os.close(fd)
                fd = child
                st = os.fstat(fd)
                if top_dev is not None and st.st_dev != top_dev:
                    raise BpfError('%s: %s is another mount, not part of %s' % (param, here, top),
                                   param=param)
            problem = _unsafe(st)
            if problem:
                raise BpfError('%s: %s %s, so another user could replace what root puts there; '
                               'refusing to use it. Give it to root with mode 0700 (or 0755).'
                               % (param, here, problem), param=param)
        return fd, created
    except BaseException:
        os.close(fd)
        raise


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
