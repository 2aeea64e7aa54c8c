"""How ``iollm job status`` shows a job: the round table, and the live view of
``job status --watch`` / ``job submit --wait``.

The live view is one line per task of the round under way (worker, inner step of
total, training loss, tokens/s), redrawn in place on a terminal like a progress bar,
and one summary line per finished round, printed once. Without a terminal (a log, a
pipe) it prints a task's line when its state changes, and the round summaries.

Times: a round's wall time runs from its start to its merged version; its tasks run in
parallel, so the round shows its slowest task, never their sum.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO

from node.cli.common import SHORT, short_peer, when

BAR_WIDTH = 16
PLAIN_EVERY_S = 10.0  # without a terminal, a training task's line at most this often


def _loss(value: Any) -> str:
    return "?" if value is None else f"{value:.4f}"


def _rate(tokens: Any, wall_ms: Any) -> str:
    if not tokens or not wall_ms:
        return ""
    per_s = tokens / (wall_ms / 1000)
    return f"{per_s / 1000:.1f}k tok/s" if per_s >= 1000 else f"{per_s:.0f} tok/s"


def round_times(r: dict[str, Any]) -> str:
    """A finished round's time: wall, slowest task, checking (not a sum over tasks)."""
    walls = [t["wall_ms"] / 1000 for t in r["tasks"] if t.get("wall_ms")]
    parts = []
    if r.get("ended_ms") and r.get("started_ms"):
        parts.append(f"{(r['ended_ms'] - r['started_ms']) / 1000:.1f} s")
    if walls:
        parts.append(f"slowest of {len(walls)} parallel tasks {max(walls):.1f} s")
    if r.get("check_s"):
        parts.append(f"checking {r['check_s']:.1f} s")
    return ", ".join(parts)


def round_summary(r: dict[str, Any], rounds: int) -> str:
    version = (r.get("version") or "")[:SHORT] or "none (base kept)"
    return (f"round {r['round'] + 1}/{rounds}  held-out {_loss(r['heldout_before'])} -> "
            f"{_loss(r.get('heldout_after'))}  {r['accepted']}/{len(r['tasks'])} accepted  "
            f"version {version}  {round_times(r)}")


def task_verdict_lines(t: dict[str, Any], indent: str = "    ") -> list[str]:
    """A finished task: worker, verdict, its training loss and speed; why it was
    rejected, or, when accepted, the checks it passed if its held-out loss rose."""
    loss = (f"loss {t['first_loss']:.3f} -> {t['last_loss']:.3f}"
            if "first_loss" in t else "")
    steps = f"{t['steps']} steps  " if t.get("steps") else ""
    head = (f"{indent}{t['task']:<8} {short_peer(t['worker'] or '-'):<18} {t['verdict']:<8} "
            f"{steps}{loss}  {_rate(t.get('tokens'), t.get('wall_ms'))}").rstrip()
    lines = [head + (f"  ({t['reason']})" if t.get("reason") else "")]
    checks = t.get("checks") or []
    gain = (t.get("metrics") or {}).get("heldout_gain")
    if t["verdict"] == "accepted" and checks and gain is not None and gain < 0:
        lines.append(f"{indent}  passed: " + "; ".join(checks))
    return lines


def format_status(s: dict[str, Any], *, checks: bool = False) -> str:
    """``job status``: the recipe, then per round its summary and its tasks. With
    ``checks``, every accepted task's passed checks (else only where held-out rose)."""
    spec = s["spec"]
    lines = [f"job {s['job']}  {s['name']!r}",
             f"coordinator {s['coordinator']}  submitted {when(s['submitted_ms'])}",
             f"recipe      {spec['rounds']} rounds x {spec['workers_per_round']} workers, "
             f"{spec['inner_steps']} inner steps, batch {spec['batch_size']} x "
             f"{spec['seq_len']}, lr {spec['lr']:g}, outer lr {spec['outer_lr']:g} "
             f"momentum {spec['outer_momentum']:g}"
             + (f", continues from schedule round {spec['first_round']}"
                if spec.get("first_round") else "")
             + (f", memory {spec['memory']}" if spec.get("memory", "standard") != "standard"
                else "")]
    if not s["coordinated_here"]:
        lines.append("(coordinated by another node: ask it for the rounds)")
        return "\n".join(lines)
    lines.append(f"status      {s['status']}, {len(s['rounds'])} of {spec['rounds']} rounds "
                 f"done" + (f": {s['error']}" if s.get("error") else ""))
    for r in s["rounds"]:
        lines.append(round_summary(r, spec["rounds"]))
        for t in r["tasks"]:
            lines += task_verdict_lines(t)
            if checks and t["verdict"] == "accepted" and t.get("checks") and \
                    not ((t.get("metrics") or {}).get("heldout_gain", 0) < 0):
                lines.append("      passed: " + "; ".join(t["checks"]))
        for peer, w in sorted((r.get("workers") or {}).items()):  # measured vs claimed
            rate = "?" if w.get("tokens_per_s") is None else f"{w['tokens_per_s']:.0f}"
            claim = "?" if w.get("claimed_tflops") is None else f"{w['claimed_tflops']:g}"
            fitted = ("" if w.get("overhead_s") is None or w.get("fit_tokens_per_s") is None
                      else f" (fit: {w['overhead_s']:.1f} s a task + "
                           f"{w['fit_tokens_per_s']:.0f} tokens/s)")
            lines.append(f"      {short_peer(peer):<18} {rate} tokens/s measured{fitted}, "
                         f"{claim} TFLOP/s claimed")
        if r.get("left_out"):  # specs/jobs.md, "Sizing a round"
            lines.append("      left out (fixed cost beyond the round): "
                         + ", ".join(short_peer(p) for p in r["left_out"]))
    if s.get("live"):
        lines += live_lines(s["live"], spec["rounds"], tty=False, now_ms=None)
    lines.append(f"version     {s['base']}")
    return "\n".join(lines)


def live_task_line(t: dict[str, Any], *, tty: bool) -> str:
    step, steps = t.get("step"), t.get("steps")
    parts = [f"  {t['task']:<8} {short_peer(t['worker']):<18} {t['state']:<9}"]
    if step is not None and steps:
        if tty:
            filled = round(min(1.0, step / steps) * BAR_WIDTH)
            parts.append("[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]")
        parts.append(f"step {step}/{steps}")
    if t.get("loss") is not None:
        parts.append(f"loss {t['loss']:.3f}")
    if rate := _rate(t.get("tokens"), t.get("wall_ms")):
        parts.append(rate)
    if t.get("reason") and t["state"] in ("refused", "lost"):
        parts.append(f"({t['reason'][:60]})")
    return "  ".join(parts)


def live_lines(live: dict[str, Any], rounds: int, *, tty: bool,
               now_ms: int | None) -> list[str]:
    elapsed = "" if now_ms is None else f"  {max(0, now_ms - live['started_ms']) / 1000:.0f} s"
    head = f"round {live['round'] + 1}/{rounds}  {live['phase']}{elapsed}"
    return [head] + [live_task_line(t, tty=tty) for t in live["tasks"]]


class JobWatch:
    """Draws a job's progress on `stream` from successive status answers."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_ms: Callable[[], int] = lambda: int(time.time() * 1000)) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.clock = clock
        self.wall_ms = wall_ms
        self.rounds_shown = 0
        self.block = 0  # lines of the live block drawn last (tty), to redraw over
        self.plain: dict[str, tuple[str, float]] = {}  # task -> (state, when printed)
        self.phase: tuple[int, str] | None = None

    def _erase(self) -> None:
        if self.block:
            self.stream.write(f"\033[{self.block}F\033[J")  # up to the block's start, clear
            self.block = 0

    def update(self, s: dict[str, Any]) -> None:
        rounds = s["spec"]["rounds"]
        finished = s.get("rounds") or []
        if self.tty:
            self._erase()
        for r in finished[self.rounds_shown:]:
            self.stream.write(round_summary(r, rounds) + "\n")
            for t in r["tasks"]:
                self.stream.write("\n".join(task_verdict_lines(t)) + "\n")
        self.rounds_shown = len(finished)
        live = s.get("live")
        if live and s.get("status") == "running":
            if self.tty:
                lines = live_lines(live, rounds, tty=True, now_ms=self.wall_ms())
                self.stream.write("\n".join(lines) + "\n")
                self.block = len(lines)
            else:
                self._plain(live, rounds)
        self.stream.flush()

    def _plain(self, live: dict[str, Any], rounds: int) -> None:
        now = self.clock()
        phase = (live["round"], live["phase"])
        if phase != self.phase:
            self.phase = phase
            self.plain.clear()
            self.stream.write(live_lines(live, rounds, tty=False, now_ms=None)[0] + "\n")
        for t in live["tasks"]:
            key = f"{t['task']}/{t['worker']}"
            state, at = self.plain.get(key, ("", -PLAIN_EVERY_S))
            if t["state"] != state or (t["state"] == "training"
                                       and now - at >= PLAIN_EVERY_S):
                self.plain[key] = (t["state"], now)
                self.stream.write(live_task_line(t, tty=False) + "\n")

    def close(self, s: dict[str, Any] | None = None) -> None:
        if self.tty:
            self._erase()
        if s is not None:
            self.stream.write(f"job {s['job'][:SHORT]} {s['status']}"
                              + (f": {s['error']}" if s.get("error") else "")
                              + f"; version {s['base'][:SHORT]}\n")
        self.stream.flush()
