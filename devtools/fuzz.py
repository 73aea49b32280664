"""``moleflow fuzz``: hostile camera messages mixed with valid frames, against the real daemon.

Serves the engine set as systemd would (``moleflow.devtools.harness.served``: Mosquitto, ``moleflow serve``
as a child process, real ZeroMQ sockets) and checks what a line needs from a daemon facing a
broken or malicious sender: it stays up, every valid frame still gets its result, and every
message it cannot score is reported once and never published as a result.

Two phases. *Isolation*: each kind of ``moleflow.devtools.fuzz_cases`` alone, then a valid canary frame, so
an effect is named by its cause (a kind that stops the ingest thread would take every later
frame of a mixed run with it); the daemon is restarted after a kind that broke it. *Mixed*:
N hostile messages shuffled among valid frames from two cameras, sent with a bounded number
in flight so the daemon's queue (which drops the oldest when full) never drops one; then every
count is checked: reports (the ``errors`` counter, else ``events`` on MQTT) plus results of
non-valid messages must equal the non-valid messages sent, exactly. No torch.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from moleflow.config import Config
from moleflow.devtools.drive import (
    ProcStats,
    load_frames,
    metric_total,
    proc_stats,
    scrape_metrics,
)
from moleflow.devtools.fuzz_cases import (
    EITHER,
    HOSTILE,
    KINDS,
    VALID,
    Case,
    Forge,
    plan,
)
from moleflow.devtools.fuzz_session import (
    CAMERAS,
    WINDOW,
    Probe,
    Session,
    probe,
    wait_until,
)
from moleflow.errors import MoleflowError


def isolation(engines: Path, cfg: Config, folder: Path, pattern: str, forge: Forge,
              patience: float) -> list[Probe]:
    """Every kind alone, the daemon restarted after one that broke it."""
    probes: list[Probe] = []
    session, starts = None, 0
    try:
        for i, kind in enumerate(KINDS):
            if session is None:
                starts += 1
                session = Session(engines, cfg, folder / f"isolation-{starts}", pattern,
                                  patience)
            p, broken = probe(session, forge, kind, i)
            probes.append(p)
            if broken:
                stopped = session.close()
                session = None
                if stopped:
                    p.outcome += f"; then: {stopped[:120]}"
    finally:
        if session is not None:
            session.close()
    return probes


# ----- mixed phase -----------------------------------------------------------------------------
@dataclass
class Mixed:
    cases: list[Case]
    results: Counter            # frame id -> results
    invalid: list[tuple[str, str]]
    rejected: int
    faults: int
    source: str                 # what ``rejected`` was counted from
    events: Counter             # event name -> count, as received on MQTT
    before: ProcStats | None
    after: ProcStats | None
    exit_code: int | None
    stalls: list[str] = field(default_factory=list)
    unsent: int = 0
    dropped: float = 0.0        # the daemon's queue drops (the pacing failed: counts inexact)
    stop_error: str | None = None


def _outcomes(s: Session) -> int:
    results, rejected, faults = s.collector.counts()
    return results + rejected + faults


def _wait_room(s: Session, base: int, in_flight: int, patience: float) -> bool:
    """Wait until fewer than WINDOW messages are in flight; False after ``patience`` seconds
    without any outcome."""
    progress, since = _outcomes(s), time.time()
    while in_flight - (progress - base) >= WINDOW:
        time.sleep(0.002)
        now = _outcomes(s)
        if now != progress:
            progress, since = now, time.time()
        elif time.time() - since > patience:
            return False
    return True


def _send_all(s: Session, cases: list[Case], base: int, patience: float, stalls: list[str]
              ) -> list[Case]:
    """Send ``cases`` keeping fewer than WINDOW without an outcome; returns those that left.
    After a stall the messages in flight are given up as lost; a second stall without any
    outcome since the first ends the sending (the daemon no longer answers)."""
    out: list[Case] = []
    lost, last_stall = 0, None
    for n, case in enumerate(cases):
        ok = _wait_room(s, base, len(out) - lost, patience)
        if ok:
            left, ok = s.sender.send(case.camera, case.parts)
            if left:
                out.append(case)
        if ok:
            continue
        outcomes = _outcomes(s) - base
        waiting = out[lost + outcomes:]  # the ingest takes messages about in the order sent
        first = list(dict.fromkeys(c.kind for c in waiting if c.expect != VALID))[:3]
        stalls.append(f"at message {n}: {len(waiting)} in flight got no outcome for "
                      f"{patience:g} s; the first non-valid kinds among them: "
                      f"{', '.join(first) or 'none'}")
        if outcomes == last_stall:
            break
        lost, last_stall = len(out) - outcomes, outcomes
    return out


def _settle(s: Session, target: int, patience: float) -> None:
    """Wait for the outcomes of everything sent, until none has come for ``patience``."""
    last, since = -1, time.time()
    while _outcomes(s) < target and time.time() - since < patience:
        if _outcomes(s) != last:
            last, since = _outcomes(s), time.time()
        time.sleep(0.02)
    time.sleep(0.3)  # reports published after the last result


def mixed(engines: Path, cfg: Config, folder: Path, pattern: str, forge: Forge, hostile: int,
          valid: int, patience: float) -> Mixed:
    cases = plan(forge, hostile, valid, CAMERAS)
    cases += [Case(VALID, VALID, cam, f"v-last-{cam}", forge.valid(cam, f"v-last-{cam}"))
              for cam in CAMERAS]  # the ingest still answers at the very end
    s = Session(engines, cfg, folder / "mixed", pattern, patience)
    try:
        for i in range(4):  # warm-up: the first batches size the runtime's buffers
            s.sender.send(CAMERAS[i % 2], forge.valid(CAMERAS[i % 2], f"w{i}"))
        wait_until(lambda: s.collector.n_results >= 4, 30)
        base, before = _outcomes(s), proc_stats(s.pid)
        stalls: list[str] = []
        sent = _send_all(s, cases, base, patience, stalls)
        _settle(s, base + len(sent), patience)
        after, code = proc_stats(s.pid), s.exit_code()
        rejected, faults, source = s.reports()
        metrics = scrape_metrics(s.metrics_port) or {}
        with s.collector.lock:
            results = Counter(s.collector.results)
            invalid = list(s.collector.invalid)
            events = Counter(str(e.get("event")) for e in s.collector.events)
    finally:
        stop_error = s.close()
    for i in range(4):
        results.pop(f"w{i}", None)
    return Mixed(sent, results, invalid, rejected, faults, source, events, before, after, code,
                 stalls, len(cases) - len(sent), metric_total(metrics, "frames_dropped"),
                 stop_error)


# ----- checks and report -----------------------------------------------------------------------
@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


def _resources(m: Mixed, max_growth_mib: float) -> Check:
    if m.before is None or m.after is None:
        return Check("daemon memory", False, "the daemon's /proc entry is gone")
    growth = m.after.rss_mib - m.before.rss_mib
    return Check(f"RSS growth within {max_growth_mib:.0f} MiB", growth <= max_growth_mib,
                 f"{m.before.rss_mib:.1f} -> {m.after.rss_mib:.1f} MiB "
                 f"({100 * growth / max(m.before.rss_mib, 1e-9):+.1f} %), peak "
                 f"{m.after.peak_mib:.1f} MiB; fds {m.before.fds} -> {m.after.fds}; threads "
                 f"{m.before.threads} -> {m.after.threads}")


def mixed_checks(m: Mixed, max_growth_mib: float) -> list[Check]:
    valid = [c.frame_id for c in m.cases if c.expect == VALID]
    valid_set = set(valid)
    others = [c for c in m.cases if c.expect != VALID]
    missing = [i for i in valid if m.results[i] == 0]
    repeated = [i for i in valid if m.results[i] > 1]
    other_results = sum(v for k, v in m.results.items() if k not in valid_set)
    published = sorted({c.kind for c in others if c.expect == HOSTILE and m.results[c.frame_id]})
    outcome = m.rejected + other_results
    first = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    return [
        Check("daemon alive", m.exit_code is None,
              "" if m.exit_code is None else f"exited with code {m.exit_code}"),
        Check("ingest answered to the end", not m.stalls and not m.unsent,
              "; ".join(m.stalls[:3]) + (f"; {m.unsent} messages not sent" if m.unsent else "")),
        Check("every valid frame has one result", not missing and not repeated,
              f"{len(valid) - len(missing)}/{len(valid)} scored"
              + (f"; missing: {first}" if missing else "")
              + (f"; {len(repeated)} more than once" if repeated else "")),
        Check("no hostile message published as a result", not published,
              f"kinds: {', '.join(published)}" if published else ""),
        Check("every non-valid message reported or scored, once", outcome == len(others),
              f"{m.rejected} reported ({m.source}) + {other_results} scored = {outcome} of "
              f"{len(others)} sent"),
        Check("no fault events (frames batched with a hostile one are lost)", not m.faults,
              f"{m.faults} faults; events on MQTT: {dict(m.events)}"),
        Check("every MQTT payload is strict JSON", not m.invalid,
              f"{len(m.invalid)} not, e.g. {m.invalid[0][0]}: {m.invalid[0][1][:90]!r}"
              if m.invalid else ""),
        Check("no frame dropped by the daemon's queue (exact counts)", not m.dropped,
              f"{m.dropped:.0f} dropped" if m.dropped else ""),
        Check("daemon stopped on SIGTERM", m.stop_error is None, m.stop_error or ""),
        _resources(m, max_growth_mib),
    ]


@dataclass
class FuzzReport:
    title: str
    probes: list[Probe]
    mixed: Mixed
    checks: list[Check]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def text(self) -> str:
        lines = [self.title, "", "isolation (each kind alone, then a valid canary frame):"]
        for p in self.probes:
            lines.append(f"  {'PASS' if p.ok else 'FAIL'} {p.kind:<26} {p.expect:<8} {p.outcome}")
        m = self.mixed
        sent = Counter(c.kind for c in m.cases)
        scored = Counter(c.kind for c in m.cases if m.results[c.frame_id])
        expect = {c.kind: c.expect for c in m.cases}
        n_valid = sent.pop(VALID, 0)
        unsent = f"; {m.unsent} more were planned, not sent" if m.unsent else ""
        lines += ["", f"mixed ({sum(sent.values())} hostile or ambiguous messages among "
                      f"{n_valid} valid frames from {', '.join(CAMERAS)}, shuffled{unsent}):",
                  f"  {'kind':<26} {'expect':<8} {'sent':>5} {'scored':>6}"]
        lines += [f"  {k:<26} {expect[k]:<8} {n:>5} {scored[k]:>6}" for k, n in sorted(sent.items())]
        lines += ["", "checks:"]
        lines += [f"  {'PASS' if c.ok else 'FAIL'} {c.name}" + (f": {c.detail}" if c.detail else "")
                  for c in self.checks]
        n = len(self.failed)
        lines.append(f"fuzz: {n} of {len(self.checks)} checks failed" if n else
                     f"fuzz: all {len(self.checks)} checks passed")
        return "\n".join(lines)


def run_fuzz(engines: Path, cfg: Config, messages: int = 5000, seed: int = 0,
             valid: int | None = None, pattern: str = "pull", out: Path | None = None,
             data: Path | None = None, patience: float = 4.0, max_rss_growth_mib: float = 256.0
             ) -> FuzzReport:
    """Both phases on ``engines`` (see the module doc); ``messages`` hostile or ambiguous ones
    in the mixed phase among ``valid`` frames (default a quarter as many). Daemon logs and
    configs are kept under ``out`` when given."""
    if pattern not in ("pull", "rep"):
        raise MoleflowError(f"fuzz: pattern must be pull or rep, got {pattern!r}")
    frames = load_frames(engines, data, count=16, seed=seed)
    valid = max(2 * len(CAMERAS), messages // 4) if valid is None else valid
    with contextlib.ExitStack() as stack:
        folder = out or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        probes = isolation(engines, cfg, folder, pattern, Forge(frames, seed), patience)
        m = mixed(engines, cfg, folder, pattern, Forge(frames, seed + 1), messages, valid,
                  patience)
    bad = [p.kind for p in probes if not p.ok]
    checks = [Check("every kind handled alone (reported or scored once, canary scored)",
                    not bad, f"failed: {', '.join(bad)}" if bad else "")]
    checks += mixed_checks(m, max_rss_growth_mib)
    title = (f"fuzz: engine set {engines}, {pattern} socket, seed {seed}, {len(KINDS)} kinds "
             f"({sum(k.expect == EITHER for k in KINDS)} either reported or scored)")
    return FuzzReport(title, probes, m, checks)
