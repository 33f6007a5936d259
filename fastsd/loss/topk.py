"""Top-k divergences: the row math of one chunk of fp32 logits, for both backends.

Per row, S is the K tokens with the largest logits of one side (`topk_from`, the logits over the
temperature). Each side's distribution is reduced to categories:
    tail=False  q = softmax(z[S])                       K categories (S renormalised)
    tail=True   q = (p[S], 1 - sum_S p)                 K + 1 (the tail holds the rest; empty if K = V)
and the divergence (forward KL, reverse KL, JSD) is taken between the teacher's and the
student's q, each category's summand clamped at `clip` when one is given (as the full-vocabulary
clip clamps each token's). JSD with beta 0 or 1 arrives here as forward or reverse KL. S is a constant of the objective: its gradient flows through z[S] and,
with the tail, through the log-sum-exp of all V logits.

With G_c = d loss / d log q_s,c, the gradient w.r.t. the student logits z_s is
    tail=False  v in S: G_v - q_v sum_c G_c             v not in S: 0
    tail=True   v in S: G_v - p_v sum_c G_c             v not in S: p_v (G_tail / q_tail - sum_c G_c)
and per category (a = q_t, b = q_s, m = (1-beta) b + beta a; 0 where the summand is clipped):
    forward_kl  a log(a/b)        G = -a
    reverse_kl  b log(b/a)        G = b (log(b/a) + 1)
    jsd         beta a log(a/m) + (1-beta) b log(b/m)      G = (1-beta) b log(b/m)

The selection is torch.topk on the chunk's fp32 logits (the Triton backend too: a Triton
selection would save one pass over [C, V] of the several the row math makes, and the GEMMs
dominate). Among logits tied at the k-th place, which tokens are taken is torch.topk's choice.
The work is in place on the two [C, V] logit buffers (the student's ends as the gradient) plus
[C, K]-sized temporaries: `row_bytes` counts them. The student's entropy, asked for, is that of
its full-vocabulary distribution, from the log-probs of the same chunk (one more [C, V] pass, no
GEMM; the torch backend's scratch buffer, a temporary in the Triton backend).
"""

from __future__ import annotations

import math

import torch

__all__ = ["TOPK_FROM", "check_topk", "row_bytes", "topk_rows", "topk_rows_into"]

TOPK_FROM = ("teacher", "student")
_NEG_INF = float("-inf")


def check_topk(topk, topk_from, tail, vocab: int | None = None) -> None:
    """`topk` None (off) or an int in [1, vocab]; `topk_from` one of TOPK_FROM; `tail` a bool."""
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk: expected an int >= 1 (or None: the full vocabulary), got {topk!r}")
        if vocab is not None and topk > vocab:
            raise ValueError(f"topk: {topk} exceeds the vocabulary ({vocab})")
    if topk_from not in TOPK_FROM:
        raise ValueError(f"topk_from: expected one of {TOPK_FROM}, got {topk_from!r}")
    if not isinstance(tail, bool):
        raise ValueError(f"tail: expected a bool, got {tail!r}")


def row_bytes(k: int) -> int:
    """Scratch bytes per row beyond the two [C, V] logit buffers: torch.topk's values and int64
    indices, and about ten fp32 [K + 1] temporaries of the category math."""
    return (4 + 8 + 10 * 4) * (k + 1)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else _NEG_INF


def _categories(z, idx, tail, tgt, ent=None):
    """One side's category log-probs [c, K'] from its logits z [c, V], in place on z, and the
    log p of the targets `tgt` [c, 1] (None without). z ends as log p (tail=False; as z when there
    are neither targets nor `ent`), or as exp(log p - m) off S and 0 on S (tail=True), m [c] the
    largest log p off S (0 if S is everything), returned with the tail's sum below it. `ent`
    (scratch [c, V] or None, out [c]): the full-vocabulary entropy -sum_v p log p written to out."""
    lp_tgt = None
    if not tail:
        lq = torch.log_softmax(z.gather(1, idx), 1)
        if tgt is not None or ent is not None:
            torch.log_softmax(z, 1, out=z)
            lp_tgt = None if tgt is None else z.gather(1, tgt).squeeze(1)
            _entropy_into(z, ent)
        return lq, lp_tgt, None, None
    torch.log_softmax(z, 1, out=z)
    _entropy_into(z, ent)
    if tgt is not None:
        lp_tgt = z.gather(1, tgt).squeeze(1)
    lp_set = z.gather(1, idx)
    z.scatter_(1, idx, _NEG_INF)
    m = z.amax(1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s_tail = z.sub_(m[:, None]).exp_().sum(1)  # >= 1 unless the tail is empty (then 0)
    lq = torch.cat([lp_set, (s_tail.log() + m)[:, None]], 1)
    return lq, lp_tgt, m, s_tail


def _entropy_into(lp, ent) -> None:
    """-sum_v p log p of the log-probs lp [c, V] into ent[1], through the scratch ent[0] (None: a
    temporary; see `_categories`), as torch_backend's full-vocabulary rows do; nothing when `ent`
    is None."""
    if ent is not None:
        ent[1][:] = torch.exp(lp, out=ent[0]).mul_(lp).sum(1).neg_()


def _summands(la, lb, divergence, beta, clip):
    """Per-category summands and G = d summand / d log b, for category log-probs la (teacher) and
    lb (student), [c, K']. Empty categories (both -inf: the tail when K = V) give 0."""
    a, b = la.exp(), lb.exp()
    if divergence == "forward_kl":
        s, G = a * (la - lb), -a
    elif divergence == "reverse_kl":
        d = lb - la
        s, G = b * d, b * (d + 1)
    else:
        lm = torch.logaddexp(la + _log(beta), lb + _log(1 - beta))
        d = lb - lm
        s, G = beta * a * (la - lm) + (1 - beta) * b * d, (1 - beta) * b * d
    empty = lb == _NEG_INF
    s, G = s.masked_fill(empty, 0.0), G.masked_fill(empty, 0.0)
    if clip is not None:
        G = G.masked_fill(s > clip, 0.0)
        s = s.clamp(max=clip)
    return s, G


def topk_rows(z_s, z_t, *, k, topk_from, tail, divergence, beta, clip, tgt, grad, ent=None):
    """Top-k row math in place on z_s, z_t ([c, V] fp32 logits over the temperature). Returns
    (loss [c], g, lp_s[tgt], lp_t[tgt]): g (in z_s) is d loss / d z_s when `grad`, else None;
    the log-probs (of the full vocabulary) are None without `tgt` ([c, 1]). `ent` (scratch
    [c, V] or None, out [c]): the student's full-vocabulary entropy written to out, from the
    same logits (no extra GEMM)."""
    idx = (z_t if topk_from == "teacher" else z_s).topk(k, 1, sorted=False).indices
    la, lpt, _, _ = _categories(z_t, idx, tail, tgt)
    lb, lps, m, s_tail = _categories(z_s, idx, tail, tgt, ent)
    s, G = _summands(la, lb, divergence, beta, clip)
    loss = s.sum(1)
    if not grad:
        return loss, None, lps, lpt
    sum_g = G.sum(1, keepdim=True)
    b = lb[:, :k].exp()
    g_set = G[:, :k] - b * sum_g
    if tail:  # off S: exp(log p - m) (G_tail / s_tail - e^m sum G)
        coef = G[:, k] / s_tail.clamp(min=torch.finfo(s_tail.dtype).tiny) - m.exp() * sum_g[:, 0]
        g = z_s.mul_(coef[:, None])
    else:
        g = z_s.zero_()
    return loss, g.scatter_(1, idx, g_set), lps, lpt


def topk_rows_into(z_s, z_t, g, loss, s_lp, t_lp, targets, scale, nv, c0: int, c: int, *, divergence, beta,
                   clip, inv_temp, topk, entropy=None) -> None:
    """The Triton launcher's form (`kernels.rows.divergence_rows`' arguments): rows c0 .. c0 + c of
    the [C, V] logit buffers; the loss, log-probs and (`entropy` [N]) the student's entropy written
    for rows before nv (0 past it, with no host sync), the gradient times scale / temperature into
    g in its dtype."""
    k, topk_from, tail = topk
    zs, zt = z_s[:c], z_t[:c]
    # masked rows past nv may hold any id (-100): clamped, their outputs are dropped below
    tgt = None if targets is None else targets[c0:c0 + c, None].clamp(0, z_s.shape[1] - 1)
    ent = None if entropy is None else (None, torch.empty(c, dtype=loss.dtype, device=zs.device))
    row_loss, gz, lps, lpt = topk_rows(zs, zt, k=k, topk_from=topk_from, tail=tail, divergence=divergence,
                                       beta=beta, clip=clip, tgt=tgt, grad=g is not None, ent=ent)
    live = (c0 + torch.arange(c, device=zs.device)) < nv
    loss[c0:c0 + c] = torch.where(live, row_loss, 0.0)
    if ent is not None:
        entropy[c0:c0 + c] = torch.where(live, ent[1], 0.0)
    if tgt is not None:
        s_lp[c0:c0 + c] = torch.where(live, lps, 0.0)
        t_lp[c0:c0 + c] = torch.where(live, lpt, 0.0)
    if g is not None:  # rows past nv hold garbage, which the dX/dW GEMMs skip
        g[:c].copy_(gz.mul_((scale[c0:c0 + c] * inv_temp)[:, None]))
