"""The KVM ABI as pyvmm declares it: struct sizes, field offsets, ioctl numbers.

Two oracles: numbers copied from <linux/kvm.h> on x86-64 (pinned here so a
change shows up even without a compiler), and, where gcc and the kernel
headers exist, a C program compiled against the real header.
"""

import ctypes
import shutil
import subprocess

import pytest

from pyvmm.kvm import abi
from pyvmm.kvm.ioctl import _IO, _IOR, _IOW, _IOWR

SIZES = {
    "kvm_userspace_memory_region": 32, "kvm_regs": 144, "kvm_segment": 24, "kvm_dtable": 16,
    "kvm_sregs": 312, "kvm_fpu": 416, "kvm_msr_entry": 16, "kvm_msrs": 8,
    "kvm_cpuid_entry2": 40, "kvm_cpuid2": 8, "kvm_pit_config": 64, "kvm_irq_level": 8,
    "kvm_irqfd": 32, "kvm_ioeventfd": 64, "kvm_mp_state": 4, "kvm_lapic_state": 1024,
    "kvm_translation": 24,
}

IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00, "KVM_CREATE_VM": 0xAE01, "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04, "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41, "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47, "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_CREATE_IRQCHIP": 0xAE60, "KVM_IRQ_LINE": 0x4008AE61, "KVM_IRQFD": 0x4020AE76,
    "KVM_CREATE_PIT2": 0x4040AE77, "KVM_IOEVENTFD": 0x4040AE79, "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81, "KVM_SET_REGS": 0x4090AE82, "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84, "KVM_TRANSLATE": 0xC018AE85, "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89, "KVM_GET_FPU": 0x81A0AE8C, "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_GET_LAPIC": 0x8400AE8E, "KVM_SET_LAPIC": 0x4400AE8F, "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_MP_STATE": 0x8004AE98, "KVM_SET_MP_STATE": 0x4004AE99,
}

RUN_OFFSETS = {"exit_reason": 8, "exit": 32, "kvm_valid_regs": 288, "s": 304}


@pytest.mark.parametrize("name,size", sorted(SIZES.items()))
def test_struct_size(name, size):
    assert ctypes.sizeof(getattr(abi, name)) == size


@pytest.mark.parametrize("name,number", sorted(IOCTLS.items()))
def test_ioctl_number(name, number):
    assert getattr(abi, name) == number


def test_kvm_run_layout():
    for field, offset in RUN_OFFSETS.items():
        assert getattr(abi.kvm_run, field).offset == offset
    assert ctypes.sizeof(abi.kvm_run) == 304 + 2048


def test_ioctl_macros():
    assert _IO(0xAE, 0x80) == 0xAE80
    assert _IOR(0xAE, 0x81, 144) == 0x8090AE81
    assert _IOW(0xAE, 0x82, abi.kvm_regs) == 0x4090AE82
    assert _IOWR(0xAE, 0x05, 8) == 0xC008AE05
    with pytest.raises(ValueError):
        _IOW(0xAE, 0x01, 1 << 14)


def test_ioctl_names_cover_every_ioctl():
    for name, number in IOCTLS.items():
        assert abi.IOCTL_NAMES[number] == name


@pytest.mark.skipif(not shutil.which("gcc"), reason="gcc is not installed")
def test_against_the_c_header(tmp_path):
    """Compile a C program against <linux/kvm.h> and compare every number."""
    if not any(p.exists() for p in map(__import__("pathlib").Path,
                                       ["/usr/include/linux/kvm.h"])):
        pytest.skip("kernel headers (<linux/kvm.h>) are not installed")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/kvm.h>',
             'int main(void) {']
    for name in SIZES:
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
    for name in IOCTLS:
        lines.append(f'printf("{name} %lu\\n", (unsigned long){name});')
    for field in ("exit_reason", "kvm_valid_regs", "s"):
        lines.append(f'printf("run.{field} %zu\\n", offsetof(struct kvm_run, {field}));')
    lines.append('printf("run.exit %zu\\n", offsetof(struct kvm_run, io));')
    lines.append("return 0; }")
    src = tmp_path / "abi.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "abi"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = dict(line.split() for line in subprocess.run([str(exe)], capture_output=True,
                                                       text=True, check=True).stdout.splitlines())
    for name in SIZES:
        assert int(out[name]) == ctypes.sizeof(getattr(abi, name)), name
    for name in IOCTLS:
        assert int(out[name]) == getattr(abi, name), name
    for field in ("exit_reason", "kvm_valid_regs", "s", "exit"):
        assert int(out[f"run.{field}"]) == getattr(abi.kvm_run, field).offset, field
