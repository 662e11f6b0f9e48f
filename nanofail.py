"""
nanofail: "The Pitfalls of Next-Token Prediction" (Bachmann & Nagarajan, ICML 2024) in one file.

The task is path-finding on a path-star graph G(deg, path_len): a start node s with `deg` arms of
`path_len - 1` further nodes each. The prompt lists the edges in random order, then s and the goal g
(the end of one arm); the answer is the path s..g. Trained with teacher forcing, a model learns the
"Clever Hans" cheat (each node is the child of the node before it, read off the edge list) and never
learns the one hard step, the node after s: exact match stays at 1/deg. Reversed targets (g..s) are
easy, and teacherless training (answer inputs replaced by `$`) removes the cheat.

    python nanofail.py                              # CPU-quick G(2,5) next-token run: the Clever-Hans signature
    python nanofail.py --reverse                    # the same task, answer reversed: solved
    python nanofail.py --model mamba --teacherless
    python nanofail.py --preset g23 --teacherless   # G(2,3): teacherless wins on a CPU
    python nanofail.py -h                           # every knob
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

# ----------------------------------------------------------------------------- config


def knob(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class Config:
    # task: the path-star graph G(deg, path_len) over num_nodes labels
    deg: int = knob(2, "number of arms leaving the start node s")
    path_len: int = knob(5, "nodes on the path s..g, s included")
    num_nodes: int = knob(50, "node labels 0..num_nodes-1 (read off the data when loading files)")
    n_train: int = knob(50_000, "training graphs")
    n_test: int = knob(1_000, "test graphs")
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
    batch_size: int = knob(256, "graphs per step", min=1)
    lr: float = knob(1e-3, "peak learning rate (AdamW)", min=0)
    min_lr_frac: float = knob(0.1, "cosine decay ends at lr * min_lr_frac")
    warmup_iters: int = knob(100, "linear warmup steps", min=0)
    max_iters: int = knob(600, "optimizer steps", min=0)
    weight_decay: float = knob(0.1, "AdamW weight decay (matrices only)", min=0)
    grad_clip: float = knob(1.0, "clip the gradient norm to this (0: off)", min=0)
    dtype: str = knob("auto", "compute dtype; auto = bf16 autocast where the device runs it natively",
                      choices=("auto", "bfloat16", "float32"))
    compile: bool = knob(False, "torch.compile the model")
    device: str = knob("auto", "auto picks cuda, then mps, then cpu")
    seed: int = knob(1337, "seed for data, init and batches")
    # logging and I/O
    log_interval: int = knob(50, "print a progress line every this many steps", min=1)
    eval_interval: int = knob(200, "evaluate on the test set every this many steps (0: only at the end)", min=0)
    out_dir: str = knob("", "write results.json and ckpt.pt here")
    resume: str = knob("", "continue training from this ckpt.pt")
    export_data: str = knob("", "write DIR/train.txt and DIR/test.txt in the original format, then exit")
    train_file: str = knob("", "load training graphs from this file (original text format)")
    test_file: str = knob("", "load test graphs from this file (original text format)")
    plot: tuple = knob((), "plot the results.json of these run folders and exit (needs matplotlib)")
    plot_out: str = knob("clever_hans.png", "where --plot writes its figure")
    preset: str = knob("quick", "starting values, overridden by explicit flags: quick (CPU minutes), paper "
                       "(one GPU), g23 (CPU, the setting where teacherless wins)", choices=("quick", "paper", "g23"))


# Presets by (name, model); explicit flags override them.
PAPER = dict(n_train=200_000, n_test=20_000, batch_size=256, lr=5e-4, max_iters=500 * 200_000 // 256,
             warmup_iters=1_000, eval_interval=5_000, log_interval=500)  # 500 epochs of 200k graphs
QUICK_MAMBA = dict(n_layer=2, batch_size=64, lr=3e-3, max_iters=2000, eval_interval=250)
# G(2,3): the answer is s, n1, g, and n1 = parent(g) is a one-step plan. Teacherless training learns
# it in ~5 CPU minutes; next-token training still guesses n1 (the cheapest such setting found).
G23 = dict(path_len=3, n_train=200_000, max_iters=3000, eval_interval=250)
PRESETS = {
    ("quick", "gpt"): {},  # the defaults above: a 2-core laptop CPU shows the Clever-Hans signature in minutes
    # Mamba learns the edge lookup more slowly per step, and its CPU scan is memory-bound: fewer
    # layers, smaller batches and more steps show the same signature in a few minutes.
    ("quick", "mamba"): QUICK_MAMBA,
    ("paper", "gpt"): dict(PAPER, n_layer=12, n_embd=384, n_head=6),
    ("paper", "mamba"): dict(PAPER, n_layer=12, n_embd=384),
    ("g23", "gpt"): G23,
    ("g23", "mamba"): dict(QUICK_MAMBA, **G23),
}


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f"nanofail: error: {message} (see python nanofail.py -h)\n")


def parse_config(argv=None):
    """Config defaults <- preset <- explicit flags. The CLI is generated from the dataclass."""
    p = Parser(description=__doc__.split("\n\n")[1], argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        h = f"{f.metadata['help']} (default: {f.default})"
        if f.type is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=h)
        elif f.type is tuple:
            p.add_argument(f"--{f.name}", nargs="+", metavar="RUN_DIR", help=h)
        else:
            p.add_argument(f"--{f.name}", type=f.type, help=h, choices=f.metadata.get("choices"))
    explicit = vars(p.parse_args(argv))
    preset = PRESETS[explicit.get("preset", "quick"), explicit.get("model", "gpt")]
    cfg = Config(**{**preset, **explicit})
    for f in fields(Config):
        if "min" in f.metadata and getattr(cfg, f.name) < f.metadata["min"]:
            raise UsageError(f"--{f.name} must be >= {f.metadata['min']} (got {getattr(cfg, f.name)})")
    return cfg


@contextmanager
def reported():
    """Bad input (a UsageError, or a path that cannot be written) ends the run with one line on stderr
    and exit status 2, no traceback."""
    try:
        yield
    except (UsageError, OSError) as e:
        print(f"nanofail: error: {e}", file=sys.stderr)
        sys.exit(2)


def make_dir(path, flag):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the folder {path} for --{flag} ({e.strerror}): pass another path")


# ----------------------------------------------------------------------------- data
# Tokens: node labels 0..N-1, then '|' = N, '=' = N+1, '/' = N+2, '$' = N+3 (commas are dropped).
# One graph: u v | u v | ... | u v / s g = n_1 ... n_L, the answer being the path (or its reverse).


def tok(num_nodes):
    return dict(pipe=num_nodes, eq=num_nodes + 1, slash=num_nodes + 2, dollar=num_nodes + 3)


def check_task(deg, path_len, num_nodes):
    if deg < 1 or path_len < 2:
        raise UsageError(f"need deg >= 1 and path_len >= 2 (got deg={deg}, path_len={path_len})")
    if 1 + deg * (path_len - 1) > num_nodes:
        raise UsageError(f"G({deg},{path_len}) has {1 + deg * (path_len - 1)} nodes but num_nodes="
                         f"{num_nodes}: raise --num_nodes or lower --deg/--path_len")


def make_graphs(n, deg, path_len, num_nodes, rng):
    """n random path-star graphs, vectorised. Returns edges (n, E, 2) with E = deg*(path_len-1)
    parent->child edges in random order, and path (n, path_len) = s..g along a random arm."""
    labels = rng.random((n, num_nodes), dtype=np.float32).argsort(axis=1)[:, :1 + deg * (path_len - 1)]
    start, arms = labels[:, :1], labels[:, 1:].reshape(n, deg, path_len - 1)  # (n, 1), (n, deg, L-1)
    parents = np.concatenate([np.broadcast_to(start[:, :, None], (n, deg, 1)), arms[:, :, :-1]], axis=2)
    edges = np.stack([parents, arms], axis=-1).reshape(n, -1, 2)  # (n, E, 2), arm by arm
    edges = np.take_along_axis(edges, rng.random(edges.shape[:2]).argsort(axis=1)[:, :, None], axis=1)
    goal_arm = arms[np.arange(n), rng.integers(deg, size=n)]  # (n, L-1)
    return edges, np.concatenate([start, goal_arm], axis=1)


def encode(edges, path, num_nodes, reverse=False):
    """(n, E, 2), (n, L) -> token sequences (n, 3E + 3 + L) and the prompt length 3E + 3."""
    n, E, _ = edges.shape
    t = tok(num_nodes)
    body = np.concatenate([edges, np.full((n, E, 1), t["pipe"])], axis=2).reshape(n, -1)[:, :-1]
    sg = np.stack([np.full(n, t["slash"]), path[:, 0], path[:, -1], np.full(n, t["eq"])], axis=1)
    answer = path[:, ::-1] if reverse else path
    return np.concatenate([body, sg, answer], axis=1).astype(np.int64), 3 * E + 3


def make_splits(cfg):
    """Generate (or load) train and test graphs; no test prompt occurs in the training set."""
    if cfg.train_file or cfg.test_file:
        return load_splits(cfg)
    check_task(cfg.deg, cfg.path_len, cfg.num_nodes)
    if cfg.n_train < 1 or cfg.n_test < 1:
        raise UsageError(f"need n_train >= 1 and n_test >= 1 (got {cfg.n_train}, {cfg.n_test})")
    rng_test, rng_train = (np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(2))
    test = make_graphs(cfg.n_test, cfg.deg, cfg.path_len, cfg.num_nodes, rng_test)
    return fresh_train(cfg, test, rng_train), test


def prompt_keys(edges, path):
    """One hashable key per graph prompt (edge list, s, g) for the disjointness check."""
    return [r.tobytes() for r in np.concatenate([edges.reshape(len(edges), -1), path[:, [0, -1]]], 1)]


def fresh_train(cfg, test, rng):
    """cfg.n_train graphs whose prompts are not in `test`, drawing extra rounds if some collide."""
    seen, parts, have = set(prompt_keys(*test)), [], 0
    for _ in range(100):
        edges, path = make_graphs(cfg.n_train - have, cfg.deg, cfg.path_len, cfg.num_nodes, rng)
        keep = np.array([k not in seen for k in prompt_keys(edges, path)])
        parts.append((edges[keep], path[keep]))
        have += int(keep.sum())
        if have == cfg.n_train:
            return tuple(np.concatenate(p) for p in zip(*parts))
    raise UsageError(f"G({cfg.deg},{cfg.path_len}) on {cfg.num_nodes} labels has too few distinct graphs "
                     f"for {cfg.n_train} training graphs disjoint from the test set: raise --num_nodes")


def write_graphs(path_out, edges, path):
    """The original repository's format, one graph a line: u,v|u,v|...|u,v/s,g=s,n1,...,g"""
    n, E, _ = edges.shape
    nums = np.concatenate([edges.reshape(n, -1), path[:, [0, -1]], path], axis=1)  # (n, 2E + 2 + L)
    seps = ([",", "|"] * E)[:-1] + ["/", ",", "="] + [","] * (path.shape[1] - 1) + ["\n"]
    cells = np.empty((n, 2 * nums.shape[1]), dtype=object)  # number, separator, number, ...
    cells[:, 0::2] = np.array([str(i) for i in range(nums.max() + 1)], dtype=object)[nums]
    cells[:, 1::2] = seps
    tmp = path_out + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(cells.ravel().tolist()))
    os.replace(tmp, path_out)


def read_graphs(filename):
    """Parse a file in the original format -> edges (n, E, 2), path (n, L). Bad lines raise UsageError."""
    try:
        with open(filename) as f:
            text = f.read().rstrip("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {filename}: {e}")
    # Every line must have the separators of line 1, and line 1 those of a graph: ",|" per edge but
    # the last, ",/,=", then "," between path nodes. Checking this skeleton makes parsing one split.
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
        raise UsageError(f"{filename}:{bad + 1}: expected a graph 'u,v|...|u,v/s,g=s,...,g' like "
                         f"line 1, got '{lines[bad][:60]}'")
    nums = nums.reshape(len(lines), -1)
    edges, s, g, path = nums[:, :2 * E].reshape(-1, E, 2), nums[:, 2 * E], nums[:, 2 * E + 1], nums[:, 2 * E + 2:]
    on_edge = (edges[:, None, :, 0] == path[:, :-1, None]) & (edges[:, None, :, 1] == path[:, 1:, None])
    bad = np.flatnonzero((path[:, 0] != s) | (path[:, -1] != g) | ~on_edge.any(axis=2).all(axis=1))
    if len(bad):
        raise UsageError(f"{filename}:{bad[0] + 1}: the answer path does not run from s to g along the edges")
    return edges, path


def load_splits(cfg):
    """--train_file/--test_file: read deg, path_len, num_nodes off the data; generate what is missing."""
    loaded = {k: read_graphs(f) for k, f in (("train", cfg.train_file), ("test", cfg.test_file)) if f}
    E, L = next(iter(loaded.values()))[0].shape[1], next(iter(loaded.values()))[1].shape[1]
    if any(e.shape[1] != E or p.shape[1] != L for e, p in loaded.values()):
        raise UsageError("--train_file and --test_file hold graphs of different sizes")
    if E % (L - 1):
        raise UsageError(f"{E} edges and a path of {L} nodes is not a path-star graph")
    cfg.deg, cfg.path_len = E // (L - 1), L
    cfg.num_nodes = max(max(int(e.max()) for e, _ in loaded.values()) + 1, 1 + cfg.deg * (cfg.path_len - 1))
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(2)]
    test = loaded.get("test") or make_graphs(cfg.n_test, cfg.deg, cfg.path_len, cfg.num_nodes, rngs[0])
    train = loaded.get("train") or fresh_train(cfg, test, rngs[1])
    cfg.n_train, cfg.n_test = len(train[0]), len(test[0])
    return train, test


def export_data(cfg):
    """--export_data DIR: the generated splits in the original format, DIR/train.txt and DIR/test.txt."""
    (tr_e, tr_p), (te_e, te_p) = make_splits(cfg)
    make_dir(cfg.export_data, "export_data")
    write_graphs(os.path.join(cfg.export_data, "train.txt"), tr_e, tr_p)
    write_graphs(os.path.join(cfg.export_data, "test.txt"), te_e, te_p)
    print(f"wrote {len(tr_e)} + {len(te_e)} G({cfg.deg},{cfg.path_len}) graphs to {cfg.export_data}/")


# Everything above needs only numpy, so `--export_data` (and `-h`) finish here, before torch is
# imported: that import alone takes 1-2 s, longer than generating and writing 220k graphs.
if __name__ == "__main__":
    with reported():
        if (cfg := parse_config()).export_data:
            export_data(cfg)
            sys.exit(0)

# ----------------------------------------------------------------------------- model
# A compact GPT in the nanoGPT tradition: learned positions, pre-LayerNorm blocks, tied head.
import torch  # noqa: E402
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False))

    def attn(self, x, n_out):
        """x (B, T, C) -> (B, n_out, C): attention outputs of the last n_out positions only."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).unbind(2)  # 3 x (B, T, nh, hs)
        q = q[:, T - n_out:]  # (B, n_out, nh, hs)
        # causal: query i sits at position T - n_out + i and sees keys up to there; with n_out = T
        # this is plain is_causal, which lets fused kernels skip the masked half
        mask = torch.ones(n_out, T, dtype=torch.bool, device=x.device).tril(T - n_out) if n_out < T else None
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=mask is None)  # (B, nh, n_out, hs)
        return self.proj(y.transpose(1, 2).reshape(B, n_out, C))

    def forward(self, x, n_out=None):
        """x (B, T, C) -> (B, n_out, C), the last n_out positions (all if None)."""
        n_out = n_out or x.shape[1]
        x = x[:, x.shape[1] - n_out:] + self.attn(self.ln_1(x), n_out)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg, vocab_size, block_size):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise UsageError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        self.wte, self.wpe = nn.Embedding(vocab_size, cfg.n_embd), nn.Embedding(block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input/output embedding
        for name, p in self.named_parameters():  # GPT-2 init; residual projections scaled by depth
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, n_out=None):
        """idx (B, T) -> logits (B, n_out, vocab) of the last n_out positions (all T if None). The loss
        reads only the answer positions, so the last block computes only those: ~17% fewer FLOPs."""
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))  # (B, T, C)
        for block in self.blocks[:-1]:
            x = block(x)
        x = self.blocks[-1](x, n_out)  # (B, n_out, C)
        return self.lm_head(self.ln_f(x))

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
    return GPT(cfg, vocab_size, block_size)

# ----------------------------------------------------------------------------- training
# The three objectives differ only in the targets (reverse) and in the inputs (teacherless).


def make_inputs(seq, prompt_len, cfg):
    """seq (B, P+L) -> model input (B, P+L-1). Its last L positions predict the L answer tokens:
    position P-1 ('=') the first, position P+i the answer token i+1."""
    x = seq[:, :-1]
    if cfg.teacherless:
        # Teacher forcing hands the model n_i, so n_{i+1} = child(n_i) is a lookup and the hard first
        # step is left to be learned alone, without the help of the later tokens (the paper's
        # Clever-Hans cheat). With '$' in place of every answer token there is nothing to copy: the
        # model must plan the whole path from the prompt (teacherless training, paper Sec. 5).
        x = x.clone()
        x[:, prompt_len:] = tok(cfg.num_nodes)["dollar"]
    return x


def answer_logits(model, seq, prompt_len, cfg):
    """Logits of the answer positions (B, L, vocab), computed as in training."""
    return model(make_inputs(seq, prompt_len, cfg), n_out=seq.shape[1] - prompt_len).float()


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name}: use auto, cpu, cuda, cuda:N or mps")
    if (device.type == "cuda" and not torch.cuda.is_available()) or (
            device.type == "mps" and not torch.backends.mps.is_available()):
        raise UsageError(f"--device {name} is not available on this machine: use --device auto")
    return device


def autocast_dtype(cfg, device):
    """bf16 autocast where the hardware has native bf16 math (Ampere+ GPUs, AVX512-BF16/AMX CPUs)."""
    if cfg.dtype == "auto":
        native = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or (
            device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, cfg.dtype)


@contextmanager
def compute_context(device, dtype):
    """Every forward pass runs in here: autocast to `dtype`, and on CPU the plain math attention
    (PyTorch's fused CPU attention kernel is ~3x slower in bf16 at these ~30-token sequences)."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32), \
            (sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext()):
        yield


def flops_per_step(cfg, n_params, T):
    """Training FLOPs of one step (the PaLM / nanoGPT estimate): 6 per parameter and token for the
    matmuls forward and backward, plus attention's 12 * n_layer * n_embd * T (the Mamba scan not counted)."""
    attention = 12 * cfg.n_layer * cfg.n_embd * T if cfg.model == "gpt" else 0
    return (6 * n_params + attention) * T * cfg.batch_size


PEAK_BF16_TFLOPS = {"H100": 989, "H200": 989, "A100": 312}  # dense, for MFU on CUDA


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to lr * min_lr_frac at max_iters (in optimizer steps)."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    frac = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_optimizer(model, cfg, device):
    """AdamW; weight decay on matrices only (not norms, biases, or Mamba's A_log and D)."""
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)]
    rest = [p for p in params if not any(p is d for d in decay)]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=rest, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type in ("cuda", "cpu"))


def batches(n, batch_size, gen):
    """Endless shuffled epochs of row indices."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, max(n - batch_size, 0) + 1, batch_size):
            yield perm[i:i + batch_size]

# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, seq, prompt_len, cfg, amp, batch_size=1000):
    """Exact match and per-position accuracy of greedy decoding, and per-position accuracy on the
    training inputs ("forced": the true answer prefix, or '$' tokens when teacherless). The
    Clever-Hans signature is forced accuracy ~1/deg on the answer's second token, ~1 after it."""
    model.eval()
    L, dec, forced = seq.shape[1] - prompt_len, [], []
    for i in range(0, len(seq), batch_size):
        s = seq[i:i + batch_size]
        with amp():
            forced_pred = answer_logits(model, s, prompt_len, cfg).argmax(-1)  # (B, L)
            if cfg.teacherless:  # one forward pass over prompt + '$' tokens predicts the whole answer
                pred = forced_pred
            else:  # autoregressive: each predicted token is fed back in
                pred = model.generate(s[:, :prompt_len], L)
        dec.append(pred == s[:, prompt_len:])
        forced.append(forced_pred == s[:, prompt_len:])
    model.train()
    dec, forced = torch.cat(dec), torch.cat(forced).float()
    return dict(test_exact_match=dec.all(1).float().mean().item(), test_token_acc=dec.float().mean(0).tolist(),
                forced_token_acc=forced.mean(0).tolist())


def verdict(r, cfg):
    """One line saying what the accuracy pattern means."""
    f = r["forced_token_acc"]
    if r["test_exact_match"] >= 0.95:
        return "solved: the model finds the path (exact match ~ 1)."
    if cfg.teacherless:  # nothing to copy: each learned position was planned from the prompt
        learned = [n for n, a in zip(position_names(cfg), f) if a > 0.9]
        return f"teacherless: positions planned from the prompt alone so far (> 0.9): {' '.join(learned) or 'none'}."
    if len(f) > 2 and f[1] < 1.5 / cfg.deg and min(f[2:]) > 0.9:
        return (f"Clever Hans: later nodes are copied from the edge list (forced ~ 1), but the node after "
                f"s is a guess among {cfg.deg} arms (~ 1/deg), so exact match ~ 1/deg.")
    return "still learning: neither the Clever-Hans signature nor a solution yet."


def position_names(cfg):
    names = ["s"] + [f"n{i}" for i in range(1, cfg.path_len - 1)] + ["g"]
    return names[::-1] if cfg.reverse else names


def report(r, cfg):
    names = position_names(cfg)
    row = lambda label, xs: f"  {label:<10}" + "".join(f"{x:>7.3f}" for x in xs)
    print(f"  {'position':<10}" + "".join(f"{n:>7}" for n in names))
    print(row("decoded", r["test_token_acc"]) + f"   exact match {r['test_exact_match']:.3f}")
    print(row("forced", r["forced_token_acc"]))
    print("  -> " + verdict(r, cfg))


def plot_runs(run_dirs, out_path):
    """The paper's learning-dynamics picture, one panel per run: accuracy of every answer position
    over training (forced = with the objective's own inputs), and exact match of greedy decoding."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib, which training does not: pip install matplotlib")
    cols = min(3, len(run_dirs))
    rows = -(-len(run_dirs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(run_dirs):]:
        ax.axis("off")
    for ax, run_dir in zip(axes.flat, run_dirs):
        try:
            with open(os.path.join(run_dir, "results.json")) as f:
                res = json.load(f)
            cfg, hist = Config(**res["config"]), res["history"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"cannot read {run_dir}/results.json ({type(e).__name__}): pass --out_dir folders")
        steps = [h["step"] for h in hist]
        for i, name in enumerate(position_names(cfg)):
            # a node keeps its colour on every graph, in either order: s, n1, n2, n3, g = C0..C4, n4+ skip C4
            k = 0 if name == "s" else 4 if name == "g" else int(name[1:]) + (int(name[1:]) >= 4)
            ax.plot(steps, [h["forced_token_acc"][i] for h in hist], marker=".", color=f"C{k}", label=f"forced {name}")
        ax.plot(steps, [h["test_exact_match"] for h in hist], "k--", lw=2, label="exact match")
        ax.axhline(1 / cfg.deg, color="gray", ls=":", lw=1)
        objective = "teacherless" if cfg.teacherless else "reverse" if cfg.reverse else "next-token"
        ax.set(title=f"{cfg.model} {objective} G({cfg.deg},{cfg.path_len})", xlabel="step", ylim=(-0.02, 1.02))
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=7, loc="center right")
    fig.tight_layout()
    make_dir(os.path.dirname(out_path) or ".", "plot_out")
    fig.savefig(out_path, dpi=110)
    print(f"wrote {out_path}")

# ----------------------------------------------------------------------------- main


def atomic_save(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = path + ".tmp"
    if path.endswith(".json"):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, cfg):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = ckpt["config"]
        ckpt["model"], ckpt["optimizer"], ckpt["step"], ckpt["history"]  # noqa: B018  (all present?)
    except Exception as e:
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}): pass a ckpt.pt written by nanofail")
    shape = ("model", "n_layer", "n_embd", "n_head", "d_state", "expand", "d_conv", "deg", "path_len", "num_nodes")
    diff = [f"--{k} {saved.get(k)}" for k in shape if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise UsageError(f"checkpoint {path} was trained with a different model or task: add {' '.join(diff)}")
    return ckpt


def train(cfg):
    torch.manual_seed(cfg.seed)
    (tr_edges, tr_path), (te_edges, te_path) = make_splits(cfg)
    device = pick_device(cfg.device)
    train_seq, P = encode(tr_edges, tr_path, cfg.num_nodes, cfg.reverse)
    test_seq, _ = encode(te_edges, te_path, cfg.num_nodes, cfg.reverse)
    train_seq, test_seq = torch.from_numpy(train_seq).to(device), torch.from_numpy(test_seq).to(device)
    L = cfg.path_len
    ckpt = load_checkpoint(cfg.resume, cfg) if cfg.resume else None
    raw = build_model(cfg, vocab_size=cfg.num_nodes + 4, block_size=P + L - 1).to(device)
    opt = make_optimizer(raw, cfg, device)
    step = 0
    if ckpt:
        raw.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    model = torch.compile(raw) if cfg.compile else raw
    dtype = autocast_dtype(cfg, device)
    amp = lambda: compute_context(device, dtype)  # noqa: E731
    n_params = sum(p.numel() for p in raw.parameters())
    step_flops = flops_per_step(cfg, n_params, P + L - 1)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), 0)
    print(f"{cfg.model} {n_params / 1e6:.2f}M params on {device} ({str(dtype)[6:]}) | G({cfg.deg},{L}) "
          f"N={cfg.num_nodes} | {len(train_seq)} train / {len(test_seq)} test graphs | prompt {P} tokens, "
          f"answer {L} | {'teacherless' if cfg.teacherless else 'next-token'}{' reverse' if cfg.reverse else ''}")
    if cfg.out_dir:
        make_dir(cfg.out_dir, "out_dir")
    gen = torch.Generator().manual_seed(cfg.seed + step)  # a resumed run draws fresh batches
    stream, history = batches(len(train_seq), cfg.batch_size, gen), ckpt["history"] if ckpt else []
    window, t_window, t_start, train_loss = [], time.time(), time.time(), float("nan")
    while step < cfg.max_iters:
        seq = train_seq[next(stream).to(device)]  # (B, P+L)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with amp():
            logits = answer_logits(model, seq, P, cfg)  # (B, L, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), seq[:, P:].flatten())  # answer tokens only
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        window.append(loss.detach())  # stays on the device: no GPU sync per step
        do_eval = step == cfg.max_iters or (cfg.eval_interval and step % cfg.eval_interval == 0)
        if step % cfg.log_interval == 0 or do_eval:
            train_loss, its = torch.stack(window).mean().item(), len(window) / (time.time() - t_window)
            print(f"step {step:>6}/{cfg.max_iters} | loss {train_loss:.4f} | lr {lr_at(step - 1, cfg):.1e} | "
                  f"{its:.2f} it/s {its * cfg.batch_size * (P + L - 1) / 1e3:.0f}k tok/s {its * step_flops / 1e9:.0f} GFLOP/s"
                  f"{f' MFU {its * step_flops / peak / 1e10:.0f}%' if peak and dtype == torch.bfloat16 else ''} | "
                  f"ETA {(cfg.max_iters - step) / its / 60:.1f} min", flush=True)
        if do_eval:
            r = dict(step=step, train_loss=train_loss, **evaluate(model, test_seq, P, cfg, amp))
            history.append(r)
            print(f"eval at step {step}:")
            report(r, cfg)
            if cfg.out_dir:
                atomic_save(dict(config=asdict(cfg), history=history, final=r), os.path.join(cfg.out_dir, "results.json"))
                atomic_save(dict(model=raw.state_dict(), optimizer=opt.state_dict(), config=asdict(cfg), step=step,
                                 history=history), os.path.join(cfg.out_dir, "ckpt.pt"))
        if step % cfg.log_interval == 0 or do_eval:
            window, t_window = [], time.time()  # it/s counts training steps only, not evaluation
    print(f"done in {(time.time() - t_start) / 60:.1f} min")
    return history


def main(argv=None):
    with reported():
        cfg = parse_config(argv)
        if cfg.plot:
            return plot_runs(cfg.plot, cfg.plot_out)
        if cfg.export_data:
            return export_data(cfg)
        train(cfg)


if __name__ == "__main__":
    main()
