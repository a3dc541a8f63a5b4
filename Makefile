# fvd: the two set-up commands are `make demo` and `make test`; both install what they need.
SHELL := /bin/bash
NODE  ?= node
NPM   ?= npm
PREFIX ?= /usr/local
# Guest kernel for demo and bench-dev where this kernel lacks ublk: 6.12 or 7.3 (make bench-dev
# KERNEL=7.3). `make test` runs the device suite on both (tests/vm/run-e2e-kernels.sh).
KERNEL ?= 6.12
FVD_VM_KERNEL ?= $(KERNEL)
export FVD_VM_KERNEL

.PHONY: all deps build test test-full test-vm-harness fuzz crash-campaign demo demo-engine bench bench-dev bench-postmark-dev bench-prefetch-dev bench-trace-dev bench-recovery-dev bench-queues-dev bench-remote install clean

all: build

# npm ci when the lock file and node_modules disagree; quiet otherwise.
node_modules/.package-lock.json: package.json package-lock.json
	$(NPM) ci --no-audit --no-fund
	@touch $@

deps: node_modules/.package-lock.json

build: deps
	$(NODE) node_modules/typescript/bin/tsc -p tsconfig.json
	@# A source moved or deleted leaves its old .js behind, which the test runner would still run: prune it.
	@cd build && find . -name '*.js' | while read -r f; do [ -e "../$${f%.js}.ts" ] || rm -f "$$f" "$$f.map"; done

# Unit, differential, crash, CLI and bad-input tests here; then the ublk device suite in guests:
# every scenario on the 7.3 kernel, the kernel-facing ones on 6.12 (tests/vm/run-e2e-kernels.sh).
test: build
	bash tests/all.sh

# The same with every device scenario on both guest kernels, their long rounds (E2E_LONG=1) and
# the guest harness's self-test (about 40 min more than `make test`; CI's 90 min would not hold it).
test-full: build
	FVD_TEST_FULL=1 bash tests/all.sh

# The guest harness's self-test alone (tests/vm/smoke.sh: exit codes, argv, a boot panic, time-out).
test-vm-harness:
	bash tests/vm/smoke.sh

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
# Quiet: package installation and guest preparation go to $(DEMO_LOG), shown only on failure.
DEMO_LOG ?= /tmp/fvd-demo-prepare.log
demo: build
	@if bash tests/vm/host-has-ublk.sh -q; then bash tests/demo-device.sh; \
	else echo "This kernel has no ublk: the demo runs in a QEMU guest with Debian's 6.12 kernel."; \
	  echo "Preparing it (packages, kernel, initramfs; output in $(DEMO_LOG)) ..."; \
	  bash tests/vm/prepare.sh > $(DEMO_LOG) 2>&1 || { tail -20 $(DEMO_LOG); echo "preparing the guest failed: see $(DEMO_LOG)"; exit 1; }; \
	  FVD_VM_QUIET=1 FVD_VM_BOOT_NOTICE=1 bash tests/vm/run.sh --timeout 900 -- bash tests/demo-device.sh; fi

# The engine and CLI alone, no device: create, io, info, map, check, convert.
demo-engine: build
	bash tests/demo.sh

# FVD vs qcow2 vs raw through qemu-img bench, one run, same pattern and depth (installs qemu-utils);
# then reading a compressed qcow2 template, fvd convert vs qemu-img convert.
bench: build
	bash bench/compare.sh
	bash bench/qcow2.sh

# The device against kernel loop (direct I/O) and qcow2 via qemu-nbd, fio in one guest boot
# (or directly where this kernel has ublk). FIO_RUNTIME (default 20 s per job), BENCH_SIZE (1G),
# BENCH_TARGETS, BENCH_ROUNDS, BENCH_JOBS, BENCH_FRESH, BENCH_RAMP (bench/device.sh), e.g. make bench-dev KERNEL=7.3
# BENCH_TARGETS="fvd fvd-zc loop" BENCH_ROUNDS=5 FIO_RUNTIME=10 (zero copy against copies;
# fvd-batch: batched ublk commands against one per request).
# FIO_RATE_IOPS=N caps every job at N IOPS: CPU per I/O of fvd and qemu-nbd at equal rates.
bench-dev: build
	@if bash tests/vm/host-has-ublk.sh -q; then bash bench/device.sh; \
	else bash tests/vm/prepare.sh && bash tests/vm/run.sh --timeout 3600 -- env FIO_RUNTIME=$${FIO_RUNTIME:-20} FIO_RATE_IOPS=$${FIO_RATE_IOPS:-} BENCH_SIZE=$${BENCH_SIZE:-1G} \
	  BENCH_TARGETS="$${BENCH_TARGETS:-fvd fvd-cow loop qcow2-nbd}" BENCH_ROUNDS=$${BENCH_ROUNDS:-1} BENCH_ROTATE=$${BENCH_ROTATE:-1} BENCH_FRESH=$${BENCH_FRESH:-job} BENCH_RAMP=$${BENCH_RAMP:-0} BENCH_WARM=$${BENCH_WARM:-1} BENCH_JOBS="$${BENCH_JOBS:-randread randwrite read write}" bash bench/device.sh; fi

# PostMark (small-file workload) on ext4 in each device, one guest boot (bench/device-postmark.sh):
# kernel loop, a fresh FVD image over a raw base holding the file system (default options), that
# image made fully local by `fvd prefetch`, and a qcow2 overlay via qemu-nbd; vm.dirty_bytes=32M;
# BENCH_ROUNDS (3) interleaved rounds, each on fresh disks; files created/s, transactions/s, ratios
# to loop, and the daemons' resident memory. Issue 11's targets: fresh >= 0.95x loop, fully local
# >= 1.0x loop, a served device's RSS <= 80 MB at start. E.g. make bench-postmark-dev KERNEL=7.3.
# BENCH_TARGETS, BENCH_SIZE (1G), PM_FILES (5000), PM_TRANSACTIONS (10000).
bench-postmark-dev: build
	@if bash tests/vm/host-has-ublk.sh -q; then bash bench/device-postmark.sh; \
	else bash tests/vm/prepare.sh && bash tests/vm/run.sh --timeout 3600 -- env BENCH_SIZE=$${BENCH_SIZE:-1G} \
	  BENCH_TARGETS="$${BENCH_TARGETS:-loop fvd-fresh fvd-local qcow2-nbd}" BENCH_ROUNDS=$${BENCH_ROUNDS:-3} BENCH_ROTATE=$${BENCH_ROTATE:-1} \
	  PM_FILES=$${PM_FILES:-5000} PM_TRANSACTIONS=$${PM_TRANSACTIONS:-10000} BENCH_WARM=$${BENCH_WARM:-1} bash bench/device-postmark.sh; fi

# Where a fresh copy-on-write image's request time goes: fio 4K random read/write QD16 on a fresh
# image over a raw base, served with FVD_TRACE; per-stage summary (bench/device-trace.sh). Other
# jobs: JOBS="write" TRACE_BS=128k TRACE_QD=4; PROFILE=1 for CPU profiles instead of the trace;
# FVD_PREFETCH_TRACE=1 adds the prefetcher's per-second lines (its latency budget's view).
bench-trace-dev: build
	@if bash tests/vm/host-has-ublk.sh -q; then bash bench/device-trace.sh; \
	else bash tests/vm/prepare.sh && bash tests/vm/run.sh --timeout 1800 -- env FIO_RUNTIME=$${FIO_RUNTIME:-10} BENCH_SIZE=$${BENCH_SIZE:-1G} TRACE_MODES="$${TRACE_MODES:-default noprefetch}" \
	  JOBS="$${JOBS:-randread randwrite}" TRACE_BS=$${TRACE_BS:-4k} TRACE_QD=$${TRACE_QD:-16} PROFILE=$${PROFILE:-0} BENCH_WARM=$${BENCH_WARM:-1} \
	  FVD_PREFETCH_TRACE=$${FVD_PREFETCH_TRACE:-} bash bench/device-trace.sh; fi

# What serve's background prefetching costs the guest: fio over a local working set while the
# script pauses and resumes prefetching every PHASE_MS (FIO_RUNTIME default 30 s, PHASE_MS 2000,
# PREFETCH_SHARE 10; PREFETCH_BASES="local http nbd" adds bases on a server in the guest;
# PHASE_ORDERS="on off abba" runs the jobs once per order of on/off phases).
bench-prefetch-dev: build
	@if bash tests/vm/host-has-ublk.sh -q; then bash bench/device-prefetch.sh; \
	else bash tests/vm/prepare.sh && bash tests/vm/run.sh --timeout 1800 -- env FIO_RUNTIME=$${FIO_RUNTIME:-30} PHASE_MS=$${PHASE_MS:-2000} FVD_PREFETCH_TRACE=$${FVD_PREFETCH_TRACE:-} PREFETCH_SHARE=$${PREFETCH_SHARE:-10} PREFETCH_BASES="$${PREFETCH_BASES:-local}" PHASE_ORDERS="$${PHASE_ORDERS:-on}" bash bench/device-prefetch.sh; fi

# What a second thread per queue could give (UBLK_F_PER_IO_DAEMON's load balancing): one image
# served with 2 queues under a balanced and a one-CPU load, and with 1 queue
# (bench/device-queues.sh), e.g. make bench-queues-dev KERNEL=7.3; QUEUE_CONFIGS adds NAME-nospin
# (the queue threads without polling).
bench-queues-dev: build
	@if bash tests/vm/host-has-ublk.sh -q; then bash bench/device-queues.sh; \
	else bash tests/vm/prepare.sh && bash tests/vm/run.sh --timeout 1800 -- env FIO_RUNTIME=$${FIO_RUNTIME:-10} BENCH_ROUNDS=$${BENCH_ROUNDS:-3} QUEUE_CONFIGS="$${QUEUE_CONFIGS:-q2-split q2-pinned q1-split}" bash bench/device-queues.sh; fi

# Daemon deaths under fio verify (MODE=kill: SIGKILL and serve again; MODE=takeover: live restart),
# CYCLES times (default 20, the issue's figure is 100): errors and the pause the guest sees.
bench-recovery-dev: build
	@if bash tests/vm/host-has-ublk.sh -q; then bash bench/device-recovery.sh; \
	else bash tests/vm/prepare.sh && bash tests/vm/run.sh --timeout 5400 -- env CYCLES=$${CYCLES:-20} MODE=$${MODE:-kill} INTERVAL=$${INTERVAL:-2} bash bench/device-recovery.sh; fi

# A template on a server made local: fvd create + prefetch against qemu-img convert from the same
# URL, over HTTP (nginx) and NBD (nbdkit), time and bytes transferred (BENCH_SIZE, default 1G).
bench-remote: build
	bash bench/remote.sh

# Into $(DESTDIR)$(PREFIX): the compiled CLI, daemon and engine (no tests or benchmarks), the
# production dependencies only, README and docs under lib/fvd; bin/fvd; the systemd unit made
# from systemd/fvd@.service with its /usr/local paths set to $(PREFIX); /etc/fvd and /var/lib/fvd.
# INSTALL_NODE=/abs/path/to/node pins the runtime: bin/fvd is then a three-line /bin/sh script
# running the CLI on that node (a supported LTS beside a distribution's older one; the unit runs
# bin/fvd, so the service uses it too). Unset, bin/fvd is a symlink to the CLI, which runs on the
# first `node` on PATH (#!/usr/bin/env node).
UNITDIR ?= $(PREFIX)/lib/systemd/system
LIBDIR  := $(DESTDIR)$(PREFIX)/lib/fvd
INSTALL_NODE ?=
install: build
ifneq ($(INSTALL_NODE),)
	@case '$(INSTALL_NODE)' in /*) ;; *) echo "make install: INSTALL_NODE must be an absolute path, not '$(INSTALL_NODE)'" >&2; exit 2;; esac
	@'$(INSTALL_NODE)' build/daemon/cli.js --version >/dev/null || { echo "make install: the CLI does not run on INSTALL_NODE=$(INSTALL_NODE)" >&2; exit 2; }
endif
	rm -rf $(LIBDIR)
	install -d $(LIBDIR)/build $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) $(DESTDIR)/etc/fvd $(DESTDIR)/var/lib/fvd
	cp -r build/daemon build/fvd build/ffi build/storage $(LIBDIR)/build/
	find $(LIBDIR)/build -name '*.map' -delete
	cp -r package.json package-lock.json README.md docs node_modules $(LIBDIR)/
	cd $(LIBDIR) && $(NPM) prune --omit=dev --no-audit --no-fund --loglevel=error >/dev/null
	find $(LIBDIR)/node_modules -type d -empty -delete
	chmod +x $(LIBDIR)/build/daemon/cli.js
	rm -f $(DESTDIR)$(PREFIX)/bin/fvd
ifeq ($(INSTALL_NODE),)
	ln -s $(PREFIX)/lib/fvd/build/daemon/cli.js $(DESTDIR)$(PREFIX)/bin/fvd
else
	printf '#!/bin/sh\n# fvd on the Node.js chosen at install (make install INSTALL_NODE=)\nexec "%s" "%s" "$$@"\n' \
	  '$(INSTALL_NODE)' '$(PREFIX)/lib/fvd/build/daemon/cli.js' > $(DESTDIR)$(PREFIX)/bin/fvd
	chmod 0755 $(DESTDIR)$(PREFIX)/bin/fvd
endif
	sed -e 's|/usr/local/|$(PREFIX)/|g' systemd/fvd@.service > $(DESTDIR)$(UNITDIR)/fvd@.service
	sed -e 's|/usr/local/|$(PREFIX)/|g' systemd/fvd-expire@.service > $(DESTDIR)$(UNITDIR)/fvd-expire@.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/fvd@.service $(DESTDIR)$(UNITDIR)/fvd-expire@.service
	install -m 0644 systemd/fvd.conf.example $(DESTDIR)/etc/fvd/fvd.conf.example
	-[ -z "$(DESTDIR)" ] && command -v systemctl >/dev/null && systemctl daemon-reload 2>/dev/null || true
