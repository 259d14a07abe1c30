# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The BPF sources of an instance, in a directory that may hold files of others."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import os

from ansible_collections.ebpf.sockredir.plugins.module_utils import mounts
from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError


class SourceDir(object):
    """src_dir: writes only the files given in sources, records them, removes only those."""

    def __init__(self, path, sources, recorded):
        self.path = path
        self.sources = sources  # {name: bytes} or None (use what is on disk: the boot)
        self.recorded = set(recorded or [])

    def _open(self, create=False):
        if not os.path.isabs(self.path):
            raise BpfError('src_dir: must be an absolute directory path, got %r' % self.path, param='src_dir')
        return mounts.open_dir(self.path, 'src_dir', create=create, mode=0o755)

    def check(self):
        fd = self._open()[0]
        if fd is None:
            return
        try:
            for name in sorted(self.sources or {}):
                if name in self.recorded:
                    continue
                try:
                    with open(os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd), 'rb') as f:
                        same = f.read() == self.sources[name]
                except FileNotFoundError:
                    continue
                except OSError:
                    same = False
                if not same:
                    raise BpfError('src_dir: %s already holds a %s that this collection did not write; it '
                                   'is not overwritten. Choose a src_dir of its own.'
                                   % (self.path, name), param='src_dir')
        finally:
            os.close(fd)

    def changes(self):
        """Names whose content on disk differs from sources."""
        fd = self._open()[0]
        if fd is None:
            return sorted(self.sources or {})
        try:
            out = []
            for name, text in sorted((self.sources or {}).items()):
                try:
                    with open(os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd), 'rb') as f:
                        if f.read() == text:
                            continue
                except OSError:
                    pass
                out.append(name)
            return out
        finally:
            os.close(fd)

    def write(self, names):
        fd, created = self._open(create=True)
        try:
            for name in names:
                tmp = '.%s.%d.tmp' % (name, os.getpid())
                out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=fd)
                with open(out, 'wb') as f:
                    f.write(self.sources[name])
                os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        finally:
            os.close(fd)
        return created

    def remove(self, names, created_dirs):
        """Unlink our files; then the directories this collection created, if empty."""
        fd = self._open()[0]
        if fd is None:
            return []
        gone = []
        try:
            for name in sorted(names):
                try:
                    os.unlink(name, dir_fd=fd)
                    gone.append(os.path.join(self.path, name))
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)
        for d in sorted(created_dirs or [], key=len, reverse=True):
            try:
                os.rmdir(d)  # only when empty: files of others stay, and so does their directory
                gone.append(d)
            except OSError:
                pass
        return gone
