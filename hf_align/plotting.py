"""Training curves as a PNG (matplotlib, headless Agg backend), from a Trainer's ``state.log_history``."""

from __future__ import annotations

from pathlib import Path

CURVES = [
    ("reward", "reward (train rollouts)"),
    ("accuracy", "answer accuracy (train rollouts)"),
    ("format_rate", "format rate (train rollouts)"),
    ("eval_accuracy", "eval accuracy"),
    ("eval_format_rate", "eval format rate"),
    ("eval_reward", "eval reward"),
]


def plot_training_curves(log_history: list[dict], path: str | Path, curves=CURVES) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(k, title) for k, title in curves if any(k in h for h in log_history)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = max(1, min(3, len(present)))
    rows = max(1, -(-len(present) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(present) :]:
        ax.axis("off")
    for ax, (key, title) in zip(axes.flat, present):
        points = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if not present:
        axes.flat[0].text(0.5, 0.5, "no reward metrics logged", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
