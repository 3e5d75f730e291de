"""PNG figures with matplotlib (the optional extra ``llmsample[plot]``), imported only when a plot is asked for."""

from __future__ import annotations

from typing import Any

from llmsample.errors import ConfigError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'llmsample[plot]'") from None
    return plt


CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
             "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "AR PL UMing CN")


def _cjk_font() -> Any:
    """A font that can draw Chinese, if this machine has one."""
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in names), None)


def _label(text: str, cjk: bool) -> str:
    """Text for a figure: as is when a CJK font is there (or not needed), else escaped rather than drawn as boxes."""
    if cjk or all(ord(ch) < 0x2E80 for ch in text):
        return text
    return text.encode("ascii", "backslashreplace").decode()


def _save(fig: Any, path: str) -> None:
    try:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    except OSError as exc:
        raise ConfigError(f"cannot write the plot {path}: {exc.strerror or exc}") from None


def inspect_plot(result: dict[str, Any], path: str) -> None:
    """Seed 002's figure: the sorted top probabilities of the next token under each setting."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    font = _cjk_font()
    if font:
        plt.rcParams["font.sans-serif"] = [font, *plt.rcParams["font.sans-serif"]]
    steps = result["steps"]
    fig, axes = plt.subplots(len(steps), 1, figsize=(8, 3.2 * len(steps)), squeeze=False)
    for ax, step in zip(axes[:, 0], steps):
        for variant in step["variants"]:
            probs = [t["prob"] for t in variant["top"]]
            ax.plot(range(1, len(probs) + 1), probs, marker="o", markersize=3,
                    label=_label(variant["label"] if variant["entropy"] is None else  # a server's top-N only
                                 f"{variant['label']} (H={variant['entropy']:.2f}, kept {variant['kept']})",
                                 bool(font)))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("rank")
        ax.set_ylabel("probability")
        context = (result["prompt"] + step["context"])[-50:]
        ax.set_title(_label(f"next token after ...{context!r}", bool(font)), fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


SWEEP_METRICS = [("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"),
                 ("repeated_3gram_rate", "repeated 3-gram rate"), ("mean_entropy", "mean entropy (nats)"),
                 ("perplexity", "perplexity of chosen tokens"), ("mean_length", "mean length (tokens)")]


def sweep_plot(rows: list[dict[str, Any]], grid: dict[str, list], path: str) -> None:
    """Each metric against the first grid parameter, one line per combination of the others."""
    plt = _pyplot()
    names = list(grid)
    x_name, others = names[0], names[1:]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row["point"][n] for n in others), []).append(row)
    for ax, (key, title) in zip(axes.flat, SWEEP_METRICS):
        for group, members in groups.items():
            label = ", ".join(f"{n}={v}" for n, v in zip(others, group)) or None
            values = [float("nan") if m[key] is None else m[key] for m in members]  # None: the server cannot say
            ax.plot([m["point"][x_name] for m in members], values, marker="o", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x_name)
        ax.grid(alpha=0.3)
        if others:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
