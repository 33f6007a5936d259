"""fastsd's fused losses on the CPU against their peers: time and peak memory, one run.

    python bench/cpu_peers.py                       # the issue-15 table: forward KL, N=4096 D=512 V=32000
    python bench/cpu_peers.py --shape 1024,256,151936 --divergence forward_kl reverse_kl jsd
    python bench/cpu_peers.py --divergence logprob  # fused_linear_logprob vs log_softmax().gather()
    python bench/cpu_peers.py --shape 64,32,500 --rounds 2 --json out.json   # a few seconds
    python bench/cpu_peers.py --shape 1024,256,151936 --topk 64 --variants fastsd fastsd_topk64 \
        eager_topk64 liger_compiled                  # top-k (with the tail) against full vocabulary

Every variant computes the same fp32 loss ("mean" over rows; separate teacher head) and its
forward + backward into the student hidden states and weight. Timing: all variants in one
process, interleaved (each round runs them in a rotated order), one untimed warm-up call each
first (its time is reported: torch.compile's cost), median of `--rounds`. Memory: each variant
in a fresh process of its own: peak RSS (VmHWM, reset through /proc/self/clear_refs) during a
second call, minus the RSS before the first (taken after a tiny generic forward + backward has
started torch's thread pools), so memory a variant keeps between calls counts.
Peers that are not installed (liger-kernel, trl) are skipped and named. Prints a table with
ratios to fastsd and writes JSON. `--topk K` adds fastsd_topkK and eager_topkK (the float64
reference's definition run in fp32 on materialised logits): the divergence over the teacher's top K
tokens with the tail; their losses agree with each other's, not with the full vocabulary's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

import fastsd
from fastsd.loss import torch_backend
from fastsd.reference import per_token_divergence

JSD_BETA = 0.5
# the peers' beta that gives each divergence (liger and TRL: beta=0 forward KL, 1 reverse KL)
PEER_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": JSD_BETA}


def inputs(n, d, v, seed=0):
    """Logits with std ~3, teacher = a noisy copy of the student's hidden states, its own head."""
    g = torch.Generator().manual_seed(seed)
    scale = 3.0 / (0.02 * d**0.5)
    h = torch.randn(n, d, generator=g) * scale
    h_t = h + 0.2 * scale * torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.02
    w_t = w + 0.002 * torch.randn(v, d, generator=g)
    ids = torch.randint(0, v, (n,), generator=g)
    return h, w, h_t, w_t, ids


def _eager(h, w, h_t, w_t, ids, div):
    lps = torch.log_softmax(h @ w.T, -1)
    with torch.no_grad():
        lpt = torch.log_softmax(h_t @ w_t.T, -1)
    if div == "forward_kl":
        return F.kl_div(lps, lpt, log_target=True, reduction="batchmean")
    if div == "reverse_kl":
        return F.kl_div(lpt, lps, log_target=True, reduction="batchmean")
    return per_token_divergence(lps, lpt, divergence="jsd", beta=JSD_BETA).mean()


def _liger(compiled):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    def run(h, w, h_t, w_t, ids, div):
        loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=PEER_BETA[div],
                                       compiled=compiled)
        return loss(h, w, h_t, w_t, ids)
    return run


def _trl(h, w, h_t, w_t, ids, div):
    from trl.experimental.gkd import GKDTrainer

    with torch.no_grad():
        t_logits = h_t @ w_t.T
    return GKDTrainer.generalized_jsd_loss(h @ w.T, t_logits, beta=PEER_BETA[div])


def _fastsd(workspace_mb=None):
    def run(h, w, h_t, w_t, ids, div):
        chunk = None
        if workspace_mb is not None:  # what FASTSD_WORKSPACE_MB=<mb> gives
            chunk = torch_backend.chunk_rows(int(workspace_mb * 2**20), w.shape[0], w.shape[1], div)
        return fastsd.fused_linear_divergence(h, w, h_t, w_t, divergence=div, beta=JSD_BETA,
                                              backend="torch", chunk_size=chunk).loss
    return run


def _fastsd_topk(k):
    def run(h, w, h_t, w_t, ids, div):
        return fastsd.fused_linear_divergence(h, w, h_t, w_t, divergence=div, beta=JSD_BETA, backend="torch",
                                              topk=k, topk_from="teacher", tail=True).loss
    return run


def _eager_topk(k):
    def run(h, w, h_t, w_t, ids, div):
        with torch.no_grad():
            t_logits = h_t @ w_t.T
        return per_token_divergence(h @ w.T, t_logits, divergence=div, beta=JSD_BETA, topk=k, topk_from="teacher",
                                    tail=True).mean()
    return run


def objective(name):
    """Variants computing the same loss: "full", or "topkK"."""
    return name.split("_")[-1] if "_topk" in name else "full"


def _fastsd_logprob(h, w, h_t, w_t, ids, div):
    return -fastsd.fused_linear_logprob(h, w, ids, backend="torch").mean()


def _eager_logprob(h, w, h_t, w_t, ids, div):
    return -torch.log_softmax(h @ w.T, -1).gather(1, ids[:, None]).mean()


# name -> (module it needs or None, builder); the first is the reference of the ratios
VARIANTS = {
    "fastsd": (None, _fastsd()),
    "fastsd_ws128": (None, _fastsd(128)),
    "eager": (None, _eager),
    "liger": ("liger_kernel", _liger(False)),
    "liger_compiled": ("liger_kernel", _liger(True)),
    "trl": ("trl", _trl),
}
LOGPROB_VARIANTS = {"fastsd": (None, _fastsd_logprob), "eager": (None, _eager_logprob)}
SKIPPED_ALWAYS = {"logprob": {"liger_flce": "liger's fused linear cross-entropy is a Triton kernel: "
                                            "no CPU path (liger's chunked losses have no plain log-prob)"}}


def variants_for(div, topk=()):
    table = LOGPROB_VARIANTS if div == "logprob" else VARIANTS
    if div != "logprob":
        table = {**table, **{f"{kind}_topk{k}": (None, fn(k)) for k in topk
                             for kind, fn in (("fastsd", _fastsd_topk), ("eager", _eager_topk))}}
    have, skipped = {}, dict(SKIPPED_ALWAYS.get(div, {}))
    for name, (module, fn) in table.items():
        try:
            if module:
                __import__(module)
            have[name] = fn
        except ImportError:
            skipped[name] = f"{module} is not installed"
    return have, skipped


def leaves(data):
    return data[0].clone().requires_grad_(), data[1].clone().requires_grad_()


def call(fn, data, div, fresh=None):
    """One forward + backward on fresh leaves (`fresh`, or new clones); returns (loss, dX, dW)."""
    _, _, h_t, w_t, ids = data
    hh, ww = fresh or leaves(data)
    loss = fn(hh, ww, h_t, w_t, ids, div)
    loss.backward()
    return loss.detach(), hh.grad, ww.grad


def time_variants(shape, div, rounds, names, topk=()):
    have, _ = variants_for(div, topk)
    data = inputs(*shape)
    first, times, results = {}, {n: [] for n in names}, {}
    for name in names:
        t0 = time.perf_counter()
        results[name] = call(have[name], data, div)
        first[name] = time.perf_counter() - t0
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            call(have[name], data, div)
            times[name].append(time.perf_counter() - t0)
    ref = {}  # the first variant of each objective
    for n in names:
        ref.setdefault(objective(n), results[n])
    agree = {n: [float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))
                 for a, b in zip(results[n], ref[objective(n)])] for n in names}
    return {n: dict(median_s=statistics.median(times[n]), min_s=min(times[n]), times_s=times[n], first_call_s=first[n],
                    rel_diff_to_first=agree[n]) for n in names}


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child_memory(shape, div, name, topk=()):
    """In this (fresh) process: bytes of peak RSS during a second call above the RSS before the first."""
    fn = variants_for(div, topk)[0][name]
    data = inputs(*shape)
    # thread pools, MKL and the autograd engine start on first use: not any variant's memory
    x = torch.randn(64, 64, requires_grad=True)
    torch.log_softmax(x @ torch.randn(64, 512), -1).sum().backward()
    first, second = leaves(data), leaves(data)  # inputs, not the variant's memory
    before = _status("VmRSS")
    call(fn, data, div, first)
    first[0].grad = first[1].grad = None  # the leaves stay: they are in `before`
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    call(fn, data, div, second)  # its dX and dW count: every variant returns them
    return _status("VmHWM") - before


def memory(shape, div, name, topk=()):
    cmd = [sys.executable, __file__, "--_child", name, "--shape", ",".join(map(str, shape)), "--divergence", div,
           *(["--topk", *map(str, topk)] if topk else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
    return int(out.stdout.strip().splitlines()[-1])


def run(shape, div, rounds, measure_memory, only=None, topk=()):
    have, skipped = variants_for(div, topk)
    names = [n for n in have if only is None or n in only]
    res = time_variants(shape, div, rounds, names, topk)
    base = res[names[0]]["median_s"]
    for n in names:
        res[n]["time_ratio"] = res[n]["median_s"] / base
        if measure_memory:
            res[n]["peak_rss_mib"] = memory(shape, div, n, topk) / 2**20
    return dict(shape=dict(zip("NDV", shape)), divergence=div, rounds=rounds, variants=res, skipped=skipped)


def print_table(entry):
    s = entry["shape"]
    print(f"\n{entry['divergence']}  N={s['N']} D={s['D']} V={s['V']}  fp32, median of {entry['rounds']}")
    print(f"{'variant':16s} {'median s':>9s} {'/ fastsd':>9s} {'min s':>8s} {'first call s':>13s} {'peak RSS MiB':>13s}")
    for n, r in entry["variants"].items():
        mem = f"{r['peak_rss_mib']:13.0f}" if "peak_rss_mib" in r else f"{'-':>13s}"
        print(f"{n:16s} {r['median_s']:9.3f} {r['time_ratio']:9.2f} {r['min_s']:8.3f} {r['first_call_s']:13.2f} {mem}")
    for n, why in entry["skipped"].items():
        print(f"{n:16s} skipped: {why}")


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def _versions():
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "liger-kernel", "trl"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def finish(meta, data, path, extra=""):
    """The end of a run: the machine, the load average at start and end, the JSON written."""
    meta["loadavg_end"] = os.getloadavg()
    print(f"\n{meta['machine']}, {meta['threads']} threads, {meta['versions']}{extra}")
    print(f"load average (1, 5, 15 min) at start {meta['loadavg_start']}, at end {meta['loadavg_end']}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", action="append", help="N,D,V (repeatable; default 4096,512,32000)")
    p.add_argument("--divergence", nargs="+", default=["forward_kl"],
                   choices=["forward_kl", "reverse_kl", "jsd", "logprob"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", nargs="+", help="only these (the first is the ratios' reference)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    p.add_argument("--topk", nargs="+", type=int, default=[],
                   help="add fastsd_topkK and eager_topkK: the teacher's top K tokens with the tail")
    p.add_argument("--json", default="runs/cpu_peers.json")  # runs/ is not tracked: keep results on purpose
    p.add_argument("--_child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split(",")) for s in (a.shape or ["4096,512,32000"])]
    if a._child:
        print(child_memory(shapes[0], a.divergence[0], a._child, a.topk))
        return
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=_cpu(),
                threads=torch.get_num_threads(), versions=_versions(), loadavg_start=os.getloadavg())
    entries = []
    for shape in shapes:
        for div in a.divergence:
            entries.append(run(shape, div, a.rounds, not a.no_memory, a.variants, a.topk))
            print_table(entries[-1])
    finish(meta, dict(meta=meta, results=entries), a.json)


if __name__ == "__main__":
    main()
