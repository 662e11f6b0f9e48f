"""
Mamba-1 language model in one readable file: plain PyTorch + einops, no custom kernels.
Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752.
Initialisation as in the official code (state-spaces/mamba: mamba_simple.py, mixer_seq_simple.py).

Read from the top: the block, the language model, the scan by its definition (scan_ref) and
selective_scan, the one door to it. Below the divider, the same scan scheduled for speed.
`python mamba_min.py` (or assets/mamba_bench.py) times the schedules on this device.

Glossary (code name -> paper symbol), used in the shape comments:
  b, l      batch size, sequence length (paper: B, L)
  d_model   width of the residual stream (the paper's D; not the skip parameter D below)
  d_in      d_inner = expand * d_model, width inside the mixer (E*D, with E = 2)
  n         d_state, size of the SSM state of each channel (N)
  u         input of the scan: the convolved activations (b, l, d_in), called x in the paper
  z         the gating branch (b, l, d_in): the scan's output is multiplied by SiLU(z) (Fig. 3)
  delta     step size Δ = softplus(dt_proj(dt)) > 0, one per token and channel (b, l, d_in)
  A         state matrix; diagonal, so stored as (d_in, n); A = -exp(A_log) < 0 keeps the SSM stable
  B, C      how the input enters the state and how the state is read out, one per token (b, l, n)
  D         skip connection from u to y (d_in,)
  dt_rank   rank R of the low-rank projection that produces Δ, ceil(d_model / 16)
  h         hidden state (b, d_in, n): all that the model remembers of the past
  hs        the hidden state after every step (b, l, d_in, n)
  dA, dBu   discretised Ā = exp(ΔA) (zero-order hold) and B̄u ≈ ΔB u (Euler), (b, l, d_in, n)
  y         output of the scan (b, l, d_in): y_t = C_t h_t + D u_t
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum, rearrange


class MambaBlock(nn.Module):
    """x + mixer(RMSNorm(x)), x (b, l, d_model); the mixer is the Mamba block of the paper's Fig. 3:
    x -> in_proj -> [u | z]; u -> causal conv -> SiLU -> selective SSM; y * SiLU(z) -> out_proj."""

    def __init__(self, d_model, d_state, expand, d_conv):
        super().__init__()
        d_in = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.in_proj = nn.Linear(d_model, 2 * d_in, bias=False)  # both branches, u and z
        self.conv1d = nn.Conv1d(d_in, d_in, d_conv, groups=d_in)  # depthwise: mixes only time
        self.x_proj = nn.Linear(d_in, self.dt_rank + 2 * d_state, bias=False)  # selection: Δ, B, C
        self.dt_proj = nn.Linear(self.dt_rank, d_in)  # Δ's rank-R bottleneck back up to d_in
        self.out_proj = nn.Linear(d_in, d_model, bias=False)
        # Δ: weight keeps the variance, bias makes softplus(bias) log-uniform in [1e-3, 1e-1]
        # at init, so channels start with time scales from ~10 to ~1000 tokens.
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        log_dt = torch.empty(d_in).uniform_(math.log(1e-3), math.log(1e-1))
        dt = torch.exp(log_dt).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.dt_proj.bias._no_reinit = True  # Mamba's init zeroes Linear biases, but not this one
        # S4D-real init A = -(1, 2, ..., n) in every channel; D = 1. No weight decay on either:
        # shrinking A_log to 0 pulls every A to -1 (one time scale); shrinking D cuts the skip.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_in, 1)  # (d_in, n)
        self.A_log = nn.Parameter(torch.log(A))  # learn log(-A): A stays negative after any update
        self.D = nn.Parameter(torch.ones(d_in))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    def forward(self, x, cache=None):
        """x (b, l, d_model) -> (b, l, d_model), and the cache after the last token.
        cache = (conv_state (b, d_conv-1, d_in): the last pre-conv inputs, h (b, d_in, n)), or None
        for the start of a sequence. Training passes None; generation feeds the cache back in."""
        u, z = self.in_proj(self.norm(x)).chunk(2, dim=-1)                # (b, l, d_in) each
        k = self.conv1d.kernel_size[0]                                     # d_conv
        if cache is None:  # start of a sequence: no earlier inputs, and h = 0 in the scan
            conv_state = u.new_zeros(x.shape[0], k - 1, u.shape[-1])       # (b, k-1, d_in)
            h = None
        else:
            conv_state, h = cache
        # Causal conv: prepend the k-1 previous inputs (zeros at the start), keep "valid" outputs.
        u = torch.cat([conv_state, u], dim=1)                              # (b, k-1+l, d_in)
        conv_state = u[:, u.shape[1] - (k - 1):]                           # (b, k-1, d_in)
        u = F.silu(self.conv1d(u.transpose(1, 2)).transpose(1, 2))         # (b, l, d_in)
        # Selection (Sec. 3.2): Δ, B and C are functions of the token, not constants as in S4.
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))                               # (b, l, d_in)
        A = -torch.exp(self.A_log.float())                                 # (d_in, n)
        y, h = selective_scan(u, delta, A, B, C, self.D, h0=h, return_state=True)
        out = self.out_proj(y * F.silu(z))                                 # gate, back to d_model
        return x + out, (conv_state, h)


class Mamba(nn.Module):
    """Language model: idx (b, l) -> embedding -> n_layer MambaBlocks -> RMSNorm -> tied lm_head."""

    def __init__(self, vocab_size, n_layer, d_model, d_state=16, expand=2, d_conv=4):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(MambaBlock(d_model, d_state, expand, d_conv)
                                    for _ in range(n_layer))
        self.norm_f = nn.RMSNorm(d_model, eps=1e-5)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight  # tied
        # Official MambaLMHeadModel init: embedding N(0, 0.02), Linear biases 0 (unless _no_reinit),
        # out_proj (the only write to the residual stream) default init / sqrt(n_layer), as in GPT-2
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                if not getattr(m.bias, "_no_reinit", False):
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for layer in self.layers:
            nn.init.kaiming_uniform_(layer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.out_proj.weight /= math.sqrt(n_layer)

    def _run(self, idx, caches):
        """idx (b, l) -> final hidden states (b, l, d_model) and the new per-layer caches."""
        x = self.embedding(idx)                                            # (b, l, d_model)
        new_caches = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer(x, cache)
            new_caches.append(cache)
        return self.norm_f(x), new_caches

    def forward(self, idx, n_out=None):
        """idx (b, l) int64 -> logits (b, n_out, vocab_size): last n_out positions, all if None."""
        x = self._run(idx, [None] * len(self.layers))[0]                  # (b, l, d_model)
        return self.lm_head(x[:, x.shape[1] - (n_out or x.shape[1]):])

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        """Greedy decoding. idx (b, l) prompt -> (b, max_new_tokens) new tokens only. The prompt
        is read once in parallel; then each token is one recurrent step (l = 1) that feeds the
        caches back: O(1) work per token, since the state h summarises the whole past."""
        caches = [None] * len(self.layers)  # None: every layer starts its sequence afresh
        new = []
        for _ in range(max_new_tokens):
            x, caches = self._run(idx, caches)
            idx = self.lm_head(x[:, -1:]).argmax(dim=-1)  # (b, 1): next input is just this token
            new.append(idx)
        return torch.cat(new, dim=1) if new else idx[:, :0]


def scan_ref(u, delta, A, B, C, D, h):
    """The SSM by its definition, one time step after the other (slow; the tests' oracle):
    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,  y_t = C_t · h_t + D u_t,  with h (b, d_in, n).
    u, delta (b, l, d_in); A (d_in, n); B, C (b, l, n); D (d_in,) -> y (b, l, d_in), last h."""
    ys = []
    for t in range(u.shape[1]):
        dA = torch.exp(delta[:, t, :, None] * A)                         # (b, d_in, n): Ā_t
        dBu = (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]     # (b, d_in, n): B̄_t u_t
        h = dA * h + dBu                                                 # forget a little, add
        ys.append(einsum(h, C[:, t], "b d n, b n -> b d") + D * u[:, t])  # (b, d_in): read out
    return torch.stack(ys, dim=1), h


def selective_scan(u, delta, A, B, C, D, mode="auto", h0=None, return_state=False):
    """y = SSM(u): u, delta (b, l, d_in); A (d_in, n); B, C (b, l, n); D (d_in,) -> y (b, l, d_in).
    delta must already be positive (after softplus). h0: initial state (b, d_in, n), zero if None;
    return_state=True also returns the state after the last step, to continue the sequence later.
    mode: "ref" (scan_ref), or one of the faster modes below the divider: "loop" (CPU; short
    sequences on a GPU), "chunked" (long sequences on a GPU) or "auto" (one of these two)."""
    dtype = u.dtype
    # fp32 with autocast off: in bf16, decays close to 1 round to 1 and long memories are lost.
    with torch.autocast(u.device.type, enabled=False):
        # float64 stays float64 (the tests' oracle); anything narrower goes up to float32
        u, delta, A, B, C, D = [t.to(torch.promote_types(t.dtype, torch.float32))
                                for t in (u, delta, A, B, C, D)]
        if h0 is None:  # nothing seen yet
            h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])           # (b, d_in, n)
        else:
            h = h0.to(u.dtype)
        if mode == "ref":
            y, h = scan_ref(u, delta, A, B, C, D, h)
        else:
            y, h = _scan_fast(u, delta, A, B, C, D, h, mode)
    y = y.to(dtype)  # back to the caller's precision
    if return_state:
        return y, h
    return y


# ============== speed: the same scan, scheduled for speed (nothing above depends on how) ==========
# Every mode computes exactly scan_ref's recurrence; they only schedule the loop over time.
# Timed by assets/mamba_bench.py (timings in RESULTS.md).

class _ScanLoop(torch.autograd.Function):
    """h_t = dA_t * h_{t-1} + dBu_t, step by step over dim 1: (b, l, ...) -> all states (b, l, ...).
    The backward is the same recurrence run backwards, g_t = dL/dh_t + dA_{t+1} * g_{t+1}, written
    out by hand: one fused multiply-add per step where autograd would record several ops per step
    (and, with x[:, t] indexing under autograd, build a full-size zero tensor per step: O(l^2))."""

    @staticmethod
    def forward(ctx, dA, dBu, h0):
        """dA, dBu (b, l, ...), h0 (b, ...) -> hs (b, l, ...), the state after every step."""
        hs = torch.empty_like(dBu)
        h = h0
        for t in range(dA.shape[1]):
            h = torch.addcmul(dBu[:, t], dA[:, t], h)  # dBu + dA * h in one op
            hs[:, t] = h
        ctx.save_for_backward(dA, hs, h0)
        return hs

    @staticmethod
    def backward(ctx, grad_hs):
        """grad_hs (b, l, ...) -> gradients for dA (b, l, ...), dBu (b, l, ...) and h0 (b, ...)."""
        dA, hs, h0 = ctx.saved_tensors
        g = torch.empty_like(grad_hs)  # g_t = dL/dh_t, through every later step
        g[:, -1] = grad_hs[:, -1]
        for t in range(dA.shape[1] - 2, -1, -1):
            g[:, t] = torch.addcmul(grad_hs[:, t], dA[:, t + 1], g[:, t + 1])
        h_prev = torch.cat([h0[:, None], hs[:, :-1]], dim=1)  # (b, l, ...): state each step read
        # h_t = dA_t h_{t-1} + dBu_t, so dL/ddA_t = g_t h_{t-1}, dL/ddBu_t = g_t, dL/dh0 = dA_0 g_0
        return g * h_prev, g, dA[:, 0] * g[:, 0]


def _scan_chunked(dA, dBu, h):
    """dA, dBu (b, l, d_in, n), h (b, d_in, n) -> hs (b, l, d_in, n) as _ScanLoop, in ~2 sqrt(l)
    sequential steps, not l (each a kernel launch on a GPU): 1) run it in all chunks of k steps at
    once, from a zero state; 2) carry the state from chunk to chunk; 3) add to each position the
    state entering its chunk, times the cumprod of decays since (no division: no inf/NaN at 0)."""
    l = dA.shape[1]
    k = math.ceil(math.sqrt(l))
    pad = (0, 0, 0, 0, 0, -l % k)  # pad l to a multiple of k, at the end: it cannot leak back
    a = rearrange(F.pad(dA, pad), "b (c k) d n -> b k c d n", k=k)   # decays, c chunks side by side
    x = rearrange(F.pad(dBu, pad), "b (c k) d n -> b k c d n", k=k)  # inputs, likewise
    local = _ScanLoop.apply(a, x, torch.zeros_like(x[:, 0]))  # (b, k, c, d_in, n), chunks from 0
    decay = torch.cumprod(a, dim=1)                           # (b, k, c, d_in, n), from chunk start
    ends = _ScanLoop.apply(decay[:, -1], local[:, -1], h)     # (b, c, d_in, n), true states at ends
    h_in = torch.cat([h[:, None], ends[:, :-1]], dim=1)       # (b, c, d_in, n), state into a chunk
    hs = local + decay * h_in[:, None]                        # (b, k, c, d_in, n)
    return rearrange(hs, "b k c d n -> b (c k) d n")[:, :l]


def _scan_fast(u, delta, A, B, C, D, h, mode):
    """selective_scan's "loop", "chunked" and "auto": same arguments and (y, h) as scan_ref, but
    the dA, dBu (b, l, d_in, n) of all steps are made at once, then the recurrence runs on them."""
    if mode == "auto":
        # Forward+backward: on a CPU "loop" wins at every length; on a GPU "chunked"
        # (~2 sqrt(l) launches instead of l) wins on long sequences only, and at the paper
        # preset's size it moves more memory and loses.
        mode = "chunked" if u.device.type != "cpu" and u.shape[1] > 128 else "loop"
    dA = torch.exp(einsum(delta, A, "b l d, d n -> b l d n"))         # zero-order hold
    dBu = einsum(delta * u, B, "b l d, b l n -> b l d n")             # Euler
    if mode == "loop":
        hs = _ScanLoop.apply(dA, dBu, h)                              # (b, l, d_in, n)
    elif mode == "chunked":
        hs = _scan_chunked(dA, dBu, h)                                # (b, l, d_in, n)
    else:
        raise ValueError(f"selective_scan: mode is ref, loop, chunked or auto, not {mode!r}")
    y = einsum(hs, C, "b l d n, b l n -> b l d") + D * u              # read out, as in scan_ref
    return y, hs[:, -1]


if __name__ == "__main__":  # `python mamba_min.py` times the scan modes, as it always has
    import runpy
    here = os.path.dirname(os.path.abspath(__file__))
    runpy.run_path(os.path.join(here, "assets", "mamba_bench.py"), run_name="__main__")
