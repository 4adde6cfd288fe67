"""The research reproduction's figures (matplotlib, Agg backend): reward curves, changed share against steps and
against weight magnitude. Each takes the rows or run records the experiments already wrote to their tables."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(ax, xlabel: str, ylabel: str, title: str | None = None, legend: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def plot_rewards(runs: dict[str, dict], base_reward: float, path: Path, title: str) -> None:
    """Training reward (moving average) and held-out reward (from the base's, at step 0) of each run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (name, run) in enumerate(runs.items()):
        color = f"C{i}"
        rewards = [e["reward"] for e in run["log"] if "reward" in e]
        window = max(1, len(rewards) // 10)
        smooth = [sum(rewards[max(0, j - window + 1):j + 1]) / len(rewards[max(0, j - window + 1):j + 1])
                  for j in range(len(rewards))]
        axes[0].plot(range(1, len(rewards) + 1), smooth, color=color, label=name)
        steps = [0] + [int(s) for s in run["evals"]]
        values = [base_reward] + list(run["evals"].values())
        axes[1].plot(steps, values, marker="o", color=color, label=name)
    axes[0].set_title(f"training reward (moving average, window {max(1, len(rewards) // 10)})")
    axes[1].set_title("held-out sampled reward")
    _style(axes[0], "step", "reward", legend=False)
    _style(axes[1], "step", "reward")
    fig.suptitle(title)
    _save(fig, path)


def plot_growth(rows: list[dict], path: Path) -> None:
    """Experiment 1: share of parameters changed at each checkpoint, bf16 and fp32, beside the precision null."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    steps = [r["step"] for r in rows]
    for key, label in (("changed_bf16", "bf16 diff"), ("changed_null", "precision null (bf16)"),
                       ("changed_fp32_gt_1e-5", "fp32 diff > 1e-5"), ("changed_fp32_any", "fp32, any change")):
        ax.plot(steps, [100 * r[key] for r in rows], marker="o", label=label)
    ax.axhspan(5, 30, color="grey", alpha=0.2, label="paper: 5-30%")
    _style(ax, "training step", "parameters changed (%)", "Share of parameters changed as training lengthens")
    _save(fig, path)


def plot_magnitude(profile, path: Path) -> None:
    """Experiment 1: changed share per |w| decile (a ``sparse_rl.analysis.magnitude_profile``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    deciles = range(1, profile.bins + 1)
    ax.plot(deciles, [100 * v for v in profile.rounded_share], marker="o", label="bf16 diff")
    ax.plot(deciles, [100 * v for v in profile.null_share], marker="s", label="precision null (bf16)")
    if profile.exact_share is not None:
        ax.plot(deciles, [100 * v for v in profile.exact_share], marker="^", label="fp32, any change")
    _style(ax, "|w| decile within each tensor (1 = smallest)", "changed (%)", "Changed share by weight magnitude")
    _save(fig, path)
