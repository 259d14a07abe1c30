#!/usr/bin/env bash
# Builds, or finds in the cache, the Debian guest image of the molecule VM
# scenarios (molecule/vm, molecule/vm-nosockmap), one per Debian suite of the
# kernel matrix. Run as root.
#
#   bash scripts/vm-image.sh            build if needed; print the image directory
#   bash scripts/vm-image.sh --path     only print where the image is (or would be)
#   bash scripts/vm-image.sh --rebuild  build again even if cached
#   bash scripts/vm-image.sh --sources  only print the mirror entries the guest gets
#
# The suite is $SOCKREDIR_VM_SUITE (or --suite SUITE before the mode):
#
#   bookworm   Debian 12, kernel 6.1 (the default)
#   trixie     Debian 13, kernel 6.12
#
# Everything comes from Debian packages: mmdebstrap builds the root file
# system from the Debian mirror the host's apt uses (the entries whose
# Release says Origin: Debian in `apt-get indextargets`; for a suite the host
# does not list, the same mirrors with the host's suite name replaced, e.g.
# bookworm-security -> trixie-security), mke2fs -d makes the disk from it.
# No image is downloaded. The result, in $SOCKREDIR_VM_CACHE (default
# /var/cache/ebpf-sockredir-vm) under <suite>-<key>, where the key hashes this
# script (which holds the package list and the guest's files), the suite and
# the mirror entries:
#
#   disk.raw      ext4 root file system, read-only; runs use a qcow2 overlay on it
#   vmlinuz       the guest kernel (Debian's linux-image-amd64) and its
#   initrd.img    initrd, for qemu -kernel/-initrd
#   image.json    suite, kernel release, package versions, the mirror entries, timings
#
# A new build of a suite removes that suite's older keys only; the images of
# the other suites stay.
#
# The guest: Debian (the suite above), systemd, openssh-server (root by key
# only; the key of a run is passed on the kernel command line as
# sockredir_vm.ssh_key=<base64 of the public key line>, a unit writes it to
# /root/.ssh/authorized_keys before sshd starts), systemd-networkd DHCP on
# the qemu user-mode network, python3, python3-apt (Ansible's apt module),
# bpftool (the scenarios' witness), iproute2; bookworm also the kernel's own
# headers (linux-headers-amd64 depends on linux-headers-<release>) and
# python3-bpfcc, for the bcc loader; trixie neither (SUITE_PACKAGES). Host packages this needs
# (qemu-system-x86, qemu-utils, mmdebstrap, e2fsprogs, openssh-client) are
# installed with apt-get when missing.
set -euo pipefail

GUEST_SUITES=(bookworm trixie)
GUEST_PACKAGES=(
  systemd-sysv udev dbus
  linux-image-amd64
  openssh-server
  python3 python3-apt bpftool
  iproute2 procps
)
# What each suite adds, per the loader its scenario converges with
# (molecule/vm/vars/guest.yml, vm_suites): bookworm tests the bcc loader, so
# it gets BCC and the kernel's headers; trixie tests the prebuilt object and
# gets no compiler, no headers and no BCC (the build checks that none of them
# came in as a dependency).
declare -A SUITE_PACKAGES=(
  [bookworm]="linux-headers-amd64 python3-bpfcc"
  [trixie]=""
)
# What a compiler-free suite must not have installed: package names, as an
# extended regular expression (compilers, LLVM, kernel headers, BCC).
declare -A SUITE_ABSENT=(
  [bookworm]=""
  [trixie]="^(clang|libclang|llvm|libllvm|linux-headers-|linux-compiler-|python3-bpfcc$|libbpfcc|bpfcc|gcc$|gcc-[0-9]+$|gcc-[0-9]+-x86-64|cpp$|cpp-[0-9]+)"
)
HOST_PACKAGES=(qemu-system-x86 qemu-utils mmdebstrap e2fsprogs openssh-client)
# free space left in the guest's root file system beyond its contents
FREE_MIB=1536

cache_root=${SOCKREDIR_VM_CACHE:-/var/cache/ebpf-sockredir-vm}
GUEST_SUITE=${SOCKREDIR_VM_SUITE:-bookworm}
usage="usage: $0 [--suite $(IFS='|'; echo "${GUEST_SUITES[*]}")] [--path|--rebuild|--sources]"
if [ "${1:-}" = --suite ]; then
  GUEST_SUITE=${2:-}
  shift 2 || { echo "$usage" >&2; exit 2; }
fi
mode=build
case "${1:-}" in
  "") ;;
  --path) mode=path ;;
  --rebuild) mode=rebuild ;;
  --sources) mode=sources ;;
  *) echo "$usage" >&2; exit 2 ;;
esac

log() { echo "vm-image: $*" >&2; }

case " ${GUEST_SUITES[*]} " in
  *" $GUEST_SUITE "*) ;;
  *) log "unknown suite '$GUEST_SUITE' (SOCKREDIR_VM_SUITE): one of ${GUEST_SUITES[*]}"; exit 2 ;;
esac

# shellcheck disable=SC2206  # the per-suite lists are space-separated words
GUEST_PACKAGES+=(${SUITE_PACKAGES[$GUEST_SUITE]})

if [ "$(id -u)" != 0 ]; then
  log "run as root (mmdebstrap in root mode, apt-get, the cache in /var/cache)"
  exit 1
fi

# The Debian entries of the host's apt sources (not third-party ones), one
# "URI SUITE COMPONENT" per line, from the lists apt has downloaded. For a
# suite the host does not list, the host's own Debian suite is renamed in
# each entry (same mirrors: bookworm, bookworm-updates, bookworm-security
# become trixie, trixie-updates, trixie-security).
debian_sources() {
  apt-get indextargets --format '$(ORIGIN)|$(REPO_URI)|$(RELEASE)|$(COMPONENT)' \
      'Created-By: Packages' 2>/dev/null \
    | awk -F'|' -v suite="$GUEST_SUITE" '
        $1 == "Debian" && $4 == "main" { all[$2 " " $3 " " $4] = 1; if ($3 !~ /-/) host = $3 }
        END {
          for (e in all) { split(e, f, " "); if (f[2] == suite || index(f[2], suite "-") == 1) { print e; found = 1 } }
          if (found || host == "") exit
          for (e in all) {
            split(e, f, " ")
            if (f[2] == host || index(f[2], host "-") == 1) print f[1], suite substr(f[2], length(host) + 1), f[3]
          }
        }' \
    | sort -u
}

sources=$(debian_sources)
if [ -z "$sources" ]; then
  apt-get update -qq
  sources=$(debian_sources)
fi
if [ -z "$sources" ]; then
  log "no Debian entry with component main in the host's apt sources (/etc/apt/sources.list*) to take $GUEST_SUITE from"
  exit 1
fi

key=$( { cat "${BASH_SOURCE[0]}"; echo "$GUEST_SUITE"; printf '%s\n' "${GUEST_PACKAGES[@]}"; echo "$sources"; } \
       | sha256sum | cut -c1-16)
image_dir="$cache_root/$GUEST_SUITE-$key"

if [ "$mode" = path ]; then
  echo "$image_dir"
  exit 0
fi
if [ "$mode" = sources ]; then
  while read -r uri suite component; do echo "deb $uri $suite $component"; done <<<"$sources"
  exit 0
fi

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
flock 9   # one build at a time; a second caller waits and then finds it cached

if [ "$mode" = build ] && [ -f "$image_dir/image.json" ]; then
  log "cached: $image_dir"
  echo "$image_dir"
  exit 0
fi

missing=()
for p in "${HOST_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

start=$(date +%s)
work=$(mktemp -d "$cache_root/build.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
rootfs="$work/rootfs"
mkdir "$rootfs"

# The mirror entries for the guest's /etc/apt/sources.list.
while read -r uri suite component; do
  echo "deb $uri $suite $component"
done <<<"$sources" >"$work/sources.list"

# Files the guest gets (part of this script, hence of the cache key).
mkdir -p "$work/files"
cat >"$work/files/sockredir-vm-key" <<'EOF'
#!/bin/sh
# Writes the SSH public key of this boot, given on the kernel command line as
# sockredir_vm.ssh_key=<base64 of the key line>, to root's authorized_keys.
set -e
for word in $(cat /proc/cmdline); do
  case "$word" in
    sockredir_vm.ssh_key=*) key=${word#sockredir_vm.ssh_key=} ;;
  esac
done
[ -n "${key:-}" ] || { echo "no sockredir_vm.ssh_key= on the kernel command line" >&2; exit 0; }
umask 077
mkdir -p /root/.ssh
echo "$key" | base64 -d >/root/.ssh/authorized_keys
EOF
cat >"$work/files/sockredir-vm-key.service" <<'EOF'
[Unit]
Description=Authorize the SSH key given on the kernel command line
Before=ssh.service
After=local-fs.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/sockredir-vm-key
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
EOF
cat >"$work/files/10-dhcp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
IPv6AcceptRA=no
EOF

log "mmdebstrap $GUEST_SUITE from: $(echo "$sources" | awk '{print $1 $2}' | paste -sd' ')"
t0=$(date +%s)
mmdebstrap --quiet --variant=minbase --mode=root --components=main \
  --include="$(IFS=,; echo "${GUEST_PACKAGES[*]}")" \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --skip=cleanup/apt/lists \
  --customize-hook='echo sockredir-vm >"$1/etc/hostname"' \
  --customize-hook='printf "127.0.0.1 localhost\n127.0.1.1 sockredir-vm\n::1 localhost ip6-localhost ip6-loopback\n" >"$1/etc/hosts"' \
  --customize-hook='echo "/dev/vda / ext4 rw,errors=remount-ro 0 0" >"$1/etc/fstab"' \
  --customize-hook='rm -f "$1/etc/resolv.conf"; echo "nameserver 10.0.2.3" >"$1/etc/resolv.conf"' \
  --customize-hook="copy-in $work/files/sockredir-vm-key /usr/local/sbin" \
  --customize-hook="copy-in $work/files/sockredir-vm-key.service /etc/systemd/system" \
  --customize-hook="copy-in $work/files/10-dhcp.network /etc/systemd/network" \
  --customize-hook='chmod 0755 "$1/usr/local/sbin/sockredir-vm-key"' \
  --customize-hook='chroot "$1" systemctl enable --quiet sockredir-vm-key.service systemd-networkd.service' \
  --customize-hook='chroot "$1" systemctl mask --quiet apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer systemd-timesyncd.service 2>/dev/null || true' \
  --customize-hook='chroot "$1" passwd --lock root >/dev/null' \
  --customize-hook='chroot "$1" dpkg-query -W -f="\${Package} \${Version}\n" >"$1/../packages.txt"' \
  "$GUEST_SUITE" "$rootfs" "$work/sources.list"
t1=$(date +%s)

release=$(basename "$(ls -d "$rootfs"/lib/modules/*)")
[ -f "$rootfs/boot/vmlinuz-$release" ] && [ -f "$rootfs/boot/initrd.img-$release" ] \
  || { log "no kernel or initrd for $release in the root file system"; exit 1; }
if [[ " ${GUEST_PACKAGES[*]} " == *" linux-headers-amd64 "* ]]; then
  [ -d "$rootfs/usr/src/linux-headers-$release" ] \
    || { log "linux-headers-$release is not installed: the headers do not match the kernel"; exit 1; }
fi
# A compiler-free suite: nothing of a compiler, headers or BCC came in.
if [ -n "${SUITE_ABSENT[$GUEST_SUITE]}" ]; then
  absent=$(awk -v re="${SUITE_ABSENT[$GUEST_SUITE]}" '$1 ~ re { print $1 }' "$work/packages.txt" | paste -sd' ')
  [ -z "$absent" ] || { log "$GUEST_SUITE must have no package matching ${SUITE_ABSENT[$GUEST_SUITE]}; installed: $absent"; exit 1; }
fi
cp "$rootfs/boot/vmlinuz-$release" "$work/vmlinuz"
cp "$rootfs/boot/initrd.img-$release" "$work/initrd.img"
lsm=$(sed -n 's/^CONFIG_LSM="\(.*\)"$/\1/p' "$rootfs/boot/config-$release")

size_mib=$(( $(du -sm "$rootfs" | cut -f1) + FREE_MIB ))
log "mke2fs: ${size_mib} MiB"
mke2fs -q -t ext4 -L sockredir-vm -d "$rootfs" "$work/disk.raw" "${size_mib}M"
chmod 0444 "$work/disk.raw"
t2=$(date +%s)

python3 - "$work" "$GUEST_SUITE" "$release" "$lsm" "$key" "$((t1 - t0))" "$((t2 - t1))" "$((t2 - start))" <<'EOF'
import json, sys
work, suite, release, lsm, key, debootstrap_s, mkfs_s, total_s = sys.argv[1:]
packages = dict(line.split(' ', 1) for line in open(work + '/packages.txt').read().splitlines())
wanted = ['linux-image-' + release, 'linux-headers-' + release, 'linux-image-amd64',
          'linux-headers-amd64', 'python3', 'python3-bpfcc', 'libbpfcc', 'libbpf1', 'bpftool',
          'python3-apt', 'openssh-server', 'systemd', 'clang', 'llvm']
json.dump(dict(key=key, suite=suite, kernel_release=release, kernel_lsm_default=lsm,
               sources=open(work + '/sources.list').read().splitlines(),
               packages={p: packages.get(p) for p in wanted},
               seconds=dict(mmdebstrap=int(debootstrap_s), mke2fs=int(mkfs_s), total=int(total_s))),
          open(work + '/image.json', 'w'), indent=2)
EOF
rm -rf "$rootfs" "$work/files" "$work/sources.list"

chmod 0755 "$work"
rm -rf "$image_dir"
mv "$work" "$image_dir"
trap - EXIT
# earlier keys of this suite are not used any more (other suites' images stay)
find "$cache_root" -mindepth 1 -maxdepth 1 -type d -name "$GUEST_SUITE-*" ! -name "$GUEST_SUITE-$key" -exec rm -rf {} +
log "built $image_dir in $(( $(date +%s) - start )) s ($GUEST_SUITE, kernel $release)"
echo "$image_dir"
