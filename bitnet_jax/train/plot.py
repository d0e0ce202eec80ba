"""The loss plot of a run (loss.png): optional, and never fatal to training.

matplotlib is not a dependency of the package. `LossPlot` draws after each evaluation when it
can; the first failure (matplotlib missing, an unwritable folder, a bad backend) is reported as
one warning and plotting stays off for the rest of the run, while training goes on.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path


class LossPlot:
    """Redraws `png` from a metrics.jsonl file on demand; warns once per run and then gives up.

    Attributes:
      enabled: False once switched off (by the run config or after a failure).
    """

    def __init__(self, metrics: str | Path, png: str | Path, enabled: bool = True):
        self.metrics, self.png, self.enabled = Path(metrics), Path(png), enabled

    def update(self) -> bool:
        """Redraw the plot; returns whether a PNG was written."""
        if not self.enabled:
            return False
        try:
            plot_metrics(self.metrics, self.png)
        except Exception as exc:  # noqa: BLE001 (a plot must never end a training run)
            self.enabled = False
            hint = ("install matplotlib (pip install matplotlib) to get it"
                    if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}")
            warnings.warn(f"no loss plot for this run ({self.png} is not written): {hint}; "
                          "training goes on.", RuntimeWarning, stacklevel=2)
            return False
        return True


def plot_metrics(metrics: str | Path, png: str | Path) -> None:
    """Plot train loss (and held-out loss) against tokens seen into a PNG.

    Draws on a bare matplotlib Figure (Agg canvas), so pyplot's global backend and figure list,
    e.g. a notebook's, are left alone. Raises ImportError when matplotlib is not installed.
    """
    # Deferred: matplotlib is optional (not a dependency) and slow to import.
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], lw=1, label="train")
    ev = [r for r in rows if "valid_loss" in r]
    if ev:
        ax.plot([r["tokens"] for r in ev], [r["valid_loss"] for r in ev], "o-", label="held-out")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
