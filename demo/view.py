"""Live terminal view of the demo (rich): balance per layer, rollouts, tokens, failed steps."""

from __future__ import annotations

import numpy as np
from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from expertplane.demo.timeline import Timeline


def render(timeline: Timeline, elapsed: float, duration: float, mode: str):
    """A renderable for ``rich.live.Live``: header, per-layer table, last rollouts."""
    header = Table.grid(expand=True)
    header.add_column()
    header.add_column(justify="right")
    last = timeline.samples[-1] if timeline.samples else None
    header.add_row(
        f"[bold]ExpertPlane demo[/] ({mode})  t={elapsed:5.1f}s / {duration:.0f}s",
        f"plan v{last.plan_version if last else '-'}  tokens {timeline.tokens:,}  "
        f"steps {timeline.steps:,}  [{'red' if timeline.failed_steps else 'green'}]failed steps "
        f"{timeline.failed_steps}[/]",
    )
    layers = Table(title="max / mean GPU load per MoE layer", expand=True)
    layers.add_column("layer", justify="right")
    layers.add_column("now", justify="right")
    layers.add_column("initial plan (control)", justify="right")
    layers.add_column("fresh plan (predicted)", justify="right")
    if last is not None:
        for i, (b, c, p) in enumerate(zip(last.balance, last.control, last.predicted)):
            layers.add_row(str(i), _colour(b), _colour(c), f"{p:.3f}")
        layers.add_row("mean", _colour(float(np.mean(last.balance))),
                       _colour(float(np.mean(last.control))), f"{np.mean(last.predicted):.3f}",
                       style="bold")
    rollouts = Table(title="rebalance decisions and rollouts", expand=True)
    for name in ("t (s)", "version", "state", "gain", "slots moved", "MiB moved", "prepare ms", "commit ms"):
        rollouts.add_column(name, justify="right")
    for r in timeline.rollouts[-6:]:
        rollouts.add_row(f"{r.t:.1f}", f"{r.from_version}->{r.to_version}", r.state, f"{r.gain:.1%}",
                         str(r.slots_moved), f"{r.bytes_moved / 2**20:.1f}",
                         f"{r.prepare_seconds * 1e3:.0f}", f"{r.commit_seconds * 1e3:.0f}")
    return Panel(Group(header, layers, rollouts))


def _colour(balance: float) -> str:
    colour = "green" if balance < 1.15 else "yellow" if balance < 1.5 else "red"
    return f"[{colour}]{balance:.3f}[/]"
