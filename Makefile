# fvd: the two set-up commands are `make demo` and `make test`; both install what they need.
SHELL := /bin/bash
NODE  ?= node
NPM   ?= npm
PREFIX ?= /usr/local

.PHONY: all deps build test demo bench clean

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

clean:
	rm -rf build
