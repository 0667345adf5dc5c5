"""Training curves as a PNG (matplotlib, headless Agg backend), from a Trainer's ``state.log_history``."""

from __future__ import annotations

from pathlib import Path

CURVES = {
    "reward": "reward (train rollouts)",
    "accuracy": "answer accuracy (train rollouts)",
    "format_rate": "format rate (train rollouts)",
    "eval_accuracy": "eval accuracy",
    "eval_format_rate": "eval format rate",
    "eval_reward": "eval reward",
}


def plot_training_curves(log_history: list[dict], path: str | Path) -> Path:
    """One panel per metric of ``CURVES`` that was logged, against the optimizer step; three panels a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [key for key in CURVES if any(key in h for h in log_history)]
    cols = max(1, min(3, len(present)))
    rows = max(1, -(-len(present) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(present) :]:
        ax.axis("off")
    for ax, key in zip(axes.flat, present):
        points = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None)
        ax.set(title=CURVES[key], xlabel="optimizer step")
        ax.grid(alpha=0.3)
    if not present:
        axes.flat[0].text(0.5, 0.5, "no reward metrics logged", ha="center", va="center")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
