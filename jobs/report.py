"""Where jobs leave their results: the rows as JSON and a markdown report beside them."""

from __future__ import annotations

import json
from pathlib import Path


def write_rows(path: str | Path, rows: list[dict], report: str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text(report if report.endswith("\n") else report + "\n")
    return out


def plot_content_gap(run: str | Path, window: int = 50) -> dict[str, list[tuple[int, float]]]:
    """A training run's content gap -- each logged ``*own_minus_foreign``: the NLL with the sample's own rows minus
    with another sample's rows at the same k -- against the step, with its running mean over ``window`` steps, as
    ``run/content_gap.png``, and the held-out measurements of ``--val-every`` in a panel beside it. Reads every
    TensorBoard file of the run (a resumed run continues in a new one; the later file wins a repeated step). Returns
    the series plotted; {} and no plot when the run logs no gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = Path(run)
    points: dict[str, dict[int, float]] = {}
    # events.out.tfevents.<unix time>.<host>.<pid>.<n>: oldest first
    for events in sorted((run / "tb").glob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[3])):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if tag.endswith("own_minus_foreign"):
                points.setdefault(tag.removeprefix("train/"), {}).update(
                    {event.step: event.value for event in accumulator.Scalars(tag)})
    series = {name: sorted(by_step.items()) for name, by_step in points.items()}
    if not series:
        return {}
    held_out = {name.removeprefix("val/"): pairs for name, pairs in series.items() if name.startswith("val/")}
    training = {name: pairs for name, pairs in series.items() if not name.startswith("val/")}
    # the held-out points (--val-every) get their own panel: they move by thousandths, the training stream by tenths
    fig, axes = plt.subplots(1, 2 if held_out else 1, figsize=(14 if held_out else 8, 4.5), squeeze=False)
    ax = axes[0, 0]
    for name, pairs in training.items():
        steps, values = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        width = min(window, len(values))
        line, = ax.plot(steps[width - 1:], np.convolve(values, np.ones(width) / width, mode="valid"),
                        label=f"{name} ({width}-step mean)")
        ax.plot(steps, values, color=line.get_color(), alpha=0.2, linewidth=0.7)
    ax.set_title(f"{run.name}: own rows - another sample's rows, training samples")
    for name, pairs in held_out.items():
        axes[0, 1].plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o", label=name)
    if held_out:
        axes[0, 1].set_title("the same on the held-out documents (--val-data)")
    for ax in axes[0]:
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("nats/token (below 0: the rows carry their text)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(run / "content_gap.png", dpi=110)
    plt.close(fig)
    return series
