# fvd: the two set-up commands are `make demo` and `make test`; both install what they need.
SHELL := /bin/bash
NODE  ?= node
NPM   ?= npm
PREFIX ?= /usr/local

.PHONY: all deps build test demo bench install clean

all: build

# npm ci when the lock file and node_modules disagree; quiet otherwise.
node_modules/.package-lock.json: package.json package-lock.json
	$(NPM) ci --no-audit --no-fund
	@touch $@

deps: node_modules/.package-lock.json

build: deps
	$(NODE) node_modules/typescript/bin/tsc -p tsconfig.json

test: build
	$(NODE) build/tests/run.js

# The main job on a small default image (the ublk device demo arrives with the daemon issue).
demo: build
	bash tests/demo.sh

# FVD vs qcow2 vs raw through qemu-img bench, one run, same pattern and depth (installs qemu-utils).
bench: build
	bash bench/compare.sh

install: build
	install -d $(DESTDIR)$(PREFIX)/lib/fvd $(DESTDIR)$(PREFIX)/bin
	cp -r build package.json package-lock.json node_modules $(DESTDIR)$(PREFIX)/lib/fvd/
	ln -sf $(PREFIX)/lib/fvd/build/daemon/cli.js $(DESTDIR)$(PREFIX)/bin/fvd
	chmod +x $(DESTDIR)$(PREFIX)/lib/fvd/build/daemon/cli.js

clean:
	rm -rf build
