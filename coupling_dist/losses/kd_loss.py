"""Stage B loss: token CE (+ label smoothing) and KD from a causal teacher, chunked and vocab-parallel.

    L = lambda_ce * sum_r w_ce[r] * CE_r  +  lambda_kd * sum_r w_kd[r] * tau^2 * KL(p_T[r] || p_S[r])

with CE_r = (1 - eps) * (lse(s_r) - s_r[y_r]) + eps * (lse(s_r) - mean_v s_r[v]) (the definition of
``F.cross_entropy(label_smoothing=eps)``), p_T = softmax(t_r / tau) from the teacher's row and
p_S = softmax(s_r / tau). Row weights carry the pad mask and the normalisation (``sequence_loss``
builds them, pairing student position t with teacher position t - 1).

Why a custom autograd Function: at V = 151,936 the student and teacher logits of one batch are
gigabytes in fp32. ``ChunkedHeadLoss`` never materialises them: rows are processed ``chunk_rows``
at a time, and within a row chunk the vocabulary ``chunk_vocab`` columns at a time with online
(running max, rescaled sum) log-sum-exp statistics for the student (at T = 1 and at tau), the
teacher, and the teacher-weighted log-ratio (its expectation, combined across chunks by their
log-sum-exp weights) needed by the KL. Once a row chunk's statistics
are complete, a second sweep recomputes each logit chunk and accumulates the gradients w.r.t. the
hidden rows and the head weight right away (d/ds = softmax(s) - target for CE and
tau * (softmax(s/tau) - p_T) for the scaled KL), so backward only scales the stored gradients by the
incoming scalar. Memory is O(chunk_rows * chunk_vocab) beyond the inputs and their gradients.
When the whole local vocabulary fits in one chunk the logits of the first sweep are reused, so the
matmul count equals the naive forward + backward.

Restricted teacher (``teacher_vocab``): the teacher's probability is zero at global ids >= the
limit and renormalised over the ids below it (its logits there are set to a large negative
constant: finite, so a shard holding no valid id yields no NaN). The compact vocabulary
(``data.vocab: corpus``) passes the teacher's head rows for its ids, padded, with the limit at
the compact size: KD is then KL(teacher restricted to the corpus ids and renormalised || student),
an approximation of the full-vocabulary KD (the teacher's mass outside the corpus ids is dropped).

Vocab-parallel (TP > 1): each rank passes its vocabulary shard of the student head and of the
teacher head (split the same way, ``vocab_start``), the per-row maxima are all-reduced (MAX) and
the rescaled sums (SUM) in the TP group; only O(rows) numbers cross ranks, never the vocabulary.
The hidden rows are replicated over the TP group, so their gradient is the sum of the ranks'
partial gradients (all-reduced here).

Cached teacher (``pair_store.teacher_topk``, ``stage_b.kd.source: cache``): instead of a teacher
head, each row brings the teacher's top-k ids K_r (k distinct ids), their log-probabilities
log p_T[r, j] at tau, and the tail log-mass log p_T[r, tail] = log(1 - sum_{j in K_r} p_T[r, j]).
Both distributions are grouped into the k + 1 buckets {j} (j in K_r) and "tail" (every other id):

    q[r, j]    = softmax(s_r / tau)[j]                    (j in K_r)
    q[r, tail] = 1 - sum_{j in K_r} q[r, j] = sum_{v not in K_r} softmax(s_r / tau)[v]
    KD_r       = tau^2 * ( sum_{j in K_r} p_T[r, j] (log p_T[r, j] - log q[r, j])
                           + p_T[r, tail] (log p_T[r, tail] - log q[r, tail]) ),   0 log 0 = 0

i.e. the KL between the grouped distributions. With k = V (tail mass 0) it is exactly the live KD.
log q[r, tail] is computed as the log-sum-exp of s / tau over the ids outside K_r (not as log(1 -
sum)), which is the same number without the cancellation when the top-k hold almost all the mass.
The same sweeps and TP reductions serve both teachers: the gathered student logits at K_r and the
outside-K_r log-sum-exp are two more per-row statistics (O(rows * k) numbers cross TP ranks). The
gradient w.r.t. s_r / tau is q[v] * P - p_T[v] for v in K_r and q[v] * (P - p_T[tail] / q[tail])
otherwise, P = sum of the k + 1 teacher buckets (1 up to rounding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class LossOptions:
    temperature: float = 2.0
    label_smoothing: float = 0.0
    lambda_ce: float = 1.0
    lambda_kd: float = 1.0
    vocab_start: int = 0
    vocab_size: Optional[int] = None  # full vocabulary (all TP ranks); default: local shard size
    tp_group: object = None
    chunk_rows: int = 64
    chunk_vocab: int = 32768
    teacher_vocab: Optional[int] = None  # global ids >= this get teacher probability 0 (None: all ids)


MASKED_LOGIT = -1e30  # finite "minus infinity": exp underflows to 0, and 0 * it is 0, not NaN


def _teacher_logits(htr: torch.Tensor, wt: torch.Tensor, v0: int, v1: int, o: LossOptions) -> torch.Tensor:
    """t / tau for vocabulary chunk [v0, v1) of this shard, ids beyond ``teacher_vocab`` masked."""
    t = (htr @ wt[v0:v1].t()).float().div_(float(o.temperature))
    if o.teacher_vocab is not None:
        first_masked = int(o.teacher_vocab) - int(o.vocab_start) - v0
        if first_masked < v1 - v0:
            t[:, max(0, first_masked):] = MASKED_LOGIT
    return t


def _tp(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _in_chunk(ids_l: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, slots, columns in the chunk) of the cached ids that fall into vocabulary columns [v0, v1)."""
    r, j = ((ids_l >= v0) & (ids_l < v1)).nonzero(as_tuple=True)
    return r, j, ids_l[r, j] - v0


def _grouped_kd(qk, l_r, l_q, logp, tail, tau: float):
    """Cached teacher, per row: (KD_r, log q at K_r, P, p_T[tail] / q[tail]) from the complete
    statistics (qk: s / tau gathered at K_r; l_r: log-sum-exp of s / tau outside K_r)."""
    log_qk, log_qt = qk - l_q[:, None], l_r - l_q
    p, pt = logp.exp(), tail.exp()
    kl = (p * (logp - log_qk)).sum(1) + torch.where(pt > 0, pt * (tail - log_qt), torch.zeros_like(pt))
    ratio = torch.where(pt > 0, (tail - log_qt).exp(), torch.zeros_like(pt))
    return tau * tau * kl, log_qk, p.sum(1) + pt, ratio


class ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, ht, wt, targets, ce_w, kd_w, o: LossOptions, cached=None):
        N, H = h.shape
        Vl = w.shape[0]
        V = int(o.vocab_size or Vl)
        tau, eps = float(o.temperature), float(o.label_smoothing)
        tp = _tp(o.tp_group)
        use_kd = (ht is not None or cached is not None) and o.lambda_kd != 0.0
        live = use_kd and cached is None  # the teacher head runs here
        from_cache = use_kd and cached is not None  # its top-k from the pair store instead
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros(N, H, dtype=torch.float32, device=h.device) if need_h else None
        grad_w = torch.zeros(Vl, H, dtype=torch.float32, device=w.device) if need_w else None
        ce_rows = torch.zeros(N, dtype=torch.float32, device=h.device)
        kd_rows = torch.zeros(N, dtype=torch.float32, device=h.device)
        R, C = max(1, int(o.chunk_rows)), max(1, int(o.chunk_vocab))
        single = Vl <= C  # one vocabulary chunk: keep its logits for the gradient sweep
        local_t = targets.long() - int(o.vocab_start)

        for r0 in range(0, N, R):
            r1 = min(N, r0 + R)
            hr = h[r0:r1]
            htr = ht[r0:r1] if live else None
            n = r1 - r0
            # running log-sum-exp of s, s/tau, t/tau over vocabulary chunks; a_t = E_{p_T}[t/tau - s/tau]
            l_s = torch.full((n,), -float("inf"), device=h.device)
            l_q, l_t = l_s.clone(), l_s.clone()
            a_t, sum_s, tgt = (torch.zeros(n, device=h.device) for _ in range(3))
            if from_cache:  # cached: s/tau at the top-k ids, log-sum-exp of s/tau outside them
                ids_l = cached[0][r0:r1].long() - int(o.vocab_start)
                qk = torch.zeros(ids_l.shape, device=h.device)
                # l_t holds the outside-K log-sum-exp here, so the TP reduction below serves both teachers
            lt = local_t[r0:r1]
            kept = None
            for v0 in range(0, Vl, C):
                v1 = min(Vl, v0 + C)
                s = (hr @ w[v0:v1].t()).float()
                q = s / tau
                l_s = torch.logaddexp(l_s, torch.logsumexp(s, 1))
                l_q = torch.logaddexp(l_q, torch.logsumexp(q, 1))
                if eps:
                    sum_s += s.sum(1)
                inside = (lt >= v0) & (lt < v1)
                if inside.any():
                    idx = inside.nonzero(as_tuple=True)[0]
                    tgt[idx] += s[idx, lt[idx] - v0]
                t = None
                if from_cache:
                    rr, jj, cc = _in_chunk(ids_l, v0, v1)
                    qk[rr, jj] = q[rr, cc]
                    outside = q.clone()
                    outside[rr, cc] = -float("inf")
                    l_t = torch.logaddexp(l_t, torch.logsumexp(outside, 1))
                    del outside
                if live:
                    t = _teacher_logits(htr, wt, v0, v1, o)
                    lc = torch.logsumexp(t, 1)
                    a_c = torch.softmax(t, 1).mul_(t - q).sum(1)  # expectation under this chunk's softmax
                    l_new = torch.logaddexp(l_t, lc)
                    a_t = a_t * torch.exp(l_t - l_new) + a_c * torch.exp(lc - l_new)
                    l_t = l_new
                if single:
                    kept = (s, t)
                del q
            if tp > 1:  # vocabulary shards: combine the per-row statistics of all TP ranks
                ls = torch.stack([l_s, l_q, l_t if use_kd else l_s])
                mx = ls.clone()
                dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=o.tp_group)
                e = torch.exp(ls - mx)
                sums = torch.stack([e[0], e[1], e[2], a_t * e[2], sum_s, tgt])
                if from_cache:  # each cached id lives on one shard: the others add 0
                    sums = torch.cat([sums, qk.t()])
                dist.all_reduce(sums, group=o.tp_group)
                l_s, l_q, l_t = (mx + torch.log(sums[:3])).unbind(0)
                a_t = sums[3] / sums[2]
                sum_s, tgt = sums[4], sums[5]
                if from_cache:
                    qk = sums[6:].t()
            ce_rows[r0:r1] = (1 - eps) * (l_s - tgt) + (eps * (l_s - sum_s / V) if eps else 0.0)
            if live:
                kd_rows[r0:r1] = tau * tau * (a_t - l_t + l_q)
            elif from_cache:
                logp, tail = cached[1][r0:r1].float(), cached[2][r0:r1].float()
                kd_rows[r0:r1], log_qk, P, ratio = _grouped_kd(qk, l_t, l_q, logp, tail, tau)
            if not (need_h or need_w):
                continue
            c_ce = (o.lambda_ce * ce_w[r0:r1].float())[:, None]
            c_kd = (o.lambda_kd * tau * kd_w[r0:r1].float())[:, None] if use_kd else None
            hr32 = hr.float()
            for v0 in range(0, Vl, C):
                v1 = min(Vl, v0 + C)
                if single:
                    s, t = kept
                else:
                    s = (hr @ w[v0:v1].t()).float()
                    t = _teacher_logits(htr, wt, v0, v1, o) if live else None
                # in place where possible: these buffers are [rows, vocab chunk]
                gq = (s / tau).sub_(l_q[:, None]).exp_().mul_(c_kd) if use_kd else None
                if from_cache:  # the grouped KL's gradient (module docstring)
                    gq.mul_(P[:, None] - ratio[:, None])
                    rr, jj, cc = _in_chunk(ids_l, v0, v1)
                    gq[rr, cc] += c_kd[rr, 0] * (ratio[rr] * log_qk[rr, jj].exp() - logp[rr, jj].exp())
                g = s.sub_(l_s[:, None]).exp_()
                if eps:
                    g.sub_(eps / V)
                g.mul_(c_ce)
                inside = (lt >= v0) & (lt < v1)
                if inside.any():
                    idx = inside.nonzero(as_tuple=True)[0]
                    g[idx, lt[idx] - v0] -= (1 - eps) * c_ce[idx, 0]
                if live:
                    g.add_(gq).sub_(t.sub_(l_t[:, None]).exp_().mul_(c_kd))
                elif from_cache:
                    g.add_(gq)
                del gq
                # addmm_ accumulates in place: no [V_chunk, H] temporary per row chunk
                if need_h:
                    grad_h[r0:r1].addmm_(g, w[v0:v1].float())
                if need_w:
                    grad_w[v0:v1].addmm_(g.t(), hr32)
            kept = None
        if need_h and tp > 1:
            dist.all_reduce(grad_h, group=o.tp_group)
        ce = (ce_rows * ce_w.float()).sum()
        kd = (kd_rows * kd_w.float()).sum() if use_kd else torch.zeros((), device=h.device)
        total = o.lambda_ce * ce + o.lambda_kd * kd
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.dtypes = (h.dtype, w.dtype)
        ctx.mark_non_differentiable(ce, kd)
        return total, ce, kd

    @staticmethod
    def backward(ctx, g_total, _g_ce, _g_kd):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * g_total).to(ctx.dtypes[0]) if grad_h is not None else None
        gw = (grad_w * g_total).to(ctx.dtypes[1]) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None


def kd_loss(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, ce_weight: torch.Tensor, *,
            teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
            kd_weight: Optional[torch.Tensor] = None, teacher_topk: Optional[tuple] = None,
            **options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows form: hidden [N, H], head_weight [V_local, H] (this rank's vocabulary shard), targets [N]
    (global ids), ce_weight [N]; teacher_hidden [N, Ht] row-aligned with the student rows,
    teacher_weight [V_local, Ht] (same shard), kd_weight [N]; or, instead of the teacher head,
    ``teacher_topk`` = (ids [N, k] global, log-probs at tau [N, k], tail log-mass [N]), row-aligned
    (module docstring). Returns (total, ce, kd): ``total`` carries the gradient; ``ce`` and ``kd``
    are the weighted sums, detached (for logging)."""
    o = LossOptions(**options)
    if kd_weight is None or (teacher_hidden is None and teacher_topk is None):
        teacher_hidden = teacher_weight = teacher_topk = None
        kd_weight = torch.zeros_like(ce_weight)
    elif teacher_topk is not None:
        if teacher_hidden is not None:
            raise ValueError("give the teacher either as hidden states + head or as its cached top-k, not both")
    elif teacher_weight is None or teacher_weight.shape[0] != head_weight.shape[0]:
        raise ValueError(f"teacher head shard {None if teacher_weight is None else tuple(teacher_weight.shape)} does not "
                         f"match the student's vocabulary shard {tuple(head_weight.shape)}")
    return ChunkedHeadLoss.apply(hidden, head_weight, teacher_hidden, teacher_weight, targets, ce_weight, kd_weight, o,
                                 teacher_topk)


def row_weights(ce_mask: torch.Tensor, kd_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """[B, T] masks -> per-row weights [B*T]. A bool ``ce_mask`` gives a token mean; a float one is
    taken as the weights themselves (e.g. Eq. 32's per-sequence normalisation). KD (a token mean
    over ``kd_mask``) pairs student position t with the teacher's prediction at t - 1, so
    position 0 never carries KD."""
    if ce_mask.dtype == torch.bool:
        ce_w = ce_mask.float() / ce_mask.sum().clamp(min=1)
    else:
        ce_w = ce_mask.float()
    kd_w = None
    if kd_mask is not None:
        kd_mask = kd_mask.clone()
        kd_mask[:, 0] = False
        kd_w = kd_mask.float() / kd_mask.sum().clamp(min=1)
        kd_w = kd_w.reshape(-1)
    return ce_w.reshape(-1), kd_w


def shift_teacher(teacher_hidden: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] -> [B, T, ...] with row t holding the teacher's value at t - 1 (row 0: zeros;
    KD never weights it)."""
    return torch.cat([torch.zeros_like(teacher_hidden[:, :1]), teacher_hidden[:, :-1]], dim=1)


def sequence_loss(hidden: torch.Tensor, tokens: torch.Tensor, ce_mask: torch.Tensor, head_weight: torch.Tensor, *,
                  teacher_hidden: Optional[torch.Tensor] = None, teacher_weight: Optional[torch.Tensor] = None,
                  kd_mask: Optional[torch.Tensor] = None, teacher_topk: Optional[tuple] = None, **options):
    """Batch form: hidden [B, T, H], tokens [B, T], ce_mask [B, T] (bool: positions to score, token
    mean; float: per-position weights),
    teacher_hidden [B, T, Ht] (the causal teacher run on ``tokens``), kd_mask [B, T] bool; or
    ``teacher_topk`` = (ids [B, T, k], log-probs [B, T, k], tail [B, T]) cached per teacher
    position (unshifted, as ``models.teacher.topk_logprobs`` stores them)."""
    B, T, H = hidden.shape
    has_teacher = teacher_hidden is not None or teacher_topk is not None
    ce_w, kd_w = row_weights(ce_mask, kd_mask if has_teacher else None)
    th = topk = None
    if teacher_hidden is not None:
        th = shift_teacher(teacher_hidden).reshape(B * T, -1)
    if teacher_topk is not None:  # teacher position t-1 predicts token t, as for the live teacher
        ids, logp, tail = (shift_teacher(x) for x in teacher_topk)
        topk = (ids.reshape(B * T, -1), logp.reshape(B * T, -1), tail.reshape(B * T))
    return kd_loss(hidden.reshape(B * T, H), head_weight, tokens.reshape(-1), ce_w, teacher_hidden=th,
                   teacher_weight=teacher_weight, kd_weight=kd_w, teacher_topk=topk, **options)


def naive_sequence_loss(student_logits: torch.Tensor, tokens: torch.Tensor, ce_mask: torch.Tensor, *,
                        teacher_logits: Optional[torch.Tensor] = None, kd_mask: Optional[torch.Tensor] = None,
                        temperature: float = 2.0, label_smoothing: float = 0.0, lambda_ce: float = 1.0,
                        lambda_kd: float = 1.0, teacher_topk: Optional[int] = None):
    """The same loss from full fp32 logits [B, T, V] (reference for tests and the benchmark baseline).
    ``teacher_topk`` = k: KD is the grouped KL of the cached teacher (module docstring), computed
    here directly from its definition (student tail = 1 - the sum of its top-k probabilities)."""
    s = student_logits.float()
    ce_tok = F.cross_entropy(s.transpose(1, 2), tokens.long(), reduction="none", label_smoothing=label_smoothing)
    ce = (ce_tok * ce_mask).sum() / ce_mask.sum().clamp(min=1)
    kd = torch.zeros((), device=s.device)
    if teacher_logits is not None and kd_mask is not None:
        tau = temperature
        t = teacher_logits.float()[:, :-1] / tau  # teacher position t-1 predicts token t
        log_q = F.log_softmax(s[:, 1:] / tau, -1)
        log_p = F.log_softmax(t, -1)
        if teacher_topk is not None:
            from ..models.teacher import topk_from_logits

            ids, log_pk, log_pt = topk_from_logits(t * tau, teacher_topk, tau)
            log_p = torch.cat([log_pk, log_pt[..., None]], -1)
            qk = log_q.exp().gather(-1, ids.long())
            log_q = torch.cat([qk.log(), torch.log1p(-qk.sum(-1, keepdim=True))], -1)
        p = log_p.exp()
        kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1) * tau * tau
        m = kd_mask[:, 1:].float()
        kd = (kl * m).sum() / m.sum().clamp(min=1)
    return lambda_ce * ce + lambda_kd * kd, ce, kd
