# pyvmm -- the two commands of the README, and the steps they are made of.
#
#   make demo    boot the default guest and show it working
#   make test    the whole test suite (unit, KVM-level, Linux boot, end-to-end)
#   make bench   the benchmarks, side by side with ceilings and QEMU (bench-quick: < 2 min)
#
# Each does its own set-up on a fresh Debian machine: apt packages (deps), a
# virtualenv with pyvmm installed (venv), the guest kernel (kernel) and guest
# images (guest), all cached: a second run rebuilds nothing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PYVMM_CACHE ?= $(HOME)/.cache/pyvmm

# Debian packages the builds and tests need.
APT_PACKAGES := linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev \
	xz-utils patch cpio busybox-static libc6-dev binutils qemu-system-x86 qemu-utils socat kmod zstd \
	gcc python3-venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Extra pytest arguments, e.g. make test PYTEST_ARGS="-k serial -x"
PYTEST_ARGS ?=

.PHONY: all demo test unit bench bench-quick deps venv kernel guest freestanding initramfs clean distclean

all: kernel guest venv

deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "deps: installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

kernel: deps
	kernels/build.sh

initramfs: deps
	guest/initramfs/build.sh

freestanding: deps
	guest/freestanding/build.sh

guest: initramfs freestanding

demo: venv kernel guest
	$(PY) scripts/demo

test: venv kernel guest
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks (never pass/fail): a table on stdout, JSON in bench/results/ (bench/README.md)
bench: venv guest
	$(PY) -m bench

bench-quick: venv guest
	$(PY) -m bench --quick

# Tests that need neither KVM nor built images.
unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf .pytest_cache build
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
	@echo "the image cache in $(PYVMM_CACHE) is kept; remove it by hand if you want"
