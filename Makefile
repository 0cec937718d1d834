# kvm-supervisor — everything a fresh Debian 12 machine (as root) needs.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# Ganeti 3.0.2, for tests/ganeti (a two-node virtual cluster in a network namespace).
GANETI_DEBS := ganeti ganeti-3.0 ganeti-haskell-3.0 ganeti-htools-3.0
DEBS := qemu-system-x86 qemu-utils busybox-static iputils-ping socat iproute2 cpio openvswitch-switch \
	openssh-server openssh-client openssl $(GANETI_DEBS)
GUEST := .cache/guest
CONFIG ?= config/supervisor.toml
PYTEST_ARGS ?=

.PHONY: help deps debs venv guest run test lint typecheck bench clean

help:
	@echo "make run    install what is missing, build the test guest, start the daemon (foreground)"
	@echo "make test   install what is missing and run ruff, mypy --strict and the whole test suite"
	@echo "make bench  benchmarks (figures and ratios, no assertions)"
	@echo "make guest  build the test guest kernel and initramfs into $(GUEST)/"
	@echo "make lint   ruff + mypy only;  make clean   remove venv and caches"

# Debian packages: only the missing ones, and `apt-get update` only when something is missing.
# A policy-rc.d (exit 101) keeps package scripts from starting services (sshd, Open vSwitch, Ganeti)
# on the host while they install; the tests start their own, in namespaces. It is removed
# afterwards unless it was there before.
debs:
	@missing=""; for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing" >&2; \
	  policy=/usr/sbin/policy-rc.d; \
	  if [ ! -e $$policy ]; then \
	    printf '#!/bin/sh\nexit 101\n' > $$policy; chmod 755 $$policy; \
	    trap 'rm -f '$$policy EXIT; \
	  fi; \
	  apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >&2; \
	fi

# The venv is rebuilt only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	@if ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2; fi
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

deps: debs venv

guest: debs
	@tests/guest/build.sh $(GUEST)

run: deps guest
	$(VENV)/bin/kvm-supervisor serve --config $(CONFIG)

lint: venv
	$(VENV)/bin/ruff check supervisor protocols tests
	$(VENV)/bin/ruff format --check supervisor protocols tests
	$(VENV)/bin/mypy --strict supervisor protocols

typecheck: lint

test: deps guest lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: deps guest
	$(VPY) tests/bench/run.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
