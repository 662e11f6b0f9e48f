"""
Times the Mamba scan's modes (mamba_min.selective_scan) on this device: forward + backward, the
median of a few interleaved runs, and on CUDA the extra peak memory of each. When mambapy is
installed (pip install mambapy; a competitor, not a dependency), its parallel scan runs beside them.

    python assets/mamba_bench.py                                  # b=8 d_in=256 n=16, four lengths
    python assets/mamba_bench.py --b 256 --d_in 768 --lengths 36  # the paper preset's size
    python mamba_min.py                                           # the same as the first line

Shapes as in mamba_min's glossary: u, delta (b, l, d_in); A (d_in, n); B, C (b, l, n); D (d_in,).
"""
import argparse
import os
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
from einops import einsum

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mamba_min import selective_scan  # noqa: E402


def mambapy_scan(u, delta, A, B, C, D):
    """selective_scan by mambapy's Blelloch parallel scan: u, delta (b, l, d_in); A (d_in, n);
    B, C (b, l, n); D (d_in,) -> y (b, l, d_in). The same discretisation as mamba_min's."""
    from mambapy.pscan import pscan
    dA = torch.exp(einsum(delta, A, "b l d, d n -> b l d n"))         # (b, l, d_in, n)
    dBu = einsum(delta * u, B, "b l d, b l n -> b l d n")             # (b, l, d_in, n)
    hs = pscan(dA, dBu)                                               # (b, l, d_in, n)
    return einsum(hs, C, "b l d n, b l n -> b l d") + D * u


def scan_modes():
    """Name -> scan function, each (u, delta, A, B, C, D) -> y (b, l, d_in)."""
    modes = {m: partial(selective_scan, mode=m) for m in ("ref", "loop", "chunked", "auto")}
    try:
        import mambapy.pscan  # noqa: F401  (optional)
        modes["mambapy"] = mambapy_scan
    except ImportError:
        pass
    return modes


def random_inputs(b, l, d_in, n, device):
    """Valid scan inputs that require grad: u, delta > 0 (b, l, d_in); A < 0 (d_in, n);
    B, C (b, l, n); D (d_in,)."""
    torch.manual_seed(0)
    u = torch.randn(b, l, d_in)
    delta = F.softplus(torch.randn(b, l, d_in))
    B = torch.randn(b, l, n)
    C = torch.randn(b, l, n)
    A = -torch.exp(torch.randn(d_in, n))
    D = torch.randn(d_in)
    return [t.to(device).requires_grad_() for t in (u, delta, A, B, C, D)]


def time_once(fn, inputs, cuda):
    """Milliseconds for one forward+backward of fn(*inputs), and on CUDA the extra peak MiB."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.cuda.synchronize()  # GPU work is asynchronous: wait before starting the clock
    t0 = time.perf_counter()
    fn(*inputs).sum().backward()
    if cuda:
        torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - t0)
    if not cuda:
        return ms, ""
    return ms, f"{(torch.cuda.max_memory_allocated() - base) / 2**20:8.0f} MiB"


def benchmark(b=8, d_in=256, n=16, lengths=(32, 64, 200, 1024), reps=7):
    """Print the median forward+backward time of each scan mode (and extra peak memory on CUDA)
    for u, delta (b, l, d_in); A (d_in, n); B, C (b, l, n); D (d_in,), for each l in lengths."""
    cuda = torch.cuda.is_available()
    if cuda:
        device = "cuda"
    elif torch.backends.mps.is_available():
        device = "mps"
    else:
        device = "cpu"
    modes = scan_modes()
    print(f"{device}, {torch.get_num_threads()} threads, b={b} d_in={d_in} n={n}: forward+backward")
    for l in lengths:
        inputs = random_inputs(b, l, d_in, n, device)
        # ref is one Python step per token under autograd: too slow beyond a few hundred
        todo = {name: fn for name, fn in modes.items() if name != "ref" or l <= 200}
        times = {name: [] for name in todo}
        peaks = {}
        for _ in range(reps + 1):  # interleaved, so that a busy neighbour slows all modes alike
            for name, fn in todo.items():
                ms, peak = time_once(fn, inputs, cuda)
                times[name].append(ms)
                peaks[name] = peak
        for name, t in times.items():  # the first run of each was a warm-up
            print(f"l={l:5d}  {name:8s} {statistics.median(t[1:]):9.2f} ms {peaks[name]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--b", type=int, default=8, help="batch size")
    parser.add_argument("--d_in", type=int, default=256, help="channels: expand * d_model")
    parser.add_argument("--n", type=int, default=16, help="state size d_state")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 200, 1024])
    parser.add_argument("--reps", type=int, default=7, help="timed runs after one warm-up")
    args = parser.parse_args()
    benchmark(args.b, args.d_in, args.n, tuple(args.lengths), args.reps)
