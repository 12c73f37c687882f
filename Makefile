# shadowblk: `make serve` runs a demo service, `make test` runs lint and every test.
# Both start with `setup`, which is idempotent: Debian packages (only the missing ones),
# then .venv, then the editable install (only when pyproject.toml changed).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON_SYSTEM := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.shadowblk-installed
STATE := ./var
MYPY_TREE := build/mypy
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

DEB_PACKAGES := python3-venv python3-dev python3-libnbd libnbd-bin nbdkit nbdkit-plugin-python \
	qemu-utils fio fuse3 libfuse3-dev pkg-config gcc libc6-dev xfsprogs btrfs-progs e2fsprogs \
	util-linux mount

.PHONY: help setup packages serve test lint pytest bench torture clean distclean

help:
	@echo "make setup      install Debian packages, .venv and shadowblk (idempotent)"
	@echo "make serve      run a demo service on $(STATE) with volume 'demo' (1G)"
	@echo "make test       lint (ruff, mypy), then pytest"
	@echo "make lint       ruff check and mypy only"
	@echo "make bench      the benchmark against nbdkit and qemu-nbd, into bench-out/"
	@echo "make torture    the long crash runs (KILLS=300 ROUNDS=40 STATES=3000 SEED=...)"
	@echo "make fuzz       the atheris fuzzers, by hand (FUZZ_RUNS=100000)"
	@echo "make clean      remove caches and build output; distclean also .venv and $(STATE)"

setup: packages $(STAMP)

packages:
	@missing=(); \
	for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q "ok installed" || missing+=("$$p"); \
	done; \
	if [ $${#missing[@]} -gt 0 ]; then \
	  echo "installing: $${missing[*]}"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$${missing[@]}"; \
	fi

$(PY): | packages
	$(PYTHON_SYSTEM) -m venv --system-site-packages $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[test]'
	touch $@

serve: setup
	@sock="$(CURDIR)/var/nbd.sock"; \
	echo "shadowblk: serving volume 'demo' from $(STATE); stop with Ctrl-C. From another shell:"; \
	echo "  nbdinfo 'nbd+unix:///demo?socket=$(STATE)/nbd.sock'"; \
	echo "  qemu-img info 'nbd+unix:///demo?socket=$$sock'"; \
	echo "  $(VENV)/bin/shadowblk --state-dir $(STATE) status"; \
	echo "  ls -l $(STATE)/fuse        # the volume and its snapshots as files (see README)"
	$(VENV)/bin/shadowblk --state-dir $(STATE) serve --init-volume demo=1G

test: setup
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory pytest

lint: setup $(MYPY_TREE)
	$(VENV)/bin/ruff check .
	MYPYPATH=$(MYPY_TREE) $(VENV)/bin/mypy -p shadowblk

# mypy needs a directory named after the package: symlinks map shadowblk.X to X/, as
# pyproject.toml's package-dir does for pip.
$(MYPY_TREE):
	mkdir -p $@/shadowblk
	for d in provider mount tools; do ln -sfn ../../../$$d $@/shadowblk/$$d; done

# pytest exit status 5 means "no tests collected": a failure here, never a pass.
pytest: setup
	@rc=0; $(VENV)/bin/pytest || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

# The full benchmark, side by side with nbdkit and qemu-nbd (about 6 minutes here).
bench: setup
	$(VENV)/bin/shadowblk bench --out bench-out

# the long crash runs (make test runs a bounded round of each): docs/reliability.md
torture: setup
	SHADOWBLK_CRASH_KILLS=$${KILLS:-300} SHADOWBLK_FAULT_ROUNDS=$${ROUNDS:-40} SHADOWBLK_POWERLOSS_STATES=$${STATES:-3000} \
	SHADOWBLK_CRASH_SEED=$${SEED:-$$(date +%s)} $(VENV)/bin/pytest -q tests/crash

clean:
	rm -rf build .mypy_cache .ruff_cache .hypothesis *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(STATE)

# The atheris (libFuzzer) harnesses, by hand: FUZZ_RUNS inputs each (default 100000); the
# corpus grows in build/fuzz/NAME, a crashing input is saved as build/fuzz/crash-*.
.PHONY: fuzz
fuzz: setup
	$(PY) -c "import atheris" 2>/dev/null || $(PY) -m pip install "atheris==3.0.0"
	for name in nbd control; do \
	  mkdir -p build/fuzz/$$name; \
	  dict=tests/fuzz/$$name.dict; [ -f $$dict ] && dict=-dict=$$dict || dict=; \
	  $(PY) tests/fuzz/atheris_$$name.py -runs=$${FUZZ_RUNS:-100000} $$dict \
	    -artifact_prefix=build/fuzz/ build/fuzz/$$name; \
	done
