"""What each loader's package step costs on a fresh guest, asked of apt.

Usage: package_sizes.py 'PATH=PKG,PKG,...' ... (e.g. object=libbpf1,bpftool)

The guest of a scenario already has some of these packages (bpftool is the
witness of verify in both images; bookworm's image has BCC and the headers),
so apt is asked twice per path, both times with --assume-no (nothing is
installed, nothing is downloaded):

  guest   apt-get install --assume-no --no-install-recommends PKGS in the
          guest as it is: what the role's package step would install here;
  fresh   the same against a copy of dpkg's status without every path's
          packages and what only they pulled in (apt-get -s purge
          --autoremove of all of them lists those): the guest as it would be
          had the image been built without any of them, i.e. a fresh host of
          the suite with the image's base packages.

Each answer is apt's own line "After this operation, N MB of additional disk
space will be used" (0 when apt installs nothing) and the packages it would
install. Prints one JSON object.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

ENV = dict(os.environ, LC_ALL='C', DEBIAN_FRONTEND='noninteractive')
SIZE = re.compile(r'^After this operation, (.+) of additional disk space will be used\.$', re.M)
UNITS = {'B': 1, 'kB': 1000, 'MB': 1000 ** 2, 'GB': 1000 ** 3}


def apt(args, status=None):
    opts = ['-o', 'Dir::State::status=' + status] if status else []
    return subprocess.run(['apt-get'] + opts + args, env=ENV, capture_output=True, text=True, check=False)


def ask(packages, status=None):
    sim = apt(['-s', 'install', '--no-install-recommends'] + packages, status)
    if sim.returncode != 0:
        raise SystemExit('apt-get -s install %s: %s' % (' '.join(packages), sim.stderr or sim.stdout))
    new = sorted(line.split()[1] for line in sim.stdout.splitlines() if line.startswith('Inst '))
    out = apt(['install', '--assume-no', '--no-install-recommends'] + packages, status)
    found = SIZE.search(out.stdout)
    if found is None and new:
        raise SystemExit('apt-get would install %s but printed no size line:\n%s%s' % (new, out.stdout, out.stderr))
    line = found.group(0) if found else 'nothing to install (0 B)'
    size = found.group(1) if found else '0 B'
    number, unit = size.replace(',', '').split()
    return dict(packages=packages, installs=new, count=len(new), line=line, size=size,
                bytes=int(float(number) * UNITS[unit]))


def fresh_status(all_packages, tmp):
    """A copy of dpkg's status without all_packages and what only they pulled in."""
    installed = [p for p in all_packages
                 if subprocess.run(['dpkg-query', '-W', '-f=${db:Status-Abbrev}', p], env=ENV,
                                   capture_output=True, text=True, check=False).stdout.startswith('ii')]
    # A path package that the base needs (iproute2 links libbpf1) stays: purging
    # it would take a manually installed package that is not ours with it.
    ours = set(all_packages)
    manual = set(subprocess.run(['apt-mark', 'showmanual'], env=ENV, capture_output=True, text=True,
                                check=True).stdout.split())
    base = {}
    for p in installed:
        sim = apt(['-s', 'purge', p])
        taken = sorted({line.split()[1] for line in sim.stdout.splitlines() if line.startswith(('Purg ', 'Remv '))}
                       & manual - ours)
        if taken:
            base[p] = taken
    installed = [p for p in installed if p not in base]
    gone = set()
    if installed:
        sim = apt(['-s', 'purge', '--autoremove'] + installed)
        if sim.returncode != 0:
            raise SystemExit('apt-get -s purge --autoremove %s: %s' % (' '.join(installed), sim.stderr))
        gone = {line.split()[1] for line in sim.stdout.splitlines() if line.startswith(('Purg ', 'Remv '))}
    kept = []
    with open('/var/lib/dpkg/status') as f:
        for stanza in f.read().split('\n\n'):
            name = re.search(r'^Package: (\S+)', stanza, re.M)
            arch = re.search(r'^Architecture: (\S+)', stanza, re.M)
            if name and (name.group(1) in gone or '%s:%s' % (name.group(1), arch.group(1) if arch else '') in gone):
                continue
            if stanza.strip():
                kept.append(stanza.strip('\n'))
    path = os.path.join(tmp, 'status')
    with open(path, 'w') as f:
        f.write('\n\n'.join(kept) + '\n')
    return path, sorted(gone), base


def main():
    paths = dict(arg.split('=', 1) for arg in sys.argv[1:])
    paths = {k: [p for p in v.split(',') if p] for k, v in paths.items()}
    everything = sorted({p for pkgs in paths.values() for p in pkgs})
    with tempfile.TemporaryDirectory() as tmp:
        status, removed, base = fresh_status(everything, tmp)
        report = dict(
            kernel=os.uname().release,
            apt_sources=sorted(open('/etc/apt/sources.list').read().split('\n')) if os.path.exists(
                '/etc/apt/sources.list') else [],
            fresh_removed=removed,
            fresh_kept={p: 'needed by %s' % ', '.join(by) for p, by in base.items()},
            paths={name: dict(guest=ask(pkgs), fresh=ask(pkgs, status)) for name, pkgs in paths.items()})
    report['apt_sources'] = [s for s in report['apt_sources'] if s]
    print(json.dumps(report, indent=1, sort_keys=True))


if __name__ == '__main__':
    main()
