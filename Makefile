# fvd: the two set-up commands are `make demo` and `make test`; both install what they need.
SHELL := /bin/bash
NODE  ?= node
NPM   ?= npm
PREFIX ?= /usr/local

.PHONY: all deps build test fuzz crash-campaign demo demo-engine bench bench-dev bench-prefetch-dev install clean

all: build

# npm ci when the lock file and node_modules disagree; quiet otherwise.
node_modules/.package-lock.json: package.json package-lock.json
	$(NPM) ci --no-audit --no-fund
	@touch $@

deps: node_modules/.package-lock.json

build: deps
	$(NODE) node_modules/typescript/bin/tsc -p tsconfig.json

# Unit, differential, crash, CLI and bad-input tests here; then the ublk device suite in a guest.
test: build
	bash tests/all.sh

# The structure-aware image fuzzer, long mode (tests/fuzz/): FUZZ_MUTANTS (2000), FUZZ_SEED (random,
# printed), FUZZ_ONLY=i (replay one mutant), FUZZ_KEEP=DIR (keep failing mutants). `make test`
# runs a bounded part of it (tests/fuzz/fuzz.test.ts).
fuzz: build
	$(NODE) build/tests/fuzz/fuzz.js

# The power-cut campaign (tests/crash-campaign/): CRASH_CUTS (10000) simulated power cuts across
# every kind of write, recovery cut twice; CRASH_SEED (random, printed), CRASH_RUN=r (replay one run),
# CRASH_KINDS=guest,commit,... Prints the count and the losses (0). `make test` runs 400 of them.
crash-campaign: build
	$(NODE) build/tests/crash-campaign/crash-campaign.js

# The main job: a small image served as /dev/ublkbN, a filesystem on it, a clean stop. Where this
# kernel has no ublk, the same script runs inside a QEMU guest with Debian's 6.12 kernel.
demo: build
	@if bash tests/vm/host-has-ublk.sh -q; then bash tests/demo-device.sh; \
	else bash tests/vm/prepare.sh && bash tests/vm/run.sh --timeout 900 -- bash tests/demo-device.sh; fi

# The engine and CLI alone, no device: create, io, info, map, check, convert.
demo-engine: build
	bash tests/demo.sh

# FVD vs qcow2 vs raw through qemu-img bench, one run, same pattern and depth (installs qemu-utils).
bench: build
	bash bench/compare.sh

# The device against kernel loop (direct I/O) and qcow2 via qemu-nbd, fio in one guest boot
# (or directly where this kernel has ublk). FIO_RUNTIME (default 20 s per job), BENCH_SIZE (1G).
bench-dev: build
	@if bash tests/vm/host-has-ublk.sh -q; then bash bench/device.sh; \
	else bash tests/vm/prepare.sh && bash tests/vm/run.sh --timeout 1800 -- env FIO_RUNTIME=$${FIO_RUNTIME:-20} BENCH_SIZE=$${BENCH_SIZE:-1G} bash bench/device.sh; fi

# What serve's background prefetching costs the guest: fio over a local working set while the
# script pauses and resumes prefetching every PHASE_MS (FIO_RUNTIME default 30 s, PHASE_MS 2000,
# PREFETCH_SHARE 10).
bench-prefetch-dev: build
	@if bash tests/vm/host-has-ublk.sh -q; then bash bench/device-prefetch.sh; \
	else bash tests/vm/prepare.sh && bash tests/vm/run.sh --timeout 1800 -- env FIO_RUNTIME=$${FIO_RUNTIME:-30} PHASE_MS=$${PHASE_MS:-2000} FVD_PREFETCH_TRACE=$${FVD_PREFETCH_TRACE:-} PREFETCH_SHARE=$${PREFETCH_SHARE:-10} bash bench/device-prefetch.sh; fi

install: build
	install -d $(DESTDIR)$(PREFIX)/lib/fvd $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib/systemd/system $(DESTDIR)/etc/fvd
	rm -rf $(DESTDIR)$(PREFIX)/lib/fvd/build
	cp -r build package.json package-lock.json node_modules README.md docs $(DESTDIR)$(PREFIX)/lib/fvd/
	chmod +x $(DESTDIR)$(PREFIX)/lib/fvd/build/daemon/cli.js
	ln -sf $(PREFIX)/lib/fvd/build/daemon/cli.js $(DESTDIR)$(PREFIX)/bin/fvd
	install -m 0644 systemd/fvd@.service $(DESTDIR)$(PREFIX)/lib/systemd/system/fvd@.service
	install -m 0644 systemd/fvd.conf.example $(DESTDIR)/etc/fvd/fvd.conf.example
	-[ -z "$(DESTDIR)" ] && command -v systemctl >/dev/null && systemctl daemon-reload 2>/dev/null || true
