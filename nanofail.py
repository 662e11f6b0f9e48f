"""nanofail: "The Pitfalls of Next-Token Prediction" (Bachmann & Nagarajan, ICML 2024) in one file.

A path-star graph G(deg, path_len) is a start s with deg arms of path_len - 1 nodes. The prompt is
the shuffled edge list, then s and the goal g; the answer is the path s, n1, ..., g. Teacher forcing
teaches the "Clever Hans" cheat (each node is the child of the one before, read off the edges) and
leaves the hard step n1 a guess: exact match 1/deg. Reversed targets are easy; teacherless training
(every answer input replaced by `$`) removes the cheat once a run gets off its plateaus (README: how
often). Part I, the lesson, is the `# %%` cells down to the engine room; the cells only define. Run
`python nanofail.py [--reverse | --teacherless]`, or from Python `train(Config(teacherless=True))`.
"""
# %% imports
import argparse, json, math, os, re, sys, tempfile, time  # noqa: E401
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from itertools import islice
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# %% data: path-star graphs
# One G(2,5) on N = 50 labels (the paper's task), a line of the original repository's text format:
#
#     35,1|27,35|20,39|39,37|27,6|3,41|1,3|6,20/27,41=27,35,1,3,41
#
# The edges u,v (parent -> child) in random order, then /s,g and, after '=', the answer s..g.
# Drawn, the edges are two arms leaving s = 27:   27 -> 35 -> 1 -> 3 -> 41 (the goal g)
#                                                 27 -> 6 -> 20 -> 39 -> 37
# Every node but s has one child or none: after n1 = 35 the rest is lookups: n1 is the plan.
MAX_NODES = 10_000  # the cap on --num_nodes: the text format's labels have 1-4 digits
NEW_BLOCK = 100  # --fresh_after's new graphs are drawn this many steps' worth at a time

def make_graphs(n, deg, path_len, num_nodes, rng):
    """n random path-star graphs: edges (n, E, 2), E = deg * (path_len - 1) parent->child pairs in
    random order, and path (n, path_len) = s, n1, ..., g along a random arm."""
    k = 1 + deg * (path_len - 1)  # labels a graph: s and the arms' nodes, all distinct
    rows = max(1, 2**22 // num_nodes)  # graphs a block: its random floats take 16 MiB at most
    labels = []  # per graph the first k labels of a random permutation (an argsort of floats),
    for i in range(0, max(n, 1), rows):  # in blocks that draw the numbers of one big call
        floats = rng.random((min(rows, n - i), num_nodes), dtype=np.float32)
        labels.append(floats.argsort(axis=1)[:, :k])
    labels = np.concatenate(labels)  # (n, k)
    start = labels[:, :1]  # (n, 1): s
    arms = labels[:, 1:].reshape(n, deg, path_len - 1)  # (n, deg, L-1): each arm's nodes in order
    # each node's parent: s for the first node of every arm, then the node before it on the arm
    parents = np.concatenate([np.repeat(start[:, :, None], deg, 1), arms[:, :, :-1]], axis=2)
    edges = np.stack([parents, arms], axis=-1).reshape(n, -1, 2)  # (n, E, 2), arm by arm
    order = rng.random(edges.shape[:2]).argsort(axis=1)  # shuffled: the order gives nothing away
    goal_arm = arms[np.arange(n), rng.integers(deg, size=n)]  # (n, L-1)
    path = np.concatenate([start, goal_arm], axis=1)  # (n, L): s, n1, ..., g
    return np.take_along_axis(edges, order[:, :, None], 1), path

def graph_keys(edges, path):
    """One key per graph as an unordered edge set with its s and g: a test graph with its edges
    reshuffled is the same key, so a win on the test set cannot be memory of a training graph."""
    codes = edges[..., 0].astype(np.int64) * MAX_NODES + edges[..., 1]  # (n, E): one number an edge
    rows = np.concatenate([np.sort(codes, axis=1), path[:, [0, -1]]], axis=1)  # sorted: no order
    return [row.tobytes() for row in rows.astype(np.int64)]

def count_graphs(deg, path_len, num_nodes):
    """Distinct prompts of G(deg, path_len) on num_nodes labels, as unordered graphs with s and g:
    ordered labels for s and the arms, the deg! orders of the arms alike, deg choices of g."""
    labels = 1 + deg * (path_len - 1)
    return math.perm(num_nodes, labels) // math.factorial(deg) * deg

def fresh_graphs(n, deg, path_len, num_nodes, rng, avoid):
    """n graphs, none of them in `avoid`: a set of graph_keys (the test set's)."""
    edges, paths = [], []  # the graphs kept, draw by draw
    for _ in range(100):  # draw again for the few that collide
        e, p = make_graphs(n - sum(map(len, paths)), deg, path_len, num_nodes, rng)
        keep = np.array([key not in avoid for key in graph_keys(e, p)], dtype=bool)
        edges.append(e[keep])
        paths.append(p[keep])
        if sum(map(len, paths)) == n:
            return np.concatenate(edges), np.concatenate(paths)
    raise UsageError(f"G({deg},{path_len}) on {num_nodes} labels has too few distinct graphs for "
                     f"{n} training graphs apart from the test set: raise --num_nodes")

def new_graphs(cfg, block, avoid):
    """Block `block` of the stream of new graphs (--fresh_after): NEW_BLOCK steps' worth, none in
    `avoid`, from a seed of its own (cfg.seed's child (2, block); make_splits uses 0 and 1)."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(2, block)))
    n = NEW_BLOCK * cfg.batch_size  # graphs: one per row of NEW_BLOCK steps
    return fresh_graphs(n, cfg.deg, cfg.path_len, cfg.num_nodes, rng, avoid)

# %% encoding: tokens
# Tokens: node labels 0..N-1, then '|' = N, '=' = N+1, '/' = N+2, '$' = N+3 (commas are dropped).
# One graph is u v | u v | ... | u v / s g = followed by the answer: 3E + 3 prompt tokens, then L.

def tok(num_nodes):
    return dict(pipe=num_nodes, eq=num_nodes + 1, slash=num_nodes + 2, dollar=num_nodes + 3)

def prompt_length(deg, path_len):
    """P = 3E + 3 prompt tokens of G(deg, path_len): u v | per edge (no last |), then / s g =."""
    return 3 * deg * (path_len - 1) + 3

def encode(edges, path, num_nodes, reverse=False):
    """(n, E, 2), (n, L) -> token sequences (n, 3E + 3 + L) and the prompt length P = 3E + 3.
    With reverse=True the answer is g..s: every step is then a parent lookup, nothing to plan."""
    n, E, _ = edges.shape
    t = tok(num_nodes)
    pipes = np.full((n, E, 1), t["pipe"])  # a '|' after each edge, the last one dropped
    body = np.concatenate([edges, pipes], axis=2).reshape(n, 3 * E)[:, :-1]  # u v | ... | u v
    sg = np.stack([np.full(n, t["slash"]), path[:, 0], path[:, -1], np.full(n, t["eq"])], axis=1)
    answer = path[:, ::-1] if reverse else path  # the targets: s..g, or g..s
    seq = np.concatenate([body, sg, answer], axis=1).astype(np.int64)
    return seq, seq.shape[1] - path.shape[1]  # P: all but the L answer tokens

# %% objectives: next-token, reverse, teacherless
# The three objectives read the same sequences and score only the L answer tokens. They differ in
# the targets (reverse: g..s instead of s..g, set in `encode`) and the inputs (teacherless, below).
#
#     position        ... /  s  g  =  s  n1 n2 n3 g          (prompt length P, answer length L)
#     input x         ... /  s  g  =  s  n1 n2 n3            next-token: the true answer prefix
#     input x         ... /  s  g  =  $  $  $  $             teacherless: nothing to copy
#     target y        (not scored) s  n1 n2 n3 g             the loss reads the last L positions

def make_inputs(seq, prompt_len, teacherless, num_nodes, n_forced=0):
    """seq (B, P+L) -> model input x (B, P+L-1). Position P-1 ('=') predicts the first answer
    token, position P+i the answer token i+1. A hybrid batch keeps its first n_forced rows
    teacher-forced: they train the edge lookup that the teacherless rows chain (Nagarajan et al.
    2025, arXiv 2504.15266, Sec. 3)."""
    x = seq[:, :-1]  # the last token is only a target
    if teacherless:
        # Teacher forcing hands the model n_i, so n_{i+1} = child(n_i) is a lookup (the Clever-Hans
        # cheat), and n1 is left to be learned alone (the Indecipherable Token; paper Sec. 4).
        # With '$' in place of every answer input there is nothing to copy: the model must plan the
        # whole path from the prompt (teacherless training, paper Sec. 5).
        x = x.clone()  # seq keeps the true answer: the targets
        x[n_forced:, prompt_len:] = tok(num_nodes)["dollar"]
    return x

def answer_logits(model, seq, prompt_len, teacherless, num_nodes, n_forced=0):
    """Logits of the L answer positions (B, L, vocab), with the objective's inputs."""
    x = make_inputs(seq, prompt_len, teacherless, num_nodes, n_forced)  # (B, P+L-1)
    return model(x, n_out=seq.shape[1] - prompt_len).float()  # fp32 for the loss, under bf16

def answer_loss(model, seq, prompt_len, teacherless, num_nodes, n_forced=0):
    """Cross-entropy on the answer tokens only: the prompt is given, not predicted."""
    logits = answer_logits(model, seq, prompt_len, teacherless, num_nodes, n_forced)  # (B,L,V)
    return F.cross_entropy(logits.flatten(0, 1), seq[:, prompt_len:].flatten())

# %% model: a compact GPT (Mamba lives in mamba_min.py, with the same interface)
# nanoGPT's GPT-2: learned positions, pre-LayerNorm blocks, a tied input/output embedding.

class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)  # queries, keys, values at once
        self.proj = nn.Linear(n_embd, n_embd, bias=False)  # the heads, mixed back
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=False), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd, bias=False))

    def attn(self, x):
        """Causal self-attention (where the edge lookups happen): x (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x):
        """x (B, T, C) -> (B, T, C)"""
        x = x + self.attn(self.ln_1(x))  # residual: each block adds to the stream
        return x + self.mlp(self.ln_2(x))

class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_embd, n_head):
        super().__init__()
        if n_embd % n_head:
            raise UsageError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)  # pre-LN blocks leave the last norm to here
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input/output embedding
        for name, p in self.named_parameters():  # GPT-2 init; residual projections scaled by depth
            if p.dim() == 2:
                residual = name.endswith(("proj.weight", "mlp.2.weight"))  # mlp.2: its 2nd Linear
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer) if residual else 0.02)

    def forward(self, idx, n_out=None):
        """idx (B, T) -> logits (B, n_out, vocab) of the last n_out positions (all T if None)."""
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return self.lm_head(x if n_out is None else x[:, -n_out:])  # the loss reads the answer only

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        """Greedy decoding: (B, T) prompt -> (B, max_new_tokens). Answers are a few tokens, so a
        full forward per token is cheap enough and needs no KV cache."""
        for _ in range(max_new_tokens):
            idx = torch.cat([idx, self(idx, n_out=1).argmax(-1)], dim=1)
        return idx[:, -max_new_tokens:]

def build_model(cfg, vocab_size, block_size):
    if cfg.model == "mamba":
        from mamba_min import Mamba  # the file beside this one
        return Mamba(vocab_size, cfg.n_layer, cfg.n_embd, cfg.d_state, cfg.expand, cfg.d_conv)
    return GPT(vocab_size, block_size, cfg.n_layer, cfg.n_embd, cfg.n_head)

# %% evaluation: forced accuracy, exact match, the worked example, the verdict

def objective_name(cfg):
    """teacherless, reverse or next-token: which of the three objectives cfg trains."""
    return "teacherless" if cfg.teacherless else "reverse" if cfg.reverse else "next-token"

def position_names(path_len, reverse=False):
    names = ["s"] + [f"n{i}" for i in range(1, path_len - 1)] + ["g"]
    return names[::-1] if reverse else names

@torch.no_grad()
def evaluate(model, edges, path, num_nodes, reverse=False, teacherless=False, amp=nullcontext):
    """Test graphs edges (n, E, 2), path (n, L) -> accuracy per answer position with the training
    inputs ("forced": the true prefix, or '$'), exact match of greedy decoding, and the worked
    example: the first graph the model gets wrong (graph 0 if none) and the model's answer."""
    was_training = model.training  # the mode it came in, restored below
    model.eval()
    seq, P = encode(edges, path, num_nodes, reverse)  # (n, P+L), P
    seq = torch.from_numpy(seq).to(next(model.parameters()).device)
    right = []  # (b, L) per batch: is the forced prediction the target?
    for chunk in seq.split(128):  # small batches bound the memory (Mamba's scan state)
        with amp():
            forced = answer_logits(model, chunk, P, teacherless, num_nodes).argmax(-1)  # (b, L)
            right.append(forced == chunk[:, P:])
    right = torch.cat(right)  # (n, L)
    # Greedy decoding is right all the way exactly when every forced prediction is right: each
    # decoded token then sees the true prefix. So exact match needs one forced pass, no decoding.
    wrong = torch.nonzero(~right.all(1))  # the graphs with a wrong token
    k = int(wrong[0]) if len(wrong) else 0  # the worked example: the first of them, or graph 0
    with amp():  # teacherless decoding is the forced pass itself; otherwise each token is fed back
        pred = (answer_logits(model, seq[k:k + 1], P, True, num_nodes).argmax(-1) if teacherless
                else model.generate(seq[k:k + 1, :P], seq.shape[1] - P))
    model.train(was_training)
    return dict(test_exact_match=right.all(1).float().mean().item(),
                forced_token_acc=right.float().mean(0).tolist(),
                example=dict(index=k, edges=edges[k].tolist(), path=path[k].tolist(),
                             pred=pred[0].tolist()))

def explain(edges, path, pred, reverse=False):
    """Where a decoded answer went wrong: 'wrong arm at n1, then n2 n3 along the edges from there'
    is the Clever-Hans cheat seen from outside. edges [[u, v], ...], path [s, ..., g]."""
    names = position_names(len(path), reverse)
    answer = path[::-1] if reverse else path
    wrong = [i for i, (p, a) in enumerate(zip(pred, answer)) if p != a]
    if not wrong:
        return "right"
    rest = " ".join(names[j] for j in wrong[1:])  # the slips after the first
    slip = f"wrong at {names[wrong[0]]}"
    at_n1 = wrong[0] == 1 and len(path) > 2  # (in G(d,2) position 1 is g, not n1)
    if at_n1 and not reverse and [path[0], pred[1]] in edges:
        slip = "wrong arm at n1"  # another child of s: the guess teacher forcing leaves
    next_node = dict((v, u) if reverse else (u, v) for u, v in edges)  # its child, or its parent
    if rest and all(next_node.get(pred[j - 1]) == pred[j] for j in wrong[1:]):
        return f"{slip}, then {rest} along the edges from there"  # lookups from the slip on
    return f"{slip}, {rest} too" if rest else slip

def verdict(r, cfg):
    """One line: what the accuracy pattern means."""
    f = r["forced_token_acc"]
    exact = r["test_exact_match"]
    if exact >= 0.95:  # teacherless: nothing to copy, so the path was planned from the prompt
        how = "planned from the prompt" if cfg.teacherless else "found"
        return f"solved: the path is {how} (exact match {exact:.3f})."
    if cfg.teacherless:
        names = position_names(cfg.path_len, cfg.reverse)
        have = " ".join(n for n, a in zip(names, f) if a > 0.9)
        lack = " ".join(n for n, a in zip(names, f) if a <= 0.9)
        lack = lack or f"all of them right at once (exact match {exact:.3f})"  # each > 0.9
        return (f"teacherless: planned from the prompt so far (> 0.9): {have or 'nothing'}; not "
                f"yet: {lack} (README: how often it wins).")
    n1_to_guess = cfg.deg > 1 and cfg.path_len > 2 and not cfg.reverse  # a choice among arms
    guess = abs(f[1] - 1 / cfg.deg) <= 0.1 and abs(exact - 1 / cfg.deg) <= 0.1  # n1: 1 of deg
    if n1_to_guess and guess and min(f[2:]) >= 0.9:
        later = "every later node is read off the edge list"  # n_i = child(n_{i-1}), the cheat
        if cfg.path_len == 3:  # G(d,3): the one later node is g, which the prompt gives
            later = "g is copied from the prompt"
        return (f"Clever Hans: {later} (forced ~ 1), but n1 is a guess among {cfg.deg} arms, so "
                f"exact match ~ 1/deg.")
    return "still learning: neither the Clever-Hans signature nor a solution yet."

def report(r, cfg, log=print):
    """Print an evaluation: accuracy per answer position, the verdict, and the worked example."""
    def row(name, xs):  # a name, then a column of 7 characters per answer position
        return f"  {name:<10}" + "".join(f"{x:>7}" for x in xs)
    ex = r["example"]
    log(row("position", position_names(cfg.path_len, cfg.reverse)))
    forced = [f"{x:.3f}" for x in r["forced_token_acc"]]
    log(row("forced", forced) + f"   exact match {r['test_exact_match']:.3f}")
    log(f"  -> {verdict(r, cfg)}")
    graph = graph_lines(np.array([ex["edges"]]), np.array([ex["path"]]))[0]
    log(f"  example   {graph}   (test graph {ex['index']})")
    log(row("true", ex["path"][::-1] if cfg.reverse else ex["path"]))
    why = explain(ex["edges"], ex["path"], ex["pred"], cfg.reverse)
    log(row("model", ex["pred"]) + "   " + why)

# %% training: the config
# A preset is a few overrides of the defaults, each with its reason (as nanoGPT's config files);
# RESULTS.md has the runs behind each value.
PRESETS = {
    # the defaults: G(2,3) (s, n1, g: n1 = parent(g), a one-step plan) with the paper's training set
    # and batch; 25 labels, a constant lr: the plan comes sooner than on 50 (--reverse lags on 20)
    "quick": {},
    # the paper's G(2,5): next-token's cheat in minutes; teacherless stays near 0 at this budget
    "cheat": dict(path_len=5, num_nodes=50, min_lr_frac=0.1, n_train=50_000, batch_size=128,
                  max_iters=600, eval_interval=300),
    # the earlier default, pinned as its runs took it (RESULTS.md): 50 labels, 3000 steps
    "g23": dict(path_len=3, num_nodes=50, n_embd=128, lr=1e-3, min_lr_frac=0.1, log_interval=50,
                n_train=200_000, batch_size=256, max_iters=3000, eval_interval=250),
    "g25": dict(path_len=5, num_nodes=50, n_embd=128,  # pinned: the paper's task, its runs' width
                n_layer=8,           # depth shortens the plateaus of the plan's three links
                n_train=200_000, batch_size=256,
                lr=5e-4,             # higher rates stayed on the first plateau
                min_lr_frac=1,       # constant: a cosine decays before the last plateau ends
                fresh_after=6000,    # the pool, then new graphs: won more often than the pool
                hybrid=0.25, hybrid_until=2000,  # next-token rows: off the first plateau sooner
                max_iters=20_000,    # n1, the last link, can come late; the paper: 390,625
                eval_interval=1000, log_interval=500),
    "paper": dict(path_len=5, num_nodes=50,  # G(2,5) on 50 labels, the paper's Sec. 4 task
                  n_layer=12, n_embd=384, n_head=6,  # the paper's Transformer (its code: 6 layers)
                  n_train=200_000, n_test=20_000, batch_size=256, lr=5e-4,
                  warmup_iters=100,   # the original code's AdamW and schedule: warmup 100,
                  weight_decay=0.0, beta2=0.999, grad_clip=0.0,  # no decay, no clipping,
                  min_lr_frac=1,      # its cosine spans 256x the steps it runs: ~constant
                  max_iters=390_625,  # 500 epochs of 200,000 graphs: a GPU's work
                  eval_interval=5000, log_interval=500),
}
# Mamba's default is the cheat's task, G(2,5) (on G(2,3) it learns n1 with either objective); its
# CPU scan is memory-bound: fewer layers, smaller batches, a higher lr and more steps.
MAMBA_PRESETS = {
    "quick": dict(PRESETS["cheat"], n_layer=2, batch_size=64, lr=3e-3, max_iters=1500,
                  eval_interval=250),
    "g23": dict(PRESETS["g23"], n_layer=2, lr=3e-3),
}
MAMBA_PRESETS["cheat"] = MAMBA_PRESETS["quick"]  # the same G(2,5) run

def knob(default, help, **checks):
    """A Config field with its help line and checks: min, max, choices, and fixed (a model or task
    knob, which a resumed run cannot change)."""
    return field(default=default, metadata=dict(help=help, **checks))

@dataclass
class Config:
    # task: the path-star graph G(deg, path_len) over num_nodes labels, and the objective
    deg: int = knob(2, "arms leaving the start node s", min=1, fixed=True)
    path_len: int = knob(3, "nodes on the path s..g, s included", min=2, fixed=True)
    num_nodes: int = knob(25, "node labels (a data file sets it)", min=1, max=MAX_NODES, fixed=True)
    n_train: int = knob(200_000, "training graphs: the pool, seen epoch after epoch", min=1)
    fresh_after: int = knob(0, "from this step on, new graphs, each seen once (0: never)", min=0)
    n_test: int = knob(1_000, "test graphs", min=1)
    reverse: bool = knob(False, "target the reversed path g..s (each step is a parent lookup)")
    teacherless: bool = knob(False, "replace the answer inputs by '$': plan the whole answer")
    hybrid: float = knob(0.0, "with --teacherless: this fraction of each batch is next-token",
                         min=0, max=1)
    hybrid_until: int = knob(0, "the --hybrid rows stop at this step (0: never)", min=0)
    # model
    model: str = knob("gpt", "gpt or mamba", choices=("gpt", "mamba"), fixed=True)
    n_layer: int = knob(4, "layers", min=1, fixed=True)
    n_embd: int = knob(128, "width (d_model)", min=1, fixed=True)
    n_head: int = knob(4, "attention heads (gpt)", min=1, fixed=True)
    d_state: int = knob(16, "SSM state size N (mamba)", min=1, fixed=True)
    expand: int = knob(2, "inner width = expand * n_embd (mamba)", min=1, fixed=True)
    d_conv: int = knob(4, "causal conv kernel (mamba)", min=1, fixed=True)
    # training
    batch_size: int = knob(256, "graphs per step, over all processes", min=1)
    lr: float = knob(1e-3, "peak learning rate (AdamW)", min=0)
    min_lr_frac: float = knob(1.0, "cosine decay to lr * this (1: constant)", min=0, max=1)
    warmup_iters: int = knob(100, "linear warmup steps", min=0)
    max_iters: int = knob(1250, "optimizer steps", min=0)
    weight_decay: float = knob(0.1, "AdamW weight decay (matrices only)", min=0)
    beta2: float = knob(0.95, "AdamW beta2 (torch's default: 0.999)", min=0, max=1)
    grad_clip: float = knob(1.0, "clip the gradient norm to this (0: off)", min=0)
    dtype: str = knob("auto", "auto: bf16 autocast where the device has native bf16",
                      choices=("auto", "bfloat16", "float32"))
    compile: bool = knob(False, "torch.compile the model for training")
    compile_mode: str = knob("default", "with --compile; reduce-overhead: CUDA graphs",
                             choices=("default", "reduce-overhead", "max-autotune"))
    device: str = knob("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    threads: int = knob(0, "CPU threads (0: one per core no other process keeps busy)", min=0)
    seed: int = knob(1337, "seed for data, init and batches", min=0, max=2**32 - 1)
    # logging and files
    log_interval: int = knob(50, "print a progress line every this many steps", min=1)
    eval_interval: int = knob(250, "evaluate every this many steps (0: at the end)", min=0)
    out_dir: str = knob("", "write results.json and ckpt.pt here")
    overwrite: bool = knob(False, "replace a run (or exported data) already in the folder")
    resume: str = knob("", "continue from this ckpt.pt with its settings (flags override them)")
    export_data: str = knob("", "write DIR/train.txt and DIR/test.txt, then exit")
    train_file: str = knob("", "training graphs from this file (original text format)")
    test_file: str = knob("", "test graphs from this file (original text format)")
    preset: str = knob("quick", "overrides of the defaults (README)", choices=tuple(PRESETS),
                       fixed=True)  # on resume its values are the checkpoint's: no new name

    def __init__(self, preset="quick", **given):
        # The defaults above, then the preset's values for this model, then the values given: so
        # Config(preset="g23", teacherless=True) is the run of --preset g23 --teacherless.
        knobs = {f.name: f for f in fields(self)}
        unknown = set(given) - set(knobs)  # a typo is an error, not a no-op
        if unknown:
            raise UsageError(f"unknown knob {min(unknown)}: see python nanofail.py -h")
        check(knobs["preset"], preset)  # one of PRESETS
        presets = MAMBA_PRESETS if given.get("model") == "mamba" else PRESETS
        overrides = presets.get(preset, PRESETS[preset])  # Mamba's own, where it has one
        for name, f in knobs.items():
            setattr(self, name, given.get(name, overrides.get(name, f.default)))
        self.preset = preset  # the name, for results.json and resume
        for f in knobs.values():  # what the command line checks, from Python too
            check(f, getattr(self, f.name))

# %% training: the loop
# As in nanoGPT's train.py: a batch, its loss, an AdamW step, a log line, at times an evaluation
# and a checkpoint. Part II sets up `run` (model; raw: before compile, DDP; opt, batches, amp, ...).

def lr_at(step, cfg):
    """Linear warmup, then cosine decay to lr * min_lr_frac at max_iters (in optimizer steps)."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters  # no large steps from random weights
    frac = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))

def train(cfg, log=print):
    """Train cfg's model on cfg's task and objective, evaluating every eval_interval steps. Returns
    (model, history); out_dir keeps results.json and ckpt.pt. log=None trains without a word."""
    run = start(cfg, log)  # Part II: device, processes, data, model, optimizer; new or resumed
    cfg = run.cfg  # a copy with the data's task (a data file sets it)
    P = prompt_length(cfg.deg, cfg.path_len)
    step = run.step  # 0, or the checkpoint's
    window = []  # the losses since the last log line, kept on the device
    try:
        while step < cfg.max_iters:
            # batch: this process's share of the step's global batch, (B / world, P+L)
            seq = next(run.batches).chunk(run.world)[run.rank]
            # forward: the loss on the answer tokens, with the objective's inputs
            hybrid_on = step < cfg.hybrid_until or not cfg.hybrid_until  # --hybrid_until 0: always
            n_forced = round(cfg.hybrid * len(seq)) if hybrid_on else 0  # rows kept teacher-forced
            if run.cuda_graphs:  # CUDA graphs reuse their buffers: a new step, a new replay
                torch.compiler.cudagraph_mark_step_begin()
            with run.amp():  # autocast: bf16 where the device computes in it
                loss = answer_loss(run.model, seq, P, cfg.teacherless, cfg.num_nodes, n_forced)
            # backward: the gradients (DDP averages them over the processes)
            run.opt.zero_grad(set_to_none=True)  # no stale gradients from the last step
            loss.backward()
            # step: clip the gradient norm, then AdamW at this step's lr
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(run.raw.parameters(), cfg.grad_clip)
            for group in run.opt.param_groups:
                group["lr"] = lr_at(step, cfg)  # warmup, then cosine or constant
            run.opt.step()
            step += 1
            window.append(loss.detach())  # stays on the device: a GPU is not synced every step
            # log: a progress line; a nan or inf loss stops the run (Part II)
            do_eval = step == cfg.max_iters or (cfg.eval_interval and step % cfg.eval_interval == 0)
            do_log = do_eval or step % cfg.log_interval == 0
            train_loss = log_progress(run, step, window, do_log)  # the mean loss, on log steps
            # evaluate: the test graphs, which training never sees (on the first process only)
            if do_eval and run.rank == 0:
                run.history.append(dict(step=step, train_loss=train_loss, **run.scores()))
                run.log(f"eval at step {step}:")
                report(run.history[-1], cfg, run.log)
            # save: results.json and ckpt.pt at each evaluation, with --out_dir (Part II)
            if do_eval and run.rank == 0 and cfg.out_dir:
                run.saved = save_run(cfg, run.raw, run.opt, step, run.history)
            if do_log:  # a new window: it/s counts training steps, not the evaluation
                window = []
                run.clock = time.time()
    except KeyboardInterrupt:  # Ctrl-C: one line that names the checkpoint to resume from
        raise Stopped(f"interrupted at step {step}. {resume_hint(run.saved, cfg)}") from None
    finish(run, step)  # Part II: with nothing trained, one evaluation; the time; the processes
    return run.raw, run.history

# %% engine room: a reader may skip what follows, which runs the lesson above: the text format,
# devices, precision, threads, DDP, checkpoints, resume, the nan stop, Ctrl-C, checks, command line.

class UsageError(Exception):
    """Bad input: one line saying what to change (exit status 2)."""

class Stopped(Exception):
    """A run that diverged or was interrupted: one line saying where its checkpoint is (exit 1)."""

CPU_THREADS = torch.get_num_threads()  # torch's default: one per physical core

def not_path_stars(edges, path):
    """Indices of the graphs that are not a path star: s = path[:, 0] with E / (L-1) arms."""
    E, L = edges.shape[1], path.shape[1]  # E edges, L path nodes
    parent, child, s = edges[..., 0], edges[..., 1], path[:, :1]  # (n, E), (n, E), (n, 1)
    def distinct(a):  # (n, m) -> (n,): each row's values all differ
        return (np.diff(np.sort(a, axis=1), axis=1) != 0).all(1)
    follows = parent[:, :, None] == child[:, None, :]  # (n, E, E): edge i leaves where j ends
    reached = parent == s  # (n, E): the edges within k steps of s, for k = 1 .. L-1
    for _ in range(L - 2):
        reached = reached | (follows & reached[:, None, :]).any(2)
    # one parent per node but s, which has none; one child per node but s, which has E / (L-1)
    one_child = distinct(np.where(parent == s, -np.arange(1, E + 1), parent))
    ok = distinct(child) & (child != s).all(1) & one_child & ((parent == s).sum(1) * (L - 1) == E)
    return np.flatnonzero(~(ok & reached.all(1)))

# a line of the text format: labels of 1-4 digits (below MAX_NODES), L >= 2 path nodes
GRAPH = re.compile(r"(\d{1,4},\d{1,4}\|)*\d{1,4},\d{1,4}/\d{1,4},\d{1,4}=\d{1,4}(,\d{1,4})+")

def parse_graphs(text, name="input", log=print):
    """Text in the original format -> edges (n, E, 2), path (n, L); a bad line raises UsageError.
    Like the original reader it takes CRLF, spaces around a line, blank lines at the end."""
    lines = [ln.strip() for ln in text.rstrip().splitlines()] or [""]  # "": an empty file
    shape = (lines[0].count("|"), lines[0].count(","))  # E - 1 and E + L, as on every line
    bad = [i for i, ln in enumerate(lines)
           if not GRAPH.fullmatch(ln) or (ln.count("|"), ln.count(",")) != shape]
    if bad:
        raise UsageError(f"{name}:{bad[0] + 1}: expected a graph 'u,v|...|u,v/s,g=s,...,g' of "
                         f"labels below {MAX_NODES} like line 1, got '{lines[bad[0]][:60]}'")
    E = shape[0] + 1  # edges
    L = shape[1] - E  # path nodes
    nums = np.array(re.split(r"\D+", "\n".join(lines)), dtype=np.int64).reshape(len(lines), -1)
    edges, sg, path = nums[:, :2 * E].reshape(-1, E, 2), nums[:, 2 * E:][:, :2], nums[:, 2 * E + 2:]
    if path[0, 0] == sg[0, 1] and path[0, -1] == sg[0, 0]:  # line 1's answer runs g..s
        log(f"note: {name} has its answers g..s (its generator's reverse=True): read back as s..g")
        path = path[:, ::-1].copy()  # so --reverse means the same as for any other file
    u, v = edges[:, None, :, 0], edges[:, None, :, 1]  # (n, 1, E): each step of the path an edge?
    on_edges = ((u == path[:, :-1, None]) & (v == path[:, 1:, None])).any(2).all(1)
    bad = np.flatnonzero((sg != path[:, [0, -1]]).any(1) | ~on_edges)
    if len(bad):
        raise UsageError(f"{name}:{bad[0] + 1}: the answer is no path from s to g along the edges")
    bad = [0] if E % (L - 1) else not_path_stars(edges, path)
    if len(bad):
        raise UsageError(f"{name}:{bad[0] + 1}: not a path star (s, then arms of {L - 1} edges)")
    return edges, path

def read_graphs(name, log=print):
    """A file in the original text format -> edges (n, E, 2), path (n, L)."""
    try:
        with open(name) as f:  # text mode: CRLF reads as LF
            return parse_graphs(f.read(), name, log)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {name}: {e}")

def graph_lines(edges, path):
    """edges (n, E, 2), path (n, L) -> the graphs as lines of the original text format."""
    return ["|".join(f"{u},{v}" for u, v in e) + f"/{p[0]},{p[-1]}=" + ",".join(map(str, p))
            for e, p in zip(edges.tolist(), path.tolist())]

def write_graphs(filename, edges, path):
    """One graph a line, to a .tmp file then renamed: a crash never leaves half a file."""
    with open(filename + ".tmp", "w") as f:
        f.write("\n".join(graph_lines(edges, path)) + "\n")
    os.replace(filename + ".tmp", filename)

def check_memory(n_graphs, deg, path_len):
    """Refuse, before drawing them, more graphs than this machine's memory holds."""
    need = n_graphs * 16 * (6 * deg * (path_len - 1) + 2 * path_len + 8)  # int64 arrays and copies
    have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    if have and need > have:
        raise UsageError(f"{n_graphs:,} graphs of G({deg},{path_len}) need ~{need / 2**30:.0f} GiB,"
                         f" not {have / 2**30:.0f}: lower --n_train or --n_test")

def make_splits(cfg, log=print):
    """(train, test, task): graphs generated from cfg.seed or read from the original text files, and
    what they are (deg, path_len, num_nodes and the set sizes; a data file sets them)."""
    files = (("train", cfg.train_file), ("test", cfg.test_file))  # either, both, or none
    loaded = {split: read_graphs(name, log) for split, name in files if name}
    task = dict(deg=cfg.deg, path_len=cfg.path_len, num_nodes=cfg.num_nodes)
    if loaded:
        sizes = {(e.shape[1], p.shape[1]) for e, p in loaded.values()}  # (E, L) of each file
        if len(sizes) > 1:
            raise UsageError("--train_file and --test_file hold graphs of different sizes")
        E, L = sizes.pop()
        labels = 1 + max(int(e.max()) for e, _ in loaded.values())  # N: every label seen
        data = dict(deg=E // (L - 1), path_len=L, num_nodes=max(labels, 1 + E))
        if data != task:  # the data wins: say so
            log("note: the data sets the task: " + " ".join(f"--{k} {v}" for k, v in data.items()))
        task = data
    deg, L, N = task["deg"], task["path_len"], task["num_nodes"]  # from here on, the data's task
    if 1 + deg * (L - 1) > N:  # a graph needs 1 + E distinct labels
        raise UsageError(f"G({deg},{L}) needs {1 + deg * (L - 1)} distinct labels, not {N}: raise "
                         "--num_nodes or lower --deg/--path_len")
    drawn = ("train" not in loaded) * cfg.n_train + ("test" not in loaded) * cfg.n_test
    check_memory(drawn, deg, L)  # before drawing them
    seeds = np.random.SeedSequence(cfg.seed).spawn(2)  # the test set's and the pool's (new_graphs)
    train, test = loaded.get("train"), loaded.get("test")  # a split not given is drawn
    if test is None:  # drawn first, apart from a training file given alone
        avoid = set(graph_keys(*train)) if train else set()
        test = fresh_graphs(cfg.n_test, deg, L, N, np.random.default_rng(seeds[0]), avoid)
    if train is None:  # the pool: apart from the test set as graphs
        avoid = set(graph_keys(*test))
        train = fresh_graphs(cfg.n_train, deg, L, N, np.random.default_rng(seeds[1]), avoid)
    elif not set(graph_keys(*train)).isdisjoint(graph_keys(*test)):
        raise UsageError("--train_file and --test_file share graphs: pass disjoint sets")
    return train, test, dict(task, n_train=len(train[0]), n_test=len(test[0]))

def batches(n, batch_size, gen):
    """Endless shuffled epochs of whole batches of row indices, drawn where `gen` lives."""
    while True:
        order = torch.randperm(n, generator=gen, device=gen.device)[:n - n % batch_size]
        yield from order.view(-1, batch_size)  # (n // B, B): the last, partial batch is dropped

def train_batches(cfg, step, pool, test, device, log):
    """Each step's global batch (B, P+L) from `step` on: the pool in shuffled epochs, then from
    --fresh_after on new graphs, each seen once; by the step alone, so a run resumed (with a larger
    --max_iters or not) trains on the batches of one unbroken run."""
    last = cfg.fresh_after or None  # the pool trains the steps before --fresh_after, or all
    if last is None or step <= last:  # (a run resumed past the switch needs no pool)
        seq = torch.from_numpy(encode(*pool, cfg.num_nodes, cfg.reverse)[0]).to(device)
        gen = torch.Generator(device).manual_seed(cfg.seed)  # the pool's order, from the seed
        for idx in islice(batches(len(seq), cfg.batch_size, gen), step, last):  # from `step`
            yield seq[idx]  # (B, P+L) token rows, on the device
        log(f"step {last}: new graphs from here on, each seen once")
        step = last
    avoid = set(graph_keys(*test))  # never a test graph
    while True:
        block, done = divmod(step - cfg.fresh_after, NEW_BLOCK)  # done: its steps trained before
        new = encode(*new_graphs(cfg, block, avoid), cfg.num_nodes, cfg.reverse)[0]
        for rows in torch.from_numpy(new).to(device).split(cfg.batch_size)[done:]:
            yield rows
            step += 1

def pick_device(name, threads):
    """auto: cuda, then mps, then cpu; a device this machine lacks is a usage error. On the CPU,
    threads=0 takes one per core no other process keeps busy (a shared core makes each step wait):
    torch's count less the runnable tasks in /proc/loadavg but this one, at the least of 5 looks."""
    have = dict(cuda=torch.cuda.device_count(), mps=int(torch.backends.mps.is_available()), cpu=1)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name):
        raise UsageError(f"unknown --device {name}: use auto, cpu, cuda, cuda:N or mps")
    auto = "cuda" if have["cuda"] else "mps" if have["mps"] else "cpu"  # the first there is
    device = torch.device(auto if name == "auto" else name)
    if (device.index or 0) >= have[device.type]:  # no GPU, or not that many
        raise UsageError(f"--device {name} is not available on this machine: use --device auto")
    if device.type == "cpu" and (threads or "OMP_NUM_THREADS" not in os.environ):
        busy = 0
        if os.path.exists("/proc/loadavg"):  # 'running/total' is its fourth field
            looks = [open("/proc/loadavg").read().split()[3] for _ in range(5)]
            busy = min(int(x.split("/")[0]) for x in looks) - 1
        torch.set_num_threads(threads or max(1, CPU_THREADS - busy))
    return device

def autocast_dtype(dtype, device):
    """auto: bf16 where the hardware has native bf16 math (Ampere+ GPUs, AVX512-BF16/AMX CPUs)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    cpu_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if device.type == "cpu" and cpu_bf16 else torch.float32

@contextmanager
def compute_context(device, dtype):
    """Every forward pass runs in here: autocast to `dtype`, and on CPU the plain math attention
    (PyTorch's fused CPU attention kernel is slower in bf16 at these short sequences)."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32), \
            (sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext()):
        yield

def make_optimizer(model, cfg, device, state=None):
    """AdamW; weight decay on matrices only (not norms, biases, or Mamba's A_log and D). From a
    checkpoint's `state`: its moments, with the flags given for the rest."""
    decay = [p for p in model.parameters() if p.dim() >= 2 and not hasattr(p, "_no_weight_decay")]
    rest = [p for p in model.parameters() if not any(p is d for d in decay)]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=rest, weight_decay=0)]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2),
                            fused=device.type in ("cuda", "cpu"))
    if state:  # the saved moments and settings, then the flags' over them
        opt.load_state_dict(state)
        for group, decay in zip(opt.param_groups, (cfg.weight_decay, 0)):
            group.update(weight_decay=decay, betas=(0.9, cfg.beta2))
    return opt

def distributed(device):
    """Under torchrun (RANK set) join the process group (nccl, one GPU a process; gloo on CPUs):
    (rank, world_size, device); without torchrun (0, 1, device)."""
    if "RANK" not in os.environ:  # not started by torchrun: one process
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU a process
        torch.cuda.set_device(device)  # before any CUDA work: nccl needs it
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device

def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "step", "history", "config"} <= set(ckpt)
        return ckpt
    except Exception as e:
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}): pass a ckpt.pt")

def claim_folder(path, files, flag, overwrite, resumed=""):
    """Make the folder and check now, not at the first save, that it can be written; refuse to
    replace another run's files there unless --overwrite (resumed: the ckpt.pt continued)."""
    try:
        os.makedirs(path, exist_ok=True)  # parents too; an existing folder is fine
        tempfile.TemporaryFile(dir=path).close()  # a write test, before any training
    except OSError as e:
        raise UsageError(f"cannot write to {path} for --{flag} ({e.strerror}): pass another folder")
    taken = [f for f in files if os.path.exists(os.path.join(path, f))]
    if resumed and os.path.samefile(os.path.dirname(resumed) or ".", path):
        taken = []  # a run resumed in its own folder goes on writing there
    if taken and not overwrite:
        ckpt = os.path.join(path, "ckpt.pt")
        go_on = f", --resume {ckpt} to continue it," if flag == "out_dir" else ""
        raise UsageError(f"{path} holds {' and '.join(taken)} already: pass a new --{flag}{go_on}"
                         " or --overwrite")

def save_run(cfg, model, opt, step, history):
    """results.json (every evaluation) and ckpt.pt (model, optimizer, step) in cfg.out_dir, each
    written to a .tmp file and renamed: a crash never leaves a half-written file."""
    path = os.path.join(cfg.out_dir, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dict(config=asdict(cfg), history=history, final=history[-1]), f, indent=1)
    os.replace(path + ".tmp", path)  # atomic: the old file or the new one
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(), config=asdict(cfg),
                    step=step, history=history), path + ".tmp")
    os.replace(path + ".tmp", path)
    return path

def quiet(*args, **kwargs):
    """The log of a silent run (log=None) and of every process but rank 0."""

def start(cfg, log):
    """Before step 1: device and processes, the out_dir, the data, the model and its optimizer,
    fresh or from cfg.resume: the run, cfg (with the data's task) and what train() uses."""
    rank, world, device = distributed(pick_device(cfg.device, cfg.threads))
    log = log if log and rank == 0 else quiet  # only rank 0 speaks and saves
    ckpt = load_checkpoint(cfg.resume) if cfg.resume else dict(step=0, history=[])
    if cfg.out_dir and ckpt["step"] < cfg.max_iters:
        claim_folder(cfg.out_dir, ("ckpt.pt", "results.json"), "out_dir", cfg.overwrite, cfg.resume)
    train_set, test_set, task = make_splits(cfg, log)
    old = ckpt["config"] if cfg.resume else task  # a resumed model keeps its task and labels
    if (old["deg"], old["path_len"]) != (task["deg"], task["path_len"]) or (
            task["num_nodes"] > old["num_nodes"]):  # (data with fewer labels is fine)
        raise UsageError(f"the checkpoint learned G({old['deg']},{old['path_len']}) on "
                         f"{old['num_nodes']} labels, not G({task['deg']},{task['path_len']}): "
                         "pass data of its task")
    task["num_nodes"] = old["num_nodes"]  # the vocabulary the checkpoint's model has
    cfg = replace(cfg, **task)  # a copy with the data's task: the caller's cfg is untouched
    if cfg.batch_size % world or cfg.batch_size > cfg.n_train:
        raise UsageError(f"--batch_size {cfg.batch_size} must split over {world} process(es) and "
                         f"not exceed the {cfg.n_train} training graphs")
    torch.manual_seed(cfg.seed)  # the same seed, the same initial weights
    T = prompt_length(cfg.deg, cfg.path_len) + cfg.path_len - 1  # the inputs: all but the last
    raw = build_model(cfg, vocab_size=cfg.num_nodes + 4, block_size=T).to(device)
    if cfg.resume:
        raw.load_state_dict(ckpt["model"])  # the trained weights
        done = ckpt["step"] >= cfg.max_iters  # a finished run: one evaluation, no training
        log(f"resumed from {cfg.resume} at step {ckpt['step']}" + (
            f"; nothing to train (--max_iters {cfg.max_iters}): one evaluation" if done else ""))
    opt = make_optimizer(raw, cfg, device, ckpt.get("optimizer"))
    n_params = sum(p.numel() for p in raw.parameters())  # the tied embedding counted once
    count = count_graphs(cfg.deg, cfg.path_len, cfg.num_nodes)  # distinct graphs of the task
    count = f"{count:,}" if count < 10**15 else f"~10^{int(math.log10(count))}"
    new = " + new graphs" if cfg.fresh_after else ""
    log(f"{cfg.model} {n_params / 1e6:.2f}M params on {device} x {world} | G({cfg.deg},"
        f"{cfg.path_len}) N={cfg.num_nodes}: {count} distinct graphs; {cfg.n_train:,} in the "
        f"pool{new}, {cfg.n_test:,} test (apart as graphs) | {objective_name(cfg)}")
    model = torch.compile(raw, mode=cfg.compile_mode) if cfg.compile else raw  # evaluation: raw
    if world > 1:  # DistributedDataParallel averages the gradients over the processes in backward()
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = partial(compute_context, device, autocast_dtype(cfg.dtype, device))  # each forward's
    return SimpleNamespace(
        cfg=cfg, log=log, rank=rank, world=world, device=device, raw=raw, model=model, opt=opt,
        batches=train_batches(cfg, ckpt["step"], train_set, test_set, device, log), amp=amp,
        scores=partial(evaluate, raw, *test_set, cfg.num_nodes, cfg.reverse, cfg.teacherless, amp),
        step=ckpt["step"], history=ckpt["history"], saved=cfg.resume, began=time.time(),
        clock=time.time(), n_params=n_params, T=T,
        cuda_graphs=cfg.compile and cfg.compile_mode == "reduce-overhead")

def log_progress(run, step, window, do_log):
    """A nan or inf loss stops the run (checked each step on a CPU; on a GPU at log steps only, as a
    check waits for it). A log step logs the mean loss over the processes (returned), the lr, the
    speed (FLOPs: 6 a parameter and token, + attention's 12 n_layer n_embd T) and the time left."""
    cfg = run.cfg
    if run.device.type == "cuda" and not do_log:
        return None
    losses = torch.stack(window)
    bad = torch.nonzero(~torch.isfinite(losses))  # the window's steps with a nan or inf loss
    if len(bad):
        j = int(bad[0])  # the first of them
        raise Stopped(f"the loss is {losses[j].item()} at step {step - len(window) + 1 + j}: "
                      f"training diverged; lower --lr (now {cfg.lr:g}). "
                      f"{resume_hint(run.saved, cfg)}")
    if not do_log:
        return None
    if run.world > 1:  # the mean over the processes
        dist.all_reduce(losses)
        losses /= run.world  # all_reduce sums
    its = len(window) / (time.time() - run.clock)  # steps a second
    attn = 12 * cfg.n_layer * cfg.n_embd * run.T if cfg.model == "gpt" else 0  # no Mamba scan
    flops = (6 * run.n_params + attn) * run.T * cfg.batch_size * its  # PaLM's, as nanoGPT's
    run.log(f"step {step:>6}/{cfg.max_iters} | loss {losses.mean().item():.4f} | lr "
            f"{lr_at(step - 1, cfg):.1e} | {its:.2f} it/s {flops / 1e9:.0f} GFLOP/s | "
            f"ETA {(cfg.max_iters - step) / its / 60:.1f} min")
    return losses.mean().item()

def resume_hint(saved, cfg):
    if saved:
        return f"The last checkpoint is {saved}; continue with: python nanofail.py --resume {saved}"
    if cfg.out_dir:
        return f"No checkpoint yet: the first comes at step {cfg.eval_interval or cfg.max_iters}."
    return "No checkpoint was written (--out_dir DIR keeps one at every evaluation)."

def finish(run, step):
    """After the loop: with nothing trained (--max_iters reached), one evaluation; the time."""
    if step == run.step and run.rank == 0:  # --max_iters 0, or a finished run resumed
        report(dict(step=step, **run.scores()), run.cfg, run.log)
    run.log(f"done in {(time.time() - run.began) / 60:.1f} min")
    if run.world > 1:  # every rank gets here before any leaves: a clean shutdown
        dist.barrier()
        dist.destroy_process_group()

def check(f, v):
    """One knob's value against its field: its type, choices and range."""
    lo, hi = f.metadata.get("min", -math.inf), f.metadata.get("max", math.inf)
    if type(v) is not f.type and not (f.type is float and type(v) is int):  # True is no int here
        raise UsageError(f"--{f.name} must be of type {f.type.__name__} (got {v!r})")
    if v not in f.metadata.get("choices", [v]):
        raise UsageError(f"--{f.name} must be one of {', '.join(f.metadata['choices'])} (got {v})")
    if f.type in (int, float) and not (math.isfinite(v) and lo <= v <= hi):
        raise UsageError(f"--{f.name} must be in [{lo}, {hi}] (got {v})")

OLD_DEFAULTS = dict(min_lr_frac=0.1)  # knobs whose default changed since: what versions before did

def known_knobs(saved):
    """A config saved by this or an older version: knobs it did not have take what that version did
    (their default then, not the preset's); knobs no longer here are dropped."""
    return {f.name: saved.get(f.name, OLD_DEFAULTS.get(f.name, f.default)) for f in fields(Config)}

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f"nanofail: error: {message} (see python {self.prog} -h)\n")

def parse_config(argv=None):
    """Flags -> Config: the flags given, over the preset (or, with --resume, over the checkpoint's
    settings). A resume that changes the model or the task is refused."""
    p = Parser(prog="nanofail.py", description="The Pitfalls of Next-Token Prediction.",
               argument_default=argparse.SUPPRESS)  # flags not given stay out of `given`
    for f in fields(Config):
        kind = (dict(action=argparse.BooleanOptionalAction) if f.type is bool else
                dict(type=f.type, choices=f.metadata.get("choices")))  # choices shown in -h
        p.add_argument(f"--{f.name}", help=f"{f.metadata['help']} (default: {f.default})", **kind)
    given = vars(p.parse_args(argv))  # only the flags given: they win over preset and ckpt
    if "resume" not in given:
        return Config(**given)
    saved = known_knobs(load_checkpoint(given["resume"])["config"])
    clash = [f"--{f.name} {saved[f.name]}" for f in fields(Config)
             if f.metadata.get("fixed") and given.get(f.name, saved[f.name]) != saved[f.name]]
    if clash:
        raise UsageError(f"checkpoint {given['resume']} was trained with another model or task: "
                         f"use {' '.join(clash)} or leave those flags out")
    return Config(**{**saved, **given})

@contextmanager
def reported():
    """Bad input, a path that cannot be written, a stopped run: one line on stderr, no traceback."""
    try:
        yield
    except (UsageError, OSError, Stopped) as e:
        print(f"nanofail: {'stopped' if isinstance(e, Stopped) else 'error'}: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, Stopped) else 2)
    except KeyboardInterrupt:  # before training started (train() reports its own)
        print("nanofail: stopped: interrupted", file=sys.stderr)
        sys.exit(1)

def main(argv=None):
    with reported():
        cfg = parse_config(argv)
        if not cfg.export_data:
            return train(cfg, log=partial(print, flush=True))  # flushed: a log file follows
        # the splits in the original format, DIR/train.txt and DIR/test.txt
        train_set, test_set, task = make_splits(cfg)
        claim_folder(cfg.export_data, ("train.txt", "test.txt"), "export_data", cfg.overwrite)
        for name, graphs in (("train.txt", train_set), ("test.txt", test_set)):
            write_graphs(os.path.join(cfg.export_data, name), *graphs)
        print(f"wrote {task['n_train']} + {task['n_test']} G({task['deg']},{task['path_len']}) "
              f"graphs to {cfg.export_data}/")

# A notebook kernel runs cells as __main__ with its own argv (-f kernel.json): parse nothing there.
if __name__ == "__main__" and "ipykernel" not in sys.modules and "ipykernel" not in sys.argv[0]:
    main()
