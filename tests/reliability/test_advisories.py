"""The kernel preflight's table of sockmap bugs: version parsing, comparison, verdicts.

Pure logic, no kernel needed. The cases sit on the boundaries the CVE records
give (last affected / first fixed release of a series, backports that brought
a bug into an older series, series that never got a fix, release candidates,
distribution kernels).
"""

import pytest

from ansible_collections.ebpf.sockredir.plugins.module_utils import advisories

COMPARE = [
    ('6.1', '6.1.0', 0),
    ('6.1.9', '6.1.10', -1),
    ('6.1.120', '6.1.119', 1),
    ('6.10', '6.9.12', 1),
    ('5.15.200', '6.1', -1),
    ('7.0', '6.19.3', 1),
    ('6.16-rc1', '6.16', -1),
    ('6.16-rc2', '6.16-rc10', -1),
    ('6.16-rc7', '6.15.9', 1),
    ('6.16-rc1', '6.16-rc1', 0),
]


@pytest.mark.parametrize('a,b,expected', COMPARE)
def test_compare_versions(a, b, expected):
    assert advisories.compare_versions(a, b) == expected
    # swapped on purpose: the comparison must be antisymmetric
    assert advisories.compare_versions(b, a) == -expected  # pylint: disable=arguments-out-of-order


RELEASES = [
    # release, /proc/version text, (version, series, vendor, upstream_hint)
    ('6.6.30', None, ((6, 6, 30, None), '6.6', False, None)),
    ('6.10-rc3', None, ((6, 10, 0, 3), '6.10', False, None)),
    ('6.1', None, ((6, 1, 0, None), '6.1', False, None)),
    ('6.18.44-fc-v669', None, ((6, 18, 44, None), '6.18', True, None)),
    ('6.1.0-26-amd64', None, ((6, 1, 0, None), '6.1', True, None)),
    ('5.15.0-105-generic', None, ((5, 15, 0, None), '5.15', True, None)),
    ('5.14.0-427.13.1.el9_4.x86_64', None, ((5, 14, 0, None), '5.14', True, None)),
    ('6.1.0-26-amd64',
     'Linux version 6.1.0-26-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14) '
     '12.2.0) #1 SMP PREEMPT_DYNAMIC Debian 6.1.112-1 (2024-09-30)',
     ((6, 1, 112, None), '6.1', True, '6.1.112')),
    ('5.15.0-105-generic', 'Ubuntu 5.15.0-105.115-generic 5.15.148\n',
     ((5, 15, 148, None), '5.15', True, '5.15.148')),
    # a hint from another series is not this kernel's: ignored
    ('6.1.0-26-amd64', 'Linux version ... Debian 5.10.226-1 (2024-10-03)',
     ((6, 1, 0, None), '6.1', True, None)),
]


@pytest.mark.parametrize('release,text,expected', RELEASES)
def test_parse_release(release, text, expected):
    info = advisories.parse_release(release, text)
    assert (info['version'], info['series'], info['vendor'], info['upstream_hint']) == expected


@pytest.mark.parametrize('release', ['', 'linux', 'v6.1', '6', '6.x.1'])
def test_a_release_without_a_version_is_refused(release):
    with pytest.raises(ValueError, match='cannot read a kernel version'):
        advisories.advisories_for(release)


VERDICTS = [
    # release, /proc/version text, CVE, expected status (None: not listed), expected fixed_in
    # a plain fix in every series: the boundaries
    ('6.1.119', None, 'CVE-2024-56633', 'affected', '6.1.120'),
    ('6.1.120', None, 'CVE-2024-56633', None, None),
    ('6.12.4', None, 'CVE-2024-56633', 'affected', '6.12.5'),
    ('6.12.5', None, 'CVE-2024-56633', None, None),
    ('6.13', None, 'CVE-2024-56633', None, None),
    ('6.18.44', None, 'CVE-2024-56633', None, None),
    ('4.19.300', None, 'CVE-2024-56633', None, None),     # before the bug (4.20)
    ('4.20', None, 'CVE-2024-56633', 'affected', None),    # 4.20 series: no fix, end of life
    ('6.11.9', None, 'CVE-2024-56633', 'affected', None),  # 6.11: no fix, end of life
    ('6.13-rc1', None, 'CVE-2024-56633', 'may_be_affected', 'unknown'),  # which rc has it: not recorded
    # a bug that a stable backport brought into older series
    ('6.1.90', None, 'CVE-2024-56694', None, None),
    ('6.1.91', None, 'CVE-2024-56694', 'affected', '6.1.120'),
    ('6.1.119', None, 'CVE-2024-56694', 'affected', '6.1.120'),
    ('6.1.120', None, 'CVE-2024-56694', None, None),
    ('6.8.9', None, 'CVE-2024-56694', None, None),
    ('6.8.10', None, 'CVE-2024-56694', 'affected', None),   # backported into 6.8, never fixed there
    ('6.9.1', None, 'CVE-2024-56694', 'affected', None),
    ('6.11.10', None, 'CVE-2024-56694', 'affected', '6.11.11'),
    ('5.4.280', None, 'CVE-2024-56694', None, None),
    ('6.10.5', None, 'CVE-2025-38154', 'affected', None),
    ('6.9.5', None, 'CVE-2025-38154', None, None),
    ('6.9.6', None, 'CVE-2025-38154', 'affected', None),
    ('6.15.2', None, 'CVE-2025-38154', 'affected', '6.15.3'),
    ('6.16-rc1', None, 'CVE-2025-38154', None, None),      # the mainline fix is in rc1
    ('6.15.3', None, 'CVE-2025-38154', None, None),
    # fixed in 6.18.42: this machine's 6.18.44 has it
    ('6.18.41', None, 'CVE-2026-68284', 'affected', '6.18.42'),
    ('6.18.42', None, 'CVE-2026-68284', None, None),
    # distribution kernels: never a hard verdict
    ('6.1.0-26-amd64', None, 'CVE-2024-41048', 'may_be_affected', '6.1.100'),
    ('6.1.0-26-amd64', 'Linux version 6.1.0-26-amd64 ... Debian 6.1.112-1 (2024-09-30)',
     'CVE-2024-41048', None, None),
    ('6.1.0-26-amd64', 'Linux version 6.1.0-26-amd64 ... Debian 6.1.112-1 (2024-09-30)',
     'CVE-2024-56633', 'may_be_affected', '6.1.120'),
    ('5.15.0-105-generic', 'Ubuntu 5.15.0-105.115-generic 5.15.148', 'CVE-2024-41048',
     'may_be_affected', '5.15.163'),
    ('5.15.0-105-generic', None, 'CVE-2022-49205', 'may_be_affected', '5.15.33'),
    ('6.18.44-fc-v669', None, 'CVE-2024-56633', None, None),
    # a record without stable fix versions
    ('6.1.50', None, 'CVE-2023-0160', 'may_be_affected', 'unknown'),
    ('6.3.13', None, 'CVE-2023-0160', 'may_be_affected', 'unknown'),
    ('6.4-rc1', None, 'CVE-2023-0160', None, None),
    ('6.4', None, 'CVE-2023-0160', None, None),
]


@pytest.mark.parametrize('release,text,cve,status,fixed_in', VERDICTS)
def test_verdicts(release, text, cve, status, fixed_in):
    found = {a['cve']: a for a in advisories.advisories_for(release, text)}
    if status is None:
        assert cve not in found, found.get(cve)
        return
    assert found[cve]['status'] == status
    assert found[cve]['fixed_in'] == fixed_in
    assert found[cve]['source'] == 'https://www.cve.org/CVERecord?id=%s' % cve


def test_this_machines_kernel_has_every_fix_in_the_table():
    """6.18.44 (the VM these tests run on) is past every fix the table knows."""
    assert advisories.advisories_for('6.18.44-fc-v669') == []


def test_messages_say_how_sure_they_are():
    upstream = {a['cve']: a for a in advisories.advisories_for('6.1.90')}['CVE-2024-56633']
    assert upstream['message'].startswith('6.1.90 is affected by CVE-2024-56633')
    assert 'fixed in 6.1.120' in upstream['message']
    distro = {a['cve']: a for a in advisories.advisories_for('6.1.0-26-amd64')}['CVE-2024-56633']
    assert 'may be affected' in distro['message']
    assert "check your distribution's advisory for CVE-2024-56633" in distro['message']
    eol = {a['cve']: a for a in advisories.advisories_for('6.11.9')}['CVE-2024-56633']
    assert 'no 6.11 release has the fix; it is in 6.13 and later' in eol['message']


def test_path_filter_keeps_the_bugs_on_this_collections_path():
    everything = advisories.advisories_for('6.1.90')
    ours = advisories.advisories_for('6.1.90', path='sockredir')
    assert ours and len(ours) < len(everything)
    assert {a['path'] for a in ours} == {'sockredir'}


@pytest.mark.parametrize('entry', advisories.ADVISORIES, ids=lambda e: e['cve'])
def test_table_entries_are_consistent(entry):
    assert set(entry) >= {'cve', 'title', 'impact', 'path', 'introduced', 'backported_into',
                          'fixed', 'fixed_mainline', 'stable_fixes_known', 'source'}
    assert entry['path'] in ('sockredir', 'sockmap')
    mainline = advisories.version_key(entry['fixed_mainline'])
    if entry['introduced'] is not None:
        assert advisories.version_key(entry['introduced']) < mainline
    for series, first in entry['backported_into'].items():
        assert first.startswith(series + '.')
        if entry['introduced'] is not None:  # a backport into a series older than the bug
            assert advisories.version_key(first) < advisories.version_key(entry['introduced'])
        if series in entry['fixed']:
            assert advisories.version_key(first) < advisories.version_key(entry['fixed'][series])
    for series, fix in entry['fixed'].items():
        assert fix.startswith(series + '.'), (series, fix)
        assert advisories.version_key(fix) < mainline
    if not entry['stable_fixes_known']:
        assert entry['fixed'] == {}
