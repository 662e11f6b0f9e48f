"""
nanofail: "The Pitfalls of Next-Token Prediction" (Bachmann & Nagarajan, ICML 2024) in one file.

The task is path-finding on a path-star graph G(deg, path_len): a start node s with `deg` arms of
`path_len - 1` further nodes each. The prompt lists the edges in random order, then s and the goal g
(the end of one arm); the answer is the path s, n1, ..., g. Trained with teacher forcing, a model
learns the "Clever Hans" cheat (each node is the child of the node before it, read off the edge
list) and never learns the one hard step n1, the node after s: exact match stays at 1/deg. Reversed
targets (g..s) are easy, and teacherless training (answer inputs replaced by `$`) removes the cheat.

    python nanofail.py                              # G(2,5), next-token: the Clever-Hans signature
    python nanofail.py --reverse                    # the same task, answer reversed: solved
    python nanofail.py --teacherless                # the way out: what a laptop budget learns
    python nanofail.py --preset g23 --teacherless   # G(2,3): teacherless wins in ~5 CPU minutes
    python nanofail.py --preset g25 --teacherless --fresh_after 6000 --seed 2   # the paper's G(2,5): ~1 hour
    python nanofail.py -h                           # every knob

Every part below can be pasted into a notebook: data -> encoding -> objectives -> model ->
evaluation -> training -> command line.
"""
import argparse
import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

class UsageError(Exception):
    """Bad input: reported as one line saying what to change, exit status 2."""

class Stopped(Exception):
    """A run that diverged or was interrupted: one line saying where its checkpoint is, exit status 1."""

# ----------------------------------------------------------------------------- data
# One path-star graph G(2,5) on N = 50 labels, one line of the original repository's text format
# (test graph 2 of the demo, seed 1337):
#
#     35,1|27,35|20,39|39,37|27,6|3,41|1,3|6,20/27,41=27,35,1,3,41
#
# The edges u,v (parent -> child) in random order, then /s,g and, after '=', the answer s,n1,n2,n3,g.
# Drawn, the edges are two arms leaving s = 27:   27 -> 35 -> 1 -> 3 -> 41 (the goal g)
#                                                 27 -> 6 -> 20 -> 39 -> 37
# Every node but s has one child or none, so once n1 = 35 is chosen the rest is a lookup; n1 is the plan.

def make_graphs(n, deg, path_len, num_nodes, rng):
    """n random path-star graphs. Returns edges (n, E, 2), E = deg * (path_len - 1) parent->child
    pairs in random order, and path (n, path_len) = s, n1, ..., g along a random arm."""
    labels = rng.random((n, num_nodes), dtype=np.float32).argsort(axis=1)[:, :1 + deg * (path_len - 1)]
    start, arms = labels[:, :1], labels[:, 1:].reshape(n, deg, path_len - 1)  # (n, 1), (n, deg, L-1)
    parents = np.concatenate([np.broadcast_to(start[:, :, None], (n, deg, 1)), arms[:, :, :-1]], axis=2)
    edges = np.stack([parents, arms], axis=-1).reshape(n, -1, 2)  # (n, E, 2), arm by arm
    edges = np.take_along_axis(edges, rng.random(edges.shape[:2]).argsort(axis=1)[:, :, None], axis=1)
    goal_arm = arms[np.arange(n), rng.integers(deg, size=n)]  # (n, L-1)
    return edges, np.concatenate([start, goal_arm], axis=1)

def prompt_keys(edges, path):
    """One hashable key per graph prompt (edge list, s, g): train and test prompts must not meet."""
    return [r.tobytes() for r in np.concatenate([edges.reshape(len(edges), -1), path[:, [0, -1]]], 1)]

def fresh_graphs(n, deg, path_len, num_nodes, rng, avoid):
    """n graphs whose prompts are not among the prompts of `avoid` (the test set)."""
    seen, parts, have = set(prompt_keys(*avoid)), [], 0
    for _ in range(100):  # draw again for the few that collide
        edges, path = make_graphs(n - have, deg, path_len, num_nodes, rng)
        keep = np.array([k not in seen for k in prompt_keys(edges, path)])
        parts.append((edges[keep], path[keep]))
        have += int(keep.sum())
        if have == n:
            return tuple(np.concatenate(p) for p in zip(*parts))
    raise UsageError(f"G({deg},{path_len}) on {num_nodes} labels has too few distinct graphs for "
                     f"{n} training graphs apart from the test set: raise --num_nodes")

def parse_graphs(text, name="input"):
    """Text in the original format -> edges (n, E, 2), path (n, L). Bad lines raise UsageError."""
    # Every line must have the separators of line 1, and line 1 those of a graph: ",|" per edge but
    # the last, ",/,=", then "," between path nodes. Checking this skeleton makes parsing one split.
    text = text.rstrip("\n")
    lines, skeletons = text.split("\n"), re.sub(r"[0-9]+", "", text).split("\n")
    E, L = skeletons[0].count("|") + 1, skeletons[0].count(",") - skeletons[0].count("|") - 1
    expected = ",|" * (E - 1) + ",/,=" + "," * (L - 1)
    bad = next((i for i, sk in enumerate(skeletons) if sk != expected), None)
    if bad is None:
        try:
            nums = np.array(re.split(r"[^0-9]+", text), dtype=np.int64)
        except (ValueError, OverflowError):  # an empty or huge number somewhere
            bad = next(i for i, ln in enumerate(lines) if any(not 0 < len(x) < 19 for x in re.split(r"[^0-9]+", ln)))
    if bad is not None:
        raise UsageError(f"{name}:{bad + 1}: expected a graph 'u,v|...|u,v/s,g=s,...,g' like "
                         f"line 1, got '{lines[bad][:60]}'")
    nums = nums.reshape(len(lines), -1)
    edges, s, g, path = nums[:, :2 * E].reshape(-1, E, 2), nums[:, 2 * E], nums[:, 2 * E + 1], nums[:, 2 * E + 2:]
    on_edge = (edges[:, None, :, 0] == path[:, :-1, None]) & (edges[:, None, :, 1] == path[:, 1:, None])
    bad = np.flatnonzero((path[:, 0] != s) | (path[:, -1] != g) | ~on_edge.any(axis=2).all(axis=1))
    if len(bad):
        raise UsageError(f"{name}:{bad[0] + 1}: the answer path does not run from s to g along the edges")
    return edges, path

def read_graphs(filename):
    try:
        with open(filename) as f:
            return parse_graphs(f.read(), filename)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {filename}: {e}")

# ----------------------------------------------------------------------------- encoding
# Tokens: node labels 0..N-1, then '|' = N, '=' = N+1, '/' = N+2, '$' = N+3 (commas are dropped).
# One graph is u v | u v | ... | u v / s g = followed by the answer: 3E + 3 prompt tokens, then L.

def tok(num_nodes):
    return dict(pipe=num_nodes, eq=num_nodes + 1, slash=num_nodes + 2, dollar=num_nodes + 3)

def encode(edges, path, num_nodes, reverse=False):
    """(n, E, 2), (n, L) -> token sequences (n, 3E + 3 + L) and the prompt length P = 3E + 3.
    With reverse=True the answer is g..s: every step is then a parent lookup, nothing to plan."""
    n, E, _ = edges.shape
    t = tok(num_nodes)
    body = np.concatenate([edges, np.full((n, E, 1), t["pipe"])], axis=2).reshape(n, -1)[:, :-1]
    sg = np.stack([np.full(n, t["slash"]), path[:, 0], path[:, -1], np.full(n, t["eq"])], axis=1)
    answer = path[:, ::-1] if reverse else path
    return np.concatenate([body, sg, answer], axis=1).astype(np.int64), 3 * E + 3

def decode(seq, num_nodes):
    """Token rows -> lines of the original text format: [5, 2, |, 2, 8, /, 5, 8, =, 5, 2, 8] -> '5,2|2,8/5,8=5,2,8'."""
    symbol = {v: s for s, v in zip("|=/$", tok(num_nodes).values())}
    rows = (" ".join(symbol.get(t, str(t)) for t in row) for row in np.asarray(seq).tolist())
    return [re.sub(r"(?<=\d) (?=\d)", ",", r).replace(" ", "") for r in rows]

def write_graphs(filename, edges, path):
    """The original repository's format, one graph a line, written atomically."""
    num_nodes = int(edges.max()) + 1
    with open(filename + ".tmp", "w") as f:
        f.write("\n".join(decode(encode(edges, path, num_nodes)[0], num_nodes)) + "\n")
    os.replace(filename + ".tmp", filename)

# ----------------------------------------------------------------------------- objectives
# All three objectives read the same sequences and score only the L answer tokens. They differ in the
# targets (reverse: g..s instead of s..g, set in `encode`) and in the inputs (teacherless, below).
#
#     position        ... /  s  g  =  s  n1 n2 n3 g          (prompt length P, answer length L)
#     input x         ... /  s  g  =  s  n1 n2 n3            next-token: the true answer prefix
#     input x         ... /  s  g  =  $  $  $  $             teacherless: nothing to copy
#     target y        -1 ......... -1 s  n1 n2 n3 g          the loss reads the last L positions only

def make_inputs(seq, prompt_len, teacherless, num_nodes):
    """seq (B, P+L) -> model input x (B, P+L-1). Position P-1 ('=') predicts the first answer token,
    position P+i the answer token i+1."""
    x = seq[:, :-1]
    if teacherless:
        # Teacher forcing hands the model n_i, so n_{i+1} = child(n_i) is a lookup, and n1 is left to be
        # learned alone, without help from the later tokens (the Clever-Hans cheat, paper Sec. 4). With
        # '$' in place of every answer input there is nothing to copy: the model must plan the whole
        # path from the prompt (teacherless training, paper Sec. 5).
        x = x.clone()
        x[:, prompt_len:] = tok(num_nodes)["dollar"]
    return x

def answer_logits(model, seq, prompt_len, teacherless, num_nodes):
    """Logits of the L answer positions (B, L, vocab), with the objective's inputs."""
    return model(make_inputs(seq, prompt_len, teacherless, num_nodes), n_out=seq.shape[1] - prompt_len).float()

def answer_loss(model, seq, prompt_len, teacherless, num_nodes):
    """Cross-entropy on the answer tokens only: the prompt is given, not predicted."""
    logits = answer_logits(model, seq, prompt_len, teacherless, num_nodes)  # (B, L, vocab)
    return F.cross_entropy(logits.flatten(0, 1), seq[:, prompt_len:].flatten())

# ----------------------------------------------------------------------------- model
# A compact GPT in the nanoGPT tradition: learned positions, pre-LayerNorm blocks, tied head.
# Mamba, the paper's other architecture, lives in mamba_min.py with the same interface.

class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=False), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd, bias=False))

    def attn(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.qkv(x).split(C, dim=2))  # 3 x (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x):
        """x (B, T, C) -> (B, T, C)"""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_embd, n_head):
        super().__init__()
        if n_embd % n_head:
            raise UsageError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input/output embedding
        for name, p in self.named_parameters():  # GPT-2 init; residual projections scaled by depth
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

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
        try:
            from mamba_min import Mamba
        except ImportError as e:
            raise UsageError(f"--model mamba needs mamba_min.py next to nanofail.py ({e})")
        return Mamba(vocab_size, cfg.n_layer, cfg.n_embd, cfg.d_state, cfg.expand, cfg.d_conv)
    return GPT(vocab_size, block_size, cfg.n_layer, cfg.n_embd, cfg.n_head)

# ----------------------------------------------------------------------------- evaluation

def position_names(path_len, reverse=False):
    names = ["s"] + [f"n{i}" for i in range(1, path_len - 1)] + ["g"]
    return names[::-1] if reverse else names

@torch.no_grad()
def evaluate(model, seq, prompt_len, teacherless, num_nodes, amp=nullcontext, batch_size=1000):
    """Per-position test accuracy with the training inputs ("forced": the true answer prefix, or '$'
    tokens when teacherless), exact match of greedy decoding, and one worked example: the decoded
    answer of the first test graph the model gets wrong (graph 0 if none). The Clever-Hans signature
    is forced accuracy ~1/deg on n1 and ~1 on every later node."""
    model.eval()
    right = []
    for i in range(0, len(seq), batch_size):
        s = seq[i:i + batch_size]  # (B, P+L)
        with amp():
            right.append(answer_logits(model, s, prompt_len, teacherless, num_nodes).argmax(-1) == s[:, prompt_len:])
    right = torch.cat(right)  # (n, L)
    # Greedy decoding is right all the way exactly when every forced prediction is right: each decoded
    # token then sees the true prefix. So exact match needs no decoding, a single pass per graph.
    k = int((~right.all(1)).float().argmax())  # the first graph with a wrong token, or 0
    with amp():  # teacherless decoding is the forced pass itself; otherwise each token is fed back in
        example = answer_logits(model, seq[k:k + 1], prompt_len, True, num_nodes).argmax(-1) if teacherless \
            else model.generate(seq[k:k + 1, :prompt_len], seq.shape[1] - prompt_len)
    model.train()
    return dict(test_exact_match=right.all(1).float().mean().item(), forced_token_acc=right.float().mean(0).tolist(),
                example_index=k, example_pred=example[0].tolist())

def explain(graph, pred, reverse=False):
    """Where one decoded answer went wrong, e.g. 'wrong arm at n1, then n2 n3 along the edges from
    there' (the Clever-Hans cheat seen from outside). graph: one line of the original text format."""
    edges, path = (a[0].tolist() for a in parse_graphs(graph))
    names, answer = position_names(len(path), reverse), path[::-1] if reverse else path
    wrong = [i for i, (p, a) in enumerate(zip(pred, answer)) if p != a]
    if not wrong:
        return "right"
    step = dict((v, u) if reverse else (u, v) for u, v in edges)  # the next node: child, or parent
    i, rest = wrong[0], " ".join(names[j] for j in wrong[1:])
    follows = rest and all(step.get(pred[j - 1]) == pred[j] for j in wrong[1:])
    head = "wrong arm at n1" if not reverse and i == 1 and [path[0], pred[1]] in edges else f"wrong at {names[i]}"
    return head + (f", then {rest} along the edges from there" if follows else f", {rest} too" if rest else "")

def verdict(r, cfg):
    """One line saying what the accuracy pattern means, and what to run next."""
    names, f, exact = position_names(cfg.path_len, cfg.reverse), r["forced_token_acc"], r["test_exact_match"]
    if cfg.teacherless:  # nothing to copy: each learned position was planned from the prompt
        learned, guessed = (" ".join(n for n, a in zip(names, f) if (a > 0.9) == yes) for yes in (True, False))
        said = (f"solved, the whole path planned from the prompt (exact {exact:.3f})" if exact >= 0.95 else
                f"planned from the prompt so far (> 0.9): {learned or 'nothing'}; not yet: {guessed}")
        measured = (" (on G(2,5), at every budget measured: the Clever-Hans cheat, exact ~ 1/deg)"
                    if (cfg.deg, cfg.path_len) == (2, 5) else "")
        win = (f"Teacherless GPT beats next-token GPT on G(2,5) with 8 layers in ~1 hour on 2 bf16 CPU cores: "
               f"{WIN_COMMANDS[0]}; on G(2,3) in minutes: {WIN_COMMANDS[1]}")
        win = win if cfg.model == "gpt" else f"No teacherless Mamba win measured yet. {win}"
        return (f"teacherless: {said}. Next-token training on this budget: {command(cfg, teacherless=False)}{measured}."
                + ("" if exact >= 0.95 else f" {win}"))
    if exact >= 0.95:
        return "solved: the model finds the path (exact match ~ 1)."
    if not cfg.reverse and f[1] < 1.5 / cfg.deg and min(f[2:], default=1) > 0.9:
        return (f"Clever Hans: every later node is read off the edge list (forced ~ 1), but n1, the node "
                f"after s, is a guess among {cfg.deg} arms (~ 1/deg), so exact match ~ 1/deg.")
    return "still learning: neither the Clever-Hans signature nor a solution yet."

def report(r, cfg):
    """Print an evaluation: accuracy per answer position, the verdict, and the worked example."""
    names, graph = position_names(cfg.path_len, cfg.reverse), r["example"]
    print(f"  {'position':<10}" + "".join(f"{n:>7}" for n in names))
    print(f"  {'forced':<10}" + "".join(f"{x:>7.3f}" for x in r["forced_token_acc"]) +
          f"   exact match {r['test_exact_match']:.3f}")
    print("  -> " + verdict(r, cfg))
    answer = graph.split("=")[1].split(",")[::-1 if cfg.reverse else 1]
    print(f"  example   {graph}   (test graph {r['example_index']})\n  {'true':<10}{' '.join(answer)}\n  {'model':<10}"
          f"{' '.join(map(str, r['example_pred']))}   {explain(graph, r['example_pred'], cfg.reverse)}")

# ----------------------------------------------------------------------------- training

def knob(default, help, **kw):
    """A Config field. It stays None until a preset or an explicit value sets it; `default` is last."""
    return field(default=None, metadata=dict(default=default, help=help, **kw))

# Presets by (name, model): starting values that Config fills in below any value given.
PAPER = dict(n_train=200_000, n_test=20_000, batch_size=256, lr=5e-4, max_iters=500 * 200_000 // 256,
             warmup_iters=1_000, eval_interval=5_000, log_interval=500)  # 500 epochs of 200k graphs
# Mamba learns the edge lookup more slowly per step, and its CPU scan is memory-bound: fewer layers,
# smaller batches and more steps show the same signature in a few minutes.
QUICK_MAMBA = dict(n_layer=2, batch_size=64, lr=3e-3, max_iters=1500, eval_interval=250)
# G(2,3): the answer is s, n1, g, and n1 = parent(g) is a one-step plan. Teacherless training learns
# it in ~5 CPU minutes; next-token training still guesses n1.
G23 = dict(path_len=3, n_train=200_000, batch_size=256, max_iters=3000, eval_interval=250)
# G(2,5), the paper's graph: the plan is three lookups back from g (n3, n2, then n1), each a plateau.
# Depth shortens them and a constant lr outlasts them (a cosine decays before the last one ends).
G25 = dict(n_layer=8, n_train=200_000, batch_size=256, lr=5e-4, min_lr_frac=1, max_iters=16_000,
           eval_interval=1000, log_interval=500)
PRESETS = {
    ("quick", "gpt"): {},  # the Config defaults: a 2-core laptop CPU shows the Clever-Hans signature in minutes
    ("quick", "mamba"): QUICK_MAMBA,
    ("paper", "gpt"): dict(PAPER, n_layer=12, n_embd=384, n_head=6),
    ("paper", "mamba"): dict(PAPER, n_layer=12, n_embd=384),
    ("g23", "gpt"): G23,
    ("g23", "mamba"): dict(QUICK_MAMBA, **G23),
    ("g25", "gpt"): G25,  # no Mamba: teacherless Mamba has not won even on G(2,4) (RESULTS.md)
}

@dataclass
class Config:
    # task: the path-star graph G(deg, path_len) over num_nodes labels, and the objective
    deg: int = knob(2, "number of arms leaving the start node s", min=1)
    path_len: int = knob(5, "nodes on the path s..g, s included", min=2)
    num_nodes: int = knob(50, "node labels 0..num_nodes-1 (read off the data when loading files)", min=1)
    n_train: int = knob(50_000, "training graphs (the pool, epoch after epoch, until --fresh_after)", min=1)
    fresh_after: int = knob(0, "from this step on, train on new graphs, each seen once (0: never)", min=0)
    n_test: int = knob(1_000, "test graphs", min=1)
    reverse: bool = knob(False, "target the reversed path g..s (each step is a parent lookup)")
    teacherless: bool = knob(False, "replace answer inputs by '$' and predict the whole answer at once")
    # model
    model: str = knob("gpt", "architecture", choices=("gpt", "mamba"))
    n_layer: int = knob(4, "layers", min=1)
    n_embd: int = knob(128, "width (d_model)", min=1)
    n_head: int = knob(4, "attention heads (gpt)", min=1)
    d_state: int = knob(16, "SSM state size N (mamba)", min=1)
    expand: int = knob(2, "inner width = expand * n_embd (mamba)", min=1)
    d_conv: int = knob(4, "causal conv kernel (mamba)", min=1)
    # training
    batch_size: int = knob(128, "graphs per step, over all processes", min=1)
    lr: float = knob(1e-3, "peak learning rate (AdamW)", min=0)
    min_lr_frac: float = knob(0.1, "cosine decay ends at lr * min_lr_frac (1: constant after warmup)", min=0)
    warmup_iters: int = knob(100, "linear warmup steps", min=0)
    max_iters: int = knob(600, "optimizer steps", min=0)
    weight_decay: float = knob(0.1, "AdamW weight decay (matrices only)", min=0)
    grad_clip: float = knob(1.0, "clip the gradient norm to this (0: off)", min=0)
    dtype: str = knob("auto", "compute dtype; auto = bf16 autocast where the device runs it natively",
                      choices=("auto", "bfloat16", "float32"))
    compile: bool = knob(False, "torch.compile the training step")
    device: str = knob("auto", "auto picks cuda, then mps, then cpu")
    seed: int = knob(1337, "seed for data, init and batches")
    # logging and I/O
    log_interval: int = knob(50, "print a progress line every this many steps", min=1)
    eval_interval: int = knob(300, "evaluate on the test set every this many steps (0: only at the end)", min=0)
    out_dir: str = knob("", "write results.json and ckpt.pt here")
    resume: str = knob("", "continue from this ckpt.pt, with its settings (flags given override them)")
    export_data: str = knob("", "write DIR/train.txt and DIR/test.txt in the original format, then exit")
    train_file: str = knob("", "load training graphs from this file (original text format)")
    test_file: str = knob("", "load test graphs from this file (original text format)")
    preset: str = knob("quick", "starting values, below any value given: quick (CPU minutes), paper (one GPU), "
                       "g23 and g25 (where teacherless wins: CPU minutes, ~1 hour on 2 bf16 cores; g25 for gpt only)",
                       choices=tuple(dict.fromkeys(name for name, _ in PRESETS)))

    def __post_init__(self):
        # A value given wins, then the preset's for this model, then the default above: so that
        # Config(preset="g23", teacherless=True) is the same run as --preset g23 --teacherless.
        self.model, self.preset = self.model or "gpt", self.preset or "quick"
        if (self.preset, self.model) not in PRESETS:
            raise UsageError(f"no preset '{self.preset}' for model '{self.model}': see python nanofail.py -h")
        for f in fields(self):
            if getattr(self, f.name) is None:
                setattr(self, f.name, PRESETS[self.preset, self.model].get(f.name, f.metadata["default"]))
            if "min" in f.metadata and getattr(self, f.name) < f.metadata["min"]:
                raise UsageError(f"--{f.name} must be >= {f.metadata['min']} (got {getattr(self, f.name)})")

# Where teacherless GPT beats next-token GPT on the same graph and budget (RESULTS.md). G(2,5): the
# pool to step 6000, then new graphs, ~1 hour on 2 bf16 CPU cores (seeds 2 and 4 of four win); G(2,3): minutes.
WIN_COMMANDS = ("python nanofail.py --preset g25 --teacherless --fresh_after 6000 --seed 2",
                "python nanofail.py --preset g23 --teacherless")

def known_knobs(saved):
    """A config dict saved by this or an older version: knobs Config no longer has are dropped, and the
    knobs it did not have yet take their default, which is what that version did (not the preset's)."""
    return {f.name: saved.get(f.name, f.metadata["default"]) for f in fields(Config)}

def command(cfg, **change):
    """The command line that runs cfg with `change` applied: its preset, then the flags that differ from
    the preset, leaving out where it writes and what its data files set (task and set sizes)."""
    cfg = Config(**{**asdict(cfg), **change})
    base = dict(asdict(Config(preset=cfg.preset, model=cfg.model)), model="gpt")
    skip = {"preset", "out_dir", "resume"}
    if cfg.train_file or cfg.test_file:  # make_splits reads the task off the files, and each file's size
        skip |= {"deg", "path_len", "num_nodes"} | {n for n, f in (("n_train", cfg.train_file), ("n_test", cfg.test_file)) if f}
    flags = [f"--{k}" if v is True else f"--no-{k}" if v is False else f"--{k} {v}"
             for k, v in asdict(cfg).items() if v != base[k] and k not in skip]
    return " ".join(["python nanofail.py"] + [f"--preset {cfg.preset}"] * (cfg.preset != "quick") + flags)

def make_splits(cfg):
    """Train and test graphs, generated from cfg.seed or read from the original text files (then deg,
    path_len and num_nodes are read off the data). No test prompt occurs in the training set."""
    loaded = {k: read_graphs(f) for k, f in (("train", cfg.train_file), ("test", cfg.test_file)) if f}
    if loaded:
        (E, L), *other = {(e.shape[1], p.shape[1]) for e, p in loaded.values()}
        if other or E % (L - 1):
            raise UsageError("--train_file and --test_file must hold path-star graphs of one size")
        cfg.deg, cfg.path_len = E // (L - 1), L
        cfg.num_nodes = max(max(int(e.max()) for e, _ in loaded.values()) + 1, 1 + cfg.deg * (L - 1))
    if cfg.deg < 1 or cfg.path_len < 2 or 1 + cfg.deg * (cfg.path_len - 1) > cfg.num_nodes:
        raise UsageError(f"G({cfg.deg},{cfg.path_len}) needs {1 + cfg.deg * (cfg.path_len - 1)} distinct node labels, "
                         f"not {cfg.num_nodes}: raise --num_nodes or lower --deg/--path_len")
    rng_test, rng_train = (np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(2))
    task = (cfg.deg, cfg.path_len, cfg.num_nodes)
    test = loaded.get("test") or make_graphs(cfg.n_test, *task, rng_test)
    train = loaded.get("train") or fresh_graphs(cfg.n_train, *task, rng_train, avoid=test)
    cfg.n_train, cfg.n_test = len(train[0]), len(test[0])
    return train, test

def unseen_graphs(cfg, test):
    """The graphs for the steps from --fresh_after on: one per training example left, drawn from a seed
    of their own (the third child of cfg.seed; make_splits uses the first two), none a test prompt."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(3)[2])
    n = max(cfg.max_iters - cfg.fresh_after, 0) * cfg.batch_size
    return fresh_graphs(n, cfg.deg, cfg.path_len, cfg.num_nodes, rng, avoid=test)

def pick_device(name):
    """auto: cuda, then mps, then cpu. A device this machine does not have is a usage error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    try:
        device = torch.device(("cuda" if cuda else "mps" if mps else "cpu") if name == "auto" else name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name}: use auto, cpu, cuda, cuda:N or mps")
    if (device.type == "cuda" and not cuda) or (device.type == "mps" and not mps):
        raise UsageError(f"--device {name} is not available on this machine: use --device auto")
    return device

def autocast_dtype(dtype, device):
    """bf16 autocast where the hardware has native bf16 math (Ampere+ GPUs, AVX512-BF16/AMX CPUs)."""
    if dtype == "auto":
        native = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or (
            device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, dtype)

@contextmanager
def compute_context(device, dtype):
    """Every forward pass runs in here: autocast to `dtype`, and on CPU the plain math attention
    (PyTorch's fused CPU attention kernel is ~3x slower in bf16 at these ~30-token sequences)."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32), \
            (sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext()):
        yield

def lr_at(step, cfg):
    """Linear warmup, then cosine decay to lr * min_lr_frac at max_iters (in optimizer steps)."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    frac = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))

def make_optimizer(model, cfg, device):
    """AdamW; weight decay on matrices only (not norms, biases, or Mamba's A_log and D)."""
    decay = [p for p in model.parameters() if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)]
    rest = [p for p in model.parameters() if not any(p is d for d in decay)]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=rest, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type in ("cuda", "cpu"))

def batches(n, batch_size, gen):
    """Endless shuffled epochs of row indices, drawn where `gen` lives (on a GPU: no host sync)."""
    while True:
        perm = torch.randperm(n, generator=gen, device=gen.device)
        for i in range(0, max(n - batch_size, 0) + 1, batch_size):
            yield perm[i:i + batch_size]

PEAK_BF16_TFLOPS = {"H100": 989, "H200": 989, "A100": 312}  # dense, for MFU on CUDA

def distributed(device):
    """Under torchrun (RANK set): join the process group, one GPU per process on CUDA (nccl), gloo on
    CPU. Returns (rank, world_size, device). Without torchrun: (0, 1, device), nothing imported."""
    if "RANK" not in os.environ:
        return 0, 1, device
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device

def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["model"], ckpt["optimizer"], ckpt["step"], ckpt["history"], ckpt["config"]  # noqa: B018  (all there?)
        return ckpt
    except Exception as e:
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}): pass a ckpt.pt written by nanofail")

def train(cfg):
    """Train cfg's model on cfg's task and objective, evaluating every eval_interval steps. Returns the
    history of evaluations (also in out_dir/results.json; the model and optimizer in out_dir/ckpt.pt)."""
    # data: every process builds the same splits from the same seed, tokenised once, on the device
    (tr_edges, tr_path), (te_edges, te_path) = make_splits(cfg)
    rank, world, device = distributed(pick_device(cfg.device))
    if cfg.batch_size % world:
        raise UsageError(f"--batch_size {cfg.batch_size} does not split over {world} processes")
    L, N = cfg.path_len, cfg.num_nodes
    test_seq, P = encode(te_edges, te_path, N, cfg.reverse)
    test_seq = torch.from_numpy(test_seq).to(device)
    def train_data(step):
        """The training sequences from `step` on, and batches drawn from `step`'s seed: a run resumed
        at the switch to new graphs draws the same batches as one run that passes through it."""
        graphs = unseen_graphs(cfg, (te_edges, te_path)) if 0 < cfg.fresh_after <= step else (tr_edges, tr_path)
        seq = torch.from_numpy(encode(*graphs, N, cfg.reverse)[0]).to(device)
        return seq, batches(len(seq), cfg.batch_size, torch.Generator(device).manual_seed(cfg.seed + step))
    # model and optimizer, fresh or from a checkpoint
    torch.manual_seed(cfg.seed)
    raw = build_model(cfg, vocab_size=N + 4, block_size=P + L - 1).to(device)
    opt = make_optimizer(raw, cfg, device)
    step, history, saved = 0, [], cfg.resume  # saved: the last checkpoint, named if the run stops
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume)
        raw.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, history = ckpt["step"], ckpt["history"]
    (train_seq, stream), start, per_rank = train_data(step), step, cfg.batch_size // world
    model = torch.compile(raw) if cfg.compile else raw  # evaluation runs `raw`: only training is compiled
    if world > 1:  # DistributedDataParallel averages the gradients over the processes in backward()
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    dtype = autocast_dtype(cfg.dtype, device)
    amp = lambda: compute_context(device, dtype)  # noqa: E731
    log = print if rank == 0 else (lambda *a, **k: None)  # only rank 0 speaks, evaluates and saves
    n_params, T = sum(p.numel() for p in raw.parameters()), P + L - 1
    # FLOPs per step, the PaLM / nanoGPT estimate: 6 per parameter and token (matmuls forward and
    # backward) plus attention's 12 * n_layer * n_embd * T (the Mamba scan is not counted)
    step_flops = (6 * n_params + (12 * cfg.n_layer * cfg.n_embd * T if cfg.model == "gpt" else 0)) * T * cfg.batch_size
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), 0)
    log(f"{cfg.model} {n_params / 1e6:.2f}M params on {device}{f' x {world}' if world > 1 else ''} ({str(dtype)[6:]}) | "
        f"G({cfg.deg},{L}) N={N} | {len(train_seq)} train / {len(test_seq)} test graphs | prompt {P} tokens, answer {L} | "
        f"{'teacherless' if cfg.teacherless else 'next-token'}{' reverse' if cfg.reverse else ''}")
    if cfg.out_dir and rank == 0:
        make_dir(cfg.out_dir, "out_dir")
    window, t_window, t_start = [], time.time(), time.time()
    try:
        while step < cfg.max_iters:
            if step == cfg.fresh_after != start:  # the pool has done its work: new graphs from here on
                train_seq, stream = train_data(step)
                log(f"step {step}: from here on {len(train_seq)} new graphs, each seen once")
            # fetch: this process's slice of the global batch
            seq = train_seq[next(stream)[rank * per_rank:(rank + 1) * per_rank]]  # (B / world, P+L)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            # forward, backward, clip, update
            with amp():
                loss = answer_loss(model, seq, P, cfg.teacherless, N)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            window.append(loss.detach())  # stays on the device: a GPU is not synced every step
            # check: stop at the first nan or inf loss (on CUDA, checked at each progress line)
            do_eval = step == cfg.max_iters or (cfg.eval_interval and step % cfg.eval_interval == 0)
            do_log = step % cfg.log_interval == 0 or do_eval
            if device.type != "cuda" or do_log:
                losses = torch.stack(window)
                if not torch.isfinite(losses).all():
                    j = int((~torch.isfinite(losses)).nonzero()[0])
                    raise Stopped(f"the loss is {losses[j].item()} at step {step - len(window) + 1 + j}: training "
                                  f"diverged; lower --lr (now {cfg.lr:g}). {resume_hint(saved)}")
            # log: mean loss over the window (and over the processes), speed
            if do_log:
                train_loss, its = losses.mean(), len(window) / (time.time() - t_window)
                if world > 1:
                    torch.distributed.all_reduce(train_loss)
                    train_loss /= world
                log(f"step {step:>6}/{cfg.max_iters} | loss {train_loss.item():.4f} | lr {lr_at(step - 1, cfg):.1e} | "
                    f"{its:.2f} it/s {its * cfg.batch_size * T / 1e3:.0f}k tok/s {its * step_flops / 1e9:.0f} GFLOP/s"
                    f"{f' MFU {its * step_flops / peak / 1e10:.0f}%' if peak and dtype == torch.bfloat16 else ''} | "
                    f"ETA {(cfg.max_iters - step) / its / 60:.1f} min", flush=True)
            # evaluate, report, save
            if do_eval and rank == 0:
                r = dict(step=step, train_loss=train_loss.item(), **evaluate(raw, test_seq, P, cfg.teacherless, N, amp))
                k = r["example_index"]  # the worked example, in the original text format
                r["example"] = decode(encode(te_edges[k:k + 1], te_path[k:k + 1], N)[0], N)[0]
                history.append(r)
                log(f"eval at step {step}:")
                report(r, cfg)
                if cfg.out_dir:
                    saved = os.path.join(cfg.out_dir, "ckpt.pt")
                    atomic_save(dict(config=asdict(cfg), history=history, final=r), os.path.join(cfg.out_dir, "results.json"))
                    atomic_save(dict(model=raw.state_dict(), optimizer=opt.state_dict(), config=asdict(cfg), step=step,
                                     history=history), saved)
            if do_log:
                window, t_window = [], time.time()  # it/s counts training steps only, not evaluation
    except KeyboardInterrupt:
        raise Stopped(f"interrupted at step {step}. {resume_hint(saved)}") from None
    log(f"done in {(time.time() - t_start) / 60:.1f} min")
    if world > 1:
        torch.distributed.destroy_process_group()
    return history

def resume_hint(ckpt_path):
    if not ckpt_path:
        return "No checkpoint was written (--out_dir DIR keeps one at every evaluation)."
    return f"The last checkpoint is {ckpt_path}; continue with: python nanofail.py --resume {ckpt_path}"

def atomic_save(obj, path):
    """Write path.tmp, then rename it: a crash never leaves a half-written file."""
    with open(path + ".tmp", "w" if path.endswith(".json") else "wb") as f:
        json.dump(obj, f, indent=1) if path.endswith(".json") else torch.save(obj, f)
    os.replace(path + ".tmp", path)

# ----------------------------------------------------------------------------- command line

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f"nanofail: error: {message} (see python nanofail.py -h)\n")

def parse_config(argv=None):
    """Flags -> Config. The command line is generated from the dataclass; flags not given stay None,
    so the preset (or, with --resume, the checkpoint's settings) fills them in."""
    p = Parser(description="The Pitfalls of Next-Token Prediction, on path-star graphs.",
               argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        h = f"{f.metadata['help']} (default: {f.metadata['default']})"
        if f.type is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=h)
        else:
            p.add_argument(f"--{f.name}", type=f.type, help=h, choices=f.metadata.get("choices"))
    given = vars(p.parse_args(argv))
    if "resume" not in given:
        return Config(**given)
    saved = known_knobs(load_checkpoint(given["resume"])["config"])
    clash = [f"--{k} {saved[k]}" for k in ("model", "n_layer", "n_embd", "n_head", "d_state", "expand", "d_conv",
                                           "deg", "path_len", "num_nodes") if given.get(k, saved[k]) != saved[k]]
    if clash:
        raise UsageError(f"checkpoint {given['resume']} was trained with a different model or task: use "
                         f"{' '.join(clash)} or leave those flags out")
    return Config(**{**saved, **given})

@contextmanager
def reported():
    """Bad input, a path that cannot be written or a stopped run: one line on stderr, no traceback."""
    try:
        yield
    except (UsageError, OSError, Stopped) as e:
        print(f"nanofail: {'stopped' if isinstance(e, Stopped) else 'error'}: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, Stopped) else 2)
    except KeyboardInterrupt:  # before training started (train() reports its own)
        print("nanofail: stopped: interrupted", file=sys.stderr)
        sys.exit(1)

def make_dir(path, flag):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the folder {path} for --{flag} ({e.strerror}): pass another path")

def main(argv=None):
    with reported():
        cfg = parse_config(argv)
        if cfg.export_data:  # the splits in the original format, DIR/train.txt and DIR/test.txt
            (tr_e, tr_p), (te_e, te_p) = make_splits(cfg)
            make_dir(cfg.export_data, "export_data")
            write_graphs(os.path.join(cfg.export_data, "train.txt"), tr_e, tr_p)
            write_graphs(os.path.join(cfg.export_data, "test.txt"), te_e, te_p)
            return print(f"wrote {len(tr_e)} + {len(te_e)} G({cfg.deg},{cfg.path_len}) graphs to {cfg.export_data}/")
        train(cfg)

# A notebook kernel runs cells as __main__ with its own argv (-f kernel.json): parse nothing there.
if __name__ == "__main__" and "ipykernel" not in sys.modules and "ipykernel" not in sys.argv[0]:
    main()
