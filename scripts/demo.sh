#!/bin/bash
# `make demo`: the main job on the built-in default guest, step by step, with timings, then
# an OCI image pulled from a registry the demo starts on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
TORPOR=${TORPOR:-.venv/bin/torpor}
export TORPOR_DATA_ROOT=${TORPOR_DATA_ROOT:-/var/lib/torpor}
VM=torpor-demo

step() {  # step "description" command...
  local start end
  printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"
  start=$(date +%s.%N)
  "${@:2}"
  end=$(date +%s.%N)
  python3 -c "print(f'   ({$end - $start:.2f} s)')"
}

echo "data root: $TORPOR_DATA_ROOT"
SOCKET=$TORPOR_DATA_ROOT/torpord.sock
DAEMON_PID=
stop_daemon() {
  if [ -n "$DAEMON_PID" ]; then
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
    echo "daemon stopped"
  fi
}
trap stop_daemon EXIT
if $TORPOR --local list >/dev/null 2>&1 && [ -S "$SOCKET" ] && \
    curl -sf --unix-socket "$SOCKET" http://torpord/healthz >/dev/null 2>&1; then
  echo "a torpord already serves this data root: the demo uses it"
else
  printf '\n\033[1m== start torpord, the API daemon (the CLI below talks to it)\033[0m\n'
  echo "\$ $TORPOR serve &"
  $TORPOR serve 2>"${TMPDIR:-/tmp}/torpord-demo.log" &
  DAEMON_PID=$!
  for _ in $(seq 300); do
    curl -sf --unix-socket "$SOCKET" http://torpord/healthz >/dev/null 2>&1 && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "${TMPDIR:-/tmp}/torpord-demo.log"; exit 1; }
    sleep 0.1
  done
  echo "   listening on unix:$SOCKET (token in $TORPOR_DATA_ROOT/api-token)"
fi
for leftover in "$VM" "$VM-fork-1" "$VM-fork-2" "$VM-live" "$VM-file" "$VM-file-fork-1" \
    "$VM-file-fork-2"; do
  if $TORPOR show "$leftover" >/dev/null 2>&1; then $TORPOR delete --force "$leftover" >/dev/null; fi
done
if $TORPOR snapshot show demo-snap >/dev/null 2>&1; then $TORPOR snapshot delete demo-snap; fi
step "create a VM of the built-in guest" $TORPOR create "$VM" --memory 512M
step "boot it (until the guest agent answers)" $TORPOR start "$VM"
step "run a command in the guest through the agent" \
  $TORPOR exec "$VM" -- sh -c 'echo "hello from $(hostname), kernel $(uname -r), counter $(cat /run/counter)"'
step "show it" $TORPOR show "$VM"
step "put something in guest RAM (tmpfs) to prove it survives" \
  $TORPOR exec "$VM" -- sh -c 'dd if=/dev/urandom of=/tmp/ram.bin bs=1M count=16 2>/dev/null; md5sum /tmp/ram.bin'
step "standby: save the machine state (zstd), stop QEMU, release its memory" \
  $TORPOR standby "$VM" --compress zstd
step "it is in standby: no QEMU process" $TORPOR list
step "restore: load the state, resume" $TORPOR restore "$VM"
step "the guest carried on (same RAM contents, counter kept counting)" \
  $TORPOR exec "$VM" -- sh -c 'md5sum /tmp/ram.bin; echo "counter $(cat /run/counter)"'
step "memory-file mode: a second VM whose RAM lives in a file" \
  $TORPOR create "$VM-file" --memory 512M --memory-backing file
RAM_FILE=$($TORPOR show "$VM-file" --json | python3 -c 'import json, sys
print(json.load(sys.stdin)["path"] + "/memory")')
step "boot it" $TORPOR start "$VM-file"
step "the same 16 MiB of random data in its RAM" \
  $TORPOR exec "$VM-file" -- sh -c 'dd if=/dev/urandom of=/tmp/ram.bin bs=1M count=16 2>/dev/null; md5sum /tmp/ram.bin'
step "standby in memory-file mode: only the device state is saved (milliseconds); the RAM
   file is flushed and dropped from the page cache after QEMU has quit" $TORPOR standby "$VM-file"
step "what the host still caches of its RAM file: nothing" fincore "$RAM_FILE"
step "restore: map the RAM file again, load the devices; pages come back as touched" \
  $TORPOR restore "$VM-file"
step "the guest carried on" $TORPOR exec "$VM-file" -- md5sum /tmp/ram.bin
step "snapshot it and fork two copies that map the snapshot's RAM copy-on-write (no RAM copy)" \
  sh -c "$TORPOR snapshot create $VM-file --name demo-file-snap >/dev/null && \
  $TORPOR snapshot fork demo-file-snap $VM-file-fork --count 2"
step "each fork has the data, and writes only its own copy" \
  $TORPOR exec "$VM-file-fork-2" -- sh -c 'md5sum /tmp/ram.bin; echo mine > /tmp/ram.bin; md5sum /tmp/ram.bin'
step "the source is untouched by the fork's write" $TORPOR exec "$VM-file" -- md5sum /tmp/ram.bin
step "clean up the memory-file VMs" sh -c "$TORPOR delete --force $VM-file-fork-1 && \
  $TORPOR delete --force $VM-file-fork-2 && $TORPOR snapshot delete demo-file-snap && \
  $TORPOR delete --force $VM-file"
step "snapshot it while it runs (paused for the state save; the disk, frozen under an overlay, is copied as it runs)" \
  $TORPOR snapshot create "$VM" --name demo-snap --tag purpose=demo
step "fork the snapshot into two running copies (new MAC, vmgenid, hostname)" \
  $TORPOR snapshot fork demo-snap "$VM-fork" --count 2
step "a fork has the source's RAM contents and its own identity" \
  $TORPOR exec "$VM-fork-1" -- sh -c 'md5sum /tmp/ram.bin; echo "$(hostname) $(cat /sys/class/net/eth0/address)"'
step "fork the running VM directly (it keeps running)" $TORPOR fork "$VM" "$VM-live"
step "all of them" $TORPOR list
step "clean up the forks and the snapshot" sh -c "$TORPOR delete --force $VM-fork-1 && \
  $TORPOR delete --force $VM-fork-2 && $TORPOR delete --force $VM-live && \
  $TORPOR snapshot delete demo-snap"
step "both snapshot formats side by side, as the daemon recorded them (standby, restore)" \
  sh -c "$TORPOR operations | grep -E '^ *(KIND|standby|restore) '"
step "its Prometheus metrics (curl on the socket, bearer token)" sh -c "curl -s \
  --unix-socket $SOCKET -H \"Authorization: Bearer \$(cat $TORPOR_DATA_ROOT/api-token)\" \
  http://torpord/metrics | grep -E '^torpor_(operations_total|paused_window_seconds_count)'"

# --- your own image: an OCI image from a registry (Debian's docker-registry, on loopback) ---
WORK=$(mktemp -d)
REGISTRY_PID=
cleanup_image_demo() {
  if [ -n "$REGISTRY_PID" ]; then
    kill "$REGISTRY_PID" 2>/dev/null || true
    wait "$REGISTRY_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
  stop_daemon
}
trap cleanup_image_demo EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: %s/registry\nhttp:\n  addr: 127.0.0.1:%s\nlog:\n  level: warn\n' \
  "$WORK" "$PORT" > "$WORK/registry.yml"
printf '\n\033[1m== an OCI registry on loopback, and an image pushed to it (umoci builds, skopeo pushes)\033[0m\n'
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REGISTRY_PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/v2/" >/dev/null && break; sleep 0.1; done
(
  cd "$WORK"
  umoci init --layout layout && umoci new --image layout:web && umoci unpack --image layout:web bundle
  mkdir -p bundle/rootfs/bin bundle/rootfs/www bundle/rootfs/etc
  cp /bin/busybox bundle/rootfs/bin/ && for a in sh httpd cat env wget; do ln -s busybox bundle/rootfs/bin/$a; done
  echo "hello from my own image" > bundle/rootfs/www/index.html
  umoci repack --image layout:web bundle
  umoci config --image layout:web --config.env=GREETING=hi --config.workingdir=/www \
    --config.cmd=sh --config.cmd=-c --config.cmd='echo "$GREETING, serving /www on 8080"; exec httpd -f -p 8080 -h /www'
  skopeo copy --quiet --dest-tls-verify=false oci:layout:web "docker://127.0.0.1:$PORT/demo/web:1"
) >/dev/null
echo "   127.0.0.1:$PORT/demo/web:1: static busybox, CMD serves /www over HTTP"
IMAGE=127.0.0.1:$PORT/demo/web:1
if $TORPOR show "$VM-web" >/dev/null 2>&1; then $TORPOR delete --force "$VM-web" >/dev/null; fi
step "pull it (plain HTTP: the registry is on loopback)" $TORPOR image pull "$IMAGE"
step "the images torpor has" $TORPOR image list
WEB_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
step "create a VM of it, with one more variable and its port 8080 published on the host" \
  $TORPOR create "$VM-web" --image "$IMAGE" --env WHO=demo --publish "127.0.0.1:$WEB_PORT:8080"
step "boot it: torpor's kernel and init, the image's command" $TORPOR start "$VM-web"
step "its command serves (exec runs in the image's root, with its environment)" \
  $TORPOR exec "$VM-web" -- sh -c 'echo "$GREETING $WHO from $(hostname)"; wget -qO- http://127.0.0.1:8080/'
step "its output" $TORPOR logs "$VM-web"
step "standby and restore it like any other VM" sh -c "$TORPOR standby $VM-web && $TORPOR restore $VM-web"
step "still serving" $TORPOR exec "$VM-web" -- wget -qO- http://127.0.0.1:8080/
step "it names its image and digest" sh -c "$TORPOR show $VM-web | grep -E '^ *image'"
step "served on the host through the published port" curl -s "http://127.0.0.1:$WEB_PORT/"
step "sleep when idle: standby by itself after 3 s without traffic" sh -c \
  "$TORPOR policy $VM-web --auto-standby 3s && \
   until $TORPOR show $VM-web | grep -q 'state *standby'; do sleep 0.2; done && $TORPOR list"
step "wake on traffic: the first request wakes it and is served" \
  curl -s -w '   first response after %{time_total} s\n' "http://127.0.0.1:$WEB_PORT/"
step "both were operations, with their trigger" sh -c \
  "$TORPOR operations --instance $VM-web | grep -E 'idle|traffic'"
step "the built-in guest runs next to it" $TORPOR list
step "delete it and the image" sh -c "$TORPOR delete --force $VM-web && $TORPOR image rm $IMAGE"

step "stop it (graceful power-off)" $TORPOR stop "$VM"
step "delete it" $TORPOR delete "$VM"
echo; echo "demo done"
