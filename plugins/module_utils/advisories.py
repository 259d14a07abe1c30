# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Known sockmap/sk_msg kernel bugs that lose data or crash, and which kernels have them.

ADVISORIES is plain data, one dict per CVE, copied by hand from the CVE records
(the Linux kernel CNA's JSON in the kernel's vulns.git, cve/published/<year>/
<CVE>.json; CVE-2023-0160 from Red Hat's record) and checked against them:

    cve, title        as in the record
    impact            what goes wrong, in a sentence
    path              'sockredir' when the buggy code runs on the path this
                      collection's programs use (a TCP socket in a sockhash,
                      an sk_msg verdict redirecting to ingress, close, map
                      free); 'sockmap' when it needs a sockmap feature they do
                      not use (stream parser/verdict, cork, deletes from
                      tracing programs) that another tool on the host might
    introduced        first mainline release with the bug; None = unknown
                      (then every release before the mainline fix counts)
    backported_into   {series: first release} where a stable backport brought
                      the bug into an older series
    fixed             {series: first fixed release} of each stable series
                      that got the fix; a series missing here that is older
                      than fixed_mainline never got it (end of life)
    fixed_mainline    first mainline release with the fix ('6.16-rc1' style)
    stable_fixes_known  False when the record does not say which stable
                      releases carry the fix: such kernels "may be affected"
    source            the CVE record

advisories_for(release) compares a `uname -r` string against the table. Only
an upstream version (6.6.30, 6.10-rc3) gets a hard verdict. A distribution or
vendor kernel (6.1.0-26-amd64, 5.15.0-105-generic, 5.14.0-427.el9.x86_64, a
local suffix like 6.18.44-fc-v669) backports fixes without changing its
number, so a match there is reported as "may be affected, check your
distribution's advisory", never as a verdict.
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import re

CVE_RECORD = 'https://www.cve.org/CVERecord?id=%s'

ADVISORIES = [
    dict(cve='CVE-2022-49205',
         title='bpf, sockmap: Fix double uncharge the mem of sk_msg',
         impact='a redirected sendmsg() racing with the psock tear-down (programs detached while '
                'data flows) uncharges socket memory twice: WARNING in inet_sock_destruct',
         path='sockredir', introduced='4.20', backported_into={},
         fixed={'5.4': '5.4.189', '5.10': '5.10.110', '5.15': '5.15.33', '5.16': '5.16.19',
                '5.17': '5.17.2'},
         fixed_mainline='5.18'),
    dict(cve='CVE-2023-0160',
         title='Possibility of deadlock in libbpf function sock_hash_delete_elem',
         impact='deadlock (system hang) when sockhash/sockmap elements are deleted from a BPF '
                'program; the 6.4 fix was later reverted and replaced (CVE-2024-35895)',
         path='sockmap', introduced=None, backported_into={}, fixed={},
         fixed_mainline='6.4-rc1', stable_fixes_known=False),
    dict(cve='CVE-2023-52735',
         title="bpf, sockmap: Don't let sock_map_{close,destroy,unhash} call itself",
         impact='closing a socket that is in a sockmap can recurse until the kernel stack '
                'overflows (crash)',
         path='sockredir', introduced='5.16', backported_into={'5.14': '5.14.19', '5.15': '5.15.3'},
         fixed={'5.15': '5.15.95', '6.1': '6.1.13'},
         fixed_mainline='6.2'),
    dict(cve='CVE-2024-35895',
         title='bpf, sockmap: Prevent lock inversion deadlock in map delete elem',
         impact='deadlock when a tracing BPF program deletes sockmap/sockhash elements',
         path='sockmap', introduced='4.20', backported_into={},
         fixed={'5.4': '5.4.274', '5.10': '5.10.215', '5.15': '5.15.154', '6.1': '6.1.85',
                '6.6': '6.6.26', '6.8': '6.8.5'},
         fixed_mainline='6.9'),
    dict(cve='CVE-2024-36938',
         title='bpf, skmsg: Fix NULL pointer dereference in sk_psock_skb_ingress_enqueue',
         impact='NULL pointer dereference (crash) when a socket closes while a stream verdict '
                'program queues data to it',
         path='sockmap', introduced='4.20', backported_into={},
         fixed={'5.10': '5.10.223', '5.15': '5.15.159', '6.1': '6.1.91', '6.6': '6.6.31',
                '6.8': '6.8.10'},
         fixed_mainline='6.9'),
    dict(cve='CVE-2024-39500',
         title='sock_map: avoid race between sock_map_close and sk_psock_put',
         impact='close() racing with the removal of the socket from the map hits a WARN and '
                'leaves the socket with a stale close callback',
         path='sockredir', introduced='5.13', backported_into={'5.10': '5.10.248'},
         fixed={'5.15': '5.15.162', '6.1': '6.1.95', '6.6': '6.6.35', '6.9': '6.9.6'},
         fixed_mainline='6.10'),
    dict(cve='CVE-2024-41048',
         title='skmsg: Skip zero length skb in sk_msg_recvmsg',
         impact='a FIN (shutdown(SHUT_WR)) queued as a zero-length skb makes recvmsg() read a '
                'NULL page: kernel panic on some architectures',
         path='sockmap', introduced='4.20', backported_into={},
         fixed={'5.15': '5.15.163', '6.1': '6.1.100', '6.6': '6.6.41', '6.9': '6.9.10'},
         fixed_mainline='6.10'),
    dict(cve='CVE-2024-46783',
         title='tcp_bpf: fix return value of tcp_bpf_sendmsg()',
         impact='sendmsg() on a corked sk_msg socket can return a negative byte count: BUG in '
                'sock_sendmsg_nosec',
         path='sockmap', introduced='4.17', backported_into={},
         fixed={'5.4': '5.4.284', '5.10': '5.10.226', '5.15': '5.15.167', '6.1': '6.1.110',
                '6.6': '6.6.51', '6.10': '6.10.10'},
         fixed_mainline='6.11'),
    dict(cve='CVE-2024-47710',
         title='sock_map: Add a cond_resched() in sock_hash_free()',
         impact='freeing a large sockhash (the unpin at state=absent) can soft-lock a CPU',
         path='sockredir', introduced='5.8', backported_into={'5.4': '5.4.49', '5.7': '5.7.6'},
         fixed={'5.4': '5.4.285', '5.10': '5.10.227', '5.15': '5.15.168', '6.1': '6.1.113',
                '6.6': '6.6.54', '6.10': '6.10.13', '6.11': '6.11.2'},
         fixed_mainline='6.12'),
    dict(cve='CVE-2024-56633',
         title='tcp_bpf: Fix the sk_mem_uncharge logic in tcp_bpf_sendmsg',
         impact='wrong socket memory accounting on the sk_msg redirect path (WARNING in '
                'inet_sock_destruct when the socket is freed)',
         path='sockredir', introduced='4.20', backported_into={},
         fixed={'5.4': '5.4.287', '5.10': '5.10.231', '5.15': '5.15.174', '6.1': '6.1.120',
                '6.6': '6.6.66', '6.12': '6.12.5'},
         fixed_mainline='6.13'),
    dict(cve='CVE-2024-56664',
         title='bpf, sockmap: Fix race between element replace and close()',
         impact='replacing a map element while its socket closes drops the wrong reference: '
                'use-after-free when the map is freed',
         path='sockredir', introduced='4.20', backported_into={},
         fixed={'5.10': '5.10.236', '5.15': '5.15.180', '6.1': '6.1.125', '6.6': '6.6.67',
                '6.12': '6.12.6'},
         fixed_mainline='6.13'),
    dict(cve='CVE-2024-56694',
         title='bpf: fix recursive lock when verdict program return SK_PASS',
         impact='a stream verdict program returning SK_PASS deadlocks the system',
         path='sockmap', introduced='6.9',
         backported_into={'5.10': '5.10.223', '5.15': '5.15.159', '6.1': '6.1.91', '6.6': '6.6.31',
                          '6.8': '6.8.10'},
         fixed={'5.10': '5.10.233', '5.15': '5.15.174', '6.1': '6.1.120', '6.6': '6.6.64',
                '6.11': '6.11.11', '6.12': '6.12.2'},
         fixed_mainline='6.13'),
    dict(cve='CVE-2025-38154',
         title='bpf, sockmap: Avoid using sk_socket after free when sending',
         impact='the psock backlog worker sends on a socket being closed: use-after-free (crash)',
         path='sockmap', introduced='6.10',
         backported_into={'5.15': '5.15.162', '6.1': '6.1.95', '6.6': '6.6.35', '6.9': '6.9.6'},
         fixed={'5.15': '5.15.186', '6.1': '6.1.142', '6.6': '6.6.94', '6.12': '6.12.34',
                '6.15': '6.15.3'},
         fixed_mainline='6.16-rc1'),
    dict(cve='CVE-2025-38165',
         title='bpf, sockmap: Fix panic when calling skb_linearize',
         impact='large messages redirected to ingress by a stream verdict program: kernel BUG '
                'in pskb_expand_head (panic)',
         path='sockmap', introduced='6.6',
         backported_into={'5.15': '5.15.189', '6.1': '6.1.54', '6.5': '6.5.4'},
         fixed={'5.15': '5.15.190', '6.1': '6.1.142', '6.6': '6.6.94', '6.12': '6.12.34',
                '6.15': '6.15.3'},
         fixed_mainline='6.16-rc1'),
    dict(cve='CVE-2026-68284',
         title='bpf, sockmap: Fix cork use-after-free in tcp_bpf_sendmsg()',
         impact='two threads sending on one corked sk_msg socket: use-after-free of the cork',
         path='sockmap', introduced='4.20', backported_into={},
         fixed={'5.10': '5.10.265', '5.15': '5.15.216', '6.1': '6.1.183', '6.6': '6.6.148',
                '6.12': '6.12.101', '6.18': '6.18.42', '7.1': '7.1.6'},
         fixed_mainline='7.2'),
]

for _entry in ADVISORIES:
    _entry.setdefault('stable_fixes_known', True)
    _entry['source'] = CVE_RECORD % _entry['cve']
del _entry

_RELEASE = re.compile(r'^(\d+)\.(\d+)(?:\.(\d+))?(?:-rc(\d+))?(.*)$')
# the upstream stable level a distribution names in /proc/version or
# /proc/version_signature: "... Debian 6.1.112-1 (2024-09-30)",
# "Ubuntu 5.15.0-105.115-generic 5.15.148"
_DISTRO_UPSTREAM = (re.compile(r'\bDebian (\d+\.\d+\.\d+)'),
                    re.compile(r'^Ubuntu \S+ (\d+\.\d+\.\d+)\s*$', re.M))


def parse_version(text):
    """(major, minor, patch, rc) of '6.1', '6.1.120' or '6.16-rc1'; rc None for a release.

    Raises ValueError for anything else (the table holds only these forms).
    """
    m = _RELEASE.match(text)
    if not m or m.group(5):
        raise ValueError('not a kernel version: %r' % (text,))
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0),
            int(m.group(4)) if m.group(4) else None)


def version_key(version):
    """Sort key: 6.16-rc1 < 6.16-rc2 < 6.16 = 6.16.0 < 6.16.1."""
    major, minor, patch, rc = parse_version(version) if isinstance(version, str) else version
    return (major, minor, patch, 0 if rc is not None else 1, rc or 0)


def compare_versions(a, b):
    """-1, 0 or 1 as kernel version a is older than, equal to or newer than b."""
    ka, kb = version_key(a), version_key(b)
    return (ka > kb) - (ka < kb)


def parse_release(release, version_text=None):
    """What a `uname -r` string says: dict(version, series, vendor, upstream_hint).

    vendor: the release carries a suffix (distribution ABI, local version), so
    its number need not show which fixes it has. version_text, the contents of
    /proc/version or /proc/version_signature, may name the upstream stable
    level a distribution kernel is based on (Debian, Ubuntu); that level is
    then compared instead of the ABI number (6.1.0-26-amd64 is 6.1.112).
    """
    m = _RELEASE.match(release.strip())
    if not m:
        raise ValueError('cannot read a kernel version from the release %r' % (release,))
    major, minor, patch = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    rc = int(m.group(4)) if m.group(4) else None
    suffix = m.group(5)
    # the first version of this kernel's series ("Debian 12.2.0" is the compiler's)
    hints = [found.group(1) for pattern in _DISTRO_UPSTREAM
             for found in pattern.finditer(version_text or '')
             if parse_version(found.group(1))[:2] == (major, minor)]
    hint = hints[0] if hints else None
    version = parse_version(hint) if hint else (major, minor, patch, rc)
    return dict(version=version, series='%d.%d' % (major, minor), vendor=bool(suffix),
                upstream_hint=hint)


def _format(version):
    major, minor, patch, rc = version
    return '%d.%d.%d' % (major, minor, patch) + ('-rc%d' % rc if rc is not None else '')


def _verdict(entry, version, series):
    """(affected, fixed_in) by the upstream numbers alone; fixed_in None when not affected."""
    key = version_key(version)
    if key >= version_key(entry['fixed_mainline']):
        return False, None
    first = entry['backported_into'].get(series)
    if first is None:
        if entry['introduced'] is not None and key < version_key(entry['introduced']):
            return False, None
    elif key < version_key(first):
        return False, None
    if not entry['stable_fixes_known']:
        return True, 'unknown'
    if version[3] is not None and series == '%d.%d' % parse_version(entry['fixed_mainline'])[:2]:
        return True, 'unknown'  # a release candidate before the fix's release: which rc has it is not recorded
    fix = entry['fixed'].get(series)
    if fix is not None:
        return (key < version_key(fix)), fix
    # no fix in this series: end of life before the fix, or a mainline
    # release candidate of the fix's own release
    return True, None


def advisories_for(release, version_text=None, path=None):
    """The ADVISORIES that apply to a kernel release, each with a status and a message.

    status 'affected': an upstream version below the fix of its series.
    status 'may_be_affected': a distribution/vendor kernel whose number is
    below the fix (it may carry the fix as a backport), or a series whose
    stable fix version the record does not give. path='sockredir' keeps only
    the bugs on this collection's own code path.
    """
    info = parse_release(release, version_text)
    out = []
    for entry in ADVISORIES:
        if path is not None and entry['path'] != path:
            continue
        affected, fixed_in = _verdict(entry, info['version'], info['series'])
        if not affected:
            continue
        if fixed_in is None:
            fix_text = ('no %s release has the fix; it is in %s and later'
                        % (info['series'], entry['fixed_mainline']))
        elif fixed_in == 'unknown':
            fix_text = ('the fixed %s release is unknown; mainline has it since %s'
                        % (info['series'], entry['fixed_mainline']))
        else:
            fix_text = 'fixed in %s' % fixed_in
        if info['vendor'] or fixed_in == 'unknown':
            status = 'may_be_affected'
            message = ('%s may be affected by %s (%s): %s. %s is %s, check your distribution\'s '
                       'advisory for %s.' % (release, entry['cve'], entry['impact'], fix_text,
                                             release,
                                             'a distribution or vendor build that can carry the fix '
                                             'without a new version number' if info['vendor'] else
                                             'older than the mainline fix', entry['cve']))
        else:
            status = 'affected'
            message = '%s is affected by %s (%s): %s.' % (release, entry['cve'], entry['impact'],
                                                          fix_text)
        out.append(dict(cve=entry['cve'], title=entry['title'], impact=entry['impact'],
                        path=entry['path'], status=status, compared_as=_format(info['version']),
                        fixed_in=fixed_in, fixed_mainline=entry['fixed_mainline'],
                        message=message, source=entry['source']))
    return out
