"""
The README's figures, made from the results.json that `python nanofail.py --out_dir DIR` writes.

    python assets/figures.py --example runs/fig-gpt-next --out assets/example.png
    python assets/figures.py --curves runs/fig-gpt-next runs/fig-gpt-reverse ... --out assets/clever_hans.png

--example draws the worked example of a run's last evaluation: the test graph, the true path and the
model's answer. --curves draws the paper's learning-dynamics picture, one panel per run. Training does
not need matplotlib; this script does (pip install matplotlib).
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nanofail as nf  # noqa: E402


def subplots(*args, **kwargs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise nf.UsageError("the figures need matplotlib, which training does not: pip install matplotlib")
    return plt.subplots(*args, **kwargs)


def read_results(run_dir):
    try:
        with open(os.path.join(run_dir, "results.json")) as f:
            res = json.load(f)
        return nf.Config(**nf.known_knobs(res["config"])), res["history"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise nf.UsageError(f"cannot read {run_dir}/results.json ({type(e).__name__}): pass --out_dir folders")


def save(fig, out_path):
    nf.make_dir(os.path.dirname(out_path) or ".", "out")
    fig.savefig(out_path, dpi=110, bbox_inches="tight")
    print(f"wrote {out_path}")


def panel_title(cfg):
    """The run's model, objective and task, and the settings that shape its curve."""
    objective = "teacherless" if cfg.teacherless else "reverse" if cfg.reverse else "next-token"
    preset = nf.Config(preset=cfg.preset, model=cfg.model)  # heads and seed are named only where they differ from it
    heads = f", {cfg.n_head} heads" if cfg.model == "gpt" and cfg.n_head != preset.n_head else ""
    seed = f", seed {cfg.seed}" if cfg.seed != preset.seed else ""
    lines = [f"{cfg.model} {objective} G({cfg.deg},{cfg.path_len}){seed}",
             f"{cfg.n_layer} x {cfg.n_embd}{heads}, batch {cfg.batch_size}, {cfg.n_train:,} graphs",
             f"lr {cfg.lr:g} {'constant' if cfg.min_lr_frac == 1 else 'cosine'}, weight decay {cfg.weight_decay:g}"]
    if cfg.fresh_after:
        lines.append(f"new graphs from step {cfg.fresh_after:,}")
    start = os.path.dirname(cfg.resume)  # compared with out_dir, so that a copied results.json reads the same
    if start and os.path.abspath(start) != os.path.abspath(cfg.out_dir):  # continued from another run's checkpoint
        lines.append(f"started from {start}")
    return "\n".join(lines)


def plot_curves(run_dirs, out_path):
    """One panel per run: the test accuracy of every answer position with the training inputs
    (forced) over training, and the exact match of greedy decoding (dashed)."""
    cols = min(3, len(run_dirs))
    rows = -(-len(run_dirs) // cols)
    fig, axes = subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(run_dirs):]:
        ax.axis("off")
    for ax, run_dir in zip(axes.flat, run_dirs):
        cfg, hist = read_results(run_dir)
        steps = [h["step"] for h in hist]
        for i, name in enumerate(nf.position_names(cfg.path_len, cfg.reverse)):
            # a node keeps its colour on every graph, in either order: s, n1, n2, n3, g = C0..C4, n4+ skip C4
            k = 0 if name == "s" else 4 if name == "g" else int(name[1:]) + (int(name[1:]) >= 4)
            ax.plot(steps, [h["forced_token_acc"][i] for h in hist], marker=".", color=f"C{k}", label=f"forced {name}")
        ax.plot(steps, [h["test_exact_match"] for h in hist], "k--", lw=2, label="exact match")
        ax.axhline(1 / cfg.deg, color="gray", ls=":", lw=1)
        ax.locator_params(axis="x", nbins=5)
        ax.set(title=panel_title(cfg), xlabel="step", ylim=(-0.02, 1.02))
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7, loc="center right")
    fig.tight_layout()
    save(fig, out_path)


def draw_example(run_dir, out_path):
    """The worked example of a run's last evaluation: s on the left, one row per arm, the true path in
    green, the model's answer dashed red, with the words of nanofail.explain in the title."""
    cfg, hist = read_results(run_dir)
    graph, pred = hist[-1]["example"], hist[-1]["example_pred"]
    edges, path = (a[0].tolist() for a in nf.parse_graphs(graph))
    child, s, g = dict(edges), path[0], path[-1]
    pos = {s: (0, 0)}
    for row, node in enumerate(v for u, v in edges if u == s):  # walk each arm out from s
        for x in range(1, cfg.path_len):
            pos[node], node = (x, row - (cfg.deg - 1) / 2), child.get(node)
    fig, ax = subplots(figsize=(1.4 * cfg.path_len + 1, 0.7 * cfg.deg + 1.2))
    answer = pred[::-1] if cfg.reverse else pred
    for nodes, style in ((path, dict(color="green", lw=6, alpha=0.4, label="true path")),
                         (answer, dict(color="red", lw=2, ls="--", label="model"))):
        xy = np.array([pos.get(n, (np.nan, np.nan)) for n in nodes], dtype=float)
        ax.plot(xy[:, 0], xy[:, 1], zorder=1, **style)
    for u, v in edges:
        ax.annotate("", pos[v], pos[u], arrowprops=dict(arrowstyle="->", color="gray", shrinkA=12, shrinkB=12))
    for node, (x, y) in pos.items():
        ax.text(x, y, str(node), ha="center", va="center", zorder=3, bbox=dict(
            boxstyle="circle", fc="white", ec="green" if node in (s, g) else "black", lw=2 if node in (s, g) else 1))
    ax.text(-0.3, 0, "s", ha="right", va="center")
    ax.text(pos[g][0] + 0.3, pos[g][1], "goal", ha="left", va="center")
    ax.set_title(f"{graph}\nmodel: {' '.join(map(str, pred))} ({nf.explain(graph, pred, cfg.reverse)})", fontsize=8)
    ax.set(xlim=(-0.7, cfg.path_len + 0.2), ylim=(-cfg.deg / 2 - 0.1, cfg.deg / 2 + 0.1))
    ax.axis("off")
    ax.legend(loc="lower left", fontsize=8, frameon=False)
    save(fig, out_path)


def main(argv=None):
    p = nf.Parser(description="The README's figures, from runs' results.json.")
    p.add_argument("--curves", nargs="+", metavar="RUN_DIR", help="learning curves of these runs, 3 panels a row")
    p.add_argument("--example", metavar="RUN_DIR", help="the worked example of this run's last evaluation")
    p.add_argument("--out", required=True, help="the PNG to write")
    args = p.parse_args(argv)
    with nf.reported():
        if bool(args.curves) == bool(args.example):
            raise nf.UsageError("give one of --curves RUN_DIR ... or --example RUN_DIR")
        plot_curves(args.curves, args.out) if args.curves else draw_example(args.example, args.out)


if __name__ == "__main__":
    main()
