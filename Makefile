# torpor: the two set-up commands are `make demo` and `make test` (see README).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# binutils: a unit test assembles the guest's identity helper and compares (images/).
APT_PACKAGES := qemu-system-x86 qemu-utils busybox-static cpio zstd lz4 xfsprogs \
                skopeo umoci docker-registry debootstrap dnsmasq-base \
                e2fsprogs kmod util-linux binutils iproute2

.PHONY: demo test test-faults deps venv guest lint unit bench-copy bench-standby bench-codec \
        bench-snapshot bench-fork bench-cli bench-snapshot-compression bench-images bench-network bench-wake bench-memory bench-window bench-fleet bench-pool clean

# Debian packages: installed only when one is missing (needs root, as on these machines).
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@# The tests start their own registry on 127.0.0.1; the package's service (all addresses,
	@# port 5000) must not run.
	@if command -v systemctl >/dev/null && systemctl is-enabled docker-registry >/dev/null 2>&1; then \
	  systemctl disable --now docker-registry >/dev/null 2>&1 || true; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

# The built-in guest, cached in ~/.cache/torpor/guest/<recipe-hash>/.
guest: deps venv
	$(BIN)/torpor image build

demo: guest
	bash scripts/demo.sh

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

test: guest lint
	$(BIN)/pytest

unit: venv
	$(BIN)/pytest tests/unit

# The reliability tests alone (also part of `make test`): the fault matrix, tampered
# state, disk full, the guest clock and the concurrency soak.
test-faults: guest
	$(BIN)/pytest tests/integration/test_faults.py tests/integration/test_tampered_state.py \
	    tests/integration/test_guest_clock.py tests/api/test_soak.py \
	    tests/integration/test_standby_restore.py::test_disk_full_fails_cleanly_and_gives_the_space_back

# Snapshots in S3: push/pull against boto3's own upload/download, and sharing between forks.
bench-fleet: guest
	$(BIN)/python -m bench.fleet_bench

bench-pool: guest
	$(BIN)/python -m bench.pool_bench

bench-copy: deps venv
	$(BIN)/python bench/copy_bench.py

bench-standby: guest
	$(BIN)/python -m bench.standby_bench

bench-window: guest
	$(BIN)/python -m bench.window_bench

bench-snapshot: guest
	$(BIN)/python -m bench.snapshot_bench

bench-fork: guest
	$(BIN)/python -m bench.fork_bench
	$(BIN)/python -m bench.fork_bench --reflink

# A compressed stored snapshot against a raw one: size, and fork time.
bench-snapshot-compression: guest
	$(BIN)/python -m bench.snapshot_compression_bench

# What a script pays per `torpor` call, in-process and through the daemon.
bench-cli: guest
	$(BIN)/python -m bench.cli_bench

# Bridged networking, in a namespace of its own: throughput, a connection across standby.
bench-network: guest
	$(BIN)/python -m bench.network_bench

# Idle guests' host memory (PSS) after using and freeing memory, free page reporting on/off.
bench-memory: guest
	$(BIN)/python -m bench.memory_bench

# Wake on traffic (in a namespace): first response asleep vs running vs restore_to_agent.
bench-wake: guest
	$(BIN)/python -m bench.wake_bench

# OCI images: pull (cold, cached), create (ext4, XFS reflink, qcow2), boot to serving.
bench-images: guest
	$(BIN)/python -m bench.image_bench

bench-codec: guest
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.codec_bench

clean:
	rm -rf $(VENV) build *.egg-info
