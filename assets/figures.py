"""
The README's figures, made from the results.json that `python nanofail.py --out_dir DIR` writes.

    python assets/figures.py --example runs/fig-gpt-next --out assets/example.png
    python assets/figures.py --curves runs/fig-gpt-next runs/fig-gpt-reverse ... \\
        --out assets/clever_hans.png
    python assets/figures.py --attention runs/attn-demo runs/attn-g23-tl --out assets/attention.png
    python assets/figures.py --odds assets/runs/g23-tl-s*      # a table: k of n runs reached 0.95
    python assets/figures.py --reads runs/attn-g23-tl          # a table: which edges are read
    python assets/figures.py --lens runs/attn-g23-tl           # a table: where the answers appear
    python assets/figures.py --probe runs/attn-g23-tl          # a table: where the plan's nodes are

--example draws the worked example of a run's last evaluation: the test graph, the true path and the
model's answer. --curves draws the paper's learning-dynamics picture, one panel per run. --attention
draws which prompt tokens the answer positions of GPT runs (their ckpt.pt) attend to on the worked
example, with a box where each should read. Three tables look inside a GPT run over many test
graphs: --reads, how much each position reads each edge of the path against the same edge of
another arm; --lens, after which block each answer row names its answer (the logit lens); --probe,
where a linear probe finds the plan's nodes in the residual stream. Training does not need
matplotlib; this script does for its figures (pip install matplotlib).
"""
import functools
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nanofail as nf  # noqa: E402


def subplots(*args, **kwargs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise nf.UsageError("the figures need matplotlib, which training does not: "
                            "pip install matplotlib")
    return plt.subplots(*args, **kwargs)


def read_results(run_dir):
    try:
        with open(os.path.join(run_dir, "results.json")) as f:
            res = json.load(f)
        return nf.Config(**nf.known_knobs(res["config"])), res["history"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise nf.UsageError(f"cannot read {run_dir}/results.json ({type(e).__name__}): "
                            "pass --out_dir folders")


def save(fig, out_path):
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)  # an OSError: one line, exit 2
    fig.savefig(out_path, dpi=110, bbox_inches="tight")
    print(f"wrote {out_path}")


def panel_title(cfg):
    """The run's model, objective and task, and the settings that shape its curve."""
    objective = nf.objective_name(cfg)
    # heads and seed are named only where they differ from it
    preset = nf.Config(preset=cfg.preset, model=cfg.model)
    heads = f", {cfg.n_head} heads" if cfg.model == "gpt" and cfg.n_head != preset.n_head else ""
    seed = f", seed {cfg.seed}" if cfg.seed != preset.seed else ""
    lines = [f"{cfg.model} {objective} G({cfg.deg},{cfg.path_len}), N={cfg.num_nodes}{seed}",
             f"{cfg.n_layer} x {cfg.n_embd}{heads}, batch {cfg.batch_size}, {cfg.n_train:,} graphs",
             f"lr {cfg.lr:g} {'constant' if cfg.min_lr_frac == 1 else 'cosine'}, "
             f"weight decay {cfg.weight_decay:g}"]
    if cfg.beta2 != preset.beta2:  # AdamW's second moment, as the original code had it
        lines[-1] += f", beta2 {cfg.beta2:g}"
    if cfg.teacherless and cfg.hybrid:
        until = f" to step {cfg.hybrid_until:,}" if cfg.hybrid_until else ""
        lines.append(f"{cfg.hybrid:g} of each batch next-token{until}")
    if cfg.fresh_after:
        lines.append(f"new graphs from step {cfg.fresh_after:,}")
    # compared with out_dir, so that a copied results.json reads the same
    start = os.path.dirname(cfg.resume)
    # continued from another run's checkpoint
    if start and os.path.abspath(start) != os.path.abspath(cfg.out_dir):
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
            # a node keeps its colour on every graph, in either order:
            # s, n1, n2, n3, g = C0..C4, n4+ skip C4
            k = 0 if name == "s" else 4 if name == "g" else int(name[1:]) + (int(name[1:]) >= 4)
            ax.plot(steps, [h["forced_token_acc"][i] for h in hist], marker=".", color=f"C{k}",
                    label=f"forced {name}")
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
    """The worked example of a run's last evaluation: s on the left, one row per arm, the true
    path in green, the model's answer dashed red, with the words of nanofail.explain in the
    title."""
    cfg, hist = read_results(run_dir)
    ex = hist[-1]["example"]  # a dict with the model's answer, or (older runs) a text line
    pred = ex["pred"] if isinstance(ex, dict) else hist[-1]["example_pred"]
    edges, path = (a[0].tolist() for a in worked_example(run_dir))
    graph = nf.graph_lines(np.array([edges]), np.array([path]))[0]
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
        ax.annotate("", pos[v], pos[u],
                    arrowprops=dict(arrowstyle="->", color="gray", shrinkA=12, shrinkB=12))
    for node, (x, y) in pos.items():
        ax.text(x, y, str(node), ha="center", va="center", zorder=3, bbox=dict(
            boxstyle="circle", fc="white", ec="green" if node in (s, g) else "black",
            lw=2 if node in (s, g) else 1))
    ax.text(-0.3, 0, "s", ha="right", va="center")
    ax.text(pos[g][0] + 0.3, pos[g][1], "goal", ha="left", va="center")
    ax.set_title(f"{graph}\nmodel: {' '.join(map(str, pred))} "
                 f"({nf.explain(edges, path, pred, cfg.reverse)})", fontsize=8)
    ax.set(xlim=(-0.7, cfg.path_len + 0.2), ylim=(-cfg.deg / 2 - 0.1, cfg.deg / 2 + 0.1))
    ax.axis("off")
    ax.legend(loc="lower left", fontsize=8, frameon=False)
    save(fig, out_path)


# ----------------------------------------------------------------------------- attention maps
# Which prompt tokens each answer position reads: the softmax weights of every GPT layer, recomputed
# from the blocks' own modules (the model runs them fused, in F.scaled_dot_product_attention).

def residual_streams(model, x):
    """The residual stream of a GPT for input x (B, T): n_layer + 1 tensors (B, T, C), the one
    entering each block, then the last block's output (what enters ln_f)."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
             for m in [*model.blocks, model.ln_f]]
    try:  # a hook left behind would go on collecting at every later forward pass
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def attention_probs(block, resid):
    """softmax(q k^T / sqrt(head_size)) of one block under the causal mask, (B, n_head, T, T), and
    its values v (B, n_head, T, head_size). resid: the residual stream entering the block."""
    B, T, C = resid.shape
    # the split of Block.attn: q, k, v side by side in qkv's output, each cut into n_head heads
    q, k, v = (t.view(B, T, block.n_head, C // block.n_head).transpose(1, 2)
               for t in block.qkv(block.ln_1(resid)).split(C, dim=2))
    future = torch.ones(T, T, dtype=torch.bool, device=resid.device).triu(1)  # is_causal=True
    scores = (q @ k.transpose(-2, -1) / math.sqrt(C // block.n_head)).masked_fill(future, -math.inf)
    return scores.softmax(-1), v


def attention_output(block, resid):
    """block.attn(block.ln_1(resid)) rebuilt from attention_probs: weights @ v, heads merged,
    then block.proj."""
    w, v = attention_probs(block, resid)
    B, n_head, T, head_size = v.shape
    return block.proj((w @ v).transpose(1, 2).reshape(B, T, n_head * head_size))


@torch.no_grad()
def attention_weights(model, x):
    """The attention probabilities of every layer of a GPT for input rows x (B, T): a tensor
    (B, n_layer, n_head, T, T) whose [b, l, h, t] holds the weights position t of row b puts on
    positions 0..t in head h of layer l. Computed in float32 eval mode, and checked against each
    block's own attention output."""
    model.float().eval()  # the weights inference uses; float32, which the check's tolerance assumes
    weights = []
    for block, resid in zip(model.blocks, residual_streams(model, x)[:-1]):  # into each block
        # a Block changed in nanofail.py (a bias, rotary positions...) must not draw a wrong map
        own = block.attn(block.ln_1(resid))
        if not torch.allclose(attention_output(block, resid), own, atol=1e-5):
            raise RuntimeError("attention_weights no longer reproduces Block.attn: update it")
        weights.append(attention_probs(block, resid)[0])
    return torch.stack(weights, 1)


def load_gpt(run_dir):
    """A run's Config and trained GPT, from RUN_DIR/ckpt.pt."""
    ckpt = nf.load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    cfg = nf.Config(**nf.known_knobs(ckpt["config"]))
    if cfg.model != "gpt":  # a Mamba has no attention to draw
        raise nf.UsageError(f"{run_dir} is a {cfg.model} run: attention maps are for GPT runs only")
    P = nf.prompt_length(cfg.deg, cfg.path_len)  # the prompt: 3 tokens an edge, then / s g =
    # the sizes train() built it with: N node labels and | = / $, every position but the last
    model = nf.build_model(cfg, vocab_size=cfg.num_nodes + 4, block_size=P + cfg.path_len - 1)
    model.load_state_dict(ckpt["model"])
    return cfg, model


def worked_example(run_dir):
    """The graph of a run's last worked example: edges (1, E, 2), path (1, L). results.json holds
    it as a line of the original text format, or as a dict {"edges": [[u, v], ...], "path": [...]}
    (nanofail's newer results)."""
    _, hist = read_results(run_dir)
    example, name = hist[-1]["example"], f"{run_dir}/results.json"
    if not isinstance(example, dict):
        return nf.parse_graphs(example, name)
    try:  # the dict, written as a text line: the same parser checks it, a bad graph reads the same
        line, = nf.graph_lines(np.array([example["edges"]]), np.array([example["path"]]))
        return nf.parse_graphs(line, name)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise nf.UsageError(f"{name}: the worked example is not a graph ({type(e).__name__})")


def token_names(tokens, num_nodes):
    """Token ids -> the strings a reader sees: node labels and | = / $."""
    symbol = dict(zip(nf.tok(num_nodes).values(), "|=/$"))  # tok's order: pipe, eq, slash, dollar
    return [symbol.get(t, str(t)) for t in tokens.tolist()]


def expected_reads(edges, path, cfg):
    """Where each answer row should read, in the order the rows predict: a list of boxes (first
    column, width) in the prompt. s and g: their token after '/'. Every other node n_i: first the
    edge its objective looks up (its two tokens u v), then the other edge that holds n_i. Next-token
    runs read n_i as the child of the input before it, edge (n_{i-1}, n_i); teacherless and reverse
    runs as the parent of the next node back from g, edge (n_i, n_{i+1})."""
    E, path = len(edges), np.asarray(path).tolist()
    at = {(u, v): 3 * j for j, (u, v) in enumerate(edges.tolist())}  # edge j is tokens 3j, 3j+1
    child = not (cfg.teacherless or cfg.reverse)  # teacher forcing hands the row the node before
    reads = []
    for i in range(1, len(path) - 1):  # n_i sits in two edges: as a child, then as a parent
        edges_of_n = [(at[(path[i - 1], path[i])], 2), (at[(path[i], path[i + 1])], 2)]
        reads.append(edges_of_n if child else edges_of_n[::-1])
    # the prompt ends u v / s g =: the last edge has no '|', so s sits at 3E and g at 3E + 1
    reads = [[(3 * E, 1)]] + reads + [[(3 * E + 1, 1)]]
    return reads[::-1] if cfg.reverse else reads


def box_weight(w, reads, k):
    """w (..., L, P) -> the weight each answer row puts in its k-th box, 0 where it has none."""
    rows = [w[..., r, boxes[k][0]:boxes[k][0] + boxes[k][1]].sum(-1) if k < len(boxes)
            else torch.zeros(w.shape[:-2]) for r, boxes in enumerate(reads)]
    return torch.stack(rows, -1)  # (..., L)


def model_inputs(cfg, edges, path):
    """Graphs as a run's model reads them: the token rows seq (n, P+L), the prompt length P and the
    inputs x (n, P+L-1) of its objective (teacher forcing, or '$' for the answer)."""
    seq, P = nf.encode(edges, path, cfg.num_nodes, cfg.reverse)
    return seq, P, nf.make_inputs(torch.from_numpy(seq), P, cfg.teacherless, cfg.num_nodes)


def test_graphs(cfg):
    """A run's test graphs, drawn again from its seed or read from its --test_file: edges (n, E, 2),
    path (n, L)."""
    # the test set is drawn before the training set, so one training graph leaves it as it was and
    # spares drawing the run's whole pool; a training file given alone is read: the test set was
    # drawn apart from it
    given = cfg.train_file if not cfg.test_file else ""
    alone = nf.replace(cfg, n_train=1, fresh_after=0, train_file=given)
    return nf.make_splits(alone, log=lambda *_: None)[1]


def test_graph(cfg, k):
    """Test graph k of a run: edges (1, E, 2), path (1, L)."""
    edges, path = test_graphs(cfg)
    if not 0 <= k < len(path):
        raise nf.UsageError(f"--graph {k}: the run has test graphs 0 to {len(path) - 1}")
    return edges[k:k + 1], path[k:k + 1]


def attention_panel(run_dir, graph=None):
    """What one panel of --attention draws: the answer rows' attention on the prompt tokens of the
    run's worked example (or of its test graph `graph`), in the head (and layer) that reads the
    rows' nodes off the edges most."""
    cfg, model = load_gpt(run_dir)
    # the worked example is the first test graph the model gets wrong: a winner's failure
    edges, path = worked_example(run_dir) if graph is None else test_graph(cfg, graph)
    if path.shape[1] != cfg.path_len or edges.shape[1] != cfg.deg * (cfg.path_len - 1):
        raise nf.UsageError(f"{run_dir}: the worked example is not G({cfg.deg},{cfg.path_len})")
    seq, P, x = model_inputs(cfg, edges, path)
    # rows: positions P-1 .. P+L-2, each predicting one answer token; columns: the prompt only
    w = attention_weights(model, x)[0, :, :, P - 1:, :P]  # (n_layer, n_head, L, P)
    reads = expected_reads(edges[0], path[0], cfg)
    solid, dashed = box_weight(w, reads, 0), box_weight(w, reads, 1)  # (n_layer, n_head, L) each
    # the lookup head: most weight on the rows' edges, either one (s and g copy, look nothing up);
    # one head, not the layer's mean, since one head can do a layer's lookup alone
    lookups = [r for r, boxes in enumerate(reads) if len(boxes) == 2] or list(range(len(reads)))
    layer, head = divmod(int((solid + dashed)[..., lookups].mean(-1).argmax()), cfg.n_head)
    names = nf.position_names(cfg.path_len, cfg.reverse)  # the rows, in the order they predict
    answer = path[0][::-1] if cfg.reverse else path[0]
    return dict(cfg=cfg, w=w[layer, head], reads=reads, where=(layer, head),
                in_box=(solid[layer, head], dashed[layer, head]),
                mass=(solid[layer, head, lookups].mean(), dashed[layer, head, lookups].mean()),
                rows=[f"{n} = {v}" for n, v in zip(names, answer)],
                columns=token_names(seq[0, :P], cfg.num_nodes))


def draw_attention(ax, cfg, w, reads, where, in_box, mass, rows, columns):
    """One panel: the head's attention weights as a heat map, boxes around where each row should
    read (solid: its objective's lookup, dashed: the other edge of its node), and on the right the
    weight each row puts in them."""
    from matplotlib.patches import Rectangle  # called after subplots: matplotlib is there
    im = ax.imshow(w.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for r, boxes in enumerate(reads):  # outlines leave the weight under them visible
        for (c, n), ls in zip(boxes, ("-", "--")):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), n, 1, fill=False, ec="crimson", lw=2, ls=ls))
    # the token strings as ticks: a box can be checked against the edge list by eye
    ax.set_xticks(range(len(columns)), columns, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set(xlabel="prompt token (read)", ylabel="answer row (predicts)")
    right = ax.twinx()  # the same rows, labelled on the right with their weight in the boxes
    right.set(ylim=ax.get_ylim(), ylabel="weight in the boxes: solid, dashed")
    weights = [f"{a:.2f}, {b:.2f}" if len(boxes) == 2 else f"{a:.2f}"
               for a, b, boxes in zip(in_box[0].tolist(), in_box[1].tolist(), reads)]
    right.set_yticks(range(len(rows)), weights, fontsize=8)
    lookup = ("edge (n_{i-1}, n_i), n_i read as a child" if not (cfg.teacherless or cfg.reverse)
              else "edge (n_i, n_{i+1}), n_i read as a parent")
    # the run, the head shown and why, and what the marks mean
    ax.set_title(f"{panel_title(cfg)}\nlayer {where[0] + 1}/{cfg.n_layer}, head {where[1] + 1}/"
                 f"{cfg.n_head}: the head with the most weight in the boxes\nlookup rows: "
                 f"{mass[0]:.0%} of their attention in the solid box, {mass[1]:.0%} in the dashed"
                 f"\nsolid: the {lookup}; dashed: n_i's other edge; s, g: after '/'", fontsize=8)
    return im


def plot_attention(run_dirs, out_path, graph=None):
    """One panel per run, side by side, each as wide as its prompt, with one colour bar."""
    panels = [attention_panel(run_dir, graph) for run_dir in run_dirs]  # all read before drawing
    widths = [len(p["columns"]) for p in panels]  # so that a token is as wide in every panel
    fig, axes = subplots(1, len(panels), figsize=(0.3 * sum(widths) + 2.5 * len(panels), 4.2),
                         squeeze=False, gridspec_kw=dict(width_ratios=widths), layout="constrained")
    ims = [draw_attention(ax, **p) for ax, p in zip(axes[0], panels)]
    # every panel maps 0..1 to the same colours, so one bar serves them all
    fig.colorbar(ims[-1], ax=axes[0].tolist(), shrink=0.8, label="attention weight")
    save(fig, out_path)


def depth_and_arm(edges, path, n_labels):
    """Of every label of each graph, edges (B, E, 2), path (B, L): its depth (s 0, its children 1,
    ...) and its arm (the child of s it hangs from); -1 for labels not in the graph and for s's
    arm. Two (B, n_labels) arrays."""
    B, L = path.shape
    depth, arm = np.full((B, n_labels), -1), np.full((B, n_labels), -1)
    depth[np.arange(B), path[:, 0]] = 0
    u, v = edges[..., 0], edges[..., 1]
    for _ in range(L - 1):  # an arm is L - 1 edges long: its end is reached in as many sweeps
        du, au = np.take_along_axis(depth, u, 1), np.take_along_axis(arm, u, 1)
        np.put_along_axis(depth, v, np.where(du >= 0, du + 1, -1), 1)
        np.put_along_axis(arm, v, np.where(du == 0, v, au), 1)  # a child of s starts its arm
    return depth, arm


def edge_reads(run_dir, n_graphs=500):
    """How much each position after the edge list reads each edge of the path, over a run's first
    n_graphs test graphs. Rows r: s and g of the prompt, then the answer rows (L + 2 in all);
    e_k = (path[k], path[k+1]), the k-th edge of the arm to g. Returns cfg, then on and off, each
    (n_layer, n_head, L + 2, L - 1): the mean weight on e_k's two labels, and on the k-th edge of
    another arm (the control: a head that reads both alike cannot choose the arm)."""
    cfg, model = load_gpt(run_dir)
    edges, path = (t[:n_graphs] for t in test_graphs(cfg))
    x = model_inputs(cfg, edges, path)[2]
    (B, E, _), L = edges.shape, cfg.path_len
    # rows from s (token 3E) on; columns: edge j's u v at 3j, 3j+1 (3j+2 is its '|')
    w = attention_weights(model, x)[..., 3 * E:, :3 * E].unflatten(-1, (E, 3))[..., :2].sum(-1)
    depth = depth_and_arm(edges, path, cfg.num_nodes)[0]
    links = np.stack([path[:, :-1], path[:, 1:]], -1)  # (B, L-1, 2): e_0 ... e_{L-2}
    is_link = (edges[:, None] == links[:, :, None]).all(-1)  # (B, L-1, E)
    at_depth = np.take_along_axis(depth, edges[..., 0], 1)[:, None] == np.arange(L - 1)[:, None]
    is_other = at_depth & ~is_link  # the other arms' edges at the same depth: deg - 1 of them
    on = torch.einsum("blhre,bke->lhrk", w, torch.from_numpy(is_link).float()) / B
    off = torch.einsum("blhre,bke->lhrk", w, torch.from_numpy(is_other).float()) / B
    return cfg, on, off / max(cfg.deg - 1, 1)


def reads_table(run_dir, n_graphs=500):
    """edge_reads as Markdown lines: for each row and edge of the path, the head that reads that
    edge most beyond the edge at its depth on another arm. A lookup shows as one edge read far above
    its control; a head that reads both alike cannot choose the arm."""
    cfg, on, off = edge_reads(run_dir, n_graphs)
    names = nf.position_names(cfg.path_len)
    lines = ["| position | " + " | ".join(f"({a}, {b})" for a, b in zip(names, names[1:])) + " |",
             "|---" * cfg.path_len + "|"]
    rows = ["s (prompt)", "g (prompt)"] + [f"predicts {n}"
                                           for n in nf.position_names(cfg.path_len, cfg.reverse)]
    for r, row in enumerate(rows):
        cells = []
        for k in range(cfg.path_len - 1):
            layer, head = divmod(int((on[..., r, k] - off[..., r, k]).argmax()), cfg.n_head)
            cells.append(f"L{layer + 1}H{head + 1} {on[layer, head, r, k]:.2f} "
                         f"({off[layer, head, r, k]:.2f})")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines + ["", f"mean attention weight on each edge of the path over {n_graphs} test "
                    "graphs, in the head (L layer, H head) that reads it most beyond the edge at "
                    "its depth on another arm (in brackets)"]


@torch.no_grad()
def arm_choice(run_dir, n_graphs=2000):
    """Which nodes a run's answers name, over its first n_graphs test graphs, with its objective's
    inputs (as forced accuracy has them). Returns cfg; per answer position, how often the named
    node is as far from s as the answer (any arm) and how often it is the answer; and how often
    n1 ... n_{L-2} all lie on one arm, right or wrong (a plan picks an arm once); the number of
    graphs."""
    cfg, model = load_gpt(run_dir)
    edges, path = (t[:n_graphs] for t in test_graphs(cfg))
    seq, P = nf.encode(edges, path, cfg.num_nodes, cfg.reverse)
    L = cfg.path_len
    # the forced pass evaluate() scores: the answer rows, with the objective's inputs
    pred = nf.answer_logits(model, torch.from_numpy(seq), P, cfg.teacherless,
                            cfg.num_nodes).argmax(-1).numpy()
    depth, arm = depth_and_arm(edges, path, cfg.num_nodes + 4)  # any token: | = / $ have none
    d, a = np.take_along_axis(depth, pred, 1), np.take_along_axis(arm, pred, 1)
    want = np.arange(L)[::-1] if cfg.reverse else np.arange(L)  # each position's depth
    inner = want[(want > 0) & (want < L - 1)]  # the columns of n1 ... n_{L-2}
    one_arm = (d[:, inner] == want[inner]).all(1) & (a[:, inner] == a[:, inner[:1]]).all(1)
    return cfg, (d == want).mean(0), (pred == seq[:, P:]).mean(0), one_arm.mean(), len(path)


@torch.no_grad()
def after_wrong_n1(run_dir, n_graphs=2000):
    """Greedy decoding of a next-token run: after a wrong n1, is the next node the child of that
    n1 (the lookup, going on along the wrong arm) or the true next node (on G(d,3) that is g, which
    the prompt gives)? Returns (graphs with a wrong n1, lookup rate, true-next rate)."""
    cfg, model = load_gpt(run_dir)
    edges, path = (t[:n_graphs] for t in test_graphs(cfg))
    seq, P = nf.encode(edges, path, cfg.num_nodes)
    pred = model.eval().generate(torch.from_numpy(seq[:, :P]), cfg.path_len).numpy()  # (n, L)
    wrong = np.flatnonzero(pred[:, 1] != path[:, 1])
    # each node's child (every node but s has at most one; s is never a wrong n1)
    children = [dict(e) for e in edges[wrong].tolist()]
    lookup = [c.get(n1) == nxt for c, n1, nxt in zip(children, pred[wrong, 1], pred[wrong, 2])]
    true_next = pred[wrong, 2] == path[wrong, 2]
    return len(wrong), float(np.mean(lookup)), float(np.mean(true_next))


def arms_table(run_dir, n_graphs=2000):
    """arm_choice as Markdown lines: a column per answer position; for a next-token run, what
    greedy decoding does after a wrong n1 (after_wrong_n1)."""
    cfg, at_depth, right, one_arm, n = arm_choice(run_dir, n_graphs)
    names = nf.position_names(cfg.path_len, cfg.reverse)
    lines = ["| answer | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
             "| as far from s (any arm) | " + " | ".join(f"{v:.3f}" for v in at_depth) + " |",
             "| the answer | " + " | ".join(f"{v:.3f}" for v in right) + " |", "",
             f"over {n} test graphs; {' '.join(names[1:-1])} all on one arm: {one_arm:.3f}"]
    if cfg.teacherless or cfg.reverse or cfg.path_len < 3:  # no decoded n1 to follow
        return lines
    k, lookup, true_next = after_wrong_n1(run_dir, n_graphs)
    return lines + [f"greedy decoding, after a wrong n1 ({k} graphs), the next node is the child "
                    f"of that n1: {lookup:.3f}; the true {names[2]}: {true_next:.3f}"]


@torch.no_grad()
def lens(run_dir, n_graphs=500):
    """When each answer appears, over a run's first n_graphs test graphs: the logit lens (each
    block's output read through the model's own ln_f and lm_head) of every answer row. Returns cfg,
    hits (n_layer, L): how often block l's output already names the row's answer (the last block's:
    the forced accuracy), and to_g (n_layer, L): the largest weight a head of block l puts on the
    prompt's g, where the rows can copy what that position holds."""
    cfg, model = load_gpt(run_dir)
    edges, path = (t[:n_graphs] for t in test_graphs(cfg))
    seq, P, x = model_inputs(cfg, edges, path)
    outputs, L = residual_streams(model, x)[1:], cfg.path_len
    answer = torch.from_numpy(seq[:, P:])  # (B, L): rows P-1 .. P+L-2 predict these
    hits = torch.stack([(model.lm_head(model.ln_f(out[:, P - 1:P + L - 1])).argmax(-1) == answer)
                        .float().mean(0) for out in outputs])
    # the prompt ends / s g =, so g sits at P - 2
    to_g = attention_weights(model, x)[:, :, :, P - 1:, P - 2].mean(0).amax(1)  # (n_layer, L)
    return cfg, hits, to_g


def lens_table(run_dir, n_graphs=500):
    """lens as Markdown lines: a row per answer position, a column per block."""
    cfg, hits, to_g = lens(run_dir, n_graphs)
    lines = ["| row | " + " | ".join(f"L{i + 1}" for i in range(cfg.n_layer)) + " |",
             "|---" * (cfg.n_layer + 1) + "|"]
    for r, name in enumerate(nf.position_names(cfg.path_len, cfg.reverse)):
        cells = [f"{h:.2f} (g {a:.2f})" for h, a in zip(hits[:, r].tolist(), to_g[:, r].tolist())]
        lines.append(f"| predicts {name} | " + " | ".join(cells) + " |")
    return lines + ["", f"over {n_graphs} test graphs: how often block L's output, read through "
                    "ln_f and lm_head, names the row's answer (g: the largest weight a head of "
                    "block L puts on the prompt's g)"]


def probe_accuracy(X, y, n_fit, steps=200):
    """Linear read-outs of labels y (n,) from features X (..., n, C), one for each leading index,
    fit on the first n_fit rows (cross-entropy, Adam, a little L2) and scored on the others: their
    held-out accuracies (...). Fit together, each as it would be alone: their losses are summed."""
    fit = X[..., :n_fit, :]
    X = (X - fit.mean(-2, keepdim=True)) / (fit.std(-2, keepdim=True) + 1e-6)  # the fit rows' scale
    W = torch.zeros(*X.shape[:-2], X.shape[-1], int(y.max()) + 1, requires_grad=True)
    b = torch.zeros(*X.shape[:-2], 1, W.shape[-1], requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=0.05)
    for _ in range(steps):
        logits = X[..., :n_fit, :] @ W + b  # (..., n_fit, labels)
        ce = F.cross_entropy(logits.flatten(0, -2), y[:n_fit].expand(logits.shape[:-1]).flatten(),
                             reduction="sum") / n_fit  # the sum of each probe's mean
        loss = ce + 1e-3 * W.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((X[..., n_fit:, :] @ W + b).argmax(-1) == y[n_fit:]).float().mean(-1)


def probe(run_dir, n_graphs=5000):
    """Where the plan's nodes are held: after each block, how well a linear probe reads n1 ...
    n_{L-2} from the stream at the prompt's g and at the answer rows of those nodes, fit on 4/5 of
    a run's first n_graphs test graphs, scored on the rest. Returns cfg, rows (their names), acc
    (len(rows), n_layer, L - 2) and the number of graphs fit and scored."""
    cfg, model = load_gpt(run_dir)
    if cfg.path_len < 3:
        raise nf.UsageError(f"{run_dir} is a G({cfg.deg},2) run: no n1 between s and g to probe")
    edges, path = (t[:n_graphs] for t in test_graphs(cfg))
    n_fit = 4 * len(path) // 5
    _, P, x = model_inputs(cfg, edges, path)
    with torch.no_grad():
        streams = residual_streams(model, x)[1:]  # after each block
    L, names = cfg.path_len, nf.position_names(cfg.path_len, cfg.reverse)
    rows = {"g (prompt)": P - 2}  # the prompt ends / s g =
    rows.update({f"predicts {n}": P - 1 + i for i, n in enumerate(names) if n[0] == "n"})
    X = torch.stack(streams)[:, :, list(rows.values())].permute(2, 0, 1, 3)  # (rows, layers, B, C)
    labels = [torch.from_numpy(path[:, k]) for k in range(1, L - 1)]  # n1 ... n_{L-2}
    acc = torch.stack([probe_accuracy(X, y, n_fit) for y in labels], -1)  # (rows, layers, L-2)
    return cfg, list(rows), acc, (n_fit, len(path) - n_fit)


def probe_table(run_dir, n_graphs=5000):
    """probe as Markdown lines: a row per position, a column per block, n1/n2/... in a cell."""
    cfg, rows, acc, (n_fit, n_score) = probe(run_dir, n_graphs)
    lines = ["| stream at | " + " | ".join(f"L{i + 1}" for i in range(cfg.n_layer)) + " |",
             "|---" * (cfg.n_layer + 1) + "|"]
    for row, a in zip(rows, acc.tolist()):
        lines.append(f"| {row} | " + " | ".join("/".join(f"{v:.2f}" for v in cell) for cell in a)
                     + " |")
    nodes = "/".join(nf.position_names(cfg.path_len)[1:-1])
    return lines + ["", f"held-out accuracy of a linear probe for {nodes} on the stream after "
                    f"block L ({n_fit} test graphs to fit, {n_score} to score)"]


def clever_hans(forced, exact, deg):
    """The paper's failure, as nanofail's verdict reads it: every node after n1 right with the true
    inputs (forced >= 0.9; read off the edges, or on G(d,3) g copied from the prompt), n1 and exact
    match a guess among the deg arms (within 0.1 of 1/deg). forced: s, n1, ..., g."""
    r = dict(forced_token_acc=forced, test_exact_match=exact)
    return nf.verdict(r, nf.Config(deg=deg, path_len=len(forced))).startswith("Clever Hans")


def odds_table(run_dirs, target=0.95, by=None):
    """The odds behind "k of n seeds" in README/RESULTS, read from the runs' results.json: for each
    run its seed, objective, last evaluation and the first step at which exact match reached
    `target`; then, per objective, how many runs did. by: a budget in steps; a run continued past
    it is read as it stood there. Markdown lines."""
    lines = ["| run | seed | objective | last step | exact match | forced s ... g | forced >= 0.9 "
             f"from step (n1 ...) | reached {target} at step |", "|---" * 8 + "|"]
    outcomes = {}  # objective -> per run: "reached", "early" (stopped before max_iters) or "missed"
    signs = []  # per next-token run: True where it ends on the cheat
    for run_dir in run_dirs:
        try:
            cfg, hist = read_results(run_dir)
        except nf.UsageError as e:  # a run that wrote nothing yet is a row, not the end
            lines.append(f"| {run_dir} | | | | | {e} | | |")
            continue
        hist = [h for h in hist if by is None or h["step"] <= by]  # the evaluations in the budget
        objective, end = nf.objective_name(cfg), min(cfg.max_iters, math.inf if by is None else by)
        if not hist:  # nothing evaluated yet by then: counted, as a run stopped early
            outcomes.setdefault(objective, []).append("early")
            row = f"| {run_dir} | {cfg.seed} | {objective} | no evaluation by step {by} |||||"
            lines.append(row)
            continue
        at = next((h["step"] for h in hist if h["test_exact_match"] >= target), None)
        last = hist[-1]
        if objective == "next-token":
            signs.append(clever_hans(last["forced_token_acc"], last["test_exact_match"], cfg.deg))
        outcomes.setdefault(objective, []).append(
            "reached" if at is not None else "early" if last["step"] < end else "missed")
        forced = " ".join(f"{a:.3f}" for a in last["forced_token_acc"])
        # the plan's links: the first evaluation where each inner position is right 9 times in 10
        links = " ".join(str(next((h["step"] for h in hist if h["forced_token_acc"][i] >= 0.9),
                                  "-")) for i in range(1, cfg.path_len - 1))
        lines.append(f"| {run_dir} | {cfg.seed} | {objective} | {last['step']} | "
                     f"{last['test_exact_match']:.3f} | {forced} | {links} | {at or 'no'} |")
    # a run stopped early (on a plateau, or still going) is counted, and said apart
    counts = [f"{objective}: {o.count('reached')} of {len(o)} runs reached {target}"
              + (f"; {o.count('early')} of the others stopped before their max_iters"
                 if "early" in o else "") for objective, o in outcomes.items()]
    if signs:  # next-token runs: did each end on the paper's failure?
        counts.append(f"next-token: {sum(signs)} of {len(signs)} runs end with the Clever-Hans "
                      "signature (every node after n1 >= 0.9; n1, exact match within 0.1 of 1/deg)")
    return lines + [""] + counts


def main(argv=None):
    p = nf.Parser(prog="assets/figures.py",
                  description="The README's figures, from runs' results.json.")
    p.add_argument("--curves", nargs="+", metavar="RUN_DIR",
                   help="learning curves of these runs, 3 panels a row")
    p.add_argument("--example", metavar="RUN_DIR",
                   help="the worked example of this run's last evaluation")
    p.add_argument("--attention", nargs="+", metavar="RUN_DIR",
                   help="what the answer positions of these GPT runs attend to, side by side")
    p.add_argument("--odds", nargs="+", metavar="RUN_DIR",
                   help="print how many of these runs reached exact match 0.95, and when")
    p.add_argument("--reads", metavar="RUN_DIR",
                   help="print which edges of the path the positions of this GPT run read")
    p.add_argument("--lens", metavar="RUN_DIR",
                   help="print after which block each answer of this GPT run appears")
    p.add_argument("--arms", metavar="RUN_DIR",
                   help="print how often this GPT run's answers name a node at the right depth, "
                   "and on one arm")
    p.add_argument("--probe", metavar="RUN_DIR",
                   help="print where in this GPT run a linear probe finds the plan's nodes")
    p.add_argument("--by", type=int, metavar="STEP",
                   help="--odds within a budget: a run continued past STEP is read as it stood "
                        "there")
    p.add_argument("--graph", type=int, metavar="K",
                   help="--attention on test graph K of each run (default: its worked example)")
    p.add_argument("--out", help="the PNG to write")
    args = p.parse_args(argv)
    with nf.reported():
        attention = functools.partial(plot_attention, graph=args.graph)
        odds = functools.partial(odds_table, by=args.by)
        tables = {odds: args.odds, reads_table: args.reads, lens_table: args.lens,
                  probe_table: args.probe, arms_table: args.arms}  # printed
        drawn = {plot_curves: args.curves, draw_example: args.example, attention: args.attention}
        chosen = [(make, runs) for make, runs in {**tables, **drawn}.items() if runs]
        if len(chosen) != 1:  # one figure or table per call: a figure writes its own --out
            raise nf.UsageError("give one of --curves, --example, --attention (figures, with --out "
                                "FILE.png) or --odds, --reads, --lens, --probe, --arms (tables)")
        (make, runs), = chosen
        if args.graph is not None and make is not attention:  # a choice nothing else would use
            raise nf.UsageError("--graph K picks the graph of --attention: add --attention RUN_DIR")
        if args.by is not None and (make is not odds or args.by < 1):
            raise nf.UsageError("--by STEP, a step >= 1, is a budget for --odds RUN_DIR ...")
        if make in tables:
            return print("\n".join(make(runs)))
        if not args.out:
            raise nf.UsageError("--out FILE.png is needed for a figure")
        make(runs, args.out)


if __name__ == "__main__":
    main()
