"""Fast CPU tests for nanofail.py and mamba_min.py:  python -m pytest -q"""
import json
import math
import os
import re
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mamba_min
import nanofail as nf
from mamba_min import Mamba, selective_scan

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "assets"))
import figures  # noqa: E402  (assets/figures.py, the README's figures)
SHARED = HERE.parent / "shared" / "ntf-data"
# NANOFAIL_TEST_DEVICE=cuda (or mps) runs the device-relevant tests there; the default is the CPU.
DEVICE = os.environ.get("NANOFAIL_TEST_DEVICE", "cpu")
if DEVICE != "cpu" and not ((DEVICE.startswith("cuda") and torch.cuda.is_available())
                            or (DEVICE == "mps" and torch.backends.mps.is_available())):
    pytest.exit(f"NANOFAIL_TEST_DEVICE={DEVICE}, but this machine has no such device", returncode=1)

# The one small setting every run here starts from: tiny(**kw) is it as a Config, flags(**kw) as the
# command line of the same run (so a CLI run and a Python run of the same kw read the same data).
TINY = dict(n_layer=1, n_embd=32, n_head=2, n_train=256, n_test=32, batch_size=32, max_iters=20,
            warmup_iters=2, log_interval=10, eval_interval=0, dtype="float32", device=DEVICE,
            path_len=5, num_nodes=50, lr=1e-3, min_lr_frac=0.1)  # G(2,5): the paper's task


def tiny(**kw):
    return nf.Config(**{**TINY, **kw})


def flags(**kw):
    argv = []
    for k, v in {**TINY, **kw}.items():
        argv += [f"--{k}"] if v is True else [f"--no-{k}"] if v is False else [f"--{k}", str(v)]
    return argv


def graphs(n=500, deg=3, path_len=4, num_nodes=20, seed=0):
    return nf.make_graphs(n, deg, path_len, num_nodes, np.random.default_rng(seed))


def run_main(argv, capsys):
    """Run nanofail's CLI in-process; return (exit code, stdout, stderr)."""
    try:
        nf.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        # what the interpreter exits with for a message
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def usage_error(argv, capsys, needle):
    """Run the CLI and expect bad input: exit 2, one line on stderr naming `needle` (a flag, a file,
    a number). Returns (stdout, stderr)."""
    code, out, err = run_main(argv, capsys)
    assert code == 2, (code, out[-500:], err)
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err, err
    return out, err


def progress_steps(stdout):
    """The step numbers of the progress lines ('step  N/M | loss ...')."""
    return [int(s) for s in re.findall(r"^step\s+(\d+)/\d+ \|", stdout, re.M)]


def evaluations(stdout):
    """How many evaluations report() printed: its rows of forced accuracy and of the model's
    answer."""
    rows = [ln.split()[:1] for ln in stdout.splitlines()]
    assert rows.count(["forced"]) == rows.count(["model"])
    return rows.count(["forced"])


def ckpt_step(path):
    return torch.load(path, weights_only=True)["step"]


def graph_text(edges, path):
    """One graph (lists) as a line of the original text format."""
    return nf.graph_lines(np.array([edges]), np.array([path]))[0]

# ---- data


def test_graphs_are_path_stars():
    deg, path_len, N = 3, 4, 20
    edges, path = graphs(deg=deg, path_len=path_len, num_nodes=N)
    assert edges.shape == (500, deg * (path_len - 1), 2) and path.shape == (500, path_len)
    for e, p in zip(edges, path):
        nodes = set(e.ravel().tolist())
        assert len(nodes) == 1 + deg * (path_len - 1) and max(nodes) < N  # distinct labels
        children = {}
        for u, v in e.tolist():
            children.setdefault(u, []).append(v)
        s = p[0]
        assert len(children[s]) == deg and all(len(c) == 1 for u, c in children.items() if u != s)
        for first in children[s]:  # every arm has path_len - 1 nodes
            arm = [first]
            while arm[-1] in children:
                arm.append(children[arm[-1]][0])
            assert len(arm) == path_len - 1
        assert all([u, v] in e.tolist() for u, v in zip(p[:-1], p[1:]))  # the answer follows edges
        assert p[-1] not in children  # the goal ends an arm
    assert len(nf.not_path_stars(edges, path)) == 0


def test_not_path_stars_finds_the_broken_graphs():
    edges, path = graphs(n=20)
    broken = edges.copy()
    broken[3, 1] = broken[3, 0]  # a repeated edge (and an arm one edge short)
    broken[7, 0, 1] = broken[7, 1, 1]  # a node with two parents
    s = path[11, 0]
    j = int(np.flatnonzero(broken[11, :, 0] != s)[0])
    broken[11, j, 1] = s  # an arm that leads back to s
    assert nf.not_path_stars(broken, path).tolist() == [3, 7, 11]


def test_edge_order_is_shuffled():
    edges, path = graphs(n=4000, deg=2, path_len=5, num_nodes=50)
    first_is_start = (edges[:, 0, 0] == path[:, 0]).mean()
    assert 0.15 < first_is_start < 0.35  # 2 of 8 edges leave s: ~0.25 if shuffled, 1.0 if not


class SortedLabels:
    """A generator whose random() increases along the last axis, so that make_graphs' labels and
    edge order come out unshuffled (s = 0, arm i = labels 1 + i(L-1) .. (i+1)(L-1)); all else is
    random."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def random(self, size, dtype=np.float64):
        return np.broadcast_to(np.arange(size[-1], dtype=dtype) / size[-1], size).copy()

    def __getattr__(self, name):
        return getattr(self.rng, name)


def test_goal_arm_is_random():
    """With the labels in arm order, n1 tells which arm holds the goal: each of the deg arms about
    equally often (a generator that always took arm 0, or the last, fails here)."""
    n, deg, path_len = 3000, 3, 4
    edges, path = nf.make_graphs(n, deg, path_len, 20, SortedLabels(0))
    assert (path[:, 0] == 0).all()  # the premise: the labels came out in arm order
    assert len(nf.not_path_stars(edges, path)) == 0
    arm = (path[:, 1] - 1) // (path_len - 1)
    share = np.bincount(arm, minlength=deg) / n
    assert share.shape == (deg,) and (0.28 < share).all() and (share < 0.39).all(), share
    # and the rest of the answer walks that arm
    assert ((path[:, 1:] - 1) // (path_len - 1) == arm[:, None]).all()


def test_splits_are_deterministic_and_disjoint():
    # few graphs: collisions
    cfg = nf.Config(deg=2, path_len=3, num_nodes=6, n_train=2000, n_test=200)
    (tr_e, tr_p), (te_e, te_p), task = nf.make_splits(cfg)
    assert len(tr_e) == 2000 and len(te_e) == 200
    assert task == dict(deg=2, path_len=3, num_nodes=6, n_train=2000, n_test=200)
    assert not set(nf.graph_keys(tr_e, tr_p)) & set(nf.graph_keys(te_e, te_p))
    (tr_e2, tr_p2), _, _ = nf.make_splits(cfg)
    assert np.array_equal(tr_e, tr_e2) and np.array_equal(tr_p, tr_p2)
    (tr_e3, _), _, _ = nf.make_splits(nf.replace(cfg, seed=1))
    assert not np.array_equal(tr_e, tr_e3)


def test_make_splits_leaves_the_config_as_it_was(tmp_path):
    f = str(tmp_path / "g23.txt")
    nf.write_graphs(f, *graphs(n=40, deg=2, path_len=3, num_nodes=20))
    cfg = nf.Config(test_file=f, n_train=100)
    before = nf.asdict(cfg)
    _, (te_e, _), task = nf.make_splits(cfg, log=lambda *a, **k: None)
    assert nf.asdict(cfg) == before
    assert (task["deg"], task["path_len"], task["n_test"], len(te_e)) == (2, 3, 40, 40)


def test_text_format_round_trip(tmp_path):
    edges, path = graphs(n=50)
    f = str(tmp_path / "g.txt")
    nf.write_graphs(f, edges, path)
    e2, p2 = nf.parse_graphs(open(f).read(), f)
    assert np.array_equal(edges, e2) and np.array_equal(path, p2)
    assert open(f).readline().count("|") == edges.shape[1] - 1
    assert not os.path.exists(f + ".tmp")


def test_the_text_format_reads_as_the_original_reader_does(tmp_path, capsys):
    edges, path = graphs(n=20)
    lines = nf.graph_lines(edges, path)
    for text in ("\r\n".join(lines) + "\r\n",                  # Windows line ends
                 "  \n".join(lines) + " \t\n\n  \n\n",           # spaces, blank lines at the end
                 "\n".join(lines)):                              # no newline at the end
        e, p = nf.parse_graphs(text, "f.txt")
        assert np.array_equal(e, edges) and np.array_equal(p, path)
    # the original generator with reverse=True writes the answers g..s: read back as s..g, noted
    backwards = [ln.split("=")[0] + "=" + ",".join(map(str, q[::-1]))
                 for ln, q in zip(lines, path.tolist())]
    notes = []
    e, p = nf.parse_graphs("\n".join(backwards), "rev.txt", log=notes.append)
    assert np.array_equal(e, edges) and np.array_equal(p, path)
    assert len(notes) == 1 and "rev.txt" in notes[0]
    # so --reverse (or not) means the same with either file
    for name, text in (("fwd.txt", lines), ("rev.txt", backwards)):
        (tmp_path / name).write_text("\n".join(text) + "\n")
    fwd, rev = (nf.make_splits(tiny(test_file=str(tmp_path / name), reverse=True), log=print)[1]
                for name in ("fwd.txt", "rev.txt"))
    assert all(np.array_equal(a, b) for a, b in zip(fwd, rev))
    assert capsys.readouterr().out.count("rev.txt") == 1


def test_export_data_writes_both_files(tmp_path, capsys):
    code, out, _ = run_main(["--export_data", tmp_path, "--n_train", "300", "--n_test", "30"],
                            capsys)
    assert code == 0 and re.search(r"\b300\b.*\b30\b", out)  # the sizes written, in order
    tr, te = (nf.parse_graphs((tmp_path / name).read_text()) for name in ("train.txt", "test.txt"))
    (tr_e, tr_p), (te_e, te_p), _ = nf.make_splits(nf.Config(n_train=300, n_test=30))
    assert np.array_equal(tr[0], tr_e) and np.array_equal(tr[1], tr_p)
    assert np.array_equal(te[0], te_e) and np.array_equal(te[1], te_p)


def test_export_data_keeps_data_already_in_the_folder(tmp_path, capsys):
    assert run_main(["--export_data", tmp_path, "--n_train", "300", "--n_test", "30"],
                    capsys)[0] == 0
    before = {f: (tmp_path / f).read_bytes() for f in ("train.txt", "test.txt")}
    usage_error(["--export_data", tmp_path, "--n_train", "200", "--n_test", "20", "--seed", "2"],
                capsys, "--export_data")
    assert {f: (tmp_path / f).read_bytes() for f in before} == before
    code, out, _ = run_main(["--export_data", tmp_path, "--n_train", "200", "--n_test", "20",
                             "--overwrite"], capsys)
    assert code == 0 and len(nf.parse_graphs((tmp_path / "train.txt").read_text())[0]) == 200


def test_export_counts_only_the_graphs_it_writes(tmp_path, capsys):
    # --fresh_after's graphs (here far more than any memory) are for training, not in the export
    code, _, _ = run_main(["--export_data", tmp_path, "--n_train", "30", "--n_test", "10",
                           "--fresh_after", "1", "--max_iters", str(10**12)], capsys)
    assert code == 0 and len(nf.parse_graphs((tmp_path / "train.txt").read_text())[0]) == 30


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/ntf-data not present")
@pytest.mark.parametrize("name,deg,path_len,N,P", [
    ("deg_2_path_5_nodes_50_test_20000.txt", 2, 5, 50, 27),
    ("deg_5_path_3_nodes_50_test_20000.txt", 5, 3, 50, 33),
    ("deg_2_path_3_nodes_10_test_20000.txt", 2, 3, 10, 15)])
def test_original_test_files_load(name, deg, path_len, N, P):
    cfg = nf.Config(test_file=str(SHARED / name), n_train=100)
    (tr_e, tr_p), (te_e, te_p), task = nf.make_splits(cfg, log=lambda *a, **k: None)
    assert task == dict(deg=deg, path_len=path_len, num_nodes=N, n_train=100, n_test=20_000)
    seq, prompt_len = nf.encode(te_e, te_p, N)
    assert prompt_len == P and seq.shape == (20_000, P + path_len) and seq.max() < N + 4
    assert open(SHARED / name).readline().strip().split("=")[1] == ",".join(map(str, te_p[0]))
    assert tr_e.shape[1:] == te_e.shape[1:] and tr_e.max() < N
    assert len(tr_e) == 100 and not (set(nf.graph_keys(tr_e, tr_p))
                                     & set(nf.graph_keys(te_e, te_p)))


G22, G23 = "1,2|1,3/1,3=1,3", "1,2|2,3|1,4|4,5/1,3=1,2,3"


@pytest.mark.parametrize("lines,lineno", [
    ([G22, "1,2|2,3/1,3=1,2"], 2),             # the path does not end at g
    ([G22, "1,2|1,3/1,3=1,3,x"], 2),           # not a number
    ([G22, "1,2|1,4/1,4=1,2"], 2),             # the path does not end at g
    ([G22, "1,2|1,4/1,4=1,5"], 2),             # the path leaves the edges
    ([G22, "garbage"], 2),
    ([G22, " ", G22], 2),                      # a blank line inside the file
    ([G22, G22, "1,2|1,3/1,3=3,1"], 3),        # an answer g..s in a file of answers s..g
    (["1,2|1,3/1,3=3,1", G22], 2),             # and the other way round
    (["garbage", G22], 1),
    ([G22, G22, "1,2|1,3|1,4/1,3=1,3"], 3),    # another number of edges than line 1
    ([G22, "1,2|1,999999999999/1,999999999999=1,999999999999"], 2),  # a label far above MAX_NODES
    ([G22, "1,2|1,10000/1,10000=1,10000"], 2),  # the first label past MAX_NODES
    ([G22, "1,2|1,2/1,2=1,2"], 2),             # not a path star: a repeated edge, a valid answer
    ([G23, "1,2|2,3|2,5|1,4/1,3=1,2,3"], 2),   # not a path star: an arm branches
    ([G23, "1,2|2,3|1,4|4,3/1,3=1,2,3"], 2),   # not a path star: two arms meet
    ([G23, "1,2|2,3|1,4|4,1/1,3=1,2,3"], 2),   # not a path star: an arm leads back to s
])
def test_malformed_files_name_the_line(tmp_path, capsys, lines, lineno):
    f = tmp_path / "bad.txt"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(nf.UsageError, match=f"bad.txt:{lineno}:"):
        nf.parse_graphs(f.read_text(), str(f))
    usage_error(flags(max_iters=1, test_file=f), capsys, f"bad.txt:{lineno}:")


def test_a_data_file_sets_the_task_and_says_so(tmp_path, capsys):
    f = tmp_path / "g23.txt"
    nf.write_graphs(str(f), *graphs(n=40, deg=2, path_len=3, num_nodes=20))
    code, out, _ = run_main(flags(max_iters=2, test_file=f, deg=3, num_nodes=30,
                                  out_dir=tmp_path / "run"), capsys)
    assert code == 0
    notes = [ln for ln in out.splitlines() if ln.startswith("note")]
    assert len(notes) == 1 and "--deg 2" in notes[0] and "--path_len 3" in notes[0]
    res = json.load(open(tmp_path / "run" / "results.json"))
    assert (res["config"]["deg"], res["config"]["path_len"], res["config"]["n_test"]) == (2, 3, 40)
    assert len(res["final"]["forced_token_acc"]) == 3 and len(res["final"]["example"]["path"]) == 3


def test_one_file_for_training_and_testing_is_refused(tmp_path, capsys):
    f = tmp_path / "g23.txt"
    nf.write_graphs(str(f), *graphs(n=64, deg=2, path_len=3, num_nodes=20))
    usage_error(flags(max_iters=1, train_file=f, test_file=f), capsys, "--test_file")


def test_a_graph_is_one_key_in_any_edge_order_and_the_count_is_every_graph():
    edges, path = graphs(n=6000, deg=2, path_len=3, num_nodes=5)  # 120 graphs, each drawn often
    keys = nf.graph_keys(edges, path)
    order = np.random.default_rng(1).permutation(edges.shape[1])
    assert nf.graph_keys(edges[:, order], path) == keys  # reshuffled edges: the same graph
    assert len(set(keys)) == nf.count_graphs(2, 3, 5) == 120  # every graph seen, none more
    other_goal = path[:, [0, 1]]  # same edges, g moved: another prompt
    assert nf.graph_keys(edges[:1], other_goal[:1]) != keys[:1]


def test_a_training_file_alone_gets_a_test_set_apart_from_it(tmp_path):
    f = tmp_path / "g23.txt"  # G(2,3) on 7 labels: 2,520 graphs, so 600 and 300 drawn would meet
    nf.write_graphs(str(f), *graphs(n=600, deg=2, path_len=3, num_nodes=7))
    assert nf.count_graphs(2, 3, 7) == 2520
    cfg = tiny(train_file=str(f), n_test=300, deg=2, path_len=3, num_nodes=7)  # as the run saves it
    train, test, _ = nf.make_splits(cfg, log=lambda *a: None)
    assert len(test[0]) == 300 and set(nf.graph_keys(*train)).isdisjoint(nf.graph_keys(*test))
    again = figures.test_graphs(cfg)  # what the figures score: the same graphs
    assert all(np.array_equal(a, b) for a, b in zip(test, again))

# ---- encoding and objectives


def test_encoding_matches_the_original_tokens():
    edges = np.array([[[5, 2], [2, 8], [5, 9], [9, 3]]])
    path = np.array([[5, 2, 8]])
    seq, P = nf.encode(edges, path, num_nodes=10)
    pipe, eq, slash = 10, 11, 12
    assert nf.tok(10) == dict(pipe=10, eq=11, slash=12, dollar=13)
    assert P == 15 and seq[0].tolist() == [5, 2, pipe, 2, 8, pipe, 5, 9, pipe, 9, 3, slash,
                                           5, 8, eq, 5, 2, 8]
    rev, _ = nf.encode(edges, path, num_nodes=10, reverse=True)
    assert rev[0, P:].tolist() == [8, 2, 5] and np.array_equal(rev[0, :P], seq[0, :P])


def test_graph_lines_give_the_original_text_format():
    edges, path = np.array([[[5, 2], [2, 8], [5, 9], [9, 3]]]), np.array([[5, 2, 8]])
    assert nf.graph_lines(edges, path) == ["5,2|2,8|5,9|9,3/5,8=5,2,8"]
    e2, p2 = nf.parse_graphs(nf.graph_lines(edges, path)[0])
    assert np.array_equal(e2, edges) and np.array_equal(p2, path)


def test_teacherless_inputs_and_answer_positions():
    cfg = tiny()
    seq = torch.arange(20).repeat(3, 1)  # (3, P + L) with P = 15, L = 5
    x = nf.make_inputs(seq, 15, False, cfg.num_nodes)
    assert torch.equal(x, seq[:, :-1])
    tl = nf.make_inputs(seq, 15, True, cfg.num_nodes)
    dollar = nf.tok(cfg.num_nodes)["dollar"]
    assert torch.equal(tl[:, :15], seq[:, :15]) and (tl[:, 15:] == dollar).all()
    assert torch.equal(seq, torch.arange(20).repeat(3, 1))  # the batch itself is left untouched

    class Position(torch.nn.Module):  # logits[b, t] = one-hot(t): shows which positions are scored
        def forward(self, idx, n_out):
            return torch.eye(idx.shape[1])[None, -n_out:].repeat(len(idx), 1, 1)
    logits = nf.answer_logits(Position(), seq, 15, False, cfg.num_nodes)
    assert logits.shape == (3, 5, 19) and logits[0].argmax(-1).tolist() == [14, 15, 16, 17, 18]


@pytest.mark.parametrize("teacherless, hybrid, until",
                         [(False, 0, 0), (True, 0, 0), (True, 0.5, 0), (True, 0.5, 1)])
def test_training_feeds_the_objectives_inputs(monkeypatch, teacherless, hybrid, until):
    """What the model is given in training steps: the prompt, then '$' (teacherless) or the true
    answer prefix (next-token); a hybrid batch gives the prefix to its first rows only, and with
    --hybrid_until only in the steps before it."""
    given, batches = [], []
    real_build, real_loss = nf.build_model, nf.answer_loss

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.register_forward_pre_hook(
            lambda m, a: given.append(a[0].clone()) if m.training else None)
        return model

    def loss(model, seq, *args, **kwargs):
        batches.append(seq.clone())
        return real_loss(model, seq, *args, **kwargs)
    monkeypatch.setattr(nf, "build_model", build)
    monkeypatch.setattr(nf, "answer_loss", loss)
    cfg = tiny(max_iters=2, teacherless=teacherless, hybrid=hybrid, hybrid_until=until)
    nf.train(cfg, log=None)
    P, dollar = 3 * cfg.deg * (cfg.path_len - 1) + 3, nf.tok(cfg.num_nodes)["dollar"]
    forced = round(hybrid * cfg.batch_size) if teacherless else cfg.batch_size
    assert len(given) == len(batches) == 2 and (0 < forced < cfg.batch_size or hybrid == 0)
    for step, (x, seq) in enumerate(zip(given, batches)):
        forced = 0 if until and step >= until else forced  # past --hybrid_until: all teacherless
        assert (x.shape == (cfg.batch_size, P + cfg.path_len - 1)
                and torch.equal(x[:, :P], seq[:, :P]))
        assert (x[forced:, P:] == dollar).all()  # teacherless rows: nothing to copy
        assert (torch.equal(x[:forced, P:], seq[:forced, P:-1])  # next-token rows: the prefix
                and not (x[:forced, P:] == dollar).any())

# ---- model


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = nf.GPT(vocab_size=20, block_size=16, n_layer=2, n_embd=32, n_head=2).eval()
    idx = torch.randint(20, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 20
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :9], b[:, :9]) and not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("model", ["gpt", "mamba"])
def test_last_positions_only_equal_the_full_forward(model):
    torch.manual_seed(0)
    net = nf.build_model(tiny(model=model, n_layer=2), vocab_size=20, block_size=16).eval()
    idx = torch.randint(20, (3, 16))
    full = net(idx)
    assert full.shape == (3, 16, 20)
    for n_out in (1, 5, 16):
        torch.testing.assert_close(net(idx, n_out=n_out), full[:, -n_out:], rtol=1e-5, atol=1e-5)


def test_gpt_width_must_split_over_the_heads():
    with pytest.raises(nf.UsageError, match="n_head"):
        nf.GPT(vocab_size=20, block_size=16, n_layer=1, n_embd=30, n_head=4)

# ---- mamba_min

MODES = ["ref", "loop", "chunked", "auto"]
LENGTHS = list(range(1, 71)) + [97, 128, 211, 256]


def scan_inputs(l, b=2, d_in=3, n=4, seed=0, dtype=torch.float32):
    """Random valid scan inputs: delta > 0, A < 0 (down to -16, the largest |A| at init with
    n = 16)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, l, d_in, generator=g)
    delta = F.softplus(torch.randn(b, l, d_in, generator=g) - 1)
    A = -torch.exp(torch.rand(d_in, n, generator=g) * math.log(16))
    B, C = torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g)
    D = torch.randn(d_in, generator=g)
    return [t.to(dtype) for t in (u, delta, A, B, C, D)]


def value_and_grads(inputs, mode):
    """Scan output and the gradients of a random linear function of it w.r.t. all six inputs."""
    # the float64 oracle runs on the CPU
    device = "cpu" if inputs[0].dtype == torch.float64 else DEVICE
    inputs = [t.detach().clone().to(device).requires_grad_() for t in inputs]
    y = selective_scan(*inputs, mode=mode)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad((y * w).sum(), inputs)
    return [t.cpu() for t in (y, *grads)]


def assert_close_rel(actual, expected, rtol=1e-5, what=""):
    """Equal to rtol relative to the tensor's scale (plain elementwise rtol fails near zeros)."""
    atol = rtol * expected.abs().max().clamp(min=1e-12).item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


@cache  # the oracle of length l, computed once for the four modes
def float64_reference(l):
    return value_and_grads([t.double() for t in scan_inputs(l, seed=l)], "ref")


@pytest.mark.parametrize("mode", MODES)
def test_scan_matches_float64_reference_values_and_grads(mode):
    for l in LENGTHS:
        inputs, expected = scan_inputs(l, seed=l), float64_reference(l)
        names = ["y", "du", "ddelta", "dA", "dB", "dC", "dD"]
        for name, a, e in zip(names, value_and_grads(inputs, mode), expected):
            assert a.dtype == torch.float32, (l, name)
            assert_close_rel(a, e, what=f"l={l} {name}")


@pytest.mark.parametrize("mode", MODES)
def test_decay_one_gives_cumulative_sum(mode):
    u, delta, _, B, C, D = scan_inputs(37)
    # exp(delta * 0) = 1: the state just adds up its inputs
    A = torch.zeros(u.shape[-1], B.shape[-1])
    h = torch.cumsum((delta * u)[..., None] * B[:, :, None, :], dim=1)  # (b, l, d_in, n)
    expected = torch.einsum("bldn,bln->bld", h, C) + D * u
    assert_close_rel(selective_scan(u, delta, A, B, C, D, mode=mode), expected)


@pytest.mark.parametrize("mode", MODES)
def test_decay_zero_keeps_only_current_input(mode):
    u, _, A, B, C, D = scan_inputs(37)
    delta = torch.full_like(u, 1e3)  # exp(-1e3 * |A|) = 0: the state forgets everything before t
    expected = delta * u * (B * C).sum(-1, keepdim=True) + D * u
    assert_close_rel(selective_scan(u, delta, A, B, C, D, mode=mode), expected)


@pytest.mark.parametrize("mode", MODES)
def test_extreme_delta_stays_finite_and_correct(mode):
    for l in [1, 5, 16, 50]:
        u, delta, A, B, C, D = scan_inputs(l, seed=l)
        A = A.clone()
        A[:, 0], A[:, -1] = -1.0, -16.0
        # decays exp(delta * A) that are ~1, denormal (exp(-95) < 1.2e-38: the smallest
        # normal), or 0
        pick = torch.randint(0, 3, delta.shape, generator=torch.Generator().manual_seed(2))
        delta = torch.tensor([1e-6, 95.0, 1e3])[pick]
        got = value_and_grads([u, delta, A, B, C, D], mode)
        expected = value_and_grads([t.double() for t in (u, delta, A, B, C, D)], "ref")
        for a, e in zip(got, expected):
            assert torch.isfinite(a).all()
            assert_close_rel(a, e)


@pytest.mark.parametrize("mode", MODES)
def test_scan_is_causal(mode):
    u, delta, A, B, C, D = scan_inputs(30)
    y = selective_scan(u, delta, A, B, C, D, mode=mode)
    u2 = u.clone()
    u2[:, 17] += 1.0
    y2 = selective_scan(u2, delta, A, B, C, D, mode=mode)
    assert torch.equal(y[:, :17], y2[:, :17])
    assert not torch.allclose(y[:, 17:], y2[:, 17:])


@pytest.mark.parametrize("mode", MODES)
def test_scan_in_two_pieces_with_carried_state_equals_one_scan(mode):
    u, delta, A, B, C, D = scan_inputs(45)
    y = selective_scan(u, delta, A, B, C, D, mode=mode)
    first = [t[:, :20] for t in (u, delta)] + [A] + [t[:, :20] for t in (B, C)] + [D]
    second = [t[:, 20:] for t in (u, delta)] + [A] + [t[:, 20:] for t in (B, C)] + [D]
    y1, h = selective_scan(*first, mode=mode, return_state=True)
    y2 = selective_scan(*second, mode=mode, h0=h)
    assert h.shape == (2, 3, 4)
    assert_close_rel(torch.cat([y1, y2], dim=1), y)


def tiny_model(seed=0, vocab_size=11, n_layer=2, d_model=16, d_state=4):
    torch.manual_seed(seed)
    return Mamba(vocab_size, n_layer, d_model, d_state=d_state).to(DEVICE)


def test_model_is_causal():
    model = tiny_model()
    idx = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    idx2 = idx.clone()
    idx2[:, 7] = (idx2[:, 7] + 1) % 11
    logits, logits2 = model(idx), model(idx2)
    assert logits.shape == (2, 12, 11)
    assert torch.equal(logits[:, :7], logits2[:, :7])
    assert not torch.allclose(logits[:, 7:], logits2[:, 7:])


@pytest.mark.parametrize("prompt_len", [1, 2, 3, 4, 9])
def test_generate_equals_greedy_full_forward(prompt_len):
    model = tiny_model(seed=prompt_len)
    with torch.no_grad():  # bigger embeddings than at init, so that the greedy choice varies
        model.embedding.weight.normal_(std=1.0)
    idx = torch.randint(0, 11, (3, prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(DEVICE)
    new = model.generate(idx, max_new_tokens=12)
    seq = idx
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert new.shape == (3, 12) and new.dtype == torch.int64
    assert torch.equal(new, seq[:, prompt_len:])
    assert len(new.unique()) > 1  # the comparison above is not between two constant sequences
    assert model.generate(idx, 0).shape == (3, 0)


def test_generate_reads_the_prompt_once_then_one_token_per_step(monkeypatch):
    model, lengths = tiny_model(), []

    def recording_scan(u, *args, **kwargs):
        lengths.append(u.shape[1])
        return selective_scan(u, *args, **kwargs)

    monkeypatch.setattr(mamba_min, "selective_scan", recording_scan)
    model.generate(torch.zeros(2, 7, dtype=torch.long, device=DEVICE), max_new_tokens=5)
    # 2 layers: the prompt in parallel, then 4 single steps
    assert lengths == [7] * 2 + [1] * (2 * 4)


def test_initialisation_after_build():
    n_layer, d_model, d_state = 3, 32, 16
    model = tiny_model(n_layer=n_layer, d_model=d_model, d_state=d_state)
    d_in = 2 * d_model
    assert model.lm_head.weight is model.embedding.weight
    assert abs(model.embedding.weight.std().item() - 0.02) < 0.004
    for layer in model.layers:
        dt = F.softplus(layer.dt_proj.bias)
        assert dt.shape == (d_in,) and dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
        # log-uniform spread, not zeroed by the model-wide bias init
        assert dt.max() / dt.min() > 10
        assert layer.dt_proj.bias._no_reinit
        bound = math.ceil(d_model / 16) ** -0.5
        assert layer.dt_proj.weight.abs().max() <= bound
        A = -torch.exp(layer.A_log.cpu())
        torch.testing.assert_close(A, -torch.arange(1.0, d_state + 1).expand(d_in, d_state))
        torch.testing.assert_close(layer.D.cpu(), torch.ones(d_in))
        assert layer.A_log._no_weight_decay and layer.D._no_weight_decay
        # kaiming_uniform(a=sqrt(5)) bound / sqrt(n_layer)
        out_bound = 1 / math.sqrt(d_in * n_layer)
        assert 0.9 * out_bound < layer.out_proj.weight.abs().max() <= out_bound
        assert (layer.in_proj.bias is None and layer.x_proj.bias is None
                and layer.out_proj.bias is None)
        assert layer.conv1d.weight.shape == (d_in, 1, 4) and layer.conv1d.bias is not None
        assert layer.x_proj.out_features == math.ceil(d_model / 16) + 2 * d_state


def test_tiny_model_trains():
    model = tiny_model()
    idx = torch.randint(0, 11, (4, 17), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(11)) < 0.1  # near-uniform predictions at init
    assert losses[-1] < 0.5 * losses[0]


def test_autocast_bf16_forward_and_fp32_scan():
    model = tiny_model()
    with torch.no_grad():  # logits of order 1, so that the comparison below means something
        model.embedding.weight.normal_(std=1.0)
    idx = torch.randint(0, 11, (2, 20), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    device_type = torch.device(DEVICE).type
    with torch.autocast(device_type, dtype=torch.bfloat16):
        logits = model(idx)
        F.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    assert logits.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert_close_rel(logits, model(idx).detach(), rtol=1e-2)  # bf16 matmuls: ~3 significant digits
    inputs = [t.to(DEVICE) for t in scan_inputs(64, d_in=8, n=16)]
    expected = selective_scan(*inputs)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        y = selective_scan(*inputs)
        y_bf16 = selective_scan(*[t.bfloat16() for t in inputs])
    assert y.dtype == torch.float32 and y_bf16.dtype == torch.bfloat16
    assert torch.equal(y, expected)  # autocast did not sneak bf16 into the scan


def test_tiny_mamba_overfits_a_handful_of_graphs():
    cfg = tiny(model="mamba", n_layer=2, n_embd=32, n_train=16, batch_size=16, max_iters=150,
               lr=1e-2, warmup_iters=10, eval_interval=150, log_interval=150)
    (tr_e, tr_p), _, _ = nf.make_splits(cfg)
    torch.manual_seed(cfg.seed)
    model = nf.build_model(cfg, cfg.num_nodes + 4, 31)
    opt = nf.make_optimizer(model, cfg, torch.device("cpu"))
    seq, P = nf.encode(tr_e, tr_p, cfg.num_nodes)
    seq = torch.from_numpy(seq)
    for _ in range(150):
        loss = nf.answer_loss(model, seq, P, False, cfg.num_nodes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    assert torch.equal(model.generate(seq[:, :P], 5), seq[:, P:])


@pytest.mark.parametrize("objective", [{}, {"reverse": True}, {"teacherless": True}])
def test_nanofail_trains_mamba(tmp_path, capsys, objective):
    code, _, _ = run_main(flags(model="mamba", d_state=8, max_iters=30, lr=1e-2, warmup_iters=5,
                                out_dir=tmp_path, **objective), capsys)
    res = json.load(open(tmp_path / "results.json"))
    assert code == 0 and res["config"]["model"] == "mamba" and res["final"]["step"] == 30
    assert res["history"][-1]["train_loss"] < math.log(54)
    # the first answer token (s, or g reversed) is in the prompt: a model that reads it beats 1/50
    assert res["final"]["forced_token_acc"][0] > 0.2

# ---- evaluation


@pytest.mark.parametrize("model", ["gpt", "mamba"])
def test_exact_match_from_the_forced_pass_equals_greedy_decoding(model):
    """evaluate() scores exact match with one forward pass: decoding is right all the way exactly
    when every teacher-forced prediction is right. Check it against real decoding, token by token,
    on more graphs than one evaluation batch (128)."""
    cfg = tiny(model=model, n_layer=2, n_train=16, n_test=150, batch_size=16, lr=1e-2)
    (tr_e, tr_p), (te_e, te_p), _ = nf.make_splits(cfg)
    edges, path = np.concatenate([tr_e, te_e]), np.concatenate([tr_p, te_p])
    seq, P = nf.encode(edges, path, cfg.num_nodes)
    seq = torch.from_numpy(seq).to(DEVICE)
    torch.manual_seed(0)
    net = nf.build_model(cfg, cfg.num_nodes + 4, seq.shape[1] - 1).to(DEVICE)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(60):  # memorise the 16 training graphs: some answers right, many wrong
        loss = nf.answer_loss(net, seq[:16], P, False, cfg.num_nodes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    r = nf.evaluate(net, edges, path, cfg.num_nodes)
    assert net.training  # evaluate() leaves the model as training found it
    decoded = net.generate(seq[:, :P], seq.shape[1] - P)
    right = (decoded == seq[:, P:]).all(1)
    exact = right.float().mean().item()
    assert 0 < exact < 1 and r["test_exact_match"] == pytest.approx(exact)
    assert (len(r["forced_token_acc"]) == cfg.path_len
            and r["test_exact_match"] <= min(r["forced_token_acc"]))
    ex = r["example"]
    k = ex["index"]  # the first graph decoded wrong
    assert right[:k].all() and not right[k]
    assert ex["pred"] == decoded[k].tolist()
    assert ex["edges"] == edges[k].tolist() and ex["path"] == path[k].tolist()


def test_explain_names_where_the_answer_went_wrong():
    # G(2,4): s = 5, arms 5-2-8-7 and 5-9-3-4, goal 7
    edges, path = [[5, 2], [2, 8], [5, 9], [9, 3], [8, 7], [3, 4]], [5, 2, 8, 7]
    assert nf.explain(edges, path, [5, 2, 8, 7]) == "right"
    # the Clever-Hans picture: the other child of s, then its arm;
    # g itself is copied from the prompt
    assert (nf.explain(edges, path, [5, 9, 3, 7])
            == "wrong arm at n1, then n2 along the edges from there")
    assert (nf.explain(edges, path, [5, 9, 3, 4])
            == "wrong arm at n1, then n2 g along the edges from there")
    assert nf.explain(edges, path, [5, 9, 2, 7]) == "wrong arm at n1, n2 too"  # 2 does not follow 9
    assert nf.explain(edges, path, [5, 2, 3, 7]) == "wrong at n2"
    assert nf.explain(edges, path, [7, 8, 2, 5], reverse=True) == "right"
    assert (nf.explain(edges, path, [7, 3, 9, 5], reverse=True)
            == "wrong at n2, then n1 along the edges from there")
    assert nf.explain([[5, 2], [5, 9]], [5, 2], [5, 9]) == "wrong at g"  # G(2,2): no n1


def first_word(r, **cfg):
    return nf.verdict(r, nf.Config(**cfg)).split()[0].rstrip(":")


@pytest.mark.parametrize("forced,exact,cfg,word", [
    ([1.0, 0.51, 1.0, 1.0, 1.0], 0.51, {}, "Clever"),  # n1 a guess among 2, the rest read off
    ([1.0, 0.21, 0.99, 1.0], 0.2, dict(deg=5, path_len=4), "Clever"),  # a guess among 5
    ([1.0, 0.5, 0.99, 1.0], 0.5, dict(deg=5, path_len=4), "still"),    # above 1/deg: learning n1
    ([1.0, 0.51, 0.6, 1.0, 1.0], 0.3, {}, "still"),                  # the lookups not learned yet
    ([0.2] * 5, 0.0, {}, "still"),
    ([1.0, 0.51, 1.0, 1.0, 1.0], 0.51, dict(reverse=True), "still"),  # reversed: no n1 to guess
    ([1.0] * 5, 0.97, {}, "solved"),
    ([1.0] * 5, 0.97, dict(reverse=True), "solved"),
    ([1.0] * 5, 0.97, dict(teacherless=True), "solved"),
    ([1.0, 0.17, 0.16, 0.98, 1.0], 0.0, dict(teacherless=True), "teacherless"),
    ([1.0, 0.51, 1.0, 1.0, 1.0], 0.51, dict(teacherless=True), "teacherless"),
    ([0.2] * 5, 0.0, dict(teacherless=True), "teacherless"),
    ([0.2] * 5, 0.0, dict(teacherless=True, model="mamba"), "teacherless"),
])
def test_verdicts_read_the_accuracy_pattern(forced, exact, cfg, word):
    assert first_word(dict(forced_token_acc=forced, test_exact_match=exact), **cfg) == word


def test_teacherless_verdict_names_what_is_planned():
    r = dict(forced_token_acc=[1.0, 0.17, 0.16, 0.98, 1.0], test_exact_match=0.0)
    text = nf.verdict(r, nf.Config(teacherless=True, path_len=5))
    have, lack = text.split(";")[:2]  # the planned positions, then the ones not yet
    assert set(have.split()) >= {"s", "n3", "g"} and not {"n1", "n2"} & set(have.split())
    assert {"n1", "n2"} <= set(lack.split())
    r = dict(forced_token_acc=[1.0, 0.95, 0.99, 1.0], test_exact_match=0.945)  # each, not all
    lack = nf.verdict(r, nf.Config(teacherless=True, path_len=4)).split(";")[1]
    assert "0.945" in lack and not set(lack.split()) & {"s", "n1", "n2", "g"}


@pytest.mark.parametrize("n1", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_one_arm_is_never_clever_hans(n1):
    r = dict(forced_token_acc=[1.0, n1, 1.0, 1.0, 1.0], test_exact_match=min(n1, 0.9))
    assert first_word(r, deg=1) != "Clever"


def test_no_clever_hans_without_an_n1():
    r = dict(forced_token_acc=[1.0, 0.5], test_exact_match=0.5)  # G(2,2): s, g; g is in the prompt
    assert first_word(r, path_len=2) != "Clever"


def test_every_evaluation_prints_a_worked_example(tmp_path, capsys):
    kw = dict(max_iters=4, eval_interval=2)
    code, out, _ = run_main(flags(out_dir=tmp_path, **kw), capsys)
    final = json.load(open(tmp_path / "results.json"))["final"]
    ex = final["example"]
    assert code == 0 and set(ex) == {"index", "edges", "path", "pred"}
    # steps 2 and 4
    assert evaluations(out) == 2 and out.count(graph_text(ex["edges"], ex["path"])) == 2
    _, (te_e, te_p), _ = nf.make_splits(tiny(**kw))
    assert ex["edges"] == te_e[ex["index"]].tolist() and ex["path"] == te_p[ex["index"]].tolist()
    true, model = ([ln.split()[1:] for ln in out.splitlines() if ln.split()[:1] == [name]][-1]
                   for name in ("true", "model"))
    assert true == [str(n) for n in ex["path"]]
    L = len(ex["path"])
    assert model[:L] == [str(n) for n in ex["pred"]]
    assert " ".join(model[L:]) == nf.explain(ex["edges"], ex["path"], ex["pred"])

# ---- training


def test_lr_schedule():
    cfg = tiny(lr=1e-3, warmup_iters=10, max_iters=100, min_lr_frac=0.1)
    lrs = [nf.lr_at(s, cfg) for s in range(100)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-4)
    assert (all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
            and nf.lr_at(100, cfg) == pytest.approx(1e-4))
    # a third of the way down the cosine (a straight line would give 7e-4)
    assert nf.lr_at(40, cfg) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(math.pi / 3)) / 2)


def test_min_lr_frac_one_is_a_constant_lr_after_warmup():
    cfg = tiny(lr=1e-3, warmup_iters=10, max_iters=100, min_lr_frac=1)
    assert nf.lr_at(0, cfg) < nf.lr_at(5, cfg) < nf.lr_at(9, cfg)
    assert all(nf.lr_at(s, cfg) == pytest.approx(1e-3) for s in range(9, 120))


def test_weight_decay_groups():
    model = nf.GPT(vocab_size=20, block_size=16, n_layer=1, n_embd=32, n_head=2)
    flagged = model.blocks[0].qkv.weight  # a matrix: only the flag keeps it out of the decay
    flagged._no_weight_decay = True  # the flag Mamba sets on A_log and D
    cfg = tiny(weight_decay=0.3, beta2=0.99)
    opt = nf.make_optimizer(model, cfg, torch.device("cpu"))
    decay, rest = opt.param_groups
    matrices = {id(p) for p in model.parameters() if p.dim() == 2} - {id(flagged)}
    assert matrices and {id(p) for p in decay["params"]} == matrices
    assert any(p is flagged for p in rest["params"])
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))
    assert (decay["weight_decay"], rest["weight_decay"]) == (0.3, 0.0)
    assert decay["betas"] == rest["betas"] == (0.9, 0.99)


def test_mamba_A_log_and_D_get_no_weight_decay():
    cfg = nf.Config(model="mamba", n_layer=1, n_embd=16)
    model = nf.build_model(cfg, vocab_size=20, block_size=16)
    decay, rest = nf.make_optimizer(model, cfg, torch.device("cpu")).param_groups
    assert decay["weight_decay"] > 0 and rest["weight_decay"] == 0
    is_in = lambda p, group: any(p is q for q in group["params"])  # noqa: E731
    (layer,) = model.layers
    for p in (layer.A_log, layer.D):  # A_log is a matrix, yet not decayed
        assert is_in(p, rest) and not is_in(p, decay)
    assert layer.A_log.dim() == 2
    for p in (layer.in_proj.weight, layer.out_proj.weight, layer.x_proj.weight):
        assert is_in(p, decay)


@pytest.mark.parametrize("objective", [{}, {"reverse": True}, {"teacherless": True}])
def test_tiny_training_loss_falls_and_train_returns_that_model(objective):
    cfg = tiny(n_train=512, n_test=64, batch_size=64, max_iters=80, eval_interval=20, lr=1e-2,
               **objective)
    model, hist = nf.train(cfg, log=None)
    assert [h["step"] for h in hist] == [20, 40, 60, 80]
    # from ~log(vocab)
    assert hist[-1]["train_loss"] < min(0.85 * np.log(54), hist[0]["train_loss"])
    r = hist[-1]
    assert (0 <= r["test_exact_match"] <= 1
            and len(r["forced_token_acc"]) == len(r["example"]["pred"]) == 5)
    assert r["test_exact_match"] <= min(r["forced_token_acc"]) + 1e-9
    # the first answer token (s, or g when reversed) is in the prompt
    assert r["forced_token_acc"][0] > 0.9
    # the returned model is the one the last evaluation scored
    _, test, task = nf.make_splits(cfg)
    device = torch.device(DEVICE)
    again = nf.evaluate(model, *test, task["num_nodes"], cfg.reverse, cfg.teacherless,
                        lambda: nf.compute_context(device, torch.float32))
    assert again["test_exact_match"] == pytest.approx(r["test_exact_match"])
    assert again["forced_token_acc"] == pytest.approx(r["forced_token_acc"])
    assert again["example"] == r["example"]
    # and report() prints it from Python, anywhere
    lines = []
    nf.report(again, cfg, log=lines.append)
    text = "\n".join(lines)
    assert (nf.verdict(again, cfg) in text
            and graph_text(r["example"]["edges"], r["example"]["path"]) in text)


def test_train_with_log_none_says_nothing(capsys):
    model, hist = nf.train(tiny(max_iters=4, eval_interval=2, log_interval=1), log=None)
    assert [h["step"] for h in hist] == [2, 4] and isinstance(model, torch.nn.Module)
    assert capsys.readouterr() == ("", "")


def test_train_logs_to_any_one_argument_callable():
    lines = []
    nf.train(tiny(max_iters=2), log=lines.append)  # as report() takes it
    assert progress_steps("\n".join(lines)) == [2] and evaluations("\n".join(lines)) == 1


def test_too_few_training_graphs_for_a_batch_is_bad_input(capsys):
    with pytest.raises(nf.UsageError, match="--batch_size"):
        nf.train(tiny(n_train=16, batch_size=32), log=None)
    _, err = usage_error(flags(n_train=16, batch_size=32), capsys, "--batch_size")
    assert "diverged" not in err


def test_checkpoint_round_trip_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(flags(max_iters=8, out_dir=out), capsys)[0] == 0
    res = json.load(open(out / "results.json"))
    assert set(res) == {"config", "history", "final"} and res["final"]["step"] == 8
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert (ckpt["step"] == 8 and ckpt["config"]["n_embd"] == 32
            and ckpt["history"] == res["history"])
    cfg = nf.Config(**ckpt["config"])
    model = nf.build_model(cfg, cfg.num_nodes + 4, 27 + 4)
    model.load_state_dict(ckpt["model"])
    _, (te_e, te_p), _ = nf.make_splits(cfg)
    device = torch.device(DEVICE)
    dtype = nf.autocast_dtype(cfg.dtype, device)
    r = nf.evaluate(model.to(device), te_e, te_p, cfg.num_nodes,
                    amp=lambda: nf.compute_context(device, dtype))
    assert r["test_exact_match"] == pytest.approx(res["final"]["test_exact_match"])
    assert r["forced_token_acc"] == pytest.approx(res["final"]["forced_token_acc"])
    # --resume alone continues with the checkpoint's settings (into its own folder);
    # flags override them
    code, stdout, _ = run_main(["--max_iters", "12", "--resume", out / "ckpt.pt"], capsys)
    assert code == 0 and progress_steps(stdout) == [10, 12]  # steps 9..12 only
    said = [ln for ln in stdout.splitlines() if str(out / "ckpt.pt") in ln]
    assert said and re.search(r"\b8\b", said[0])  # the resume line says the step it resumed at
    assert ckpt_step(out / "ckpt.pt") == 12
    assert [h["step"] for h in json.load(open(out / "results.json"))["history"]] == [8, 12]


def test_resume_of_a_finished_run_evaluates(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(flags(max_iters=6, out_dir=out), capsys)[0] == 0
    before = (out / "ckpt.pt").read_bytes()
    code, stdout, _ = run_main(["--resume", out / "ckpt.pt"], capsys)
    assert code == 0 and progress_steps(stdout) == []
    said = [ln for ln in stdout.splitlines() if str(out / "ckpt.pt") in ln]
    assert said and re.search(r"\b6\b", said[0])
    assert evaluations(stdout) == 1
    assert (out / "ckpt.pt").read_bytes() == before


def test_max_iters_zero_evaluates_the_untrained_model(capsys):
    code, stdout, _ = run_main(flags(max_iters=0), capsys)
    assert code == 0 and progress_steps(stdout) == []
    assert evaluations(stdout) == 1


def weights(run_dir):
    return torch.load(run_dir / "ckpt.pt", weights_only=True)["model"]


def test_fresh_after_trains_on_new_graphs_each_seen_once(tmp_path, capsys, monkeypatch):
    kw = dict(n_train=48, n_test=16, batch_size=16, min_lr_frac=1)  # 48 in the pool
    code, stdout, _ = run_main(flags(max_iters=10, fresh_after=6, out_dir=tmp_path / "one", **kw),
                               capsys)
    assert code == 0 and re.search(r"^step 6\b.*new graphs", stdout, re.M)  # the switch, said
    header = stdout.splitlines()[0]  # the task's graphs against the graphs the run sees
    assert f"{nf.count_graphs(2, 5, 50):,} distinct" in header and "+ new graphs" in header
    assert run_main(flags(max_iters=10, out_dir=tmp_path / "pool", **kw), capsys)[0] == 0
    one, pool = weights(tmp_path / "one"), weights(tmp_path / "pool")
    assert not all(torch.allclose(one[k], pool[k], atol=1e-5) for k in one)  # new graphs trained
    # steps 7-10 trained on the first 64 graphs of the stream's first block, in order: none a test
    # graph, none seen twice
    cfg = tiny(max_iters=10, fresh_after=6, **kw)
    _, test, _ = nf.make_splits(cfg, log=lambda *a: None)
    new = nf.new_graphs(cfg, 0, set(nf.graph_keys(*test)))
    assert len(new[0]) == nf.NEW_BLOCK * 16 and len(set(nf.graph_keys(*new))) == len(new[0])
    assert set(nf.graph_keys(*new)).isdisjoint(nf.graph_keys(*test))
    batches, real_loss = [], nf.answer_loss

    def answer_loss(model, seq, *args, **kwargs):
        batches.append(seq.clone())
        return real_loss(model, seq, *args, **kwargs)
    monkeypatch.setattr(nf, "answer_loss", answer_loss)
    nf.train(cfg, log=None)
    assert len(batches) == 10
    assert torch.equal(torch.cat(batches[6:]), torch.from_numpy(nf.encode(*new, 50)[0][:64]))


@pytest.mark.parametrize("first", [3, 7])  # a first part that stops before the switch at 5, after
def test_a_run_resumed_with_a_larger_budget_is_the_longer_run(tmp_path, capsys, first):
    """New graphs follow the step, not --max_iters: 10 steps in one run, or `first` steps and then
    a resume with --max_iters 10 (at a constant lr), train the same weights."""
    kw = dict(n_train=48, n_test=16, batch_size=16, min_lr_frac=1, warmup_iters=0, fresh_after=5,
              threads=1)  # one thread: the same sums in every part (threads follow the load)
    assert run_main(flags(max_iters=10, out_dir=tmp_path / "one", **kw), capsys)[0] == 0
    assert run_main(flags(max_iters=first, out_dir=tmp_path / "two", **kw), capsys)[0] == 0
    assert ckpt_step(tmp_path / "two" / "ckpt.pt") == first
    code, _, _ = run_main(["--resume", tmp_path / "two" / "ckpt.pt", "--max_iters", "10"], capsys)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert code == 0 and all(torch.equal(one[k], two[k]) for k in one)


def test_the_stream_of_new_graphs_depends_on_the_step_alone():
    cfg = tiny(batch_size=2, fresh_after=3)
    pool, test, _ = nf.make_splits(cfg, log=lambda *a: None)

    def steps(first, n, **kw):  # the global batches of steps first+1 .. first+n
        gen = nf.train_batches(nf.replace(cfg, **kw), first, pool, test, torch.device("cpu"),
                               lambda *a: None)
        return [next(gen) for _ in range(n)]
    whole = steps(0, 3 + 2 * nf.NEW_BLOCK + 5)
    start = 3 + nf.NEW_BLOCK - 2  # a resume just before the second block, with a larger budget
    later = steps(start, nf.NEW_BLOCK + 10, max_iters=10**9)
    assert all(torch.equal(a, b) for a, b in zip(whole[start:], later))
    assert not torch.equal(whole[3], whole[3 + nf.NEW_BLOCK])  # each block graphs of its own


@pytest.mark.parametrize("saved_at", [3, 6])  # in the pool's first epoch; past the switch at 5
def test_a_run_resumed_mid_epoch_trains_on_the_batches_of_one_run(tmp_path, capsys, monkeypatch,
                                                                  saved_at):
    kw = dict(n_train=64, n_test=16, batch_size=16, min_lr_frac=1, max_iters=12, fresh_after=5,
              eval_interval=3)  # 4 batches an epoch of the pool; checkpoints at 3, 6, 9, 12
    assert run_main(flags(out_dir=tmp_path / "one", **kw), capsys)[0] == 0
    with monkeypatch.context() as m:  # Ctrl-C in the step after the checkpoint
        interrupt_at_call(m, saved_at + 1)
        assert run_main(flags(out_dir=tmp_path / "two", **kw), capsys)[0] == 1
    assert ckpt_step(tmp_path / "two" / "ckpt.pt") == saved_at
    assert run_main(["--resume", tmp_path / "two" / "ckpt.pt"], capsys)[0] == 0
    one, two = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True)["model"]
                for run in ("one", "two"))
    assert all(torch.allclose(one[k], two[k], atol=1e-6) for k in one)  # the same batches


def test_new_graphs_need_no_memory_up_front(capsys, monkeypatch):
    # a budget of 10**9 steps of new graphs starts at once: they are drawn as the steps come
    interrupt_at_call(monkeypatch, 6)
    code, out, err = run_main(flags(fresh_after=3, max_iters=10**9, log_interval=1), capsys)
    assert code == 1 and progress_steps(out) == [1, 2, 3, 4, 5] and re.search(r"\b5\b", err)


def test_a_checkpoint_from_an_older_version_resumes_as_that_version_ran(tmp_path, capsys):
    # as if saved before these knobs existed
    old = dict(nf.asdict(nf.Config(preset="g25")), dropped_knob=1)
    for k in ("min_lr_frac", "beta2", "compile_mode", "threads", "overwrite"):
        del old[k]
    cfg = nf.Config(**nf.known_knobs(old))
    new = (cfg.min_lr_frac, cfg.beta2, cfg.compile_mode, cfg.threads, cfg.overwrite)
    assert new == (0.1, 0.95, "default", 0, False)
    assert cfg.n_layer == 8  # what it had keeps its value
    # and from the command line: a real checkpoint whose config lacks a knob
    out = tmp_path / "run"
    assert run_main(flags(max_iters=2, out_dir=out), capsys)[0] == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    del ckpt["config"]["beta2"]
    ckpt["config"]["dropped_knob"] = 1
    torch.save(ckpt, out / "ckpt.pt")
    code, _, _ = run_main(["--resume", out / "ckpt.pt", "--max_iters", "4"], capsys)
    assert code == 0 and torch.load(out / "ckpt.pt", weights_only=True)["config"]["beta2"] == 0.95


def test_flags_given_on_resume_reach_the_optimizer(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run_main(flags(max_iters=2, out_dir=out), capsys)[0] == 0
    made, real = [], nf.make_optimizer
    monkeypatch.setattr(nf, "make_optimizer",
                        lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    code, _, _ = run_main(["--resume", out / "ckpt.pt", "--max_iters", "4", "--weight_decay", "0",
                           "--beta2", "0.5"], capsys)
    assert (code == 0
            and torch.load(out / "ckpt.pt", weights_only=True)["config"]["weight_decay"] == 0)
    assert [(g["weight_decay"], g["betas"]) for g in made[0].param_groups] == [(0, (0.9, 0.5))] * 2


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_threads_sets_the_cpu_threads(capsys, monkeypatch, restore_threads):
    n = 2 if restore_threads == 1 else 1
    seen, real = [], nf.answer_loss
    monkeypatch.setattr(nf, "answer_loss",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    assert run_main(flags(max_iters=2, threads=n, device="cpu"), capsys)[0] == 0
    assert seen == [n, n]


def test_compile_mode_without_compile_trains_eagerly(capsys, monkeypatch):
    assert nf.parse_config(["--compile_mode", "reduce-overhead"]).compile_mode == "reduce-overhead"

    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile called without --compile")
    monkeypatch.setattr(torch, "compile", no_compile)
    code, stdout, _ = run_main(flags(max_iters=2, log_interval=1, compile_mode="max-autotune"),
                               capsys)
    assert code == 0 and progress_steps(stdout) == [1, 2]


def test_a_diverging_run_stops_at_once_and_keeps_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(flags(max_iters=4, out_dir=out), capsys)[0] == 0
    before = (out / "ckpt.pt").read_bytes()
    code, stdout, err = run_main(flags(resume=out / "ckpt.pt", max_iters=400, lr=1e6, grad_clip=0,
                                       log_interval=100), capsys)
    assert (code == 1 and len(err.strip().splitlines()) == 1 and "--lr" in err
            and "nan" in err.lower())
    assert progress_steps(stdout) == []  # stopped at the bad step, not at the next progress line
    assert (out / "ckpt.pt").read_bytes() == before


def test_a_loss_gone_nan_stops_the_run_at_that_step_and_names_the_last_checkpoint(
        tmp_path, capsys, monkeypatch):
    calls, real = [], nf.answer_loss

    def nan_at_step_5(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss
    monkeypatch.setattr(nf, "answer_loss", nan_at_step_5)
    out = tmp_path / "run"
    code, stdout, err = run_main(flags(max_iters=10, eval_interval=2, log_interval=100,
                                       out_dir=out), capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and len(calls) == 5
    assert re.search(r"\b5\b", err) and "--lr" in err and f"--resume {out / 'ckpt.pt'}" in err
    assert ckpt_step(out / "ckpt.pt") == 4  # the last save before it, kept


def interrupt_at_call(monkeypatch, n):
    """Ctrl-C in the n-th training step."""
    calls, real = [], nf.answer_loss

    def answer_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(nf, "answer_loss", answer_loss)


def test_ctrl_c_says_where_the_checkpoint_is(tmp_path, capsys, monkeypatch):
    interrupt_at_call(monkeypatch, 5)
    out = tmp_path / "run"
    code, _, err = run_main(flags(max_iters=10, eval_interval=2, out_dir=out), capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert re.search(r"\b4\b", err) and f"python nanofail.py --resume {out / 'ckpt.pt'}" in err
    assert ckpt_step(out / "ckpt.pt") == 4


@pytest.mark.parametrize("eval_interval,first", [(5, 5), (0, 10)])
def test_ctrl_c_before_the_first_checkpoint_says_when_it_comes(tmp_path, capsys, monkeypatch,
                                                               eval_interval, first):
    interrupt_at_call(monkeypatch, 3)
    out = tmp_path / "run"
    code, _, err = run_main(flags(max_iters=10, eval_interval=eval_interval, out_dir=out), capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert re.search(r"\b2\b", err) and re.search(rf"\b{first}\b", err) and "--resume" not in err
    assert not (out / "ckpt.pt").exists()


def test_ctrl_c_without_out_dir_suggests_it(capsys, monkeypatch):
    interrupt_at_call(monkeypatch, 3)
    code, _, err = run_main(flags(max_iters=10, eval_interval=5), capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "--out_dir" in err


@pytest.mark.parametrize("how", ["diverged", "interrupted"])
def test_a_resumed_run_stopped_before_its_first_save_names_its_checkpoint(tmp_path, capsys,
                                                                          monkeypatch, how):
    out = tmp_path / "run"
    assert run_main(flags(max_iters=2, out_dir=out), capsys)[0] == 0
    more = dict(lr=1e6, grad_clip=0) if how == "diverged" else {}
    if how == "interrupted":
        interrupt_at_call(monkeypatch, 3)
    code, _, err = run_main(flags(resume=out / "ckpt.pt", max_iters=400, eval_interval=300,
                                  out_dir=out, **more), capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    # the checkpoint it resumed from is the one to go on from
    assert f"--resume {out / 'ckpt.pt'}" in err
    assert ckpt_step(out / "ckpt.pt") == 2


# ---- command line (and bad input)


@pytest.mark.parametrize("given,cli", [
    (dict(dtype="fp16"), ["--dtype", "fp16"]),
    (dict(model="rnn"), ["--model", "rnn"]),
    (dict(min_lr_frac=5), ["--min_lr_frac", "5"]),
    (dict(lr=float("nan")), ["--lr", "nan"]),
    (dict(seed=-1), ["--seed", "-1"]),
    (dict(seed=2**32), ["--seed", str(2**32)]),
    (dict(num_nodes=100_000), ["--num_nodes", "100000"]),
    (dict(preset="huge"), ["--preset", "huge"]),
    (dict(nope=1), ["--nope", "1"]),
    (dict(n_train="100"), None),  # the command line has no strings for numbers, Python does
    (dict(teacherless="yes"), None),
    (dict(n_train=True), ["--n_train", "True"]),  # a bool is no int here
    (dict(lr=float("inf")), ["--lr", "inf"]),
])
def test_config_from_python_checks_like_the_command_line(capsys, given, cli):
    (knob, value), = given.items()
    with pytest.raises(nf.UsageError, match=knob if knob != "preset" else value):
        nf.Config(**given)
    if cli:
        usage_error(cli + ["--max_iters", "1"], capsys, cli[0] if knob != "preset" else value)


@pytest.mark.parametrize("argv,needle", [
    (["--deg", "5", "--path_len", "5", "--num_nodes", "20"], "--num_nodes"),
    (["--deg", "0"], "--deg"),
    (["--path_len", "1"], "--path_len"),
    (["--n_train", "0"], "--n_train"),
    (["--n_embd", "30", "--n_head", "4"], "n_head"),
    (["--test_file", "/nonexistent/test.txt"], "/nonexistent/test.txt"),
    (["--model", "rnn"], "--model"),
    (["--no_such_flag"], "--no_such_flag"),
    (["--lr", "fast"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--log_interval", "0"], "--log_interval"),
    (["--batch_size", "-4"], "--batch_size"),
    (["--n_train", "16", "--batch_size", "32"], "--batch_size"),
    (["--seed", "-1"], "--seed"),
    (["--min_lr_frac", "5"], "--min_lr_frac"),
    (["--beta2", "1.5"], "--beta2"),
    (["--num_nodes", "100000"], "--num_nodes"),
    (["--dtype", "fp16"], "--dtype"),
    (["--compile_mode", "fast"], "--compile_mode"),
    (["--threads", "-1"], "--threads"),
    (["--preset", "huge"], "huge"),
    (["--device", "tpu9"], "--device"),
    (["--device", "xpu"], "--device"),
    (["--device", "meta"], "--device"),
    pytest.param(["--device", "cuda"], "--device", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param(["--device", "mps"], "--device", marks=pytest.mark.skipif(
        torch.backends.mps.is_available(), reason="this machine has MPS")),
])
def test_bad_input_is_one_line(capsys, argv, needle):
    out, _ = usage_error(flags(max_iters=1) + argv, capsys, needle)
    assert progress_steps(out) == []


def test_a_huge_test_set_is_refused_at_once(capsys):
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    n = 10**8 if memory < 90 * 2**30 else 10**10  # ~100 GiB of graphs: more than this machine holds
    t0 = time.time()
    usage_error(["--n_test", n, "--max_iters", "1"], capsys, "--n_test")  # not a MemoryError
    assert time.time() - t0 < 10


def test_the_folder_of_another_run_is_kept(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(flags(max_iters=2, out_dir=out), capsys)[0] == 0
    files = {f: (out / f).read_bytes() for f in ("ckpt.pt", "results.json")}
    stdout, _ = usage_error(flags(max_iters=4, seed=7, out_dir=out), capsys, "--out_dir")
    assert stdout == ""  # refused before the data, the model and step 1
    assert {f: (out / f).read_bytes() for f in files} == files
    (out / "ckpt.pt").unlink()  # either file alone is a run's too
    usage_error(flags(max_iters=4, out_dir=out), capsys, "--overwrite")
    assert (out / "results.json").read_bytes() == files["results.json"]
    # --overwrite replaces it; --resume continues in the same folder
    assert run_main(flags(max_iters=4, out_dir=out, overwrite=True), capsys)[0] == 0
    assert ckpt_step(out / "ckpt.pt") == 4
    assert run_main(["--resume", out / "ckpt.pt", "--max_iters", "6", "--out_dir", out],
                    capsys)[0] == 0
    assert ckpt_step(out / "ckpt.pt") == 6
    # but another run's checkpoint may not continue into this folder
    assert run_main(flags(max_iters=2, out_dir=tmp_path / "other"), capsys)[0] == 0
    usage_error(["--resume", tmp_path / "other" / "ckpt.pt", "--max_iters", "4", "--out_dir", out],
                capsys, "--out_dir")
    assert ckpt_step(out / "ckpt.pt") == 6


def test_unwritable_output_folder_is_one_line_and_keeps_the_file(tmp_path, capsys):
    f = tmp_path / "results"
    f.write_text("keep me")
    for flag in ("--export_data", "--out_dir"):
        usage_error([flag, f, "--n_train", "20", "--n_test", "5", "--max_iters", "1"], capsys, flag)
    assert f.read_text() == "keep me"


def test_read_only_output_folder_is_refused_before_step_1(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        try:
            (ro / "probe").write_text("")
            pytest.skip("this user can write to a read-only folder (root)")
        except OSError:
            pass
        out, _ = usage_error(flags(max_iters=2, out_dir=ro), capsys, "--out_dir")
        assert progress_steps(out) == [] and not list(ro.iterdir())
    finally:
        ro.chmod(0o700)


def test_corrupt_or_mismatched_checkpoint_is_refused_and_kept(tmp_path, capsys):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    usage_error(["--resume", bad, "--out_dir", tmp_path, "--max_iters", "1"], capsys, str(bad))
    assert bad.read_bytes() == b"not a checkpoint"
    good = tmp_path / "run"
    assert run_main(flags(max_iters=2, out_dir=good), capsys)[0] == 0
    before = (good / "ckpt.pt").read_bytes()
    usage_error(flags(n_embd=64, max_iters=4, resume=good / "ckpt.pt", out_dir=good), capsys,
                "--n_embd 32")
    assert (good / "ckpt.pt").read_bytes() == before


def test_resume_with_another_preset_is_refused(tmp_path, capsys):
    run = tmp_path / "g25"
    assert run_main(flags(max_iters=2, out_dir=run), capsys)[0] == 0
    # a preset's values would all be the checkpoint's: refused, not a new name on the old run
    usage_error(["--resume", run / "ckpt.pt", "--preset", "g23"], capsys, "--preset quick")
    assert run_main(["--resume", run / "ckpt.pt", "--preset", "quick"], capsys)[0] == 0


def test_resume_with_data_of_another_task_is_refused(tmp_path, capsys):
    run = tmp_path / "g25"
    assert run_main(flags(max_iters=2, out_dir=run), capsys)[0] == 0
    before = (run / "ckpt.pt").read_bytes()
    f = tmp_path / "g23.txt"
    nf.write_graphs(str(f), *graphs(n=40, deg=2, path_len=3, num_nodes=20))
    usage_error(["--resume", run / "ckpt.pt", "--test_file", f, "--max_iters", "4"], capsys,
                "G(2,5)")
    assert (run / "ckpt.pt").read_bytes() == before


def run_figures(argv, capsys):
    """Run assets/figures.py in-process; return (exit code, stdout, stderr)."""
    try:
        figures.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_learning_curves_from_results(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    example = dict(index=0, edges=[[5, 2], [2, 8], [5, 9], [9, 3]], path=[5, 2, 8], pred=[5, 9, 3])
    hist = [dict(step=s, train_loss=1.0, test_exact_match=0.5, forced_token_acc=[1, .5, 1, 1, 1],
                 example=example)
            for s in (10, 20)]
    json.dump(dict(config=nf.asdict(nf.Config()), history=hist, final=hist[-1]),
              open(run / "results.json", "w"))
    out = tmp_path / "fig" / "ch.png"
    code, stdout, _ = run_figures(["--curves", run, run, "--out", out], capsys)
    assert code == 0 and out.read_bytes()[:4] == b"\x89PNG"
    code, _, err = run_figures(["--curves", tmp_path, "--out", out], capsys)
    assert code == 2 and "results.json" in err and len(err.strip().splitlines()) == 1


def test_odds_table_counts_the_runs_that_reached_the_target(tmp_path, capsys):
    runs = []
    for seed, exacts, steps in ((1, (0.5, 0.96, 0.99), 30), (2, (0.5, 0.6, 0.94), 30),
                                (3, (0.5, 0.6, 0.94), 600)):  # seed 3 stopped before its end
        run = tmp_path / f"s{seed}"
        run.mkdir()
        hist = [dict(step=10 * (i + 1), train_loss=1.0, test_exact_match=x,
                     forced_token_acc=[1, x, 1, 1, 1]) for i, x in enumerate(exacts)]
        cfg = nf.Config(seed=seed, teacherless=True, max_iters=steps, path_len=5)
        json.dump(dict(config=nf.asdict(cfg), history=hist, final=hist[-1]),
                  open(run / "results.json", "w"))
        runs.append(run)
    (tmp_path / "empty").mkdir()  # a run that wrote nothing yet: a row, not a failure
    code, out, _ = run_figures(["--odds", *runs, tmp_path / "empty"], capsys)
    rows = [r.split("|")[1:-1] for r in out.splitlines() if r.startswith(f"| {tmp_path}")]
    assert code == 0 and [r[-1].strip() for r in rows] == ["20", "no", "no", ""]  # step >= 0.95
    assert [r[1].strip() for r in rows] == ["1", "2", "3", ""]
    assert re.search(r"teacherless: 1 of 3 .*; 1 of the others", out)  # seed 3 said apart
    assert [r[-2].strip() for r in rows] == ["20 10 10", "30 10 10", "30 10 10", ""]  # n1 n2 n3
    code, out, _ = run_figures(["--odds", *runs, "--by", "10"], capsys)  # a budget of 10 steps
    rows = [r.split("|")[1:-1] for r in out.splitlines() if r.startswith(f"| {tmp_path}")]
    assert code == 0 and [r[3].strip() for r in rows] == ["10"] * 3  # each read as at step 10
    assert re.search(r"teacherless: 0 of 3 runs", out) and "others" not in out  # all missed
    code, out, _ = run_figures(["--odds", *runs, "--by", "5"], capsys)  # before any evaluation
    assert code == 0 and re.search(r"teacherless: 0 of 3 .*; 3 of the others", out)
    code, _, err = run_figures(["--curves", runs[0], "--by", "10", "--out", "x.png"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1  # --by belongs to --odds
    code, _, err = run_figures(["--odds", *runs, "--by", "0"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1  # a budget of no steps
    code, _, err = run_figures(["--curves", runs[0]], capsys)  # a figure still needs --out
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_panel_titles_name_the_settings_and_where_a_run_started():
    cfg = nf.Config(teacherless=True, batch_size=256, min_lr_frac=1, n_head=8, path_len=5,
                    n_train=50_000, n_embd=128, num_nodes=50, lr=1e-3, resume="runs/rev/ckpt.pt",
                    out_dir="runs/tl")
    assert figures.panel_title(cfg) == ("gpt teacherless G(2,5), N=50\n4 x 128, 8 heads, "
                                        "batch 256, 50,000 graphs\nlr 0.001 constant, "
                                        "weight decay 0.1\nstarted from runs/rev")
    cfg.out_dir, cfg.seed = "runs/rev/", 2  # a run continued from its own checkpoint, another seed
    assert "started" not in figures.panel_title(cfg)
    assert figures.panel_title(cfg).startswith("gpt teacherless G(2,5), N=50, seed 2\n")
    cfg.fresh_after = 6000
    assert figures.panel_title(cfg).endswith("weight decay 0.1\nnew graphs from step 6,000")
    cfg.hybrid, cfg.hybrid_until, cfg.beta2 = 0.25, 2000, 0.999  # these shape the curve too
    assert "0.25 of each batch next-token to step 2,000\n" in figures.panel_title(cfg)
    assert "weight decay 0.1, beta2 0.999\n" in figures.panel_title(cfg)


def test_figures_without_matplotlib_say_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, _, err = run_figures(["--curves", tmp_path, "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "pip install matplotlib" in err and len(err.strip().splitlines()) == 1


def test_draw_example(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    assert run_main(flags(max_iters=1, n_train=64, n_test=8, device="cpu", out_dir=run),
                    capsys)[0] == 0
    out = tmp_path / "example.png"
    assert run_figures(["--example", run, "--out", out], capsys)[0] == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


# attention maps (figures.py --attention): the picture shows what the model computes

@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    """A tiny trained GPT run folder (ckpt.pt, results.json), shared by the tests below."""
    run = tmp_path_factory.mktemp("attention") / "run"
    # two layers: a block's input is another's output
    nf.main(flags(n_layer=2, device="cpu", out_dir=run))
    return run


def example_inputs(run):
    """The run's model and the input row x (1, T) of its worked example, as the figure has it."""
    cfg, model = figures.load_gpt(run)
    edges, path = figures.worked_example(run)
    return model, figures.model_inputs(cfg, edges, path)[2]


def test_attention_figure_is_a_png(gpt_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig" / "attention.png"
    argv = ["--attention", str(gpt_run), str(gpt_run), "--out", str(out)]  # two panels
    code, stdout, _ = run_figures(argv, capsys)
    assert code == 0 and f"wrote {out}" in stdout and out.read_bytes()[:4] == b"\x89PNG"
    code, _, err = run_figures(argv + ["--example", str(gpt_run)], capsys)
    assert code == 2 and "give one of" in err  # one figure per call
    code, _, err = run_figures(["--odds", gpt_run, "--reads", gpt_run], capsys)
    assert code == 2 and "give one of" in err  # one table too
    panel = figures.attention_panel(gpt_run, graph=1)  # a test graph of our choice, not the example
    cfg, _ = figures.read_results(gpt_run)
    _, (edges, path), _ = nf.make_splits(cfg, log=lambda *_: None)
    assert panel["rows"][1] == f"n1 = {path[1][1]}"
    code, _, err = run_figures(argv + ["--graph", "1000000"], capsys)
    assert code == 2 and "--graph" in err and len(err.strip().splitlines()) == 1
    curves = ["--curves", str(gpt_run), "--graph", "1", "--out", str(out)]
    code, _, err = run_figures(curves, capsys)
    assert code == 2 and "--attention" in err  # --graph chooses nothing outside --attention


def test_attention_rows_are_causal_distributions(gpt_run):
    model, x = example_inputs(gpt_run)
    w = figures.attention_weights(model, x)
    T = x.shape[1]
    assert w.shape == (1, 2, 2, T, T) and w.dtype == torch.float32 and not model.training
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 2, T))  # a row: where a position reads
    assert (w.triu(1) == 0).all()  # the past only: nothing above the diagonal


def test_attention_weights_reproduce_each_blocks_attention(gpt_run):
    model, x = example_inputs(gpt_run)
    with torch.no_grad():
        streams = figures.residual_streams(model, x)
        assert len(streams) == 3  # into block 1, into block 2, out of block 2
        for i, (block, resid) in enumerate(zip(model.blocks, streams)):
            # weights @ v, heads merged, projected: what F.scaled_dot_product_attention gave
            own = block.attn(block.ln_1(resid))
            torch.testing.assert_close(figures.attention_output(block, resid), own)
            # the hooks saw the real residual stream: block i's output
            torch.testing.assert_close(block(resid), streams[i + 1])
        torch.testing.assert_close(model.lm_head(model.ln_f(streams[-1])), model(x))
        assert not model.blocks[0]._forward_pre_hooks and not model.ln_f._forward_pre_hooks


def test_expected_reads_box_the_lookup_edges():
    # G(2,3): s = 5, arms 5-2-8 and 5-9-3, goal 8. Edge j is tokens 3j, 3j+1; / 5 8 = at 11..14.
    edges, path = nf.parse_graphs("5,2|2,8|5,9|9,3/5,8=5,2,8")
    seq, P = nf.encode(edges, path, 10)
    assert figures.token_names(seq[0, :P], 10)[9:] == ["9", "3", "/", "5", "8", "="]
    cfg = nf.Config(deg=2, path_len=3, num_nodes=10)
    reads = figures.expected_reads(edges[0], path[0], cfg)  # rows s, n1, g; n1 = 2
    assert reads == [[(12, 1)], [(0, 2), (3, 2)], [(13, 1)]]  # 2 as the child of 5 first
    cfg.teacherless = True
    teacherless = figures.expected_reads(edges[0], path[0], cfg)
    assert teacherless == [[(12, 1)], [(3, 2), (0, 2)], [(13, 1)]]  # 2 as the parent of 8 first
    cfg.teacherless, cfg.reverse = False, True
    reads = figures.expected_reads(edges[0], path[0], cfg)  # rows g, n1, s
    assert reads == [[(13, 1)], [(3, 2), (0, 2)], [(12, 1)]]
    w = torch.zeros(3, P)  # row s reads half of s, row n1 the 8 of edge (2, 8)
    w[0, 12], w[1, 4] = 0.5, 1.0
    assert figures.box_weight(w, teacherless, 0).tolist() == [0.5, 1.0, 0.0]
    assert figures.box_weight(w, teacherless, 1).tolist() == [0.0, 0.0, 0.0]


def test_depth_and_arm_walk_each_arm_from_s():
    # s = 5, arms 5-2-8 and 5-9-3; labels 0..9, four of them not in the graph
    edges, path = nf.parse_graphs("5,2|2,8|5,9|9,3/5,8=5,2,8")
    depth, arm = figures.depth_and_arm(edges, path, 10)
    assert depth[0].tolist() == [-1, -1, 1, 2, -1, 0, -1, -1, 2, 1]
    assert arm[0].tolist() == [-1, -1, 2, 9, -1, -1, -1, -1, 2, 9]


def test_arm_choice_counts_the_forced_predictions(gpt_run, capsys):
    cfg, at_depth, right, one_arm, n = figures.arm_choice(gpt_run, n_graphs=20)
    _, model = figures.load_gpt(gpt_run)
    edges, path = (t[:20] for t in figures.test_graphs(cfg))
    forced = nf.evaluate(model, edges, path, cfg.num_nodes)["forced_token_acc"]
    # the right node is what forced accuracy counts, and a right node is as far from s as it
    assert n == 20 and np.allclose(right, forced) and (at_depth >= right).all()
    assert 0 <= one_arm <= at_depth[1:-1].min()  # one arm: every inner node at its depth
    code, out, _ = run_figures(["--arms", str(gpt_run)], capsys)
    _, at_depth, right, _, _ = figures.arm_choice(gpt_run)  # the table's: all the test graphs
    printed = [float(v) for line in out.splitlines()[2:4] for v in line.split("|")[2:-1]]
    assert code == 0 and np.allclose(printed, np.concatenate([at_depth, right]), atol=5e-4)


class FixedDecoder:
    """A stand-in model whose greedy answers are fixed in advance: rows (n, L)."""
    def __init__(self, rows):
        self.rows = torch.tensor(rows)

    def eval(self):
        return self

    def generate(self, idx, max_new_tokens):
        assert idx.shape == (len(self.rows), 15) and max_new_tokens == 3  # G(2,3): 15 prompt tokens
        return self.rows


def test_after_wrong_n1_tells_the_lookup_from_the_true_next_node(monkeypatch):
    # s = 5, arms 5-2-8 and 5-9-3, goal 8; answers: twice the wrong arm followed (3, the child
    # of 9), once the wrong arm then g, once the right path
    edges, path = nf.parse_graphs("\n".join(["5,2|2,8|5,9|9,3/5,8=5,2,8"] * 4))
    cfg = nf.Config(deg=2, path_len=3, num_nodes=10)
    model = FixedDecoder([[5, 9, 3], [5, 9, 3], [5, 9, 8], [5, 2, 8]])
    monkeypatch.setattr(figures, "load_gpt", lambda run: (cfg, model))
    monkeypatch.setattr(figures, "test_graphs", lambda cfg: (edges, path))
    k, lookup, true_next = figures.after_wrong_n1("run")
    assert k == 3 and math.isclose(lookup, 2 / 3) and math.isclose(true_next, 1 / 3)


def test_edge_reads_average_the_attention_on_each_arm(tmp_path, capsys):
    run, n = tmp_path / "g35", 3  # three arms: two to average off the path; three graphs
    nf.main(flags(n_layer=2, deg=3, max_iters=1, device="cpu", out_dir=run))
    cfg, on, off = figures.edge_reads(run, n_graphs=n)
    L, E = cfg.path_len, cfg.deg * (cfg.path_len - 1)
    assert on.shape == off.shape == (cfg.n_layer, cfg.n_head, L + 2, L - 1)
    model = figures.load_gpt(run)[1]
    want_on, want_off = torch.zeros_like(on), torch.zeros_like(off)
    for k in range(n):  # the same means, from each graph's own map, walking its arms by hand
        edges, path = figures.test_graph(cfg, k)
        x = figures.model_inputs(cfg, edges, path)[2]
        w = figures.attention_weights(model, x)[0, :, :, 3 * E:]  # rows from s on
        out_of = {u: (j, v) for j, (u, v) in enumerate(edges[0].tolist())}  # one per node but s
        for j, (u, v) in enumerate(edges[0].tolist()):
            if u != path[0, 0]:
                continue
            to_g = v == path[0, 1]  # this arm leads to g
            for depth in range(L - 1):
                read = w[..., 3 * j:3 * j + 2].sum(-1) / n  # edge j's u and v, a mean over graphs
                if to_g:
                    want_on[..., depth] += read
                else:
                    want_off[..., depth] += read / (cfg.deg - 1)
                j, v = out_of.get(v, (None, None))  # the arm's next edge
    torch.testing.assert_close(on, want_on)
    torch.testing.assert_close(off, want_off)
    code, stdout, _ = run_figures(["--reads", run], capsys)  # a header and a row each
    assert code == 0 and len([ln for ln in stdout.splitlines() if ln.startswith("| ")]) == L + 3


def test_lens_of_the_last_block_is_the_forced_accuracy(gpt_run, capsys):
    cfg, hits, to_g = figures.lens(gpt_run, n_graphs=8)
    assert hits.shape == to_g.shape == (cfg.n_layer, cfg.path_len)
    edges, path = (t[:8] for t in figures.test_graphs(cfg))
    _, model = figures.load_gpt(gpt_run)
    r = nf.evaluate(model, edges, path, cfg.num_nodes, cfg.reverse, cfg.teacherless)
    # the lens of the last block is the model's own output: what evaluate scores
    torch.testing.assert_close(hits[-1], torch.tensor(r["forced_token_acc"]))
    assert ((0 <= to_g) & (to_g <= 1)).all()
    code, stdout, _ = run_figures(["--lens", gpt_run], capsys)  # a header and a row each
    assert code == 0 and len([ln for ln in stdout.splitlines() if ln.startswith("| ")]) == \
        cfg.path_len + 1


def test_figures_refuse_what_they_cannot_draw_in_one_line(tmp_path, capsys):
    run = tmp_path / "g22"  # G(2,2): s and g only, no n1 to probe
    nf.main(flags(path_len=2, max_iters=2, out_dir=run))
    for argv in (["--probe", run], ["--bogus"]):
        code, _, err = run_figures(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "assets/figures.py -h" in err  # the help of the script that was run


def test_a_linear_probe_reads_what_the_stream_holds_and_only_that(gpt_run, capsys):
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (600,), generator=gen)
    noise = torch.randn(600, 16, generator=gen)
    held = torch.cat([F.one_hot(y, 10).float(), torch.zeros(600, 6)], 1) + 0.3 * noise
    assert figures.probe_accuracy(held, y, n_fit=500) > 0.9  # a label the stream holds
    assert figures.probe_accuracy(noise, y, n_fit=500) < 0.3  # and none it does not (chance 0.1)
    cfg, rows, acc, (n_fit, n_score) = figures.probe(gpt_run)
    assert acc.shape == (len(rows), cfg.n_layer, cfg.path_len - 2) and n_fit + n_score == 32
    code, stdout, _ = run_figures(["--probe", gpt_run], capsys)  # a header and a row each
    assert code == 0 and len([ln for ln in stdout.splitlines() if ln.startswith("| ")]) == \
        len(rows) + 1


def test_worked_example_reads_the_text_and_the_dict_format(tmp_path):
    text = "5,2|2,8|5,9|9,3/5,8=5,2,8"
    as_dict = dict(edges=[[5, 2], [2, 8], [5, 9], [9, 3]], path=[5, 2, 8])
    got = []
    for example in (text, as_dict, dict(as_dict, path=[5, 9, 8])):
        results = dict(config=nf.asdict(nf.Config()), history=[dict(step=1, example=example)])
        (tmp_path / "results.json").write_text(json.dumps(results))
        try:
            got.append(figures.worked_example(tmp_path))
        except nf.UsageError as e:  # a path off the edges is refused as the text format is
            got.append(str(e))
    assert all(np.array_equal(a, b) for a, b in zip(got[0], got[1]))
    assert got[0][0].shape == (1, 4, 2) and got[0][1].tolist() == [[5, 2, 8]]
    assert got[2].startswith(f"{tmp_path}/results.json:1:")  # refused, naming the line


def test_attention_maps_refuse_mamba_runs(tmp_path, capsys):
    run = tmp_path / "mamba"
    nf.main(flags(model="mamba", n_embd=16, max_iters=1, device="cpu", out_dir=run))
    capsys.readouterr()
    code, _, err = run_figures(["--attention", str(run), "--out", str(tmp_path / "a.png")], capsys)
    assert code == 2 and "GPT" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a.png").exists()  # no traceback


def test_help_lists_every_knob(capsys):
    code, out, _ = run_main(["-h"], capsys)
    assert code == 0
    for f in nf.fields(nf.Config):
        assert f"--{f.name}" in out
    # the script itself: bad input is one line and exit status 2
    bad = subprocess.run([sys.executable, str(HERE / "nanofail.py"), "--deg", "0"],
                         capture_output=True, text=True)
    assert (bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--deg" in bad.stderr
            and bad.stdout == "")

# ---- notebooks, presets, torchrun


def test_exec_in_a_notebook_kernel_runs_nothing(tmp_path):
    code = ("import sys; sys.argv = ['ipykernel_launcher', '-f', 'kernel.json']; "
            f"exec(open({str(HERE / 'nanofail.py')!r}).read(), {{'__name__': '__main__'}}); "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert (out.returncode, out.stdout, out.stderr) == (0, "ok\n", "")
    assert not list(tmp_path.iterdir())


def test_notebook_cells_run_in_order_then_train_from_python(tmp_path, monkeypatch, capsys):
    """Each `# %%` cell, run in order in a fresh namespace, only defines; a cell that used a name
    of a later cell would raise NameError here. Then one call trains and returns the model."""
    cells = re.split(r"^# %%.*$", (HERE / "nanofail.py").read_text(), flags=re.M)
    # the docstring, imports, data, encoding, objectives, model, evaluation, ...
    assert len(cells) >= 8
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(HERE))  # the model cell imports mamba_min
    ns = {"__name__": "notebook"}
    for cell in cells:
        exec(compile(cell, "cell", "exec"), ns)
    assert capsys.readouterr() == ("", "") and not list(tmp_path.iterdir())  # nothing ran
    model, history = ns["train"](ns["Config"](**TINY, teacherless=True), log=None)
    assert isinstance(model, ns["GPT"]) and history[-1]["step"] == TINY["max_iters"]
    assert capsys.readouterr() == ("", "")  # log=None: silent


def test_presets_override_the_defaults_and_yield_to_flags():
    names = next(f for f in nf.fields(nf.Config) if f.name == "preset").metadata["choices"]
    assert names == tuple(nf.PRESETS) and {"quick", "g23", "g25", "paper"} <= set(names)
    assert set(nf.MAMBA_PRESETS) <= set(nf.PRESETS)
    for name in nf.PRESETS:
        for model in ("gpt", "mamba"):
            cfg = nf.Config(preset=name, model=model)
            own = (nf.MAMBA_PRESETS.get(name, nf.PRESETS[name]) if model == "mamba"
                   else nf.PRESETS[name])
            assert all(getattr(cfg, k) == v for k, v in own.items()), (name, model)
            assert 1 + cfg.deg * (cfg.path_len - 1) <= cfg.num_nodes  # a valid task
            assert cfg.preset == name and cfg.model == model
    assert nf.Config(preset="quick", model="mamba").n_layer != nf.Config(preset="quick").n_layer
    cfg = nf.parse_config(["--preset", "g23", "--model", "mamba", "--max_iters", "7"])
    # preset, model preset, explicit flag
    assert (cfg.path_len, cfg.n_layer, cfg.max_iters) == (3, 2, 7)
    assert nf.parse_config(["--preset", "paper", "--n_layer", "2"]).n_layer == 2
    assert nf.Config(preset="paper", n_layer=2).n_layer == 2


@pytest.mark.parametrize("objective", [[], ["teacherless"], ["reverse"]])
def test_presets_mean_the_same_from_python_and_the_command_line(objective):
    for name in nf.PRESETS:
        for model in ("gpt", "mamba"):
            cli = nf.parse_config(["--preset", name, "--model", model]
                                  + [f"--{o}" for o in objective])
            assert cli == nf.Config(preset=name, model=model, **{o: True for o in objective})
    assert nf.Config(preset="g23", model="mamba", teacherless=True) == nf.parse_config(
        ["--preset", "g23", "--model", "mamba", "--teacherless"])
    cfg = nf.Config(preset="g23", model="mamba", teacherless=True)
    assert (cfg.path_len, cfg.max_iters, cfg.n_layer, cfg.teacherless) == (3, 3000, 2, True)


@pytest.mark.skipif(not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no gloo backend for torchrun on the CPU")
def test_torchrun_two_processes_follow_one_process(tmp_path):
    """torchrun --nproc_per_node 2 splits each global batch over two processes; DDP averages their
    gradients, so the weights follow the single-process run, and only rank 0 writes results."""
    args = [str(HERE / "nanofail.py"), *flags(n_train=512, n_test=64, batch_size=64, max_iters=6,
                                              eval_interval=3, device="cpu")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.Popen([sys.executable, *args, "--out_dir", str(tmp_path / "one")],
                           stdout=subprocess.DEVNULL, env=env)  # meanwhile, beside torchrun
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", *args, "--out_dir", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=120)
    one.wait(timeout=120)
    # torchrun itself did not get the processes going
    if two.returncode and "params on" not in two.stdout:
        pytest.skip("torchrun could not start here: "
                    f"{(two.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    # at steps 3 and 6, rank 0 alone speaks
    assert "cpu x 2" in two.stdout and evaluations(two.stdout) == 2
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["ckpt.pt", "results.json"]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("one", "two"))
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5)


def test_presets_g23_and_g25_are_the_runs_their_results_describe():
    # the defaults moved to the demo's G(2,4) task: the presets pin what their recorded runs took
    knobs = ("deg path_len num_nodes n_train fresh_after hybrid hybrid_until n_layer n_embd "
             "n_head batch_size lr min_lr_frac warmup_iters weight_decay beta2 grad_clip").split()
    for preset, run in (("g23", "g23-tl-s1337"), ("g25", "g25-tl-hyb2k-s2")):
        saved = json.loads((HERE / "assets" / "runs" / run / "results.json").read_text())["config"]
        saved = nf.known_knobs(saved)  # knobs younger than the run: what that version did
        cfg = nf.Config(preset=preset, teacherless=True)
        assert {k: getattr(cfg, k) for k in knobs} == {k: saved[k] for k in knobs}, preset


def test_the_clever_hans_signature_is_counted_from_the_last_evaluation(tmp_path):
    # next-token on the cheat, next-token still learning, a teacherless win: one signature
    rows = [("nt", False, [1.0, 0.49, 0.99, 1.0], 0.49), ("early", False, [1.0, 0.24, 0.35, 1.0],
            0.08), ("tl", True, [1.0, 0.97, 1.0, 1.0], 0.97)]
    for name, teacherless, forced, exact in rows:
        cfg = nf.asdict(tiny(teacherless=teacherless, path_len=4, max_iters=10))
        hist = [dict(step=10, train_loss=0.1, test_exact_match=exact, forced_token_acc=forced)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(dict(config=cfg, history=hist)))
    lines = figures.odds_table([str(tmp_path / n) for n, *_ in rows])
    assert "next-token: 1 of 2 runs end with the Clever-Hans signature" in "\n".join(lines)
    assert figures.clever_hans([1.0, 0.5, 0.95, 1.0], 0.5, deg=2)
    assert not figures.clever_hans([1.0, 0.5, 0.85, 1.0], 0.5, deg=2)  # a later node not read
    assert not figures.clever_hans([1.0, 0.75, 1.0, 1.0], 0.75, deg=2)  # n1 more than a guess
