"""Forward+backward benchmark of fastsd's fused divergence on one CUDA GPU, against the cuBLAS
floor, eager PyTorch and liger-kernel.

Run from the repository root:
    python bench/gpu_bench.py                        # all shapes, 0% and 25% masked rows
    python bench/gpu_bench.py --quick                # first two shapes, 25% masked only
    python bench/gpu_bench.py --shapes 8192x4096x151936 --cases fastsd_fkl floor liger_fused_fkl
    python bench/gpu_bench.py --cpu-smoke --out /tmp/smoke.json   # tests this script on the CPU:
        # T=64 D=32 V=500, fp32, backend="torch", perf_counter, memory "n/a", liger chunked uncompiled

Per shape (T tokens, D hidden, V vocabulary) and fraction of masked rows it prints a table and writes
JSON {"meta": {...}, "rows": [...]} to --out (rewritten after every shape). Columns:
  ms        median fwd+bwd time, triton.testing.do_bench (CUDA events, warm-up, L2 flushed before
            each timed run); random bf16 inputs, never zeros; W alone is >= 450 MiB.
  x_floor   ms / ms of the 4-GEMM cuBLAS floor: teacher and student logits (T x D @ D x V),
            dX = G @ W, dW = G^T @ X, bf16, 8*T*V*D FLOPs, always over all T rows.
  x_peer    ms / the fastest liger-kernel path computing the same divergence.
  extra_gib torch.cuda.max_memory_allocated() in one warm call minus what was allocated before it
            (the inputs); the bf16 gradients of hidden states and weight count as extra.
  dx_err, dw_err  ||g - g64|| / ||g64|| on a sub-problem (first --err-rows rows, full V) against
            fastsd.reference in float64.       tflops  8*T*V*D / time, comparable across rows.
Cases: fastsd_{fkl,rkl,jsd} (backend="triton", jsd beta=0.5); fastsd_logprob (mean NLL of random
targets); floor; eager_fkl (bf16 lm_head, logits cast to fp32, log_softmax, autograd; masked rows are
computed, then multiplied by 0); liger_fused_* (liger_kernel.transformers.LigerFusedLinearJSD) and
liger_chunked_* (liger_kernel.chunked_loss.LigerFusedLinearJSDLoss, compiled, weight_hard_loss=0,
weight_soft_loss=1). liger's generalised JSD has fastsd's convention: beta=0 is KL(p_t || p_s) (fkl),
beta=1 is KL(p_s || p_t) (rkl), 0.5 is jsd; it masks rows by label -100 (ignore_index) but still
computes them. Logits have std ~3; teacher hidden = student hidden + 0.2x noise; one shared lm_head.
Failures become rows: "oom", "missing" (liger), "error: ...", with --cpu-smoke "skipped: ..." (liger).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


sys.path.insert(0, ROOT)  # a checkout that was never pip-installed: only `fastsd` is importable there
import fastsd  # noqa: E402
from fastsd.reference import reference_divergence, reference_logprob  # noqa: E402

SHAPES = [(8192, 4096, 151936), (8192, 1536, 151936), (16384, 4096, 128256), (32768, 4096, 151936)]
DIVS = {"fkl": "forward_kl", "rkl": "reverse_kl", "jsd": "jsd"}
LIGER_BETA = {"fkl": 0.0, "rkl": 1.0, "jsd": 0.5}
JSD_BETA = 0.5
W_STD, LOGIT_STD, TEACHER_NOISE = 0.02, 3.0, 0.2


# ----------------------------------------------------------------------------- inputs

def make_inputs(T, D, V, cfg, seed=0):
    torch.manual_seed(seed)
    dev, dt = cfg.device, cfg.dtype
    scale = LOGIT_STD / (W_STD * math.sqrt(D))
    h = torch.randn(T, D, device=dev) * scale
    ht = (h + TEACHER_NOISE * scale * torch.randn(T, D, device=dev)).to(dt)
    w = (torch.randn(V, D, device=dev) * W_STD).to(dt).requires_grad_()
    ids = torch.randint(0, V, (T,), device=dev)
    return SimpleNamespace(h=h.to(dt).requires_grad_(), w=w, ht=ht, ids=ids)


def set_mask(x, frac):
    """Mask exactly round(frac*T) random rows (None for frac 0); labels carry -100 there."""
    T = x.h.shape[0]
    x.mask, x.labels, x.n_valid = None, x.ids, T
    if frac > 0:
        x.mask = torch.ones(T, dtype=torch.bool, device=x.h.device)
        x.mask[torch.randperm(T, device=x.h.device)[: round(frac * T)]] = False
        x.labels = x.ids.masked_fill(~x.mask, -100)
        x.n_valid = x.mask.sum().clamp(min=1)  # stays on the device
    return x


def sub_problem(x, rows):
    """First `rows` rows with a fresh leaf for the hidden states; the weight is shared."""
    m = None if x.mask is None else x.mask[:rows]
    s = SimpleNamespace(h=x.h[:rows].detach().clone().requires_grad_(), w=x.w, ht=x.ht[:rows],
                        ids=x.ids[:rows], mask=m, labels=x.labels[:rows])
    s.n_valid = rows if m is None else m.sum().clamp(min=1)
    return s


# ----------------------------------------------------------------------------- cases
# Each step(x, cfg) runs the forward and returns the loss (None: nothing to differentiate);
# fwd_bwd() adds the backward, whose gradients land in x.h.grad and x.w.grad.

def fastsd_step(div):
    def step(x, cfg):
        return fastsd.fused_linear_divergence(x.h, x.w, x.ht, mask=x.mask, divergence=DIVS[div],
                                              beta=JSD_BETA, backend=cfg.backend).loss
    return step


def fastsd_logprob(x, cfg):
    return -fastsd.fused_linear_logprob(x.h, x.w, x.ids, mask=x.mask, backend=cfg.backend).sum() / x.n_valid


def floor(x, cfg):
    with torch.no_grad():
        x.ht @ x.w.T                    # teacher logits
        g = x.h @ x.w.T                 # student logits, reused as a (non-zero) logit gradient G
        g @ x.w, g.T @ x.h              # dX = G @ W, dW = G^T @ X
    return None


def eager_fkl(x, cfg):
    lps = (x.h @ x.w.T).float().log_softmax(-1)
    with torch.no_grad():
        lpt = (x.ht @ x.w.T).float().log_softmax(-1)
    per_row = (lpt.exp() * (lpt - lps)).sum(-1)
    return (per_row if x.mask is None else per_row * x.mask).sum() / x.n_valid


def liger_fused(div):
    def step(x, cfg):
        from liger_kernel.transformers import LigerFusedLinearJSD
        labels = None if x.mask is None else x.labels
        return LigerFusedLinearJSD(jsd_beta=LIGER_BETA[div])(x.h, x.w, x.ht, x.w, labels)
    return step


def liger_chunked(div):
    def step(x, cfg):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0,
                                     beta=LIGER_BETA[div], compiled=cfg.compiled)
        return fn(x.h, x.w, x.ht, x.w, x.labels)
    return step


CASES = {  # name -> (divergence the dX/dW error is checked against, step)
    **{f"fastsd_{d}": (d, fastsd_step(d)) for d in DIVS},
    "fastsd_logprob": ("logprob", fastsd_logprob),
    "floor": (None, floor),
    "eager_fkl": ("fkl", eager_fkl),
    **{f"liger_fused_{d}": (d, liger_fused(d)) for d in DIVS},
    **{f"liger_chunked_{d}": (d, liger_chunked(d)) for d in DIVS},
}


def fwd_bwd(name, x, cfg):
    loss = CASES[name][1](x, cfg)
    if loss is not None:
        loss.backward()
    return loss


# ----------------------------------------------------------------------------- measuring

def time_ms(fn, x, cfg):
    if not cfg.smoke:
        import triton.testing
        return triton.testing.do_bench(fn, grad_to_none=[x.h, x.w], return_mode="median")
    fn()  # warm-up
    times = []
    for _ in range(3):
        x.h.grad = x.w.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_gib_and_loss(fn, x, cfg):
    x.h.grad = x.w.grad = None
    if cfg.smoke:
        return "n/a", fn()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30, loss


def run_case(name, x, cfg):
    """One row: status, ms, extra_gib, loss. Failures are recorded, never raised."""
    row = dict(case=name, div=CASES[name][0], status="ok", ms=None, extra_gib=None, loss=None,
               dx_err=None, dw_err=None)
    fn = lambda: fwd_bwd(name, x, cfg)  # noqa: E731
    try:
        row["ms"] = time_ms(fn, x, cfg)
        row["extra_gib"], loss = peak_gib_and_loss(fn, x, cfg)
        row["loss"] = None if loss is None else float(loss.detach())
    except Exception as e:  # noqa: BLE001 -- every failure becomes a row, the run goes on
        row["ms"] = None
        row["status"] = failure_status(name, e, cfg)
    finally:
        x.h.grad = x.w.grad = None
        free_memory(cfg)
    return row


def failure_status(name, e, cfg):
    if isinstance(e, torch.OutOfMemoryError):
        return "oom"
    if name.startswith("liger") and isinstance(e, ImportError):
        return "missing"
    msg = f"{type(e).__name__}: {e}".splitlines()[0][:160]
    return f"skipped: {msg}" if cfg.smoke and name.startswith("liger") else f"error: {msg}"


def free_memory(cfg):
    gc.collect()
    if not cfg.smoke:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- accuracy

def rel_err(a, b, block=8192):
    """||a - b|| / ||b|| in float64, a few rows at a time (a [V, D] float64 copy can be GiBs)."""
    num = den = 0.0
    for i in range(0, b.shape[0], block):
        bb = b[i:i + block]
        num += float(((a[i:i + block].double() - bb) ** 2).sum())
        den += float((bb ** 2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def reference_grads(div, s):
    h64 = s.h.detach().double().requires_grad_()
    w64 = s.w.detach().double().requires_grad_()
    if div == "logprob":
        loss = -reference_logprob(h64, w64, s.ids, mask=s.mask).sum() / s.n_valid
    else:
        loss = reference_divergence(h64, w64, s.ht, mask=s.mask, divergence=DIVS[div], beta=JSD_BETA).loss
    loss.backward()
    return h64.grad, w64.grad


def add_errors(rows, x, cfg):
    """dX/dW relative errors of each ok row on the sub-problem, one float64 reference per divergence."""
    if cfg.err_rows <= 0:
        return
    s = sub_problem(x, min(cfg.err_rows, x.h.shape[0]))
    for div in dict.fromkeys(r["div"] for r in rows if r["div"] and r["status"] == "ok"):
        try:
            gx64, gw64 = reference_grads(div, s)
        except torch.OutOfMemoryError:
            continue
        for r in rows:
            if r["div"] != div or r["status"] != "ok":
                continue
            s.h.grad = s.w.grad = None
            try:
                fwd_bwd(r["case"], s, cfg)
                r["dx_err"], r["dw_err"] = rel_err(s.h.grad, gx64), rel_err(s.w.grad, gw64)
            except Exception as e:  # noqa: BLE001
                r["dx_err"] = r["dw_err"] = f"{type(e).__name__}"
        del gx64, gw64
        s.h.grad = s.w.grad = None
        free_memory(cfg)


def add_ratios(rows, T, D, V):
    floor_ms = next((r["ms"] for r in rows if r["case"] == "floor" and r["ms"]), None)
    for r in rows:
        peers = [p["ms"] for p in rows if p["case"].startswith("liger") and p["div"] == r["div"] and p["ms"]]
        ok = r["ms"] is not None
        r["x_floor"] = r["ms"] / floor_ms if ok and floor_ms else None
        r["x_peer"] = r["ms"] / min(peers) if ok and peers else None
        r["tflops"] = 8 * T * V * D / (r["ms"] * 1e9) if ok else None


# ----------------------------------------------------------------------------- driver

COLUMNS = [("case", "{}"), ("ms", "{:.2f}"), ("x_floor", "{:.2f}"), ("x_peer", "{:.2f}"),
           ("extra_gib", "{:.2f}"), ("dx_err", "{:.1e}"), ("dw_err", "{:.1e}"), ("loss", "{:.4f}"),
           ("tflops", "{:.3g}"), ("status", "{}")]
WIDTHS = dict(case=-20, status=-1)  # negative: left-aligned; others right-aligned in 9


def print_table(title, rows):
    def line(cells):
        return " ".join(f"{c:<{-WIDTHS[n]}}" if n in WIDTHS else f"{c:>9}" for (n, _), c in zip(COLUMNS, cells))
    print(f"\n== {title}")
    print(line([n for n, _ in COLUMNS]))
    for r in rows:
        vals = [r.get(n) for n, _ in COLUMNS]
        print(line(["-" if v is None else v if isinstance(v, str) else spec.format(v)
                    for v, (_, spec) in zip(vals, COLUMNS)]))
    sys.stdout.flush()


def bench_shape(shape, fracs, cases, cfg):
    T, D, V = shape
    x = make_inputs(T, D, V, cfg)
    out = []
    for frac in fracs:
        set_mask(x, frac)
        rows = [run_case(name, x, cfg) for name in cases]
        add_errors(rows, x, cfg)
        add_ratios(rows, T, D, V)
        for r in rows:
            r.update(shape=f"{T}x{D}x{V}", T=T, D=D, V=V, masked=frac)
        print_table(f"T={T} D={D} V={V} masked={frac:.0%} ({cfg.device}, {cfg.dtype})", rows)
        out += rows
    del x
    free_memory(cfg)
    return out


def metadata(args, cfg):
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "missing"
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                gpu="cpu (smoke)" if cfg.smoke else torch.cuda.get_device_name(),
                torch=torch.__version__, triton=version("triton"), liger_kernel=version("liger-kernel"),
                fastsd=fastsd.__version__, backend=cfg.backend, dtype=str(cfg.dtype), argv=sys.argv[1:])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", help="TxDxV, e.g. 8192x4096x151936 (default: all)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), metavar="CASE",
                   help=f"default: all; one or more of {', '.join(CASES)}")
    p.add_argument("--masked", nargs="+", type=float, help="fractions of masked rows (default 0 0.25)")
    p.add_argument("--quick", action="store_true", help="first two shapes, 25%% masked only")
    p.add_argument("--err-rows", type=int, default=512, help="rows of the dX/dW check (0: skip)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 CPU run of the whole pipeline")
    p.add_argument("--out", default=os.path.join("bench", "out", "gpu_bench.json"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device; use --cpu-smoke to test the script on the CPU")
    cfg = SimpleNamespace(smoke=smoke, device="cpu" if smoke else "cuda", backend="torch" if smoke else "triton",
                          dtype=torch.float32 if smoke else torch.bfloat16, compiled=not smoke,
                          err_rows=args.err_rows)
    shapes = [(64, 32, 500)] if smoke else SHAPES[:2] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    fracs = args.masked or ([0.25] if args.quick else [0.0, 0.25])
    cases = args.cases or list(CASES)
    if not smoke:
        try:  # if this fails, each fastsd case records the error itself
            importlib.import_module("fastsd.loss.kernels")
        except Exception as e:  # noqa: BLE001
            print(f"warning: fastsd.loss.kernels: {type(e).__name__}: {e}")
        # liger's compiled chunk sees a new shape or beta per group: keep it compiled
        dyn = importlib.import_module("torch._dynamo").config
        setattr(dyn, "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit", 64)
    result = dict(meta=metadata(args, cfg), rows=[])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for shape in shapes:
        result["rows"] += bench_shape(shape, fracs, cases, cfg)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
