"""Every external program the project runs is installed by the README's set-up.

The README promises that ``make demo`` and ``make test`` do all set-up on a fresh Debian
machine.  That breaks silently when code starts running a program that happened to be
installed on the development machines (``modinfo`` from ``kmod`` did exactly that).  This
test derives, from the code itself, every program the project runs and every Debian package
a build step asks for, and checks each against the one install list, the Makefile's
``APT_PACKAGES`` (``make print-apt-packages``).

How the programs are found (no second, hand-kept list):

* **Python** (``*.py`` and files with a python shebang, outside ``build`` and the
  dot-directories but ``.ci``): the syntax tree of each file.  A program is the first element of a list or
  tuple literal passed as the first argument of ``subprocess.run``/``Popen``/``call``/
  ``check_call``/``check_output`` (or any ``.run``/``.Popen``/... such as ``lab.run``), or
  of ``os.exec*``/``os.spawn*``; or a string constant given to ``shutil.which`` or to a
  helper named ``which``/``_tool``.
* **Shell** (``*.sh`` and files with an ``sh``/``bash`` shebang; files whose shebang is
  ``/bin/busybox`` run inside guests, with busybox, and are skipped): parsed by ``shfmt
  -tojson``; a program is the command word of every simple command, looking through
  ``exec``/``command``/``env``/``sudo``/``nice``/``nohup``/``timeout``/``xargs``/``stdbuf``.
  Shell builtins and keywords (``compgen -b -k``) and the file's own functions are not
  programs.
* **Makefile**: the recipes of every ``.PHONY`` target as ``make -n -B`` expands them,
  parsed like shell.
* **Packages asked for by name**: the arguments of ``scripts/check-packages WHO PKG...``
  calls (the build steps that need a library, a source tarball or a compiler back end
  rather than a program).

How a program is judged: it is looked up on ``PATH`` (plus the sbin directories); a path
inside the project (its scripts, the virtualenv) is the project's own.  ``dpkg -S`` on the
path (and its resolved and ``/usr``-merged twins) names the package.  The package must be
*base system* (``Essential: yes`` or ``Priority: required``, which every Debian
installation has) or be installed by the list: a listed package or one of the packages
they pull in through ``Depends``/``Pre-Depends`` (read from the installed packages' own
records, so ``gcc`` covers ``gcc-12``).  Every listed package must in turn be needed by
something found: removing any name from the list makes this test fail.

What it cannot see: programs named only through a variable computed at run time (e.g.
``"$cc"`` or ``argv = [qemu, ...]``; each such program is also looked up by name
somewhere, which is how it is found), programs that programs run (``make`` runs the
compiler, ``tar -J`` runs ``xz``: their packages are asked for through
``check-packages``), Python packages (``pyproject.toml`` installs those) and anything run
inside a guest.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Not the project's own code: build output, caches, the virtualenv, benchmark results, every
#: dot-directory but .ci (.git, .venv, .pytest_cache, .hypothesis, ...) and dot-files (.git
#: of a worktree, .gitignore).
SKIP_DIRS = {"build", "__pycache__", "results"}
#: Where a fresh Debian machine has its programs (not /usr/local, not this user's PATH: a
#: program installed by hand elsewhere must not stand in for the set-up's).
SEARCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: Commands that run the command given as their arguments; the value says how many
#: leading words (after options and NAME=VALUE words) are theirs, not the command's.
WRAPPERS = {"exec": 0, "command": 0, "env": 0, "sudo": 0, "nice": 0, "nohup": 0,
            "timeout": 1, "xargs": 0, "stdbuf": 0}
RUNNERS = {"run", "Popen", "call", "check_call", "check_output"}
LOOKUPS = {"which", "_tool"}
CHECK_PACKAGES = "check-packages"

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool, path=SEARCH_PATH) for tool in ("dpkg", "dpkg-query", "shfmt", "make")),
    reason="needs a Debian host with dpkg, shfmt and make (the README's set-up installs them)")


# --- what the code runs -------------------------------------------------------------------

def _project_files() -> list[Path]:
    files = []
    for directory, subdirs, names in os.walk(ROOT):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS
                            and (d == ".ci" or not d.startswith(".")))
        files.extend(Path(directory, name) for name in sorted(names) if not name.startswith("."))
    return files


def _shebang(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            first = f.readline(200)
    except OSError:
        return ""
    return first.decode("latin-1").strip() if first.startswith(b"#!") else ""


def _kind(path: Path) -> str | None:
    shebang = _shebang(path)
    if "busybox" in shebang:
        return None                      # runs inside a guest, with busybox
    if path.suffix == ".py" or "python" in shebang:
        return "python"
    if path.suffix == ".sh" or re.search(r"\b(ba)?sh\b", shebang):
        return "shell"
    return None


def python_programs(source: str, where: str) -> list[tuple[str, str]]:
    """(program, where) for every program the Python ``source`` runs (module docstring)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        on_os = isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "os"
        first = node.args[0]
        line = f"{where}:{node.lineno}"
        if on_os and name.startswith(("exec", "spawn")):
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.append((first.value, line))
        elif name in RUNNERS:
            if isinstance(first, (ast.List, ast.Tuple)) and first.elts:
                first = first.elts[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    found.append((first.value, line))
        elif name in LOOKUPS and isinstance(first, ast.Constant) and isinstance(first.value, str):
            found.append((first.value, line))
    return found


def _literal(word: dict) -> str | None:
    """A shell word's text if it is plain literal text (quoted or not), else None."""
    text = []
    for part in word.get("Parts", []):
        if part["Type"] == "Lit":
            text.append(part.get("Value", ""))
        elif part["Type"] == "SglQuoted":
            text.append(part.get("Value", ""))
        elif part["Type"] == "DblQuoted" and all(p["Type"] == "Lit" for p in part.get("Parts", [])):
            text.extend(p.get("Value", "") for p in part.get("Parts", []))
        else:
            return None
    return "".join(text)


def _command_words(words: list[str | None]) -> list[str | None]:
    """The words of the command a (possibly wrapped) simple command runs."""
    while words and words[0] in WRAPPERS:
        skip = WRAPPERS[words[0]]
        words = words[1:]
        while words and words[0] is not None and (words[0].startswith("-") or "=" in words[0]):
            words = words[1:]
        words = words[skip:]
    return words


_BUILTINS: set[str] = set()


def _shell_builtins() -> set[str]:
    if not _BUILTINS:
        done = subprocess.run(["bash", "-c", "compgen -b; compgen -k"], capture_output=True,
                              text=True, check=True)
        _BUILTINS.update(done.stdout.split())
    return _BUILTINS


def shell_programs(source: str, where: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(programs, packages): what the shell ``source`` runs, and packages it names through
    ``check-packages``; each as (name, where)."""
    done = subprocess.run(["shfmt", "-tojson"], input=source, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"shfmt cannot parse {where}: {done.stderr.strip()}")
    tree = json.loads(done.stdout)
    calls, functions = [], set()

    def walk(node) -> None:
        if isinstance(node, dict):
            if node.get("Type") == "CallExpr" and node.get("Args"):
                calls.append(node)
            if node.get("Type") == "FuncDecl":
                functions.add(node["Name"]["Value"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(tree)
    programs, packages = [], []
    for call in calls:
        words = _command_words([_literal(word) for word in call["Args"]])
        line = f"{where}:{call['Pos']['Line']}"
        if words and words[0] is None:
            # "$here/../scripts/check-packages": the project's own script, named by a path
            # made at run time; any other "$variable ..." names its program at run time.
            last = call["Args"][len(call["Args"]) - len(words)]["Parts"][-1]
            if last["Type"] == "DblQuoted" and last.get("Parts"):
                last = last["Parts"][-1]
            if last["Type"] == "Lit" and last.get("Value", "").endswith("/" + CHECK_PACKAGES):
                words = [CHECK_PACKAGES, *words[1:]]
        if not words or words[0] is None:
            continue
        program = words[0]
        if program in functions or program in _shell_builtins():
            continue
        programs.append((program, line))
        if Path(program).name == CHECK_PACKAGES:
            packages.extend((pkg, line) for pkg in words[2:] if pkg)
            programs.pop()               # the project's own script
    return programs, packages


def _makefile_recipes() -> str:
    text = (ROOT / "Makefile").read_text()
    targets = " ".join(re.findall(r"^\.PHONY:(.*)$", text, re.MULTILINE)).split()
    done = subprocess.run(["make", "-s", "-n", "-B", "-C", str(ROOT), *targets],
                          capture_output=True, text=True, check=True)
    return done.stdout


def project_needs() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(programs, packages) the whole project runs or asks for, each with where."""
    programs, packages = [], []
    for path in _project_files():
        kind = _kind(path)
        where = str(path.relative_to(ROOT))
        if kind == "python":
            programs += python_programs(path.read_text(), where)
        elif kind == "shell":
            found, asked = shell_programs(path.read_text(), where)
            programs += found
            packages += asked
    found, asked = shell_programs(_makefile_recipes(), "Makefile (make -n -B)")
    return programs + found, packages + asked


# --- what the set-up installs -----------------------------------------------------------------

def install_list() -> list[str]:
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "print-apt-packages"],
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


def _installed_records() -> dict[str, dict[str, str]]:
    fields = ["Package", "Status", "Essential", "Priority", "Depends", "Pre-Depends", "Provides"]
    done = subprocess.run(["dpkg-query", "-W", "-f", "\t".join(f"${{{f}}}" for f in fields) + "\n"],
                          capture_output=True, text=True, check=True)
    records = {}
    for line in done.stdout.splitlines():
        record = dict(zip(fields, line.split("\t")))
        if record.get("Status", "").endswith(" installed"):
            records[record["Package"]] = record
    return records


def _relation_names(field: str) -> list[list[str]]:
    """'a (>= 1) | b:any, c' -> [['a', 'b'], ['c']]"""
    return [[re.split(r"[\s(:]", alt.strip(), maxsplit=1)[0] for alt in group.split("|")]
            for group in field.split(",") if group.strip()]


class System:
    """The installed packages: base set, provides map, and dependency closure."""

    def __init__(self) -> None:
        self.records = _installed_records()
        self.providers: dict[str, list[str]] = {}
        for name, record in self.records.items():
            self.providers.setdefault(name, []).append(name)
            for group in _relation_names(record.get("Provides", "")):
                self.providers.setdefault(group[0], []).append(name)
        self.base = {name for name, r in self.records.items()
                     if r.get("Essential") == "yes" or r.get("Priority") == "required"}

    def closure(self, packages) -> set[str]:
        """The packages installing ``packages`` brings in (Depends and Pre-Depends)."""
        seen: set[str] = set()
        todo = [p for p in packages if p in self.records]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            record = self.records[name]
            for field in ("Pre-Depends", "Depends"):
                for group in _relation_names(record.get(field, "")):
                    for alternative in group:
                        installed = self.providers.get(alternative, [])
                        if installed:
                            todo.extend(installed)
                            break
        return seen


def _candidates(path: str) -> list[str]:
    """The names dpkg may know ``path`` by: itself, its target, and their /usr-merged twins."""
    out = []
    for p in (path, os.path.realpath(path)):
        out.append(p)
        out.append(p[4:] if p.startswith("/usr/") else "/usr" + p)
    return list(dict.fromkeys(out))


def _dpkg_owners(paths: list[str]) -> dict[str, str]:
    """path -> owning package, for those of ``paths`` dpkg knows (one ``dpkg -S`` call)."""
    done = subprocess.run(["dpkg", "-S", *paths], capture_output=True, text=True)
    owners = {}
    for line in done.stdout.splitlines():
        if line.startswith("diversion "):
            continue
        packages, _, path = line.partition(": ")
        owners[path.strip()] = packages.split(",")[0].strip().split(":")[0]
    return owners


_RESOLVED: dict[str, tuple[str | None, str | None]] = {}


def resolve_all(programs) -> None:
    """Find each program's path and package (see :func:`resolve`), with one dpkg call."""
    paths = {}
    for program in set(programs) - set(_RESOLVED):
        if "/" in program and not program.startswith("/"):
            _RESOLVED[program] = ("", program)    # the project's own, relative to it
            continue
        path = shutil.which(program, path=SEARCH_PATH) if "/" not in program else (
            program if os.access(program, os.X_OK) else None)
        if path is None:
            _RESOLVED[program] = (None, None)
        elif Path(path).resolve().is_relative_to(ROOT):
            _RESOLVED[program] = ("", path)
        else:
            paths[program] = path
    if paths:
        owners = _dpkg_owners(sorted({c for p in paths.values() for c in _candidates(p)}))
        for program, path in paths.items():
            package = next((owners[c] for c in _candidates(path) if c in owners), None)
            _RESOLVED[program] = (package, path)


def resolve(program: str) -> tuple[str | None, str | None]:
    """(package, path) of a program: ("", path) for the project's own (its scripts, the
    virtualenv); (None, path) for a file no package owns; (None, None) when not found."""
    resolve_all([program])
    return _RESOLVED[program]


def problems(listed: list[str], needs=None, system: System | None = None) -> list[str]:
    """What is wrong with ``listed`` as the install list; empty when nothing is."""
    programs, packages = needs if needs is not None else project_needs()
    system = system or System()
    installs = system.closure(listed)
    out, used = [], set()
    resolve_all(program for program, _ in programs)
    for program, where in programs:
        package, path = resolve(program)
        if package == "":
            continue
        if path is None:
            out.append(f"{program} ({where}) is not installed here: add its package to APT_PACKAGES")
        elif package is None:
            out.append(f"{program} ({where}) is {path}, which no Debian package owns")
        elif package not in system.base and package not in installs:
            out.append(f"{program} ({where}) comes from {package}, which the set-up does not "
                       f"install: add {package} to APT_PACKAGES")
        else:
            used.add(package)
    for package, where in packages:
        if package not in installs and package not in system.base:
            out.append(f"{package} (asked for by {where}) is not in APT_PACKAGES")
        used.add(package)
    for package in listed:
        if package not in system.records:
            out.append(f"{package} is in APT_PACKAGES but not installed: run make deps")
    return sorted(set(out))


# --- the tests -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def needs():
    return project_needs()


@pytest.fixture(scope="module")
def system():
    return System()


def test_every_program_comes_from_the_install_list_or_the_base_system(needs, system):
    found = problems(install_list(), needs, system)
    assert not found, "\n".join(found)


def test_the_finder_sees_the_known_calls(needs):
    """The derivation is not vacuous: calls we know are there are found where they are."""
    programs, packages = needs
    seen = {(program, where.split(":")[0]) for program, where in programs}
    for expected in [("modinfo", "tests/lab/lab.py"), ("socat", "tests/e2e/test_vsock.py"),
                     ("qemu-system-x86_64", "bench/runner.py"), ("make", "kernels/build.sh"),
                     ("objcopy", "guest/initramfs/build.sh"), ("scripts/install-deps", "Makefile (make -n -B)")]:
        assert expected in seen, expected
    assert {"linux-source-6.1", "linux-source-6.12"} <= {p for p, _ in packages}


def test_removing_any_package_from_the_list_fails(needs, system):
    listed = install_list()
    for package in listed:
        without = [p for p in listed if p != package]
        found = problems(without, needs, system)
        assert any(package in line for line in found), (
            f"removing {package} from APT_PACKAGES went unnoticed: nothing the code runs or asks "
            f"for needs it, or another listed package already installs it (then drop it)")


def test_a_new_tool_without_its_package_fails(system):
    programs, packages = shell_programs("set -e\nno-such-tool-pyvmm --version\nprintf ok\n", "new.sh")
    assert programs == [("no-such-tool-pyvmm", "new.sh:2")]
    found = problems(install_list(), (programs, packages), system)
    assert any("no-such-tool-pyvmm (new.sh:2) is not installed" in line for line in found)
    python = python_programs("import subprocess\nsubprocess.run(['shfmt', '-d'])\n", "new.py")
    assert python == [("shfmt", "new.py:2")]
    without = [p for p in install_list() if p != "shfmt"]
    assert any("comes from shfmt" in line for line in problems(without, (python, []), system))


def test_wrappers_builtins_and_functions(system):
    source = ('f() { gcc "$@"; }\nf x\nexec 9>lock\nexec make -C x\ntimeout 5 socat - -\n'
              'sudo -E env A=1 patch -p1\nfor x in a; do echo "$x" | read y; done\n"$cc" -c a.c\n')
    programs, _ = shell_programs(source, "s.sh")
    assert [p for p, _ in programs] == ["gcc", "make", "socat", "patch"]
