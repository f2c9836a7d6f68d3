#!/bin/bash
# Builds torpor's default guest from Debian packages only.
#
#   guest/build.sh OUTDIR
#
# OUTDIR receives:
#   vmlinux      PVH-bootable kernel (ELF), decompressed from Debian's cloud kernel
#   initrd.img   busybox initramfs: loads the virtio modules, switch_roots onto /dev/vda
#   rootfs.ext4  root filesystem image: busybox + qemu-guest-agent (+ its libraries)
#   carry/       what torpor carries into an OCI image's root as /.torpor: static busybox
#                (+ applet links), qemu-ga and setpriv with their libraries and loader,
#                torpor-reseed
#   recipe.json  what went in
#
# Changing this file changes the recipe hash, which is what triggers a rebuild.
set -euo pipefail

OUT=${1:?usage: build.sh OUTDIR}
KERNEL_PKG=${TORPOR_GUEST_KERNEL_PKG:-linux-image-cloud-amd64}
ROOTFS_SIZE=${TORPOR_GUEST_ROOTFS_SIZE:-1G}
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console failover net_failover virtio_net virtio-rng virtio_balloon"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT"
cd "$work"

log() { echo "[guest-build] $*" >&2; }

# --- kernel ---------------------------------------------------------------
# The meta package depends on the versioned image package; download that one.
kpkg=$(apt-cache depends "$KERNEL_PKG" | awk '/Depends: linux-image-/{print $2; exit}')
[ -n "$kpkg" ] || { log "cannot resolve $KERNEL_PKG (run apt-get update?)"; exit 1; }
log "kernel package $kpkg"
apt-get download -q "$kpkg" 2>&1 | grep -v "^W: Download is performed unsandboxed" >&2 || true
dpkg-deb -x ./"$kpkg"_*.deb kernel
kver=${kpkg#linux-image-}
python3 - "kernel/boot/vmlinuz-$kver" vmlinux <<'PY'
# The Debian bzImage wraps an LZ4 (legacy frame) compressed ELF; unwrap it so
# QEMU can boot it through the PVH entry point (faster than the bzImage path).
import subprocess, sys
data = open(sys.argv[1], "rb").read()
magic = b"\x02\x21\x4c\x18"
pos = data.find(magic)
while pos != -1:
    proc = subprocess.run(["lz4", "-dc"], input=data[pos:], capture_output=True)
    if proc.stdout[:4] == b"\x7fELF":
        open(sys.argv[2], "wb").write(proc.stdout)
        sys.exit(0)
    pos = data.find(magic, pos + 1)
sys.exit("no LZ4-compressed ELF found in " + sys.argv[1])
PY

# --- initramfs ------------------------------------------------------------
mkdir -p initrd/{bin,dev,proc,sys,newroot,lib/modules}
cp /bin/busybox initrd/bin/busybox
for m in $MODULES; do
  f=$(find kernel/lib/modules/"$kver" -name "$m.ko" -o -name "${m//-/_}.ko" | head -1)
  [ -n "$f" ] || { log "module $m not found"; exit 1; }
  cp "$f" initrd/lib/modules/
  echo "$(basename "$f")" >> initrd/lib/modules/order
done
cat > initrd/init <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
# Accelerator probe (torpor.hypervisor.accel): reaching here means the kernel booted.
if /bin/busybox grep -qw torpor.probe /proc/cmdline; then
  echo torpor-probe-ok > /dev/ttyS0
  /bin/busybox poweroff -f
fi
for m in $(/bin/busybox cat /lib/modules/order); do
  /bin/busybox insmod /lib/modules/$m || echo "torpor-initrd: insmod $m failed"
done
# Free page reporting in blocks of 128 KiB (order 5) instead of 2 MiB: the smaller free
# pieces kept old data that every standby saved. Set once virtio_balloon has registered:
# this kernel (6.1) overwrites the boot parameter page_reporting.page_reporting_order then.
order=/sys/module/page_reporting/parameters/page_reporting_order
[ -w $order ] && echo 5 > $order
# The smallest per-CPU free lists the kernel allows (4 batches, ~1 MiB per zone and CPU,
# where 6.1 lets a 2 GiB guest's CPU keep ~54 MiB): pages freed onto those lists stay out
# of the buddy allocator, so they are never reported, and their old data was saved by every
# standby (two 2 GiB guests that wrote and freed 512 MiB: state 1.017x before the fill
# with the default, 0.973x with this).
pcp=/proc/sys/vm/percpu_pagelist_high_fraction
[ -w $pcp ] && echo 1000000 > $pcp
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do /bin/busybox usleep 10000; i=$((i+1)); done
/bin/busybox mount -t ext4 -o rw /dev/vda /newroot || { echo "torpor-initrd: cannot mount /dev/vda"; exec /bin/busybox sh; }
/bin/busybox mount --move /dev /newroot/dev
# An OCI image instance names torpor's init carried into its root (torpor.init=/.torpor/init).
init=/sbin/torpor-init
for arg in $(/bin/busybox cat /proc/cmdline); do
  case "$arg" in torpor.init=*) init=${arg#torpor.init=} ;; esac
done
/bin/busybox umount /proc /sys
exec /bin/busybox switch_root /newroot "$init"
INIT
chmod 755 initrd/init
(cd initrd && find . | cpio -o -H newc --quiet) > initrd.img

# --- root filesystem ------------------------------------------------------
pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances --no-pre-depends qemu-guest-agent \
        | grep -v '^[ <]' | sort -u)
mkdir -p debs root
(cd debs && apt-get download -q $pkgs 2>&1 | grep -v "^W: Download is performed unsandboxed" >&2 || true)
for d in debs/*.deb; do dpkg-deb -x "$d" root; done
rm -rf root/usr/share/{doc,man,locale,info} root/etc/init.d root/lib/systemd root/usr/lib/systemd
mkdir -p root/{bin,sbin,dev,proc,sys,run,tmp,root,data,var/log} root/usr/bin
chmod 1777 root/tmp
cp /bin/busybox root/bin/busybox
for app in $(/bin/busybox --list); do
  [ -e root/bin/"$app" ] || [ -e root/usr/bin/"$app" ] || [ -e root/sbin/"$app" ] || ln -s busybox root/bin/"$app"
done
# qemu-ga's guest-set-time (torpor sets a restored guest's clock with it) runs /sbin/hwclock
# and refuses when it is missing; busybox's applet writes the RTC from the new time.
ln -sf /bin/busybox root/sbin/hwclock
echo torpor-guest > root/etc/hostname
printf 'root:x:0:0:root:/root:/bin/sh\n' > root/etc/passwd
printf 'root:x:0:\n' > root/etc/group
printf '127.0.0.1 localhost\n' > root/etc/hosts
printf 'nameserver 10.0.2.3\n' > root/etc/resolv.conf
cat > root/sbin/torpor-init <<'INIT'
#!/bin/sh
# PID 1 of the default guest: mounts, network, the agent and the counter workload.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o size=90% tmpfs /tmp
# The instance's name (torpor.hostname=) and a bridged instance's address
# (torpor.net=IP/PREFIX,GATEWAY) come on the command line; otherwise QEMU's user-mode
# network, whose addresses are fixed.
net=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    torpor.net=*) net=${arg#torpor.net=} ;;
    torpor.hostname=*) echo "${arg#torpor.hostname=}" > /etc/hostname ;;
  esac
done
hostname -F /etc/hostname
ip link set lo up
if [ -n "$net" ]; then
  ip link set eth0 up && ip addr add "${net%,*}" dev eth0 && ip route add default via "${net#*,}"
  echo "nameserver ${net#*,}" > /etc/resolv.conf
else
  ip link set eth0 up 2>/dev/null && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
fi
# The counter lives only in RAM (/run is tmpfs): if it continues after a
# restore, the guest's memory and processes survived. Shell builtins only: forking
# `mv` and `sleep` ten times a second kept an idle guest's vCPU 16% busy under TCG.
# `read -t` on a FIFO nobody writes is the sleep; the value is rewritten in place
# (`1<>`: no truncation, and it only grows, so a reader never finds it empty).
mkfifo /run/tick
(exec 3<>/run/tick; n=0; while :; do n=$((n+1)); echo $n 1<>/run/counter; read -t 0.1 -u 3 x; done) &
# No udev here: find the ports by their names in sysfs.
agent= identity=
for port in /sys/class/virtio-ports/*; do
  case "$(cat "$port/name" 2>/dev/null)" in
    org.qemu.guest_agent.0) agent=/dev/${port##*/} ;;
    org.torpor.identity) identity=/dev/${port##*/} ;;
  esac
done
if [ -n "$identity" ]; then
  while :; do /sbin/torpor-identity "$identity"; sleep 0.2; done &
fi
while :; do
  /usr/sbin/qemu-ga -m virtio-serial -p "$agent" -t /run 2>>/var/log/qemu-ga.log
  sleep 0.2
done &
echo "torpor-guest: ready" > /dev/ttyS0
# Reap orphans forever, as an init must; halt cleanly on SIGTERM/SIGUSR2.
trap 'sync; poweroff -f' TERM USR2
while :; do wait; sleep 1; done
INIT
chmod 755 root/sbin/torpor-init
# qemu-ga's guest-shutdown runs /sbin/shutdown; busybox has no such applet.
cat > root/sbin/shutdown <<'SHUTDOWN'
#!/bin/sh
sync
case "$1" in -r) exec reboot -f ;; *) exec poweroff -f ;; esac
SHUTDOWN
chmod 755 root/sbin/shutdown
# Forks reseed the kernel's RNG through this (ioctl RNDRESEEDCRNG on /dev/urandom): the
# Debian cloud kernel has no VM generation ID driver to do it, and there is no compiler or
# tool here that makes the call, so it is 183 bytes of hand-assembled x86-64 (open, ioctl,
# exit with the errno). Generated by a script kept in docs/design.md ("Fork identity").
printf '\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00\x01\x00\x00\x00\x78\x00\x40\x00\x00\x00\x00\x00\x40\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x40\x00\x38\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x40\x00\x00\x00\x00\x00\x00\x00\x40\x00\x00\x00\x00\x00\xb7\x00\x00\x00\x00\x00\x00\x00\xb7\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\xb8\x02\x00\x00\x00\x48\x8d\x3d\x26\x00\x00\x00\xbe\x01\x00\x00\x00\x0f\x05\x85\xc0\x78\x10\x89\xc7\xb8\x10\x00\x00\x00\xbe\x07\x52\x00\x00\x31\xd2\x0f\x05\x89\xc7\xf7\xdf\xb8\x3c\x00\x00\x00\x0f\x05\x2f\x64\x65\x76\x2f\x75\x72\x61\x6e\x64\x6f\x6d\x00' > root/sbin/torpor-reseed
chmod 755 root/sbin/torpor-reseed
# The identity helper: on its own virtio port, it sets the clock (every restore), and the
# hostname, MAC and randomness (forks) with system calls when the host asks, so that no
# process is started for them (guest/identity.py). Assembled from images/torpor-identity.S
# (`python -m tests.unit.test_identity_helper` prints this line).
printf '\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00\x01\x00\x00\x00\x78\x00\x40\x00\x00\x00\x00\x00\x40\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x40\x00\x38\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x40\x00\x00\x00\x00\x00\x00\x00\x40\x00\x00\x00\x00\x00\xd2\x02\x00\x00\x00\x00\x00\x00\xb8\x03\x00\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x48\x8b\x7c\x24\x10\xb8\x02\x00\x00\x00\xbe\x02\x00\x00\x00\x31\xd2\x0f\x05\x85\xc0\x0f\x88\x19\x02\x00\x00\x41\x89\xc4\x45\x31\xed\x31\xc0\x44\x89\xe7\x48\x8d\x35\x3b\x02\x00\x00\x4c\x01\xee\xba\xb0\x00\x00\x00\x44\x29\xea\x0f\x05\x48\x83\xf8\xfc\x74\xe1\x48\x85\xc0\x0f\x8e\xeb\x01\x00\x00\x41\x01\xc5\x41\x81\xfd\xb0\x00\x00\x00\x72\xcc\x41\xbe\x05\x00\x00\x00\x49\xc7\xc7\xea\xff\xff\xff\x81\x3d\xfc\x01\x00\x00\x54\x50\x49\x44\x0f\x85\x7d\x01\x00\x00\x8b\x1d\xf4\x01\x00\x00\xb8\xe4\x00\x00\x00\x31\xff\x48\x8d\x35\xaa\x02\x00\x00\x0f\x05\x41\xbe\x01\x00\x00\x00\xf6\xc3\x01\x74\x1c\xb8\xe3\x00\x00\x00\x31\xff\x48\x8d\x35\xd7\x01\x00\x00\x0f\x05\x49\x89\xc7\x48\x85\xc0\x0f\x88\x40\x01\x00\x00\x41\xbe\x02\x00\x00\x00\xf6\xc3\x02\x74\x75\xb8\xaa\x00\x00\x00\x48\x8d\x3d\xf2\x01\x00\x00\x48\x8b\x35\xe3\x01\x00\x00\x0f\x05\x49\x89\xc7\x48\x85\xc0\x0f\x88\x14\x01\x00\x00\xb8\x02\x00\x00\x00\x48\x8d\x3d\x65\x01\x00\x00\xbe\x41\x00\x00\x00\xba\xa4\x01\x00\x00\x0f\x05\x85\xc0\x78\x38\x89\xc5\xb8\x01\x00\x00\x00\x89\xef\x48\x8d\x35\xb1\x01\x00\x00\x48\x8b\x15\xa2\x01\x00\x00\x48\xff\xc2\x0f\x05\xb8\x4d\x00\x00\x00\x89\xef\x48\x8b\x35\x8f\x01\x00\x00\x48\xff\xc6\x0f\x05\xb8\x03\x00\x00\x00\x89\xef\x0f\x05\x41\xbe\x03\x00\x00\x00\xf6\xc3\x04\x74\x47\xb8\x29\x00\x00\x00\xbf\x02\x00\x00\x00\xbe\x02\x00\x00\x00\x31\xd2\x0f\x05\x49\x89\xc7\x48\x85\xc0\x0f\x88\x96\x00\x00\x00\x89\xc5\xb8\x10\x00\x00\x00\x89\xef\xbe\x24\x89\x00\x00\x48\x8d\x15\x1a\x01\x00\x00\x0f\x05\x49\x89\xc7\xb8\x03\x00\x00\x00\x89\xef\x0f\x05\x4d\x85\xff\x78\x6e\x41\xbe\x04\x00\x00\x00\xf6\xc3\x08\x74\x5d\xb8\x02\x00\x00\x00\x48\x8d\x3d\xa7\x00\x00\x00\xbe\x01\x00\x00\x00\x31\xd2\x0f\x05\x49\x89\xc7\x48\x85\xc0\x78\x46\x89\xc5\xb8\x01\x00\x00\x00\x89\xef\x48\x8d\x35\x3f\x01\x00\x00\xba\x20\x00\x00\x00\x0f\x05\x49\x89\xc7\x48\x85\xc0\x78\x13\xb8\x10\x00\x00\x00\x89\xef\xbe\x07\x52\x00\x00\x31\xd2\x0f\x05\x49\x89\xc7\xb8\x03\x00\x00\x00\x89\xef\x0f\x05\x4d\x85\xff\x78\x06\x45\x31\xf6\x45\x31\xff\xc7\x05\x1f\x01\x00\x00\x54\x50\x4f\x4b\x44\x89\x35\x1c\x01\x00\x00\x48\x8b\x05\x69\x00\x00\x00\x48\x89\x05\x12\x01\x00\x00\x4c\x89\x3d\x13\x01\x00\x00\xb8\x01\x00\x00\x00\x44\x89\xe7\x48\x8d\x35\xf4\x00\x00\x00\xba\x28\x00\x00\x00\x0f\x05\x48\x85\xc0\x0f\x89\xea\xfd\xff\xff\x89\xc7\xf7\xdf\xb8\x3c\x00\x00\x00\x0f\x05\x2f\x64\x65\x76\x2f\x75\x72\x61\x6e\x64\x6f\x6d\x00\x2f\x65\x74\x63\x2f\x68\x6f\x73\x74\x6e\x61\x6d\x65\x00' > root/sbin/torpor-identity
chmod 755 root/sbin/torpor-identity
/sbin/ldconfig -r root 2>/dev/null || true

# --- what an OCI image instance gets as /.torpor ------------------------------
# qemu-ga (and setpriv, which runs the image's command as its User) run there through
# their own loader and libraries (--library-path), so they need nothing from the image;
# the commands they start are the image's own.
mkdir -p carry/bin carry/lib tools
(cd debs && apt-get download -q util-linux libcap-ng0 2>&1 \
   | grep -v "^W: Download is performed unsandboxed" >&2 || true)
for d in debs/util-linux_*.deb debs/libcap-ng0_*.deb; do dpkg-deb -x "$d" tools; done
cp /bin/busybox carry/bin/busybox
for app in $(/bin/busybox --list); do [ -e carry/bin/"$app" ] || ln -s busybox carry/bin/"$app"; done
rm carry/bin/setpriv  # busybox's cannot change uids
cp root/usr/sbin/qemu-ga root/sbin/torpor-reseed root/sbin/torpor-identity tools/usr/bin/setpriv \
   carry/bin/
for dir in root/lib/x86_64-linux-gnu root/usr/lib/x86_64-linux-gnu tools/lib/x86_64-linux-gnu \
           tools/usr/lib/x86_64-linux-gnu; do
  if [ -d "$dir" ]; then cp -a "$dir"/. carry/lib/; fi
done
[ -e carry/lib/ld-linux-x86-64.so.2 ] || { log "no loader for the carried-in agent"; exit 1; }
# Keep only the libraries they load (the loader lists them: no gconv, no gio modules).
needed=$(for bin in qemu-ga setpriv; do
           carry/lib/ld-linux-x86-64.so.2 --library-path carry/lib --list carry/bin/$bin
         done | awk '$2 == "=>" && $1 !~ /ld-linux/ {print $1}' | sort -u)
mkdir carry/keep
for lib in ld-linux-x86-64.so.2 $needed; do cp -L carry/lib/"$lib" carry/keep/; done
rm -rf carry/lib && mv carry/keep carry/lib
mkfs.ext4 -q -F -L torpor-root -d root rootfs.ext4 "$ROOTFS_SIZE"

# --- publish ----------------------------------------------------------------
mv vmlinux initrd.img rootfs.ext4 carry "$OUT"/
printf '{"kernel_package": "%s", "kernel_version": "%s", "packages": "%s"}\n' \
  "$kpkg" "$kver" "$(echo $pkgs)" > "$OUT"/recipe.json
log "done: $OUT"
