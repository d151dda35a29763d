"""The two guest kernels, without building either: where pyvmm looks for them, and what
kernels/build.sh accepts.

``kernels/build.sh [6.1|6.12]`` builds 6.1 (the default, ``$PYVMM_CACHE/kernel``) or 6.12
(``$PYVMM_CACHE/kernel-6.12``); pyvmm.images finds them there.  An argument build.sh does not
know must stop it before it looks at packages or touches the cache.  The versions build.sh
knows must each have their fragment and patch directory, and the Makefile must install and
build each (kernels/README.md).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvmm import images
from pyvmm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BUILD_SH = ROOT / "kernels" / "build.sh"
EXIT_USAGE = 64          # kernels/build.sh: bad arguments
VERSIONS = {"6.1": "kernel", "6.12": "kernel-6.12"}     # version -> cache directory


@pytest.mark.parametrize("find, kind, name, hint", [
    (images.default_kernel, "kernel", "vmlinux", "make kernel"),
    (images.default_bzimage, "kernel", "bzImage", "make kernel"),
    (images.kernel_6_12, "kernel-6.12", "vmlinux", "make kernel-6.12"),
    (images.bzimage_6_12, "kernel-6.12", "bzImage", "make kernel-6.12"),
])
def test_each_kernel_is_found_in_its_own_cache_directory(monkeypatch, tmp_path, find, kind, name, hint):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path))
    assert find(required=False) is None
    with pytest.raises(ConfigError, match=rf"no default {name} in {re.escape(str(tmp_path / kind / 'current'))}; "
                                          rf"build it with: {hint}$"):
        find()
    built = tmp_path / kind / "k123"
    built.mkdir(parents=True)
    (built / name).write_bytes(b"\x7fELF")
    (tmp_path / kind / "current").symlink_to("k123")
    assert find() == tmp_path / kind / "current" / name


def test_the_6_12_kernel_is_not_taken_for_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path))
    (tmp_path / "kernel-6.12" / "current").mkdir(parents=True)
    (tmp_path / "kernel-6.12" / "current" / "vmlinux").write_bytes(b"\x7fELF")
    assert images.default_kernel(required=False) is None
    assert images.kernel_6_12(required=False) is not None


@pytest.mark.parametrize("args", [["5.10"], ["6"], ["6.12.117"], [""], ["6.1", "6.12"], ["--jobs"]])
def test_build_sh_refuses_what_it_does_not_know_before_doing_anything(tmp_path, args):
    # A PATH with bash and dirname (build.sh's first line needs it) and nothing else: should
    # the check let an argument through, check-packages finds no dpkg-query and stops it
    # (exit 2), so a failing test never starts a kernel build.
    tools = tmp_path / "bin"
    tools.mkdir()
    for program in ("bash", "dirname"):
        (tools / program).symlink_to(shutil.which(program))
    done = subprocess.run([str(BUILD_SH), *args], capture_output=True, text=True, timeout=30,
                          env={"PATH": str(tools), "PYVMM_CACHE": str(tmp_path / "cache")})
    assert done.returncode == EXIT_USAGE, done
    assert done.stderr.startswith("usage: kernels/build.sh [6.1|6.12]"), done.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("version", VERSIONS)
def test_every_version_has_its_inputs_and_make_targets(version):
    assert (ROOT / "kernels" / f"guest-{version}.config").is_file()
    assert sorted((ROOT / "kernels" / "patches" / version).glob("*.patch")), version
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^APT_PACKAGES :=(.|\\\n)*\blinux-source-{re.escape(version)}\b", makefile, re.M)
    target = "kernel" if version == "6.1" else f"kernel-{version}"
    recipe = "kernels/build.sh" if version == "6.1" else f"kernels/build.sh {version}"
    assert re.search(rf"^{re.escape(target)}: deps\n\t{re.escape(recipe)}\n", makefile, re.M), target
    source = BUILD_SH.read_text()
    assert re.search(rf"^    {re.escape(version)}\)", source, re.M), version
    assert f"kind={VERSIONS[version]}\n" in source


def test_make_test_builds_the_6_12_kernel_and_make_demo_does_not():
    makefile = (ROOT / "Makefile").read_text()
    prerequisites = {m.group(1): m.group(2).split()
                     for m in re.finditer(r"^(test|demo):(.*)$", makefile, re.M)}
    assert "kernel-6.12" in prerequisites["test"] and "kernel" in prerequisites["test"]
    assert "kernel-6.12" not in prerequisites["demo"] and "kernel" in prerequisites["demo"]


def test_build_sh_help_is_the_usage_line_and_succeeds():
    done = subprocess.run([str(BUILD_SH), "--help"], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout.startswith("usage: kernels/build.sh [6.1|6.12]")) == (0, True), done
