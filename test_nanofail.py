"""Fast CPU tests for nanofail.py and mamba_min.py:  python -m pytest -q"""
import json
import math
import os
import subprocess
import sys
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


def tiny(**kw):
    base = dict(n_layer=1, n_embd=32, n_head=2, n_train=512, n_test=64, batch_size=64, max_iters=20,
                warmup_iters=5, log_interval=10, eval_interval=0, dtype="float32", device=DEVICE)
    return nf.Config(**{**base, **kw})


def graphs(n=500, deg=3, path_len=4, num_nodes=20, seed=0):
    return nf.make_graphs(n, deg, path_len, num_nodes, np.random.default_rng(seed))


def run_main(argv, capsys):
    """Run nanofail's CLI in-process; return (exit code, stdout, stderr)."""
    try:
        nf.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1  # what the interpreter exits with for a message
    out = capsys.readouterr()
    return code, out.out, out.err

# ----------------------------------------------------------------------------- data


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


def test_goal_arm_and_edge_order_are_random():
    edges, path = graphs(n=4000, deg=2, path_len=5, num_nodes=50)
    first_is_start = (edges[:, 0, 0] == path[:, 0]).mean()
    assert 0.15 < first_is_start < 0.35  # 2 of 8 edges leave s: ~0.25 if shuffled, 1.0 if not
    goal_first_arm = np.mean([p[1] == e[e[:, 0] == p[0]][:, 1].min() for e, p in zip(edges, path)])
    assert 0.45 < goal_first_arm < 0.55


def test_splits_are_deterministic_and_disjoint():
    cfg = nf.Config(deg=2, path_len=3, num_nodes=6, n_train=2000, n_test=200)  # few graphs: collisions
    (tr_e, tr_p), (te_e, te_p) = nf.make_splits(cfg)
    assert len(tr_e) == 2000 and len(te_e) == 200
    assert not set(nf.prompt_keys(tr_e, tr_p)) & set(nf.prompt_keys(te_e, te_p))
    (tr_e2, tr_p2), _ = nf.make_splits(cfg)
    assert np.array_equal(tr_e, tr_e2) and np.array_equal(tr_p, tr_p2)
    (tr_e3, _), _ = nf.make_splits(nf.Config(deg=2, path_len=3, num_nodes=6, n_train=2000, n_test=200, seed=1))
    assert not np.array_equal(tr_e, tr_e3)


def test_encoding_matches_the_original_tokens():
    edges = np.array([[[5, 2], [2, 8], [5, 9], [9, 3]]])
    path = np.array([[5, 2, 8]])
    seq, P = nf.encode(edges, path, num_nodes=10)
    pipe, eq, slash = 10, 11, 12
    assert P == 15 and seq[0].tolist() == [5, 2, pipe, 2, 8, pipe, 5, 9, pipe, 9, 3, slash, 5, 8, eq, 5, 2, 8]
    rev, _ = nf.encode(edges, path, num_nodes=10, reverse=True)
    assert rev[0, P:].tolist() == [8, 2, 5] and np.array_equal(rev[0, :P], seq[0, :P])


def test_decode_gives_the_original_text_format():
    edges, path = np.array([[[5, 2], [2, 8], [5, 9], [9, 3]]]), np.array([[5, 2, 8]])
    seq, _ = nf.encode(edges, path, num_nodes=10)
    assert nf.decode(seq, 10) == ["5,2|2,8|5,9|9,3/5,8=5,2,8"]
    e2, p2 = nf.parse_graphs(nf.decode(seq, 10)[0])
    assert np.array_equal(e2, edges) and np.array_equal(p2, path)


def test_text_format_round_trip(tmp_path):
    edges, path = graphs(n=50)
    f = str(tmp_path / "g.txt")
    nf.write_graphs(f, edges, path)
    e2, p2 = nf.read_graphs(f)
    assert np.array_equal(edges, e2) and np.array_equal(path, p2)
    assert open(f).readline().count("|") == edges.shape[1] - 1


def test_export_data_writes_both_files(tmp_path, capsys):
    code, out, _ = run_main(["--export_data", str(tmp_path), "--n_train", "300", "--n_test", "30"], capsys)
    assert code == 0 and "300 + 30" in out
    tr, te = nf.read_graphs(str(tmp_path / "train.txt")), nf.read_graphs(str(tmp_path / "test.txt"))
    (tr_e, tr_p), (te_e, te_p) = nf.make_splits(nf.Config(n_train=300, n_test=30))
    assert np.array_equal(tr[0], tr_e) and np.array_equal(te[1], te_p)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/ntf-data not present")
@pytest.mark.parametrize("name,deg,path_len,N,P", [("deg_2_path_5_nodes_50_test_20000.txt", 2, 5, 50, 27),
                                                   ("deg_5_path_3_nodes_50_test_20000.txt", 5, 3, 50, 33),
                                                   ("deg_2_path_3_nodes_10_test_20000.txt", 2, 3, 10, 15)])
def test_original_test_files_load(name, deg, path_len, N, P):
    cfg = nf.Config(test_file=str(SHARED / name), n_train=100)
    (tr_e, tr_p), (te_e, te_p) = nf.make_splits(cfg)
    assert (cfg.deg, cfg.path_len, cfg.num_nodes, cfg.n_test) == (deg, path_len, N, 20_000)
    seq, prompt_len = nf.encode(te_e, te_p, cfg.num_nodes)
    assert prompt_len == P and seq.shape == (20_000, P + path_len) and seq.max() < N + 4
    assert open(SHARED / name).readline().strip().split("=")[1] == ",".join(map(str, te_p[0]))
    assert len(tr_e) == 100 and not set(nf.prompt_keys(tr_e, tr_p)) & set(nf.prompt_keys(te_e, te_p))


@pytest.mark.parametrize("line,lineno", [("1,2|2,3/1,3=1,2", 2), ("1,2|1,3/1,3=1,3,x", 2),
                                         ("1,2|1,4/1,4=1,2", 2), ("garbage", 2)])
def test_malformed_files_name_the_line(tmp_path, capsys, line, lineno):
    f = tmp_path / "bad.txt"
    f.write_text("1,2|1,3/1,3=1,3\n" + line + "\n")
    code, _, err = run_main(["--test_file", str(f)], capsys)
    assert code == 2 and f"bad.txt:{lineno}:" in err and len(err.strip().splitlines()) == 1

# ----------------------------------------------------------------------------- training pieces


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


def test_lr_schedule():
    cfg = tiny(lr=1e-3, warmup_iters=10, max_iters=100, min_lr_frac=0.1)
    lrs = [nf.lr_at(s, cfg) for s in range(100)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and nf.lr_at(100, cfg) == pytest.approx(1e-4)


def test_weight_decay_groups():
    model = nf.GPT(vocab_size=20, block_size=16, n_layer=1, n_embd=32, n_head=2)
    model.ln_f.weight._no_weight_decay = True  # the flag Mamba sets on A_log and D
    decay, rest = nf.make_optimizer(model, tiny(), torch.device("cpu")).param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and any(p is model.ln_f.weight for p in rest["params"])
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("objective", [{}, {"reverse": True}, {"teacherless": True}])
def test_tiny_training_loss_falls(objective):
    hist = nf.train(tiny(max_iters=80, eval_interval=20, lr=1e-2, **objective))
    assert [h["step"] for h in hist] == [20, 40, 60, 80]
    assert hist[-1]["train_loss"] < min(0.85 * np.log(54), hist[0]["train_loss"])  # from ~log(vocab)
    r = hist[-1]
    assert 0 <= r["test_exact_match"] <= 1 and len(r["forced_token_acc"]) == len(r["example_pred"]) == 5
    assert r["test_exact_match"] <= min(r["forced_token_acc"]) + 1e-9
    assert r["forced_token_acc"][0] > 0.9  # the first answer token (s, or g when reversed) is in the prompt


@pytest.mark.parametrize("model", ["gpt", "mamba"])
def test_exact_match_from_the_forced_pass_equals_greedy_decoding(model):
    """evaluate() scores exact match with one forward pass: decoding is right all the way exactly when
    every teacher-forced prediction is right. Check it against real decoding, token by token."""
    cfg = tiny(model=model, n_layer=2, n_train=16, batch_size=16, lr=1e-2)
    (tr_e, tr_p), (te_e, te_p) = nf.make_splits(cfg)
    seq, P = nf.encode(np.concatenate([tr_e, te_e]), np.concatenate([tr_p, te_p]), cfg.num_nodes)
    seq = torch.from_numpy(seq).to(DEVICE)
    torch.manual_seed(0)
    net = nf.build_model(cfg, cfg.num_nodes + 4, seq.shape[1] - 1).to(DEVICE)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(60):  # memorise the 16 training graphs: some answers right, many wrong
        loss = nf.answer_loss(net, seq[:16], P, False, cfg.num_nodes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    r = nf.evaluate(net, seq, P, False, cfg.num_nodes, batch_size=32)
    decoded = net.generate(seq[:, :P], seq.shape[1] - P)
    exact = (decoded == seq[:, P:]).all(1).float().mean().item()
    assert 0 < exact < 1 and r["test_exact_match"] == pytest.approx(exact)
    k = r["example_index"]  # the first graph decoded wrong
    assert (decoded[:k] == seq[:k, P:]).all() and not (decoded[k] == seq[k, P:]).all()
    assert r["example_pred"] == decoded[k].tolist()


def test_checkpoint_round_trip_and_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--n_train", "256", "--n_test", "64",
            "--batch_size", "32", "--warmup_iters", "2", "--device", DEVICE, "--out_dir", out]
    assert run_main(args + ["--max_iters", "8"], capsys)[0] == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert set(res) == {"config", "history", "final"} and res["final"]["step"] == 8
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 8 and ckpt["config"]["n_embd"] == 32
    cfg = nf.Config(**ckpt["config"])
    model = nf.build_model(cfg, cfg.num_nodes + 4, 27 + 4)
    model.load_state_dict(ckpt["model"])
    (_, _), (te_e, te_p) = nf.make_splits(cfg)
    seq, P = nf.encode(te_e, te_p, cfg.num_nodes)
    device = torch.device(DEVICE)
    dtype = nf.autocast_dtype(cfg.dtype, device)
    r = nf.evaluate(model.to(device), torch.from_numpy(seq).to(device), P, False, cfg.num_nodes,
                    lambda: nf.compute_context(device, dtype))
    assert r["test_exact_match"] == pytest.approx(res["final"]["test_exact_match"])
    # --resume alone continues with the checkpoint's settings; flags given override them
    code, stdout, _ = run_main(["--max_iters", "12", "--resume", os.path.join(out, "ckpt.pt")], capsys)
    assert code == 0 and "step     12/12" in stdout and "step      8/" not in stdout
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 12

def test_fresh_after_trains_on_unseen_graphs_and_resumes_through_the_switch(tmp_path, capsys):
    args = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--n_train", "64", "--n_test", "16",
            "--batch_size", "16", "--warmup_iters", "2", "--min_lr_frac", "1", "--dtype", "float32", "--device", DEVICE]
    weights = lambda run: torch.load(tmp_path / run / "ckpt.pt", weights_only=True)["model"]  # noqa: E731
    code, stdout, _ = run_main(args + ["--max_iters", "10", "--fresh_after", "6", "--out_dir", str(tmp_path / "one")], capsys)
    assert code == 0 and "step 6: from here on 64 new graphs, each seen once" in stdout  # (10 - 6) * 16
    assert run_main(args + ["--max_iters", "10", "--out_dir", str(tmp_path / "pool")], capsys)[0] == 0
    assert run_main(args + ["--max_iters", "6", "--out_dir", str(tmp_path / "two")], capsys)[0] == 0
    code, stdout, _ = run_main(["--resume", str(tmp_path / "two" / "ckpt.pt"), "--max_iters", "10", "--fresh_after", "6"], capsys)
    assert code == 0 and "from here on" not in stdout  # resumed at the switch: on the new graphs from the start
    one, two, pool = weights("one"), weights("two"), weights("pool")
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)  # the same run, in one go or in two
    assert not all(torch.allclose(one[k], pool[k], atol=1e-5) for k in one)  # the new graphs were trained on
    cfg = nf.Config(n_train=64, n_test=16, batch_size=16, max_iters=10, fresh_after=6)
    train, test = nf.make_splits(cfg)
    new = nf.unseen_graphs(cfg, test)
    assert len(new[0]) == 64 and not set(nf.prompt_keys(*new)) & set(nf.prompt_keys(*train) + nf.prompt_keys(*test))

def test_a_checkpoint_from_an_older_version_resumes_as_that_version_ran():
    old = dict(nf.asdict(nf.Config(preset="g25")), dropped_knob=1)  # as if saved before --min_lr_frac existed
    del old["min_lr_frac"]
    assert nf.Config(**nf.known_knobs(old)).min_lr_frac == 0.1  # that version's behaviour, not the preset's 1

# ----------------------------------------------------------------------------- mamba_min

MODES = ["ref", "loop", "chunked", "auto"]
LENGTHS = list(range(1, 71)) + [97, 128, 211, 256]


def scan_inputs(l, b=2, d_in=3, n=4, seed=0, dtype=torch.float32):
    """Random valid scan inputs: delta > 0, A < 0 (down to -16, the largest |A| at init with n = 16)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, l, d_in, generator=g)
    delta = F.softplus(torch.randn(b, l, d_in, generator=g) - 1)
    A = -torch.exp(torch.rand(d_in, n, generator=g) * math.log(16))
    B, C = torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g)
    D = torch.randn(d_in, generator=g)
    return [t.to(dtype) for t in (u, delta, A, B, C, D)]


def value_and_grads(inputs, mode):
    """Scan output and the gradients of a random linear function of it w.r.t. all six inputs."""
    device = "cpu" if inputs[0].dtype == torch.float64 else DEVICE  # the float64 oracle runs on the CPU
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


@pytest.mark.parametrize("mode", MODES)
def test_scan_matches_float64_reference_values_and_grads(mode):
    for l in LENGTHS:
        inputs = scan_inputs(l, seed=l)
        expected = value_and_grads([t.double() for t in inputs], "ref")
        names = ["y", "du", "ddelta", "dA", "dB", "dC", "dD"]
        for name, a, e in zip(names, value_and_grads(inputs, mode), expected):
            assert a.dtype == torch.float32, (l, name)
            assert_close_rel(a, e, what=f"l={l} {name}")


@pytest.mark.parametrize("mode", MODES)
def test_decay_one_gives_cumulative_sum(mode):
    u, delta, _, B, C, D = scan_inputs(37)
    A = torch.zeros(u.shape[-1], B.shape[-1])  # exp(delta * 0) = 1: the state just adds up its inputs
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
        # decays exp(delta * A) that are ~1, denormal (exp(-95) < 1.2e-38: the smallest normal), or 0
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
    idx = torch.randint(0, 11, (3, prompt_len), generator=torch.Generator().manual_seed(0)).to(DEVICE)
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
    assert lengths == [7] * 2 + [1] * (2 * 4)  # 2 layers: the prompt in parallel, then 4 single steps


def test_initialisation_after_build():
    n_layer, d_model, d_state = 3, 32, 16
    model = tiny_model(n_layer=n_layer, d_model=d_model, d_state=d_state)
    d_in = 2 * d_model
    assert model.lm_head.weight is model.embedding.weight
    assert abs(model.embedding.weight.std().item() - 0.02) < 0.004
    for layer in model.layers:
        dt = F.softplus(layer.dt_proj.bias)
        assert dt.shape == (d_in,) and dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
        assert dt.max() / dt.min() > 10  # log-uniform spread, not zeroed by the model-wide bias init
        assert layer.dt_proj.bias._no_reinit
        bound = math.ceil(d_model / 16) ** -0.5
        assert layer.dt_proj.weight.abs().max() <= bound
        A = -torch.exp(layer.A_log.cpu())
        torch.testing.assert_close(A, -torch.arange(1.0, d_state + 1).expand(d_in, d_state))
        torch.testing.assert_close(layer.D.cpu(), torch.ones(d_in))
        assert layer.A_log._no_weight_decay and layer.D._no_weight_decay
        out_bound = 1 / math.sqrt(d_in * n_layer)  # kaiming_uniform(a=sqrt(5)) bound / sqrt(n_layer)
        assert 0.9 * out_bound < layer.out_proj.weight.abs().max() <= out_bound
        assert layer.in_proj.bias is None and layer.x_proj.bias is None and layer.out_proj.bias is None
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
    cfg = tiny(model="mamba", n_layer=2, n_embd=32, n_train=16, batch_size=16, max_iters=150, lr=1e-2,
               warmup_iters=10, eval_interval=150, log_interval=150)
    (tr_e, tr_p), _ = nf.make_splits(cfg)
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


@pytest.mark.parametrize("objective", [[], ["--reverse"], ["--teacherless"]])
def test_nanofail_trains_mamba(tmp_path, capsys, objective):
    args = ["--model", "mamba", "--n_layer", "1", "--n_embd", "32", "--d_state", "8", "--n_train", "256",
            "--n_test", "32", "--batch_size", "32", "--max_iters", "30", "--lr", "1e-2", "--warmup_iters", "5",
            "--device", DEVICE, "--out_dir", str(tmp_path)]
    code, out, _ = run_main(args + objective, capsys)
    assert code == 0 and "mamba" in out and "exact match" in out
    res = json.load(open(tmp_path / "results.json"))
    assert res["config"]["model"] == "mamba" and res["history"][-1]["train_loss"] < math.log(54)

# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv,needle", [
    (["--deg", "5", "--path_len", "5", "--num_nodes", "20"], "raise --num_nodes"),
    (["--deg", "0"], "--deg must be >= 1"),
    (["--path_len", "1"], "--path_len must be >= 2"),
    (["--n_train", "0"], "--n_train must be >= 1"),
    (["--n_embd", "30", "--n_head", "4"], "divisible"),
    (["--test_file", "/nonexistent/test.txt"], "cannot read"),
    (["--model", "rnn"], "invalid choice"),
    (["--no_such_flag"], "unrecognized arguments"),
    (["--lr", "fast"], "invalid float"),
    (["--log_interval", "0"], "--log_interval must be >= 1"),
    (["--batch_size", "-4"], "--batch_size must be >= 1"),
    (["--device", "tpu9"], "unknown --device"),
    pytest.param(["--device", "cuda"], "not available", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_input_is_one_line(capsys, argv, needle):
    code, _, err = run_main(argv + ["--max_iters", "1"], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_unwritable_output_folder_is_one_line_and_keeps_the_file(tmp_path, capsys):
    f = tmp_path / "results"
    f.write_text("keep me")
    for flag in ("--export_data", "--out_dir"):
        code, _, err = run_main([flag, str(f), "--n_train", "20", "--n_test", "5", "--max_iters", "1"], capsys)
        assert code == 2 and f"for {flag}" in err and len(err.strip().splitlines()) == 1
    assert f.read_text() == "keep me"


def test_corrupt_or_mismatched_checkpoint_is_refused_and_kept(tmp_path, capsys):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = run_main(["--resume", str(bad), "--out_dir", str(tmp_path), "--max_iters", "1"], capsys)
    assert code == 2 and "cannot read checkpoint" in err and bad.read_bytes() == b"not a checkpoint"
    good = tmp_path / "run"
    small = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--n_train", "64", "--n_test", "8",
             "--batch_size", "32", "--device", "cpu", "--out_dir", str(good)]
    assert run_main(small + ["--max_iters", "2"], capsys)[0] == 0
    before = (good / "ckpt.pt").read_bytes()
    code, _, err = run_main(small + ["--n_embd", "64", "--max_iters", "4", "--resume", str(good / "ckpt.pt")], capsys)
    assert code == 2 and "--n_embd 32" in err and (good / "ckpt.pt").read_bytes() == before


def run_figures(argv, capsys):
    """Run assets/figures.py in-process; return (exit code, stdout, stderr)."""
    try:
        figures.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_learning_curves_from_results(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    hist = [dict(step=s, train_loss=1.0, test_exact_match=0.5, forced_token_acc=[1, .5, 1, 1, 1]) for s in (10, 20)]
    json.dump(dict(config=nf.asdict(nf.Config()), history=hist, final=hist[-1]), open(run / "results.json", "w"))
    out = tmp_path / "fig" / "ch.png"
    code, stdout, _ = run_figures(["--curves", str(run), str(run), "--out", str(out)], capsys)
    assert code == 0 and out.read_bytes()[:4] == b"\x89PNG"
    code, _, err = run_figures(["--curves", str(tmp_path), "--out", str(out)], capsys)
    assert code == 2 and "results.json" in err and len(err.strip().splitlines()) == 1


def test_panel_titles_name_the_settings_and_where_a_run_started():
    cfg = nf.Config(teacherless=True, batch_size=256, min_lr_frac=1, n_head=8, resume="runs/rev/ckpt.pt",
                    out_dir="runs/tl")
    assert figures.panel_title(cfg) == ("gpt teacherless G(2,5)\n4 x 128, 8 heads, batch 256, 50,000 "
                                        "graphs\nlr 0.001 constant, weight decay 0.1\nstarted from runs/rev")
    cfg.out_dir, cfg.seed = "runs/rev/", 2  # a run continued from its own checkpoint, another seed
    assert "started" not in figures.panel_title(cfg)
    assert figures.panel_title(cfg).startswith("gpt teacherless G(2,5), seed 2\n")
    cfg.fresh_after = 6000
    assert figures.panel_title(cfg).endswith("weight decay 0.1\nnew graphs from step 6,000")


def test_figures_without_matplotlib_say_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, _, err = run_figures(["--curves", str(tmp_path), "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "pip install matplotlib" in err and len(err.strip().splitlines()) == 1


def test_help_lists_every_knob():
    out = subprocess.run([sys.executable, str(HERE / "nanofail.py"), "-h"], capture_output=True, text=True)
    assert out.returncode == 0
    for f in nf.fields(nf.Config):
        assert f"--{f.name}" in out.stdout
    bad = subprocess.run([sys.executable, str(HERE / "nanofail.py"), "--deg", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "deg must be >= 1" in bad.stderr


def test_presets_cover_every_model_and_yield_to_flags():
    names = next(f for f in nf.fields(nf.Config) if f.name == "preset").metadata["choices"]
    assert names == ("quick", "paper", "g23", "g25")  # --preset's choices come from PRESETS, in order
    assert all((name, "gpt") in nf.PRESETS for name in names)
    for name, model in nf.PRESETS:
        cfg = nf.parse_config(["--preset", name, "--model", model])
        assert 1 + cfg.deg * (cfg.path_len - 1) <= cfg.num_nodes  # a valid task
        assert cfg.preset == name and cfg.model == model
    with pytest.raises(nf.UsageError, match="no preset 'g25' for model 'mamba'"):
        nf.parse_config(["--preset", "g25", "--model", "mamba"])
    cfg = nf.parse_config(["--preset", "g23", "--model", "mamba", "--max_iters", "7"])
    assert (cfg.path_len, cfg.n_layer, cfg.max_iters) == (3, 2, 7)  # preset, model preset, explicit flag
    assert nf.parse_config(["--preset", "paper", "--n_layer", "2"]).n_layer == 2


# ----------------------------------------------------------------------------- the worked example


def test_explain_names_where_the_answer_went_wrong():
    graph = "5,2|2,8|5,9|9,3|8,7|3,4/5,7=5,2,8,7"  # G(2,4): s = 5, arms 5-2-8-7 and 5-9-3-4, goal 7
    assert nf.explain(graph, [5, 2, 8, 7]) == "right"
    # the Clever-Hans picture: the other child of s, then its arm; g itself is copied from the prompt
    assert nf.explain(graph, [5, 9, 3, 7]) == "wrong arm at n1, then n2 along the edges from there"
    assert nf.explain(graph, [5, 9, 3, 4]) == "wrong arm at n1, then n2 g along the edges from there"
    assert nf.explain(graph, [5, 9, 2, 7]) == "wrong arm at n1, n2 too"  # 2 does not follow 9
    assert nf.explain(graph, [5, 2, 3, 7]) == "wrong at n2"
    assert nf.explain(graph, [7, 8, 2, 5], reverse=True) == "right"
    assert nf.explain(graph, [7, 3, 9, 5], reverse=True) == "wrong at n2, then n1 along the edges from there"


def test_verdicts_read_the_accuracy_pattern():
    r = dict(forced_token_acc=[1.0, 0.51, 1.0, 1.0, 1.0], test_exact_match=0.51)
    assert nf.verdict(r, nf.Config()).startswith("Clever Hans: ")
    assert nf.verdict(dict(r, test_exact_match=0.97), nf.Config(reverse=True)).startswith("solved")
    r = dict(forced_token_acc=[1.0, 0.17, 0.16, 0.98, 1.0], test_exact_match=0.0)
    gpt, mamba = (nf.verdict(r, nf.Config(model=m, teacherless=True)) for m in ("gpt", "mamba"))
    assert "so far (> 0.9): s n3 g; not yet: n1 n2." in gpt
    assert "Next-token training on this budget: python nanofail.py (on G(2,5), at every budget measured: the" in gpt
    assert (f"Teacherless GPT beats next-token GPT on G(2,5) with 8 layers in ~1 hour on 2 bf16 CPU cores: "
            f"{nf.WIN_COMMANDS[0]}") in gpt
    assert f"on G(2,3) in minutes: {nf.WIN_COMMANDS[1]}" in gpt
    assert "python nanofail.py --model mamba (on G(2,5), at every budget measured: the Clever-Hans cheat" in mamba
    assert "No teacherless Mamba win measured yet. Teacherless GPT beats" in mamba
    for win in nf.WIN_COMMANDS:  # each names a preset that parses, with teacherless on
        assert nf.parse_config(win.split()[2:]).teacherless
    r = dict(forced_token_acc=[0.2] * 5, test_exact_match=0.0)
    assert "so far (> 0.9): nothing; not yet: s n1 n2 n3 g." in nf.verdict(r, nf.Config(teacherless=True))


def test_every_evaluation_prints_a_worked_example(tmp_path, capsys):
    code, out, _ = run_main(["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--n_train", "256",
                             "--n_test", "32", "--batch_size", "32", "--max_iters", "4", "--eval_interval", "2",
                             "--device", DEVICE, "--out_dir", str(tmp_path)], capsys)
    final = json.load(open(tmp_path / "results.json"))["final"]
    graph, k = final["example"], final["example_index"]
    assert code == 0 and out.count(f"  example   {graph}   (test graph {k})") == 2
    (_, path), (_, test_path) = nf.parse_graphs(graph), nf.make_splits(nf.Config(n_train=256, n_test=32))[1]
    assert np.array_equal(path[0], test_path[k])  # that test graph, in the original format
    assert f"  true      {' '.join(map(str, path[0]))}" in out
    assert f"  model     {' '.join(map(str, final['example_pred']))}   {nf.explain(graph, final['example_pred'])}" in out


def test_draw_example(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    assert run_main(["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--n_train", "64", "--n_test", "8",
                     "--batch_size", "32", "--max_iters", "1", "--device", "cpu", "--out_dir", str(run)], capsys)[0] == 0
    out = tmp_path / "example.png"
    assert run_figures(["--example", str(run), "--out", str(out)], capsys)[0] == 0
    assert out.read_bytes()[:4] == b"\x89PNG"

# ----------------------------------------------------------------------------- runs that fail loudly

SMALL = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--n_train", "256", "--n_test", "32",
         "--batch_size", "32", "--warmup_iters", "2", "--dtype", "float32", "--device", DEVICE]


def test_a_diverging_run_stops_at_once_and_keeps_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(SMALL + ["--max_iters", "4", "--out_dir", str(out)], capsys)[0] == 0
    before = (out / "ckpt.pt").read_bytes()
    code, stdout, err = run_main(SMALL + ["--resume", str(out / "ckpt.pt"), "--max_iters", "400", "--lr", "1e6",
                                          "--grad_clip", "0", "--log_interval", "100"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "diverged" in err and "lower --lr" in err and f"--resume {out / 'ckpt.pt'}" in err
    assert "step    100/" not in stdout  # stopped at the bad step, not at the next progress line
    assert (out / "ckpt.pt").read_bytes() == before


def test_ctrl_c_says_where_the_checkpoint_is(tmp_path, capsys, monkeypatch):
    calls, real = [], nf.answer_loss

    def interrupted_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(nf, "answer_loss", interrupted_at_step_5)
    out = tmp_path / "run"
    code, _, err = run_main(SMALL + ["--max_iters", "10", "--eval_interval", "2", "--out_dir", str(out)], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "interrupted at step 4" in err and f"python nanofail.py --resume {out / 'ckpt.pt'}" in err
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4

# ----------------------------------------------------------------------------- notebooks, presets, torchrun


def test_exec_in_a_notebook_kernel_runs_nothing(tmp_path):
    code = ("import sys; sys.argv = ['ipykernel_launcher', '-f', 'kernel.json']; "
            f"exec(open({str(HERE / 'nanofail.py')!r}).read(), {{'__name__': '__main__'}}); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert (out.returncode, out.stdout, out.stderr) == (0, "ok\n", "")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("objective", [[], ["teacherless"], ["reverse"]])
def test_presets_mean_the_same_from_python_and_the_command_line(objective):
    for name, model in nf.PRESETS:
        cli = nf.parse_config(["--preset", name, "--model", model] + [f"--{o}" for o in objective])
        assert cli == nf.Config(preset=name, model=model, **{o: True for o in objective})
    cfg = nf.Config(preset="g23", model="mamba", teacherless=True)
    assert (cfg.path_len, cfg.max_iters, cfg.n_layer, cfg.teacherless) == (3, 3000, 2, True)
    assert nf.command(cfg, teacherless=False) == "python nanofail.py --preset g23 --model mamba"
    cfg = nf.Config(preset="g25", teacherless=True, seed=4, test_file="t.txt", n_test=20_000, out_dir="runs/a")
    assert nf.command(cfg, teacherless=False) == "python nanofail.py --preset g25 --seed 4 --test_file t.txt"


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no gloo backend for torchrun on the CPU")
def test_torchrun_two_processes_follow_one_process(tmp_path):
    """torchrun --nproc_per_node 2 splits each global batch over two processes; DDP averages their
    gradients, so the weights follow the single-process run, and only rank 0 writes results."""
    args = [str(HERE / "nanofail.py"), "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--n_train", "512",
            "--n_test", "64", "--batch_size", "64", "--max_iters", "6", "--eval_interval", "3", "--dtype",
            "float32", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *args, "--out_dir", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args,
                          "--out_dir", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=120)
    if two.returncode and "params on" not in two.stdout:  # torchrun itself did not get the processes going
        pytest.skip(f"torchrun could not start here: {(two.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert "cpu x 2" in two.stdout and two.stdout.count("eval at step 6") == 1  # rank 0 alone speaks
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["ckpt.pt", "results.json"]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("one", "two"))
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5)
