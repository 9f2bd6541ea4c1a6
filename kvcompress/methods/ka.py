"""KA-Attention (METHODS.md section 2): attention that mixes past attention outputs instead of past values.

Per head, with P = softmax(causal(Q K^T / sqrt(hs))):

    A[n] = sum_{j<n} P[n, j] A[j] + P[n, n] V[n]        (A[0] = V[0])

The recurrence is linear in A: (I - L) A = diag(P) V with L = strict_lower(P), a unit-lower-triangular
system. `ka_attention` solves it exactly and in parallel over positions; `ka_attention_reference` is the
literal token loop, kept for tests.

Grouped K/V heads (GQA, `n_kv_head` < `n_head`): each K/V group keeps ONE A, the mean of its query heads' outputs,
and a head mixes its group's past A with its own probabilities:

    a_h[n] = sum_{j<n} P_h[n, j] Ā_g[j] + P_h[n, n] V_g[n],      Ā_g = mean over the group's heads h of a_h

Averaging the recurrence over the group gives (I - strict_lower(P̄_g)) Ā_g = diag(P̄_g) V_g with P̄_g the group
mean of P_h: one unit-lower-triangular solve per group, then each head's a_h from Ā_g (`ka_attention_grouped`).
So the KA cache keeps K and Ā per group, and for KA-Attention it is exact. With one head per group Ā = a (the
multi-head model exactly). The KA cache on a model trained with standard attention (report 000's lossy cache)
does the same: it keeps, per group, the mean of the group's attention outputs (through the adapter, if any).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvcompress.models.caches import LayerCache, Step, group_mean, grouped_matmul, register_cache, sdpa
from kvcompress.models.gpt_neox import Attention, Aux, register_attention

__all__ = [
    "KAAttention",
    "KACache",
    "ka_attention",
    "ka_attention_autograd",
    "ka_attention_grouped",
    "ka_attention_reference",
    "ka_probs",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, else the input dtype (fp32 / fp64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _causal_bias(T: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(T, T) additive mask: 0 on and below the diagonal, -inf above (cheaper than masked_fill on CPU)."""
    return torch.full((T, T), float("-inf"), device=device, dtype=dtype).triu_(1)


def ka_probs(q: Tensor, k: Tensor) -> Tensor:
    """Causal attention probabilities P (B, nh, T, T) in the compute dtype; q (B, nh, T, hs), k (B, g, T, hs)."""
    ct = _compute_dtype(q.dtype)
    T, hs = q.shape[-2], q.shape[-1]
    scores = grouped_matmul(q.to(ct) * (1.0 / math.sqrt(hs)), k.to(ct).mT)  # (B, nh, T, T); scale the small side
    return scores.add_(_causal_bias(T, q.device, ct)).softmax(dim=-1)


def _solve_unit_lower(neg_l: Tensor, rhs: Tensor) -> Tensor:
    """X with (I + strict_lower(neg_l)) X = rhs; neg_l (..., T, T), rhs (..., T, hs).

    Solved in the transposed right-hand form X^T (I + N)^T = rhs^T, which saves LAPACK's layout copies on CPU.
    """
    return torch.linalg.solve_triangular(neg_l.mT, rhs.mT, upper=True, left=False, unitriangular=True).mT


def _solve_unit_lower_transposed(neg_l: Tensor, rhs: Tensor) -> Tensor:
    """X with (I + strict_lower(neg_l))^T X = rhs, i.e. X^T (I + N) = rhs^T."""
    return torch.linalg.solve_triangular(neg_l, rhs.mT, upper=False, left=False, unitriangular=True).mT


class _KAFunction(torch.autograd.Function):
    """Solve (I - L) A = diag(P) V, with a hand-written backward (fewer full (T, T) passes than autograd's)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # all (B, nh, T, hs), compute dtype
        neg_p = ka_probs(q, k).neg_()  # N = -P, (B, nh, T, T); the solves ignore its diagonal
        diag = -neg_p.diagonal(dim1=-2, dim2=-1)  # P[n, n], (B, nh, T)
        a = _solve_unit_lower(neg_p, diag.unsqueeze(-1) * v).contiguous()  # (B, nh, T, hs)
        ctx.save_for_backward(q, k, v, neg_p, diag, a)
        ctx.scale = 1.0 / math.sqrt(q.shape[-1])
        return a

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.autocast(grad_a.device.type, enabled=False):
            return _KAFunction._backward(ctx, grad_a.to(ctx.saved_tensors[0].dtype))

    @staticmethod
    def _backward(ctx, grad_a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, neg_p, diag, a = ctx.saved_tensors
        # A = (I - L)^{-1} R with R = diag(P) V: dR = (I - L)^{-T} dA.
        grad_r = _solve_unit_lower_transposed(neg_p, grad_a)  # (B, nh, T, hs)
        grad_v = diag.unsqueeze(-1) * grad_r
        # dP: strict lower = dR A^T, diagonal = <dR[n], V[n]>; the upper part meets P = 0 below.
        grad_p = grad_r @ a.mT  # (B, nh, T, T)
        grad_p.diagonal(dim1=-2, dim2=-1).copy_((grad_r * v).sum(-1))
        # Softmax backward: dS = P (dP - rowsum(P dP)), and by the recurrence rowsum(P dP)[n] = <dR[n], A[n]>.
        row = (grad_r * a).sum(-1, keepdim=True)  # (B, nh, T, 1)
        grad_s = grad_p.sub_(row).mul_(neg_p)  # = -dS since N = -P
        grad_q = (grad_s @ k).mul_(-ctx.scale)
        grad_k = (grad_s.mT @ q).mul_(-ctx.scale)
        return grad_q, grad_k, grad_v


def ka_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Exact, position-parallel KA-Attention; q, k, v (B, nh, T, hs) -> A (B, nh, T, hs).

    Solves (I - strict_lower(P)) A = diag(P) V with one batched unit-lower-triangular solve in fp32
    (fp64 stays fp64); differentiable in q, k, v.
    """
    ct = _compute_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):  # under autocast too: the solve stays in fp32
        return _KAFunction.apply(q.to(ct), k.to(ct), v.to(ct)).to(v.dtype)


def ka_attention_grouped(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """KA-Attention with grouped K/V (module docstring): q (B, nh, T, hs), k, v (B, g, T, hs) -> a (B, nh, T, hs).

    One solve per group for Ā (on the group mean of P), then each head's outputs; differentiated by autograd.
    """
    ct = _compute_dtype(q.dtype)
    B, nh, T, hs = q.shape
    g = k.shape[1]
    with torch.autocast(q.device.type, enabled=False):
        p = ka_probs(q, k)  # (B, nh, T, T)
        a_bar = _group_solve(p, v.to(ct), g)  # (B, g, T, hs)
        return _heads_from_group(p, a_bar, v.to(ct)).to(v.dtype)


def _group_solve(p: Tensor, v: Tensor, g: int) -> Tensor:
    """Ā (B, g, T, hs) with (I - strict_lower(P̄)) Ā = diag(P̄) V, P̄ the group mean of p (B, nh, T, T)."""
    p_bar = group_mean(p, g)
    rhs = p_bar.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * v
    return torch.linalg.solve_triangular(-p_bar, rhs, upper=False, unitriangular=True)


def _heads_from_group(p: Tensor, a_bar: Tensor, v: Tensor) -> Tensor:
    """a_h = strict_lower(P_h) Ā_g + diag(P_h) V_g per query head: p (B, nh, T, T), a_bar and v (B, g, T, hs)."""
    B, nh, T, _ = p.shape
    g, hs = a_bar.shape[1], a_bar.shape[-1]
    mixed = grouped_matmul(p.tril(-1), a_bar)  # (B, nh, T, hs)
    diag = p.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # (B, nh, T, 1)
    own = (diag.view(B, g, nh // g, T, 1) * v.unsqueeze(2)).view(B, nh, T, hs)
    return mixed + own


def ka_attention_autograd(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Same solve as `ka_attention`, differentiated by autograd (slower; a cross-check for tests)."""
    ct = _compute_dtype(q.dtype)
    p = ka_probs(q, k)  # (B, nh, T, T)
    rhs = p.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * v.to(ct)  # (B, nh, T, hs)
    # Unit diagonal is implied (unitriangular), so only -L's strict lower part is read.
    return torch.linalg.solve_triangular(-p, rhs, upper=False, unitriangular=True).to(v.dtype)


def ka_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The recurrence, token by token (slow; for tests). Shapes as `ka_attention` (or grouped K/V: each group's
    past is the mean of its heads' outputs)."""
    ct = _compute_dtype(q.dtype)
    B, nh, T, hs = q.shape
    g = k.shape[1]
    p = ka_probs(q, k)  # (B, nh, T, T)
    vc = v.to(ct).repeat_interleave(nh // g, dim=1)  # (B, nh, T, hs)
    outs: list[Tensor] = []  # the group means Ā[j], repeated per head
    heads: list[Tensor] = []
    for n in range(T):
        a_n = p[..., n, n, None] * vc[..., n, :]  # (B, nh, hs)
        for j in range(n):
            a_n = a_n + p[..., n, j, None] * outs[j]
        heads.append(a_n)
        outs.append(group_mean(a_n[:, :, None], g)[:, :, 0].repeat_interleave(nh // g, dim=1))
    return torch.stack(heads, dim=-2).to(v.dtype)


@register_attention("ka")
class KAAttention(Attention):
    """Standard attention's parameters; the output mixes past outputs A instead of past values V."""

    cache_layout: ClassVar[str] = "ka"
    native_cache: ClassVar[str] = "ka"

    def attend(self, q: Tensor, k: Tensor, v: Tensor, aux: Aux | None = None) -> Tensor:
        return ka_attention(q, k, v) if self.n_rep == 1 else ka_attention_grouped(q, k, v)


@register_cache("ka", layouts=("ka", "kv"))
class KACache(LayerCache):
    """The KA cache: keys and past attention outputs in place of values, (B, n_kv_head, max_len, hs) each
    (with grouped heads, one A per group: the mean of its heads' outputs; the module docstring).

    A new token attends over `[V'(A[0]), ..., V'(A[t-1]), V[t]]` where `V' = adapter` (identity when
    None). The adapter is applied once, when A[t] is made, and the cache keeps `V'(A[t])`: the same
    bytes as keeping A[t], and the past never has to be re-adapted at each step. For KA-Attention
    (no adapter) this is exact; for a model trained with standard attention it is the report-000 cache.
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_head: int,
        head_size: int,
        adapter: Callable[[Tensor], Tensor] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(batch_size, max_len)
        shape = (batch_size, n_head, max_len, head_size)
        self.adapter = adapter
        self.buffers = {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "a": torch.zeros(shape, device=device, dtype=dtype),
        }

    @classmethod
    def build(cls, attn: Any, batch_size: int, max_len: int, device=None, dtype=None, **kwargs: Any) -> KACache:
        adapter = getattr(attn, "ka_adapter", None)  # a module given to the cache, not a call into the attention
        return cls(batch_size, max_len, attn.n_kv_head, attn.head_size, adapter, device=device, dtype=dtype)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        if q.shape[-2] > 1 and self.adapter is None:
            return self.attend_parallel(q, k, v, step)
        return self.attend_loop(q, k, v, step)  # decode (T == 1) or a nonlinear adapter

    def attend_loop(self, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        """Token by token: each output becomes a value for the tokens after it (one SDPA per token)."""
        outputs = []
        for t in range(q.shape[-2]):
            one = Step(step.slots[t : t + 1], step.mask[:, :, t : t + 1], step.positions[:, t : t + 1], step.n_read)
            self.write("k", k[:, :, t : t + 1], one)
            self.write("a", v[:, :, t : t + 1], one)  # own V at the diagonal
            a_t = sdpa(q[:, :, t : t + 1], self.read("k", one), self.read("a", one), attn_mask=one.mask)
            a_group = group_mean(a_t, self.buffers["a"].shape[1])  # (B, g, 1, hs): a_t itself without groups
            self.write("a", a_group if self.adapter is None else self.adapter(a_group), one)
            outputs.append(a_t)
        return torch.cat(outputs, dim=-2)

    def attend_parallel(self, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        """Exact prefill of T new tokens at once (adapter=None only): one unit-lower-triangular solve.

        With P over [past, new] positions: (I - strict_lower(P_nn)) A_new = P_np A_past + diag(P_nn) V_new.
        Computed in fp32 for half dtypes (fp64 stays fp64). Eager only (it reads the first `n_read` slots).
        """
        if self.adapter is not None:
            raise ValueError("parallel KA prefill is exact only without an adapter (the adapter is nonlinear)")
        T = q.shape[-2]
        assert step.n_read is not None  # eager: the first n_read slots
        past = step.n_read - T
        self.write("k", k, step)
        ct = _compute_dtype(q.dtype)
        g = k.shape[1]
        scores = grouped_matmul(q.to(ct) * q.shape[-1] ** -0.5, self.read("k", step).to(ct).mT)  # (B, nh, T, n)
        p_heads = scores.masked_fill_(~step.mask, float("-inf")).softmax(dim=-1)
        p = group_mean(p_heads, g)  # (B, g, T, past + T): P itself without groups
        p_new = p[..., past:]  # (B, g, T, T), lower triangular
        rhs = p_new.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * v.to(ct)  # (B, g, T, hs)
        a_past = self.buffers["a"][:, :, :past].to(ct)
        if past:
            rhs = rhs + p[..., :past] @ a_past
        # Unit diagonal implied: only the strict lower part of -P_nn is read.
        a_new = torch.linalg.solve_triangular(-p_new, rhs, upper=False, unitriangular=True)
        self.write("a", a_new, step)
        if g == q.shape[1]:
            return a_new.to(q.dtype)
        heads = _heads_from_group(p_heads[..., past:], a_new, v.to(ct))  # each head from its group's Ā
        if past:
            heads = heads + grouped_matmul(p_heads[..., :past], a_past)
        return heads.to(q.dtype)


@register_cache("ka_plain", layouts=("kv",))
class KAPlainCache(KACache):
    """The KA cache with V' = A even where the layer has an adapter (report 000's "no adapter" row)."""

    @classmethod
    def build(cls, attn: Any, batch_size: int, max_len: int, device=None, dtype=None, **kwargs: Any) -> KACache:
        return cls(batch_size, max_len, attn.n_kv_head, attn.head_size, None, device=device, dtype=dtype)
