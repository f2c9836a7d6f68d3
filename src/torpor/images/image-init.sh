#!/.torpor/bin/sh
# PID 1 of an OCI image instance, carried into the image's root as /.torpor/init.
#
# Mounts the basics, configures the network, starts torpor's guest agent, runs the
# image's entrypoint + command (/.torpor/config.sh, written into the disk per instance)
# with the image's environment, working directory and user, forwards SIGTERM/SIGINT to it,
# reaps orphans, and powers the VM off when it exits, after telling the host its exit code.
# Only /.torpor/bin is on this script's PATH: the image may have no shell or tools at all.
export PATH=/.torpor/bin
umask 022

mount -t proc proc /proc 2>/dev/null || { mkdir -p /proc && mount -t proc proc /proc; }
mkdir -p /sys /dev/pts /dev/shm /run /tmp
mount -t sysfs sys /sys
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /.torpor/run && mount -t tmpfs -o mode=700 tmpfs /.torpor/run

. /.torpor/config.sh

# The instance's name (torpor.hostname=: a fork's own, whatever config.sh says) and a
# bridged instance's address (torpor.net=IP/PREFIX,GATEWAY) from the command line; else
# QEMU's user mode network (10.0.2.15, gateway .2, DNS .3).
net=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    torpor.net=*) net=${arg#torpor.net=} ;;
    torpor.hostname=*) TORPOR_HOSTNAME=${arg#torpor.hostname=} ;;
  esac
done
hostname "$TORPOR_HOSTNAME"
ip link set lo up
if [ -n "$net" ]; then
  ip link set eth0 up && ip addr add "${net%,*}" dev eth0 && ip route add default via "${net#*,}"
  nameserver=${net#*,}
else
  ip link set eth0 up 2>/dev/null && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
  nameserver=10.0.2.3
fi
# What a container runtime provides: the name, resolver and hosts files.
if [ -d /etc ]; then
  echo "$TORPOR_HOSTNAME" > /etc/hostname
  echo "nameserver $nameserver" > /etc/resolv.conf
  [ -s /etc/hosts ] || printf '127.0.0.1 localhost\n::1 localhost\n' > /etc/hosts
fi

# qemu-ga's guest-set-time (a restore sets the clock with it) runs /sbin/hwclock.
if [ ! -e /sbin/hwclock ]; then
  mkdir -p /sbin && ln -s /.torpor/bin/busybox /sbin/hwclock 2>/dev/null
fi

# No udev: virtio ports are found by their names in sysfs.
port() {
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && { echo "/dev/${p##*/}"; return; }
  done
  echo /dev/null
}
agent=$(port org.qemu.guest_agent.0)
app_log=$(port org.torpor.log)
status=$(port org.torpor.status)
identity=$(port org.torpor.identity)

# The identity helper (the clock after a restore; a fork's name, MAC and randomness).
if [ "$identity" != /dev/null ]; then
  while :; do /.torpor/bin/torpor-identity "$identity"; sleep 0.2; done &
fi

# config.sh's run_agent and run_main exec with the image's environment (and run_main as
# its user, in its working directory): `torpor exec` runs commands as the image would. The
# agent's loader and libraries are torpor's, so it needs nothing from the image.
while :; do
  ( run_agent -m virtio-serial -p "$agent" -t /.torpor/run ) 2>>/.torpor/run/qemu-ga.log
  sleep 0.2
done &

echo "torpor-image: starting the main process" > /dev/ttyS0
( run_main ) >"$app_log" 2>&1 </dev/null &
main=$!

trap 'kill -TERM $main 2>/dev/null' TERM INT
trap 'kill -HUP $main 2>/dev/null' HUP
# `wait` returns early when a trapped signal arrives; loop until the main process is gone.
# Orphans re-parented to PID 1 are reaped by the shell as they exit.
wait $main
code=$?
while kill -0 $main 2>/dev/null; do
  wait $main
  code=$?
done
echo "$code" > "$status"
echo "torpor-image: main process exited with code $code" > /dev/ttyS0
sync
poweroff -f
