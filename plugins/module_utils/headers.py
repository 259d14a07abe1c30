# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Which kernel headers BCC compiles against, and how it finds them.

BCC looks in /lib/modules/$(uname -r)/build (and .../source), or in the one
directory named by BCC_KERNEL_SOURCE. Distribution kernels ship
linux-headers-$(uname -r) there. A custom kernel has none; for programs that
only use UAPI structs (ours), Debian's generic linux-headers-<flavour> serve.
Debian splits them in two trees (<ver>-<flavour>: generated files, <ver>-common:
the rest), and BCC_KERNEL_SOURCE takes only one directory, so we merge the two
as symlinks in a private cache directory. Nothing is written under /lib/modules.

A kernel built with CONFIG_IKHEADERS carries its own headers as
/sys/kernel/kheaders.tar.xz (built in, or from the kheaders module). That is
the last resort, and the only one on a host whose distribution has no headers
package for the running kernel: we load the module if the file is missing and
unpack the archive once per kernel release into the cache directory. BCC has
the same fallback, but reaches it only when no other tree is found, and
unpacks into /tmp on every compile.
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import glob
import os
import re
import shutil
import subprocess
import tarfile
import tempfile

from ansible_collections.ebpf.sockredir.plugins.module_utils.errors import BpfError

DEFAULT_CACHE = '/var/cache/ebpf-sockredir/kernel-headers'
KHEADERS_ARCHIVE = '/sys/kernel/kheaders.tar.xz'
# in a cached tree: it is complete
STAMP = '.ebpf-sockredir-complete'


def _version_key(path):
    return [int(n) if n.isdigit() else n for n in re.split(r'(\d+)', os.path.basename(path))]


def _generic_debian_trees(src_root='/usr/src'):
    """(flavour tree, common tree) of the newest Debian generic headers, or None."""
    pairs = []
    for common in glob.glob(os.path.join(src_root, 'linux-headers-*-common')):
        base = common[:-len('-common')]
        for flavour in glob.glob(base + '-*'):
            if flavour != common and os.path.isdir(os.path.join(flavour, 'include', 'generated')):
                pairs.append((flavour, common))
    if not pairs:
        return None
    return sorted(pairs, key=lambda p: _version_key(p[0]))[-1]


def _done(target):
    return os.path.exists(os.path.join(target, STAMP))


def _build_once(target, cache_dir, fill, what):
    """Make the tree `target` in cache_dir once: fill(tmp) builds it in a temporary
    directory, which a stamp file marks complete and a rename puts in place (a run that
    died half-way leaves no tree that counts)."""
    if _done(target):
        return target
    os.makedirs(cache_dir, mode=0o755, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.build-', dir=cache_dir)
    try:
        fill(tmp)
        open(os.path.join(tmp, STAMP), 'w').close()
        os.chmod(tmp, 0o755)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.rename(tmp, target)
    except (OSError, subprocess.CalledProcessError, tarfile.TarError, EOFError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BpfError('kernel_headers: could not %s in %s: %s'
                       % (what, cache_dir, getattr(e, 'stderr', None) or e), param='kernel_headers')
    return target


def _merge(flavour, common, cache_dir):
    """Symlink tree of common overlaid by flavour; built once, atomically."""
    def fill(tmp):
        for tree, extra in ((common, []), (flavour, ['-f'])):
            # not module.run_command: the boot command runs this engine without an AnsibleModule
            subprocess.run(['cp', '-rs'] + extra + [tree + '/.', tmp + '/'], check=True,  # pylint: disable=ansible-bad-function
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return _build_once(os.path.join(cache_dir, os.path.basename(flavour)), cache_dir, fill,
                       'build the merged header tree')


def _kheaders_available(release, cache_dir, modules_root, archive):
    """'unpacked' (cached earlier), 'builtin' (the archive is there), 'module' (modprobe would
    provide it) or None."""
    if _done(os.path.join(cache_dir, 'kheaders-' + release)):
        return 'unpacked'
    if os.path.isfile(archive):
        return 'builtin'
    try:
        with open(os.path.join(modules_root, release, 'modules.dep')) as dep:
            if any(re.match(r'\S*/kheaders\.ko(\.\w+)?:', line) for line in dep):
                return 'module'
    except OSError:
        pass
    return None


def _unpack_kheaders(release, cache_dir, archive):
    """Unpack the kernel's own header archive into cache_dir/kheaders-<release>, once."""
    target = os.path.join(cache_dir, 'kheaders-' + release)
    if _done(target):
        return target
    if not os.path.isfile(archive):
        # not module.run_command: the boot command runs this engine without an AnsibleModule
        modprobe = shutil.which('modprobe', path=os.pathsep.join([os.environ.get('PATH', ''), '/usr/sbin', '/sbin']))
        why = 'no modprobe command'
        if modprobe:
            probe = subprocess.run([modprobe, 'kheaders'], check=False,  # pylint: disable=ansible-bad-function
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
            why = probe.stderr.strip() or 'exit %d' % probe.returncode
        if not os.path.isfile(archive):
            raise BpfError('kernel_headers: %s is missing and "modprobe kheaders" did not provide it: %s'
                           % (archive, why), param='kernel_headers')

    def fill(tmp):
        with tarfile.open(archive, 'r:xz') as tar:
            if hasattr(tarfile, 'data_filter'):  # Python >= 3.12 and the 3.8-3.11 security backports
                tar.extractall(tmp, filter='data')
            else:
                tar.extractall(tmp)  # nosec: the archive is the running kernel's own
    return _build_once(target, cache_dir, fill, 'unpack %s' % archive)


def _kheaders(release, cache_dir, check_mode, modules_root, archive):
    source = _kheaders_available(release, cache_dir, modules_root, archive)
    if source is None:
        return None
    target = os.path.join(cache_dir, 'kheaders-' + release)
    if not check_mode:
        target = _unpack_kheaders(release, cache_dir, archive)
    return dict(kind='kheaders', path=target, env={'BCC_KERNEL_SOURCE': target},
                archive=dict(unpacked='%s (unpacked before)', builtin='%s', module='%s (module kheaders)')[source] % archive)


def resolve(kernel_headers='auto', cache_dir=DEFAULT_CACHE, release=None, check_mode=False,
            modules_root='/lib/modules', src_root='/usr/src', kheaders_archive=KHEADERS_ARCHIVE):
    """dict(kind, path, env) telling BCC where the headers are.

    kind is 'running-kernel' (/lib/modules/<release>/build), 'generic' (Debian's
    generic headers merged in cache_dir), 'kheaders' (the kernel's own archive,
    CONFIG_IKHEADERS, unpacked in cache_dir) or 'explicit' (the path the user gave).
    """
    release = release or os.uname().release
    if kernel_headers == 'kheaders':
        found = _kheaders(release, cache_dir, check_mode, modules_root, kheaders_archive)
        if found is None:
            raise BpfError('kernel_headers: "kheaders" was asked for, but this kernel has no %s and no kheaders '
                           'module (CONFIG_IKHEADERS is not set); expected "auto" or a header directory'
                           % kheaders_archive, param='kernel_headers')
        return found
    if kernel_headers != 'auto':
        path = os.path.normpath(kernel_headers)
        if not os.path.isdir(os.path.join(path, 'include')):
            raise BpfError('kernel_headers: %s is not a kernel header tree (no include/ directory); '
                           'expected "auto", "kheaders" or a directory like /lib/modules/<release>/build'
                           % kernel_headers, param='kernel_headers')
        return dict(kind='explicit', path=path, env={'BCC_KERNEL_SOURCE': path})

    build = os.path.join(modules_root, release, 'build')
    if os.path.isdir(os.path.join(build, 'include')):
        return dict(kind='running-kernel', path=os.path.realpath(build), env={})

    trees = _generic_debian_trees(src_root)
    if trees is not None:
        flavour, common = trees
        target = os.path.join(cache_dir, os.path.basename(flavour))
        if not check_mode:
            target = _merge(flavour, common, cache_dir)
        return dict(kind='generic', path=target, env={'BCC_KERNEL_SOURCE': target},
                    package_tree=flavour)

    found = _kheaders(release, cache_dir, check_mode, modules_root, kheaders_archive)
    if found is not None:
        return found
    raise BpfError(
        'kernel_headers: BCC needs kernel headers and none were found: %s does not exist, no generic '
        'headers are installed in %s and the kernel has no %s (CONFIG_IKHEADERS). Install the running '
        'kernel\'s headers (Debian/Ubuntu: linux-headers-%s; RHEL/Fedora: kernel-devel-%s) or, for a '
        'custom kernel on Debian, linux-headers-amd64 (or your architecture\'s flavour).'
        % (build, src_root, kheaders_archive, release, release), param='kernel_headers')
