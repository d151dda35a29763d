# pyvmm -- the two commands of the README, and the steps they are made of.
#
#   make demo    boot the default guest and show it working
#   make test    the whole test suite (unit, KVM-level, Linux boot, end-to-end)
#   make bench   the benchmarks, side by side with ceilings and QEMU (bench-quick: < 2 min)
#
# Each does its own set-up on a fresh Debian machine: apt packages (deps), a
# virtualenv with pyvmm installed (venv), the guest kernel (kernel; make test also
# builds the second, 6.12 one: kernel-6.12) and guest images (guest: the initramfs, the same
# files as an ext4 disk image, the freestanding test guest), all cached:
# a second run rebuilds nothing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PYVMM_CACHE ?= $(HOME)/.cache/pyvmm

# Debian packages the builds, the lab, the tests and the benchmarks run programs from: the one
# install list, minimal (a package another one here brings in is not repeated: build-essential
# brings gcc, libc6-dev, binutils, make and patch; python3-venv brings python3).
# tests/unit/test_install_list.py derives every program the project runs from the code and
# fails if one comes from neither this list nor the base system (Essential or Priority:
# required), or if a name here could be dropped: a tool installed by hand on a development
# machine cannot hide a missing install step.
# dropbear-bin and wget are copied into a guest image (make vsockify); openssh-client's ssh and
# ssh-keygen are the host's end of the ssh-over-vsock test (tests/e2e/test_vsockify.py).
# qemu-system-x86 brings qemu-system-common, whose qemu-storage-daemon serves the disk images
# that are not raw (pyvmm/blk/daemon.py); qemu-utils has qemu-img, which tells their format.
APT_PACKAGES := python3-venv build-essential linux-source-6.1 linux-source-6.12 bc bison flex \
	libelf-dev libssl-dev busybox-static qemu-system-x86 qemu-utils socat kmod zstd shfmt \
	dropbear-bin wget openssh-client

# Extra pytest arguments, e.g. make test PYTEST_ARGS="-k serial -x"
PYTEST_ARGS ?=

.PHONY: all demo test unit bench bench-quick fuzz soak soak-http deps print-apt-packages venv kernel kernel-6.12 guest freestanding initramfs rootfs vsock-test vsockify clean distclean

all: kernel guest venv

deps:
	@scripts/install-deps $(APT_PACKAGES)

# The install list, one word a line (tests/unit/test_install_list.py reads it from here).
print-apt-packages:
	@printf '%s\n' $(APT_PACKAGES)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | deps
	@scripts/check-packages venv python3-venv
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The default guest kernel, Linux 6.1 ($PYVMM_CACHE/kernel), and the second one, Linux 6.12
# ($PYVMM_CACHE/kernel-6.12), which only the tests use (kernels/README.md)
kernel: deps
	kernels/build.sh

kernel-6.12: deps
	kernels/build.sh 6.12

initramfs: deps
	guest/initramfs/build.sh

freestanding: deps
	guest/freestanding/build.sh

# The initramfs's files as an ext4 disk image ($PYVMM_CACHE/rootfs/current/rootfs.img), for
# pyvmm run --disk ...,ro --cmdline root=/dev/vda (guest/README.md); mkfs.ext4 and debugfs come
# from e2fsprogs, which every Debian system has (Priority: required)
rootfs: initramfs
	guest/rootfs/build.sh

guest: initramfs freestanding rootfs

# The kernel's own tools/testing/vsock/vsock_test from linux-source-6.1 and -6.12, static, plus a
# cpio of them to append to the initramfs (guest/vsock_test/README.md). Not needed by `demo`.
vsock-test: deps
	guest/vsock_test/build.sh

# libvsockify.so (an LD_PRELOAD library: unmodified TCP programs over vsock) and a cpio to append
# to the initramfs with dropbear, dbclient, dropbearkey and wget from Debian and every library
# they load (guest/vsockify/README.md). Not needed by `demo`.
vsockify: initramfs
	guest/vsockify/build.sh

# V=1 shows the guest console live instead of saving it to a file
demo: venv kernel guest
	$(PY) scripts/demo $(if $(V),--verbose)

test: venv kernel kernel-6.12 guest vsock-test vsockify
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks (never pass/fail): a table on stdout, JSON in bench/results/ (bench/README.md)
bench: venv guest
	$(PY) -m bench

bench-quick: venv guest
	$(PY) -m bench --quick

# Coverage-guided fuzzing of the queue parser, the virtio-mmio registers and the vsock device
# (tests/fuzz; no KVM): FUZZ_SECONDS per target; what reaches new code is kept in
# tests/fuzz/corpus/<target> (make test replays it and fuzzes each target for 20 s)
FUZZ_SECONDS ?= 300
fuzz: venv
	@for t in queue mmio vsock blk; do echo "fuzz: $$t for $(FUZZ_SECONDS) s"; \
		(cd tests/fuzz && ../../$(PY) run.py $$t -max_total_time=$(FUZZ_SECONDS) \
			-print_final_stats=1 corpus/$$t) || exit 1; done

# The seed's stress test (tests/stress.py) repeated until DURATION seconds are up: CONNS
# connections at once, MIB each way each, SHA-256 checked; prints the totals, fails on any loss
DURATION ?= 1800
CONNS ?= 64
MIB ?= 64
PROTO ?= virtio
soak: venv guest
	$(PY) tests/stress.py --duration $(DURATION) --conns $(CONNS) --mib $(MIB) --proto $(PROTO)

# The seed's HTTP test (tests/e2e/test_http_both_ways.py): host and guest download HTTP_MIB
# from each other at once, ROUNDS times, SHA-256 checked; inside the lab where there is no
# hardware KVM (its run is bounded by LAB_TIMEOUT, tests/test_lab_e2e.py)
ROUNDS ?= 20
HTTP_MIB ?= 16
soak-http: venv kernel guest vsockify
	PYVMM_HTTP_ROUNDS=$(ROUNDS) PYVMM_HTTP_MIB=$(HTTP_MIB) $(PY) -m pytest -p no:cacheprovider \
		tests/e2e/test_http_both_ways.py tests/test_lab_e2e.py

# Tests that need neither KVM nor built images.
unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf .pytest_cache build
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
	@echo "the image cache in $(PYVMM_CACHE) is kept; remove it by hand if you want"
