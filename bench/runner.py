"""``python -m bench [--quick]``: run the workloads, print the table, save the JSON.

Each workload runs ``reps`` times (``quick_reps`` with ``--quick``); for each
metric the table shows the median and, with more than one run, the range
[min-max].  Ratios are medians over medians.  A workload that cannot run here
says why ("not available: ...") instead of stopping the suite, and so does one
that fails ("FAILED: ...").  Nothing here is a pass/fail test: the "target"
column only says whether the issue's targets are met on this host, this run.

Two settings apply to every VMM workload and are recorded with each figure:
``--verify`` (how the transferred bytes are checked: ``word``, the default,
or ``full``) and the placement (``--vcpu-affinity``, ``--io-affinity``,
``--client-affinity``, ``--unpinned``; default :meth:`Placement.default`:
the vCPU alone on the first CPU, the VMM's other threads and this process on
the second).  The ceilings always run unpinned.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .common import VERIFY_MODES, Context, NotAvailable, Placement
from .workloads import METRICS, Workload, load_all

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

#: published figures from another machine, printed beside ours, never compared
ANCHORS = {
    "g2h.64k": "FC 14.5", "g2h.1m": "FC 14.5",
    "h2g.64k": "FC 5.1-5.3", "h2g.1m": "FC 5.1-5.3",
}
ANCHOR_NOTE = ("FC = Firecracker vsock, published, ANOTHER MACHINE (m6i.metal, 1 vCPU, "
               "64K/1M writes): 14.5 Gb/s guest->host, 5.1-5.3 Gb/s host->guest")


# --------------------------------------------------------------------------
# the table: what is compared with what, and the targets
# --------------------------------------------------------------------------

@dataclass
class Target:
    against: str          # "ceiling", "qemu" (ratio pyvmm/that) or "abs" (pyvmm's own value)
    op: str               # ">=" or "<="
    value: float

    def text(self) -> str:
        if self.against == "ceiling":
            return f"{self.op}{self.value:.0%} ceil"
        if self.against == "qemu":
            return f"{self.op}{self.value:g}x QEMU"
        return f"{self.op}{self.value:,.0f}"


@dataclass
class Row:
    label: str
    pyvmm: str
    ceiling: str | None = None
    qemu: str | None = None
    targets: list[Target] = field(default_factory=list)
    anchor: str = ""


def _rows() -> list[tuple]:
    """(title, rows) or (title, rows, name of the comparison column: QEMU unless said)."""
    sizes = (("4k", "4 KiB"), ("64k", "64 KiB"), ("1m", "1 MiB"))
    # the data-path issue's targets (one run, same guest mode and placement for both VMMs)
    bulk_targets = {
        "g2h.64k": [Target("qemu", ">=", 1.3), Target("ceiling", ">=", 0.25)],
        "h2g.64k": [Target("qemu", ">=", 1.1), Target("ceiling", ">=", 0.10)],
        "g2h.4k": [Target("qemu", ">=", 1.0)],
    }
    sections = []
    for direction, what in (("g2h", "guest->host"), ("h2g", "host->guest")):
        sections.append((f"bulk {what}, one stream (Gb/s, higher is better)", [
            Row(f"{what} {label}", f"pyvmm.{direction}.{key}", f"ceiling.socketpair.{key}",
                f"qemu.{direction}.{key}", bulk_targets.get(f"{direction}.{key}", []),
                ANCHORS.get(f"{direction}.{key}", ""))
            for key, label in sizes]))
    sections.append(("echo streams, 64 KiB writes (Gb/s each way, higher is better)", [
        Row("1 connection", "pyvmm.echo.1conn", None, "qemu.echo.1conn"),
        Row("2 connections", "pyvmm.echo.2conn", None, None),
    ]))
    rtt = []
    for key, label in (("64", "64 B"), ("512", "512 B"), ("4k", "4 KiB")):
        for p, plabel in (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")):
            rtt.append(Row(f"{label} {plabel}", f"pyvmm.rtt.{key}.{p}",
                           f"ceiling.socketpair.rtt.{key}.{p}", f"qemu.rtt.{key}.{p}",
                           [Target("qemu", "<=", 1.0)] if p == "p50" else []))
    sections.append(("round trip, one connection (us, lower is better)", rtt))
    sections.append(("connections: connect, 64 B echo, close", [
        Row("host->guest conn/s", "pyvmm.conn.h2g.rate", targets=[Target("abs", ">=", 5000)]),
        Row("host->guest connect p50 (us)", "pyvmm.conn.h2g.connect.p50"),
        Row("host->guest connect p99 (us)", "pyvmm.conn.h2g.connect.p99"),
        Row("guest->host conn/s", "pyvmm.conn.g2h.rate", targets=[Target("abs", ">=", 5000)]),
    ]))
    sections.append(("start-up (ms, lower is better)", [
        Row("process start -> 1st KVM_RUN", "pyvmm.startup.kvm_run"),
        Row("spawn -> 1st console line", "pyvmm.startup.first_line", None,
            "qemu.startup.first_line"),
        Row("spawn -> 1st vsock connection", "pyvmm.startup.first_conn"),
        Row("spawn -> 1st guest byte on host", "pyvmm.startup.first_byte", None,
            "qemu.startup.first_byte", [Target("qemu", "<=", 1.5)]),
    ]))
    cpu = []
    for direction, what in (("g2h", "g->h"), ("h2g", "h->g")):
        for key, label in sizes:
            cpu.append(Row(f"{what} {label}, excl. vCPU thr.", f"pyvmm.cpu.{direction}.{key}",
                           None, f"qemu.cpu.{direction}.{key}", [Target("qemu", "<=", 1.5)]))
        cpu.append(Row(f"{what} 64 KiB, incl. vCPU thr.", f"pyvmm.cputotal.{direction}.64k", None,
                       f"qemu.cputotal.{direction}.64k"))
    sections.append(("VMM CPU seconds per GB moved (lower is better)", cpu))
    draft = []
    for direction, what in (("g2h", "guest->host"), ("h2g", "host->guest")):
        for key, label in sizes[:2]:
            draft.append(Row(f"{what} {label}", f"draft.{direction}.{key}",
                             f"ceiling.socketpair.{key}", f"pyvmm.{direction}.{key}"))
    sections.append(("draft mode (proto=rfc2013, 1 pair) against the standard mode "
                     "(Gb/s, higher is better)", draft, "standard"))
    sections.append(("4 echo streams at once, 64 KiB writes (Gb/s each way)", [
        Row("draft, 1 queue pair", "modes.echo4.rfc2013-1pair", None, "modes.echo4.virtio"),
        Row("draft, 4 queue pairs", "modes.echo4.rfc2013-4pairs", None, "modes.echo4.virtio"),
        Row("standard (one rx/tx pair)", "modes.echo4.virtio"),
    ], "standard"))
    sections.append(("TCP forwarding (--forward, loopback TCP host end) against the Unix host end, "
                     "64 KiB writes (Gb/s, higher is better)", [
        Row("guest->host", "fwd.g2h.64k", None, "pyvmm.g2h.64k"),
        Row("host->guest", "fwd.h2g.64k", None, "pyvmm.h2g.64k"),
        Row("guest->host, CPU s/GB excl. vCPU thr.", "fwd.cpu.g2h.64k", None, "pyvmm.cpu.g2h.64k"),
        Row("host->guest, CPU s/GB excl. vCPU thr.", "fwd.cpu.h2g.64k", None, "pyvmm.cpu.h2g.64k"),
    ], "Unix"))
    sections.append(("VM-to-VM through a vsock group (two pyvmm processes), beside host<->guest", [
        Row("guest->guest 64 KiB (Gb/s)", "v2v.bulk.64k", None, "pyvmm.g2h.64k"),
        Row("guest->guest RTT 64 B, mean (us)", "v2v.rtt.64b.mean", None, "pyvmm.rtt.64.p50"),
    ], "host"))
    sections.append(("virtio-blk, raw image in the host page cache, guest-timed (higher is better)", [
        Row(label, f"pyvmm.blk.{name}", None, f"qemu.blk.{name}")
        for label, name in (("sequential write 1 MiB (MiB/s)", "seqwrite.1M"),
                            ("sequential read 1 MiB (MiB/s)", "seqread.1M"),
                            ("random write 4 KiB (IOPS)", "randwrite.4K"),
                            ("random read 4 KiB (IOPS)", "randread.4K"))]))
    sections.append(("ceiling only", [Row("memcpy (GB/s)", "ceiling.memcpy")]))
    return sections


# --------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------

@dataclass
class Outcome:
    workload: Workload
    status: str = "ok"                  # ok | not available | FAILED
    why: str = ""
    runs: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    placement: str = "unpinned"         # Placement.label() it ran under


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values), "values": values}


def run_workload(w: Workload, ctx: Context, reps: int) -> Outcome:
    placement = ctx.placement if w.placed else Placement()
    out = Outcome(w, placement=placement.label())
    t0 = time.monotonic()
    with placement.client_pinned():
        _repeat(w, ctx, reps, out)
    out.seconds = time.monotonic() - t0
    return out


def _repeat(w: Workload, ctx: Context, reps: int, out: Outcome) -> None:
    for i in range(reps):
        print(f"  {w.name}: run {i + 1}/{reps}", file=sys.stderr, flush=True)
        try:
            out.runs.append(w.fn(ctx))
        except NotAvailable as e:
            out.status, out.why = "not available", str(e)
            break
        except Exception as e:                 # a failing workload must not stop the suite
            traceback.print_exc(file=sys.stderr)
            out.status, out.why = "FAILED", f"{type(e).__name__}: {e}".splitlines()[0]
            break


def aggregate(outcomes: list[Outcome]) -> dict[str, dict]:
    values: dict[str, list[float]] = {}
    placement: dict[str, str] = {}
    for o in outcomes:
        for run in o.runs:
            for k, v in run.items():
                values.setdefault(k, []).append(v)
                placement[k] = o.placement
    return {k: {**_summary(v), "placement": placement[k]} for k, v in values.items()}


def host_facts(ctx: Context) -> dict:
    from pyvmm.kvm.host import detect
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    host = detect()

    def cmd(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = cmd("git", "rev-parse", "HEAD")
    dirty = bool(cmd("git", "status", "--porcelain", "--untracked-files=no"))
    return {
        "hostname": socket.gethostname(), "cpu_model": cpu, "cpus": os.cpu_count(),
        "kernel": platform.release(), "kvm": host.flavour.value, "kvm_detail": host.detail,
        "pyvmm_commit": commit + ("-dirty" if dirty else ""), "python": platform.python_version(),
        "numpy": __import__("numpy").__version__,
        "qemu": cmd(ctx.qemu, "--version").splitlines()[0] if ctx.qemu else None,
        "guest_elf": str(ctx.elf) if ctx.elf else None, "loadavg": os.getloadavg(),
    }


# --------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------

def _fmt(v: float) -> str:
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _cell(s: dict | None) -> str:
    if s is None:
        return "-"
    if s["n"] == 1:
        return _fmt(s["median"])
    return f"{_fmt(s['median'])} [{_fmt(s['min'])}-{_fmt(s['max'])}]"


def _ratio(mine: dict, other: dict | None, m) -> str:
    """pyvmm / other: a percentage where higher is better (a share of the
    ceiling), a factor where lower is better (times slower)."""
    if not other:
        return "-"
    r = mine["median"] / other["median"]
    return f"{r:.1%}" if m is None or m.better == "higher" else f"{r:.1f}x"


def _missing(key: str | None, outcomes: list[Outcome]) -> str:
    if key is None:
        return "-"
    for o in outcomes:
        if o.workload.makes(key) and o.status != "ok":
            return f"{o.status}: {o.why}" if o.status == "not available" else o.status
    return "-"


def _verdict(t: Target, row: Row, stats: dict) -> str:
    mine = stats.get(row.pyvmm)
    other = stats.get(row.ceiling if t.against == "ceiling" else row.qemu) if t.against != "abs" \
        else None
    if mine is None or (t.against != "abs" and other is None):
        return f"{t.text()}: unknown (no {t.against} figure)"
    value = mine["median"] if t.against == "abs" else mine["median"] / other["median"]
    ok = value >= t.value if t.op == ">=" else value <= t.value
    return f"{t.text()}: {'met' if ok else 'MISSED'}"


def print_table(stats: dict, outcomes: list[Outcome], facts: dict, quick: bool,
                out=sys.stdout, ctx: Context | None = None) -> None:
    w = out.write
    w(f"\npyvmm bench{' --quick' if quick else ''}  {datetime.datetime.now():%Y-%m-%d %H:%M}\n")
    w(f"host: {facts['cpu_model']}, {facts['cpus']} CPUs, kernel {facts['kernel']}, "
      f"KVM: {facts['kvm']}, load average at start {facts['loadavg'][0]:.2f}\n")
    commit = facts["pyvmm_commit"]
    w(f"pyvmm {commit[:12]}{'-dirty' if commit.endswith('dirty') else ''}, "
      f"Python {facts['python']}, {facts['qemu'] or 'no QEMU'}\n")
    w("cells: median [min-max] over runs; ratios: pyvmm median / other median; "
      "ceiling = Unix socketpair, same write size\n")
    if ctx is not None:
        w(f"placement (pyvmm and QEMU rows): {ctx.placement.label()}; ceilings unpinned\n")
        how = ("the guest checks every byte word-wise, the host samples each read"
               if ctx.verify == "word" else "the guest and the host check byte for byte")
        w(f"verify: {ctx.verify} ({how})\n")
    for title, rows, *other in _rows():
        name = other[0] if other else "QEMU"
        head = (f"{'':34} {'pyvmm':>22} {'ceiling':>8} {'/ceil':>6} {name:>8} {'/' + name[:5]:>6}"
                f"  {'published':<11} target\n")
        w(f"\n{title}\n{head}")
        for row in rows:
            mine = stats.get(row.pyvmm)
            if mine is None:
                w(f"  {row.label:32} {_missing(row.pyvmm, outcomes)}\n")
                continue
            ceil = stats.get(row.ceiling) if row.ceiling else None
            qemu = stats.get(row.qemu) if row.qemu else None
            rc = _ratio(mine, ceil, METRICS.get(row.pyvmm))
            rq = f"{mine['median'] / qemu['median']:.2f}x" if qemu else "-"
            qcell = _fmt(qemu["median"]) if qemu else ("n/a" if row.qemu and
                                                       _missing(row.qemu, outcomes) != "-" else "-")
            verdicts = "; ".join(_verdict(t, row, stats) for t in row.targets)
            w(f"  {row.label:32} {_cell(mine):>22} {(_fmt(ceil['median']) if ceil else '-'):>8} "
              f"{rc:>6} {qcell:>8} {rq:>6}  {row.anchor:<11} {verdicts}\n")
    w(f"\n{ANCHOR_NOTE}\n")
    w("ceiling RTT = socketpair ping-pong with a Python echo process; QEMU = the same guest, "
      "virtio-serial port (virtio-blk: a virtio-blk-device, aio=threads), -M microvm "
      "-accel kvm\n")
    w("\nworkloads:\n")
    for o in outcomes:
        status = o.status if o.status == "ok" else f"{o.status}: {o.why}"
        w(f"  {o.workload.name:32} {len(o.runs)} run(s) {o.seconds:6.1f} s  {status}"
          f"  [{o.placement}]\n")


# --------------------------------------------------------------------------

def make_placement(args) -> Placement:
    """--unpinned, or Placement.default() with each --*-affinity given replacing its part."""
    from pyvmm.affinity import cpu_set
    from pyvmm.errors import ConfigError
    if args.unpinned:
        return Placement()
    base = Placement.default()
    try:
        parts = {k: cpu_set(getattr(args, f"{k}_affinity"), f"--{k}-affinity")
                 for k in ("vcpu", "io", "client")}
    except ConfigError as e:
        raise SystemExit(f"python -m bench: error: {e}") from None
    return Placement(**{k: v if v is not None else getattr(base, k) for k, v in parts.items()})


def make_context(quick: bool, tmp: Path) -> Context:
    from pyvmm import images
    elf = images.freestanding_guest(required=False)
    problem = "" if elf else "the freestanding guest is not built (make guest)"
    # resolve 'current' once: the guest may be rebuilt while the suite runs
    return Context(quick=quick, tmp=tmp, elf=elf.resolve() if elf else None, elf_problem=problem,
                   qemu=shutil.which("qemu-system-x86_64"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs and samples (< 2 minutes)")
    ap.add_argument("--only", metavar="REGEX", help="run only workloads whose name matches")
    ap.add_argument("--reps", type=int, help="runs per workload (overrides the defaults)")
    ap.add_argument("--list", action="store_true", help="list the workloads and what they measure")
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    ap.add_argument("--verify", choices=VERIFY_MODES, default="word",
                    help="how the moved bytes are checked: word (default; the guest checks "
                    "every byte word-wise, the host a sample of each read) or full (byte for "
                    "byte everywhere, as the tests do)")
    ap.add_argument("--vcpu-affinity", metavar="CPUS", help="CPUs for the VMMs' vCPU threads "
                    "(default: the first CPU available)")
    ap.add_argument("--io-affinity", metavar="CPUS", help="CPUs for the VMMs' other threads "
                    "(default: the second CPU available)")
    ap.add_argument("--client-affinity", metavar="CPUS", help="CPUs for this process, the "
                    "host end of every socket (default: the same as --io-affinity's default)")
    ap.add_argument("--unpinned", action="store_true", help="pin nothing (the scheduler decides)")
    args = ap.parse_args(argv)
    placement = make_placement(args)

    workloads = load_all()
    if args.only:
        workloads = [w for w in workloads if re.search(args.only, w.name)]
    if args.list:
        for w in workloads:
            print(f"{w.name}  (runs: {w.reps}, quick: {w.quick_reps})\n")
            print("    " + w.doc.replace("\n", "\n    ") + "\n")
        return 0

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-") as tmp:
        ctx = make_context(args.quick, Path(tmp))
        ctx.verify, ctx.placement = args.verify, placement
        print(f"placement: {placement.label()}; verify: {args.verify}", file=sys.stderr)
        facts = host_facts(ctx)
        outcomes = []
        for w in workloads:
            reps = args.reps or (w.quick_reps if args.quick else w.reps)
            outcomes.append(run_workload(w, ctx, reps))
    stats = aggregate(outcomes)
    print_table(stats, outcomes, facts, args.quick, ctx=ctx)
    elapsed = time.monotonic() - started
    print(f"\nwhole suite: {elapsed:.0f} s")

    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = RESULTS / f"{stamp}-{facts['hostname']}{'-quick' if args.quick else ''}.json"
        doc = {"quick": args.quick, "seconds": elapsed, "host": facts,
               "verify": args.verify, "placement": placement.as_dict(),
               "metrics": {k: {**v, "unit": METRICS[k].unit if k in METRICS else "",
                               "better": METRICS[k].better if k in METRICS else ""}
                           for k, v in sorted(stats.items())},
               "workloads": [{"name": o.workload.name, "status": o.status, "why": o.why,
                              "runs": len(o.runs), "seconds": o.seconds,
                              "placement": o.placement, "doc": o.workload.doc}
                             for o in outcomes],
               "anchors": ANCHOR_NOTE}
        path.write_text(json.dumps(doc, indent=1))
        print(f"saved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0
