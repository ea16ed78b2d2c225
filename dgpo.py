"""dgpo.py: the losses of DGPO (docs/method.md §4), as small pure functions of tensors and masks.

What it does: GRPO group advantages, the PPO clipped surrogate, the selective teacher KL term that
makes GRPO into DGPO, the paper's reward-penalty variant, the cold-start distillation loss, and the
memory-bounded log-softmax kernels they all stand on (token log-probs, exact KL, entropy).
What it does not: load models or data, sample, or decide anything about DDP. Every loss takes a
`normaliser` so the caller can pass global counts; this file never talks to other processes.

The RL objective (dgpo_loss):  L = L_clip(θ) + β · aggregate(1[EM_i = 0] · KL_t(π_θ‖π_T), m),
with KL_t exact over the vocabulary by default. As a sampled loss use k2, not k3: k3's gradient
is the FORWARD KL's (derivation in dgpo_loss).

Conventions. Tensors are aligned: logits[:, t] scores tokens[:, t] (the caller shifts once). Masks
m (B, T) are explicit 0/1 tensors, 1 on tokens the student sampled. Per-sequence values (EM) are (B,);
advantages are (B,) (one per rollout, broadcast over its tokens) or (B, T) (one per token). π_θ
student, π_old the policy that sampled, π_T teacher. Sampling temperature τ: the caller passes logits
already divided by τ — the student's, the old policy's and the teacher's alike — so every π in this
file is the distribution the rollout sampled from (softmax(z / τ)), and ratios, KL estimates and
penalties refer to the policy that generated the tokens.

    import dgpo
    logp = dgpo.token_logprobs(student_logits, tokens)                            # (B, T)
    adv = dgpo.group_advantages(em.float(), group_ids)                            # (B,)
    loss, metrics = dgpo.dgpo_loss(logp, old_logp, adv, em, mask,
                                   student_logits=student_logits, teacher_logits=teacher_logits)
    loss.backward()
"""
import torch
from torch.autograd.function import once_differentiable

AGG_MODES = ("token-mean", "seq-mean-token-mean", "token-sum-norm", "micro-token-mean")


# ----------------------------------------------------------------------------------------------
# Memory-bounded vocabulary kernels. Never a (B, T, V) fp32 tensor: each custom autograd Function
# keeps its input logits (in their own dtype) plus O(B·T) statistics, runs softmax/log_softmax on
# one chunk of rows at a time into fp32 work buffers reused across chunks, and recomputes them in
# backward. The only (B, T, V) tensor made is the gradient itself, in the logits' dtype.

# Elements per fp32 work buffer when chunk_size is None. CPU: 2M (8 MB) stays in cache and needs
# no fresh pages; a GPU would rather launch fewer, larger kernels (128 MB).
CHUNK_ELEMENTS = {"cpu": 2**21, "cuda": 2**25}


def _seqs(*logits):
    """(B, T, V) logits -> views (S, L, V) to iterate over: (1, B·T, V) when every input can be
    flattened without a copy, else (B, T, V) unchanged (e.g. logits[:, :-1]); never a copy."""
    try:
        return [x.view(1, -1, x.shape[-1]) for x in logits]
    except RuntimeError:
        return list(logits)


def _chunks(z, chunk_size, n_buffers=1):
    """Yield (r, buf_1, ..., buf_k): r = (s, slice of positions) picks C rows of z (S, L, V) and of
    any (S, L) statistic; the (C, V) work buffers are fp32 (fp64 for fp64 input) and shared by
    all chunks, so the loop allocates nothing. chunk_size = rows per chunk; None picks
    CHUNK_ELEMENTS // V.
    """
    n_seqs, length, vocab = z.shape
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS.get(z.device.type, 2**25) // vocab)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 row, got {chunk_size}")
    rows = max(1, min(chunk_size, length))      # an empty batch (length 0) yields no chunks
    buffers = [torch.empty(rows, vocab, dtype=_dtype(z), device=z.device)
               for _ in range(n_buffers)]
    for s in range(n_seqs):
        for start in range(0, length, rows):
            r = (s, slice(start, min(start + rows, length)))
            yield (r, *[b[: r[1].stop - start] for b in buffers])


def _dtype(z):
    """The compute dtype: fp32 for bf16/fp16/fp32 logits, fp64 for fp64."""
    return torch.promote_types(z.dtype, torch.float32)


def _stats(z):
    """An (S, L) buffer for per-position values of z (S, L, V), in the compute dtype."""
    return torch.empty(z.shape[:2], dtype=_dtype(z), device=z.device)


def _grad_like(logits):
    """A contiguous gradient in the logits' shape and dtype (the input may be a vocab slice).
    Backward returns this tensor itself, never a view of it, so autograd can add the gradients
    of two losses on the same logits in place instead of allocating a third (B, T, V) tensor."""
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _grad_rows(grad_z, r, buf):
    """Where to build a chunk of the gradient: in the gradient's own rows when it is already in
    the compute dtype (fp32 logits), else in the fp32 buffer, cast by `grad_z[r] = out` after
    (a no-op when out is grad_z[r])."""
    return grad_z[r] if grad_z.dtype == buf.dtype else buf


def _log_softmax(z, out):
    return torch.log_softmax(z, -1, dtype=out.dtype, out=out)      # (C, V) log π, upcast


def _softmax(z, out):
    return torch.softmax(z, -1, dtype=out.dtype, out=out)          # (C, V) π, upcast


def _softmax_lse(z, out):
    """π = softmax(z) written to out (C, V), and lse(z) = log Σ_v exp z_v (C,).
    The largest π_v is exp(max z − lse), so lse = max z − log max π: no second pass over V."""
    pi = _softmax(z, out)
    return pi, z.amax(-1).to(out.dtype) - pi.amax(-1).log()


class _TokenLogProb(torch.autograd.Function):
    """log π(y) = log_softmax(z)_y;   ∂ log π(y) / ∂z_v = 1[v = y] − π(v)."""

    @staticmethod
    def forward(ctx, logits, tokens, chunk_size):
        (z,) = _seqs(logits)                                       # (S, L, V) view
        y = tokens.reshape(z.shape[:2])[..., None]                 # (S, L, 1)
        logp = _stats(z)                                           # (S, L)
        for r, buf in _chunks(z, chunk_size):
            logp[r] = _log_softmax(z[r], buf).gather(1, y[r])[:, 0]   # (C,)
        ctx.save_for_backward(logits, tokens)
        ctx.chunk_size = chunk_size
        return logp.view(tokens.shape)                             # (B, T) fp32

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp):
        logits, tokens = ctx.saved_tensors
        (z,) = _seqs(logits)                                       # (S, L, V)
        y = tokens.reshape(z.shape[:2])[..., None]                 # (S, L, 1)
        g = grad_logp.reshape(z.shape[:2])[..., None]              # (S, L, 1)
        grad = _grad_like(logits)                                  # (B, T, V) logits dtype
        grad_z = grad.view(z.shape)                                # (S, L, V)
        for r, buf in _chunks(z, ctx.chunk_size):
            out = _grad_rows(grad_z, r, buf)                       # (C, V)
            _softmax(z[r], out).mul_(-g[r])                        # (C, V) −g·π
            grad_z[r] = out.scatter_add_(1, y[r], g[r])            # (C, V) + g·1[v = y]
        return grad, None, None


class _FullKL(torch.autograd.Function):
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v) = CE(p, q) − H(p),  p = softmax(a), q = softmax(b),
    CE(p, q) = lse(b) − Σ_v p_v b_v,  H(p) = lse(a) − Σ_v p_v a_v.  H(p) is returned too (no
    gradient): the policy entropy comes free with KL(π_θ‖π_T).
    ∂KL/∂a_v = p_v (log p_v − log q_v − KL),   ∂KL/∂b_v = q_v − p_v.
    """

    @staticmethod
    def forward(ctx, p_logits, q_logits, chunk_size):
        a, b = _seqs(p_logits, q_logits)                           # (S, L, V) views
        kl, ent, lse_a, lse_b = _stats(a), _stats(a), _stats(a), _stats(a)  # (S, L) each
        for r, p, buf in _chunks(a, chunk_size, n_buffers=2):
            _, lse_b[r] = _softmax_lse(b[r], buf)                  # (C,) q itself is not needed
            p, lse_a[r] = _softmax_lse(a[r], p)                    # (C, V), (C,)
            ent[r] = lse_a[r] - torch.mul(p, a[r], out=buf).sum(-1)            # (C,) H(p)
            kl[r] = lse_b[r] - torch.mul(p, b[r], out=buf).sum(-1) - ent[r]    # (C,) CE − H
        ctx.save_for_backward(p_logits, q_logits, lse_a, lse_b, kl)
        ctx.mark_non_differentiable(ent)
        ctx.chunk_size = chunk_size
        shape = p_logits.shape[:-1]
        return kl.view(shape), ent.view(shape)                     # (B, T), (B, T) fp32

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl, _grad_entropy):
        p_logits, q_logits, lse_a, lse_b, kl = ctx.saved_tensors
        a, b = _seqs(p_logits, q_logits)                           # (S, L, V)
        g = grad_kl.reshape(a.shape[:2])[..., None]                # (S, L, 1)
        need_a, need_b = ctx.needs_input_grad[:2]
        grad_a = _grad_like(p_logits) if need_a else None          # (B, T, V)
        grad_b = _grad_like(q_logits) if need_b else None          # (B, T, V)
        for r, p, buf in _chunks(a, ctx.chunk_size, n_buffers=2):
            _softmax(a[r], p)                                      # (C, V) p
            if need_a:  # g·p·(log p − log q − KL),  log p − log q = a − b − lse(a) + lse(b)
                out = _grad_rows(grad_a.view(a.shape), r, buf)     # (C, V)
                shift = (lse_a[r] - lse_b[r] + kl[r])[:, None]     # (C, 1)
                torch.sub(a[r], shift, out=out).sub_(b[r])         # (C, V) log p − log q − KL
                grad_a.view(a.shape)[r] = out.mul_(p).mul_(g[r])
            if need_b:  # g·(q − p)
                out = _grad_rows(grad_b.view(b.shape), r, buf)     # (C, V)
                grad_b.view(b.shape)[r] = _softmax(b[r], out).sub_(p).mul_(g[r])
        return grad_a, grad_b, None


class _Entropy(torch.autograd.Function):
    """H(π) = −Σ_v π_v log π_v = lse(z) − Σ_v π_v z_v;   ∂H/∂z_v = −π_v (log π_v + H)."""

    @staticmethod
    def forward(ctx, logits, chunk_size):
        (z,) = _seqs(logits)                                       # (S, L, V)
        ent, lse = _stats(z), _stats(z)                            # (S, L) each
        for r, pi in _chunks(z, chunk_size):
            pi, lse[r] = _softmax_lse(z[r], pi)                    # (C, V), (C,)
            ent[r] = lse[r] - pi.mul_(z[r]).sum(-1)                # (C,)
        ctx.save_for_backward(logits, lse, ent)
        ctx.chunk_size = chunk_size
        return ent.view(logits.shape[:-1])                         # (B, T) fp32

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ent):
        logits, lse, ent = ctx.saved_tensors
        (z,) = _seqs(logits)                                       # (S, L, V)
        g = grad_ent.reshape(z.shape[:2])[..., None]               # (S, L, 1)
        grad = _grad_like(logits)                                  # (B, T, V)
        grad_z = grad.view(z.shape)                                # (S, L, V)
        for r, pi, buf in _chunks(z, ctx.chunk_size, n_buffers=2):
            out = _grad_rows(grad_z, r, buf)                       # (C, V)
            torch.sub(z[r], (lse[r] - ent[r])[:, None], out=out)   # (C, V) log π + H
            grad_z[r] = out.mul_(_softmax(z[r], pi)).mul_(-g[r])   # −g·π·(log π + H)
        return grad, None


def _check_logits(fn, name, logits):
    if not torch.is_floating_point(logits) or logits.dim() != 3:
        raise ValueError(f"{fn}: `{name}` must be a float tensor (B, T, V), got "
                         f"{tuple(logits.shape)} {logits.dtype}")


def token_logprobs(logits, tokens, chunk_size=None):
    """log π(y_t | y_<t) = z_t[y_t] − log Σ_v exp z_t[v] for every position, in fp32.

    logits (B, T, V) in any float dtype, tokens (B, T) int with 0 <= y < V -> (B, T) fp32.
    chunk_size: positions per chunk; None = CHUNK_ELEMENTS // V (13 at V = 151,936 on CPU).
    Example: logits zeros(1, 1, 4), tokens [[2]] -> [[-1.3863]] (= log 1/4).

    Memory, measured (bench/bench_dgpo.py --memory and tests/test_dgpo.py, this CPU, peak RSS):
    V = 151,936, B·T = 4×1024, bf16 logits of 1.16 GiB (passed as logits[:, :-1]: no copy is
    made). Forward +0.06 GiB; forward + backward +1.21 GiB, of which 1.16 GiB is the bf16
    gradient autograd needs anyway. A full fp32 log-softmax would add 2.32 GiB in forward alone.
    Forward keeps only the logits; backward writes g·(onehot(y) − softmax(z)) chunk by chunk.
    """
    _check_logits("token_logprobs", "logits", logits)
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"token_logprobs: tokens {tuple(tokens.shape)} do not match logits "
                         f"{tuple(logits.shape)} (expected {tuple(logits.shape[:-1])})")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= logits.shape[-1]):
        raise ValueError(f"token_logprobs: token ids must be in [0, {logits.shape[-1]}), got "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")
    return _TokenLogProb.apply(logits, tokens.long(), chunk_size)


def _slice_vocab(fn, p_logits, q_logits, vocab_size):
    """Drop padding rows so both sides share the tokenizer's vocabulary [0, vocab_size)."""
    vp, vq = p_logits.shape[-1], q_logits.shape[-1]
    if vocab_size is None:
        if vp != vq:
            raise ValueError(f"{fn}: vocab sizes differ ({vp} vs {vq}); pass vocab_size= the "
                             f"tokenizer length to slice off padding rows")
        return p_logits, q_logits
    if not 0 < vocab_size <= min(vp, vq):
        raise ValueError(f"{fn}: vocab_size={vocab_size} must be in [1, min({vp}, {vq})]; "
                         f"a larger tokenizer than the logits is a genuine vocabulary mismatch")
    return p_logits[..., :vocab_size], q_logits[..., :vocab_size]


def full_kl(p_logits, q_logits, vocab_size=None, chunk_size=None):
    """KL(p‖q)_t = Σ_v p_t(v) (log p_t(v) − log q_t(v)),  p = softmax(p_logits), q likewise.

    Exact over the whole vocabulary at every position; the direction is the argument order:
    full_kl(student, teacher) = KL(π_θ‖π_T) (reverse, DGPO), full_kl(teacher, student) = KL(π_T‖π_θ)
    (forward, KD). Differentiable in both arguments (detach the teacher's). (B, T, V) x2 -> (B, T).
    vocab_size slices both to [0, vocab_size) when they differ by padding rows. Memory as in
    token_logprobs, per input.
    """
    return _kl_and_entropy("full_kl", p_logits, q_logits, vocab_size, chunk_size)[0]


def _kl_and_entropy(fn, p_logits, q_logits, vocab_size, chunk_size=None):
    """(KL(p‖q), H(p)), each (B, T); only the KL carries a gradient."""
    _check_logits(fn, "p_logits", p_logits)
    _check_logits(fn, "q_logits", q_logits)
    p_logits, q_logits = _slice_vocab(fn, p_logits, q_logits, vocab_size)
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"{fn}: shapes differ: {tuple(p_logits.shape)} vs "
                         f"{tuple(q_logits.shape)}")
    return _FullKL.apply(p_logits, q_logits, chunk_size)


def entropy(logits, chunk_size=None):
    """H_t = −Σ_v π_t(v) log π_t(v), chunked and differentiable. (B, T, V) -> (B, T) fp32."""
    _check_logits("entropy", "logits", logits)
    return _Entropy.apply(logits, chunk_size)


# ----------------------------------------------------------------------------------------------
# The one reduction.

def _bool_mask(fn, mask, shape):
    if mask.shape != shape:
        raise ValueError(f"{fn}: mask has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{fn}: mask must be 0/1 (or bool)")
        mask = mask.bool()
    return mask


def aggregate(values, mask, agg="token-mean", normaliser=None):
    """Reduce per-token values v (B, T) over the loss mask m (B, T) to a scalar.

        token-mean:           Σ_{i,t} m v / Σ_{i,t} m                       (or / normaliser)
        seq-mean-token-mean:  Σ_i [Σ_t m v / Σ_t m] / #{i : Σ_t m > 0}      (or / normaliser)
        token-sum-norm:       Σ_{i,t} m v / normaliser                      (normaliser required)
        micro-token-mean:     token-mean's formula on one micro-batch

    The first three are the loss_agg_mode values of later veRL releases; the veRL that Search-R1 pins
    has no such option and makes the fourth: each micro-batch's own token-mean
    (verl/trainer/ppo/core_algos.py, compute_policy_loss: masked_mean), divided by the number of
    micro-batches (verl/workers/actor/dp_actor.py:208 and 275-276) and averaged over ranks, so a step's
    loss is the mean over micro-batches and ranks of their token-means. Here the caller makes it by
    passing each micro-batch its own token count × the number of micro-batches as the normaliser
    (rl.micro_batch_settings); it equals token-mean when every micro-batch has as many loss tokens.

    normaliser replaces the batch's own denominator. Under DDP + gradient accumulation pass the
    GLOBAL count (loss tokens for token-mean, non-empty sequences for seq-mean-token-mean, or a
    constant such as B·T_max for token-sum-norm) to every micro-batch on every rank: the SUM of
    their losses is then exactly the whole-batch loss. DDP averages gradients over its W ranks,
    so pass global_count / W (or scale the loss by W) to get the whole-batch gradient.
    Masked entries are replaced by 0, not multiplied, so inf/NaN under the mask never leak in.
    All-masked -> 0, never NaN (a normaliser of 0 is allowed then).
    Example: v [[1, 2], [3, 9]], m [[1, 1], [1, 0]] -> token-mean 2.0, seq-mean-token-mean 2.25.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"aggregate: agg must be one of {AGG_MODES}, got {agg!r}")
    m = _bool_mask("aggregate", mask, values.shape)                  # (B, T) bool
    if isinstance(normaliser, (int, float)) and normaliser < 0:
        raise ValueError(f"aggregate: normaliser must be >= 0, got {normaliser}")
    if agg == "token-sum-norm" and normaliser is None:
        raise ValueError("aggregate: agg='token-sum-norm' needs a constant normaliser")
    v = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device))  # (B, T)

    def divide(total, count):   # count is a token/sequence count or the caller's normaliser
        den = count if normaliser is None else normaliser
        den = torch.as_tensor(den, dtype=total.dtype, device=total.device)
        return total / den.clamp(min=torch.finfo(total.dtype).tiny)   # 0 / 0 -> 0

    if agg == "seq-mean-token-mean":
        n_t = m.sum(-1)                                                # (B,)
        seq_means = v.sum(-1) / n_t.clamp(min=1)                       # (B,) empty rows -> 0
        return divide(seq_means.sum(), (n_t > 0).sum())
    return divide(v.sum(), m.sum())


# ----------------------------------------------------------------------------------------------
# Advantages and rewards.

def group_advantages(rewards, group_ids, eps=1e-6, scale=True):
    """GRPO: A_i = (R_i − mean_g R) / (std_g R + ε), g the group of i; std unbiased (N_g − 1).

    rewards (B,) float, group_ids (B,) int, any values in any order (one id per prompt instance,
    never a per-dataset index) -> (B,) in rewards' dtype. A group of one, or whose rewards are all
    equal, gets exactly 0. scale=False gives R_i − mean_g R (Dr. GRPO).
    Example: R [1, 0, 0, 0, 1, 1], ids [7, 7, 7, 3, 3, 5] -> [1.1547, −0.5773, −0.5773,
    −0.7071, 0.7071, 0].  Advantages must be computed on the whole batch, before any split.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"group_advantages: rewards and group_ids must both be (B,), got "
                         f"{tuple(rewards.shape)} and {tuple(group_ids.shape)}")
    if torch.is_floating_point(group_ids) or torch.is_complex(group_ids):
        raise ValueError(f"group_advantages: group_ids must be integers, got {group_ids.dtype}")
    out_dtype = rewards.dtype if torch.is_floating_point(rewards) else torch.float32
    r = rewards.double()                                            # (B,) exact-ish statistics
    _, g = torch.unique(group_ids, return_inverse=True)             # (B,) group index 0..G-1
    n_groups = int(g.max()) + 1 if g.numel() else 0
    n = torch.bincount(g, minlength=n_groups).double()              # (G,)
    mean = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, g, r) / n  # (G,)
    dev = r - mean[g]                                               # (B,)
    ss = torch.zeros_like(mean).index_add_(0, g, dev * dev)         # (G,)
    std = (ss / (n - 1).clamp(min=1)).sqrt()                        # (G,) unbiased
    hi = torch.full_like(mean, -torch.inf).scatter_reduce_(0, g, r, "amax")  # (G,)
    lo = torch.full_like(mean, torch.inf).scatter_reduce_(0, g, r, "amin")   # (G,)
    constant = (hi == lo)[g]                                        # (B,) singleton or all equal
    adv = dev / (std[g] + eps) if scale else dev                    # (B,)
    return torch.where(constant, torch.zeros_like(adv), adv).to(out_dtype)


def _rollout_weights(fn, em, teacher, batch):
    """w_i = 1[EM_i = 0] (selective, DGPO), 1 (uniform, ablation); (B,) float."""
    if teacher not in ("selective", "uniform"):
        raise ValueError(f"{fn}: teacher must be 'selective', 'uniform' or 'none', got {teacher!r}")
    if em.shape != (batch,):
        raise ValueError(f"{fn}: em must be (B,) = ({batch},), got {tuple(em.shape)}")
    if not ((em == 0) | (em == 1)).all():
        raise ValueError(f"{fn}: em must be 0/1 exact-match rewards")
    if teacher == "uniform":
        return torch.ones(batch, dtype=torch.float32, device=em.device)
    return (em == 0).float()


def teacher_kl_reward(old_logp, teacher_logp, em, mask, beta=0.001, teacher="selective"):
    """The official code's per-token penalty: r_t = −β · w_i · m_t · (log π_old(y_t) − log π_T(y_t))

    k1 estimate of KL(π_old‖π_T) on the sampled tokens, put in the REWARD (no gradient flows
    through it), w_i as in dgpo_loss. (B, T) x2, em (B,), mask (B, T) -> (B, T) fp32, detached.
    With GRPO, token_advantages(A, r, m) turns it into per-token advantages; with PPO it is part of
    the per-token reward that GAE reads.
    """
    B = old_logp.shape[0]
    if teacher_logp.shape != old_logp.shape:
        raise ValueError(f"teacher_kl_reward: teacher_logp {tuple(teacher_logp.shape)} vs "
                         f"old_logp {tuple(old_logp.shape)}")
    m = _bool_mask("teacher_kl_reward", mask, old_logp.shape)        # (B, T)
    if teacher == "none":
        return torch.zeros(old_logp.shape, dtype=torch.float32, device=old_logp.device)
    w = _rollout_weights("teacher_kl_reward", em, teacher, B)        # (B,)
    k1 = (old_logp - teacher_logp).detach().float()                  # (B, T)
    pen = -beta * w[:, None] * k1                                    # (B, T)
    return torch.where(m, pen, torch.zeros_like(pen))                # (B, T)


def reward_to_go(token_rewards, mask):
    """G_t = Σ_{s ≥ t} m_s r_s on sampled tokens (γ = 1), 0 elsewhere: what the rest of the rollout
    still collects from token t on. Observation and padding tokens carry no reward and are skipped.
    (B, T) x2 -> (B, T). Example: r [[1, 0, 2, 3]], m [[1, 1, 0, 1]] -> [[4, 3, 0, 3]].
    """
    m = _bool_mask("reward_to_go", mask, token_rewards.shape)          # (B, T)
    r = torch.where(m, token_rewards, torch.zeros_like(token_rewards))  # (B, T)
    to_go = r.flip(-1).cumsum(-1).flip(-1)                             # (B, T) Σ_{s ≥ t} r_s
    return torch.where(m, to_go, torch.zeros_like(to_go))


def token_advantages(advantages, token_rewards, mask):
    """GRPO with a per-token reward penalty (the paper's k1 penalty, teacher_kl_reward):

        A_{i,t} = A_i + Σ_{s ≥ t} m_s r_{i,s}       A_i the group-normalised EM advantage (B,)

    so a token is charged for the teacher disagreement from itself to the end of its rollout, not
    for what came before it. β is not normalised away (it would be if the penalty were summed into
    the sequence reward and z-scored with the group: in an all-wrong group that form only ranks
    rollouts, whatever β is, and gives every token of a rollout the same advantage).
    advantages (B,), token_rewards (B, T), mask (B, T) -> (B, T), 0 off the mask.
    """
    if advantages.shape != token_rewards.shape[:1] or token_rewards.dim() != 2:
        raise ValueError(f"token_advantages: advantages {tuple(advantages.shape)} and token_rewards "
                         f"{tuple(token_rewards.shape)} must be (B,) and (B, T)")
    to_go = reward_to_go(token_rewards.float(), mask)                  # (B, T)
    adv = advantages.float()[:, None] + to_go                          # (B, T)
    return torch.where(mask.bool(), adv, torch.zeros_like(adv))


# ----------------------------------------------------------------------------------------------
# PPO with GAE and a critic: the paper's own RL algorithm (docs/method.md §4).

def ppo_token_rewards(em, old_logp, teacher_logp, mask, beta=0.001, teacher="selective"):
    """The official run's per-token reward: the EM reward on the last sampled token of each rollout,
    plus the k1 teacher penalty on every sampled token of the wrong ones (teacher_kl_reward):

        r_t = EM_i · 1[t = last sampled token] − β · w_i · m_t · (log π_old(y_t) − log π_T(y_t))

    em (B,) 0/1, old_logp and teacher_logp (B, T), mask (B, T) -> (B, T) fp32, 0 off the mask.
    A rollout with no sampled token gets no reward at all. teacher="none": EM only.
    Example: em [1], mask [[1, 0, 1, 0]], no penalty -> [[0, 0, 1, 0]].
    """
    m = _bool_mask("ppo_token_rewards", mask, old_logp.shape)                  # (B, T)
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)          # (B, T)
    last = torch.where(m, positions, torch.full_like(positions, -1)).amax(-1)  # (B,) −1 if none
    at_last = positions == last[:, None]                                        # (B, T)
    r = torch.where(at_last & m, em.float()[:, None].expand_as(old_logp), torch.zeros((), device=m.device))
    return r.float() + teacher_kl_reward(old_logp, teacher_logp, em, m, beta, teacher)


def gae_advantages(token_rewards, values, mask, gamma=1.0, lam=1.0):
    """Generalised advantage estimation over the SAMPLED tokens of each row. Observation and padding
    tokens are part of the environment's transition: they carry neither reward nor value and are
    skipped, so the recursion links each sampled token to the next sampled one. With sampled
    positions t_1 < … < t_n of a row:

        δ_i = r_{t_i} + γ·V_{t_{i+1}} − V_{t_i}     (V_{t_{n+1}} = 0)
        A_i = δ_i + γλ·A_{i+1}                      (A_{n+1} = 0)
        returns = A + V

    token_rewards, values, mask (B, T) -> (advantages, returns), both (B, T) fp32, 0 off the mask.
    γ = λ = 1 (the paper's setting): A_i = Σ_{j ≥ i} r_{t_j} − V_{t_i}, the return-to-go minus the value.
    Example: r [[0, 9, 1]], V [[0.5, 7, 0.25]], m [[1, 0, 1]], γ = λ = 1 -> A [[0.5, 0, 0.75]].
    """
    m = _bool_mask("gae_advantages", mask, token_rewards.shape)                # (B, T)
    _check_same("gae_advantages", "token_rewards", token_rewards, values=values)
    r = token_rewards.detach().float()
    v = values.detach().float()
    zero = torch.zeros(r.shape[0], dtype=torch.float32, device=r.device)       # (B,)
    next_value, next_adv = zero, zero
    advantages = torch.zeros_like(r)                                           # (B, T)
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]                         # (B,)
        adv = delta + gamma * lam * next_adv                                   # (B,)
        here = m[:, t]
        advantages[:, t] = torch.where(here, adv, zero)
        next_value = torch.where(here, v[:, t], next_value)                    # skip unsampled tokens
        next_adv = torch.where(here, adv, next_adv)
    returns = torch.where(m, advantages + v, torch.zeros_like(v))
    return advantages, returns


def masked_whiten(values, mask, mean=None, var=None, eps=1e-8):
    """(x − mean) / sqrt(var + ε) on the masked entries, 0 elsewhere: veRL's default for GAE advantages.
    mean and var default to the masked entries' own (var unbiased); under DDP pass the global ones
    so every rank whitens alike. (B, T) x2 -> (B, T)."""
    m = _bool_mask("masked_whiten", mask, values.shape)
    x = values.float()
    if mean is None or var is None:
        n = m.sum()
        mean = torch.where(m, x, torch.zeros_like(x)).sum() / n.clamp(min=1)
        var = torch.where(m, (x - mean) ** 2, torch.zeros_like(x)).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(torch.as_tensor(var, dtype=x.dtype, device=x.device) + eps)
    return torch.where(m, out, torch.zeros_like(out))


def value_loss(values, old_values, returns, mask, clip=0.5, agg="token-mean", normaliser=None):
    """PPO's clipped value loss (the critic's), aggregated like the policy loss:

        V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
        ℓ_t    = ½ · max((V − R)², (V_clip − R)²)

    values (B, T) with grad, old_values and returns (B, T), mask (B, T) -> (loss, metrics
    {vf_loss, vf_clip_frac (the clipped branch was larger and pinned the gradient), value_mean,
    n_tokens}). clip=None: the plain ½(V − R)². Example: V 2, V_old 0, R 3, ε_v 0.5 -> V_clip 0.5,
    ℓ = ½ · max(1, 6.25) = 3.125, gradient 0.
    """
    _check_same("value_loss", "values", values, old_values=old_values, returns=returns)
    m = _bool_mask("value_loss", mask, values.shape)                          # (B, T)
    R = returns.detach().to(values.dtype)
    unclipped = (values - R) ** 2                                             # (B, T)
    if clip is None:
        per_token, clipped_larger = 0.5 * unclipped, torch.zeros_like(m)
    else:
        old = old_values.detach().to(values.dtype)
        v_clip = old + (values - old).clamp(-clip, clip)                      # (B, T)
        clipped = (v_clip - R) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clipped_larger = clipped > unclipped
    loss = aggregate(per_token, m, agg, normaliser)
    metrics = {"vf_loss": loss.item(), "vf_clip_frac": _mean(clipped_larger.float(), m),
               "value_mean": _mean(values, m), "n_tokens": int(m.sum())}
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# KL estimators on sampled tokens.

def kl_estimate(logp, ref_logp, kind):
    """Schulman's per-token estimates of KL(π‖ref) from y ~ π, with Δ = log π(y) − log ref(y):

        k1 = Δ        k2 = ½ Δ²        k3 = exp(−Δ) − 1 + Δ   ( = r − 1 − log r, r = ref/π )

    E_π[k1] = E_π[k3] = KL(π‖ref) (k3 ≥ 0, lower variance); k2 is biased in value. As LOSSES their
    gradients differ, see dgpo_loss. (B, T) x2 -> (B, T). Example: Δ = log 2 -> k1 0.6931,
    k2 0.2402, k3 0.1931.
    """
    delta = logp - ref_logp                                          # (B, T) log π − log ref
    if kind == "k1":
        return delta
    if kind == "k2":
        return 0.5 * delta * delta
    if kind == "k3":
        return torch.exp(-delta) - 1 + delta
    raise ValueError(f"kl_estimate: kind must be 'k1', 'k2' or 'k3', got {kind!r}")


# ----------------------------------------------------------------------------------------------
# Losses. Each returns (loss, metrics); metrics are Python floats over the local masked tokens
# plus n_tokens, so callers can weight them when reducing across ranks.

def _check_same(fn, ref_name, ref, **tensors):
    for name, t in tensors.items():
        if t.shape != ref.shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}, but {ref_name} has "
                             f"{tuple(ref.shape)}")


def _mean(values, mask):
    """Token-mean of a detached metric over mask, as a Python float (0.0 if empty)."""
    return aggregate(values.detach().float(), mask).item()


def _advantage_columns(fn, advantages, shape):
    """Advantages as (B, 1) (one per rollout) or (B, T) (one per token), detached."""
    if advantages.shape == shape[:1]:
        return advantages.detach()[:, None]
    if advantages.shape == shape:
        return advantages.detach()
    raise ValueError(f"{fn}: advantages must be (B,) = ({shape[0]},) or (B, T) = {tuple(shape)}, got "
                     f"{tuple(advantages.shape)}")


def policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2,
                agg="token-mean", normaliser=None, logits=None, entropy_coef=0.0):
    """PPO/GRPO clipped surrogate with asymmetric clipping and an optional entropy bonus.

        r_t = π_θ(y_t) / π_old(y_t) = exp(log π_θ − log π_old)
        ℓ_t = −min(r_t A_t, clip(r_t, 1 − ε_low, 1 + ε_high) A_t)
        L   = aggregate(ℓ, m) − c_H · aggregate(H(π_θ(·|y_<t)), m)

    logp (B, T) with grad, old_logp (B, T), advantages (B,) or (B, T) (A_t = A_i for every token of
    rollout i, or per token), mask (B, T) -> (loss, metrics). A token is clipped (zero gradient)
    when A > 0 and r > 1 + ε_high (clip_frac_high) or A < 0 and r < 1 − ε_low (clip_frac_low).
    approx_kl is k3 of KL(π_old‖π_θ) on the π_old samples, mean of (r − 1) − log r.
    entropy_coef c_H > 0 needs logits (B, T, V) and adds the bonus (differentiable); with logits and
    c_H = 0 the entropy is a metric only. Example: r = 1.5, A = 1, ε = 0.2 -> ℓ = −1.2, gradient 0.
    """
    terms, metrics = _policy_terms(logp, old_logp, advantages, mask, clip_low, clip_high, agg, normaliser,
                                   logits, entropy_coef, normaliser)
    return _sum_terms(terms), metrics


def _sum_terms(terms):
    """surrogate (+ entropy) (+ teacher), in that order: the loss, one scalar."""
    loss = terms["surrogate"]
    for name in ("entropy", "teacher"):
        if name in terms:
            loss = loss + terms[name]
    return loss


def _policy_terms(logp, old_logp, advantages, mask, clip_low, clip_high, agg, normaliser, logits,
                  entropy_coef, entropy_normaliser):
    """policy_loss's two terms apart, {"surrogate": aggregate(ℓ, m) / normaliser, "entropy":
    −c_H · aggregate(H, m) / entropy_normaliser (only when c_H > 0)}, and its metrics."""
    _check_same("policy_loss", "logp", logp, old_logp=old_logp)
    adv = _advantage_columns("policy_loss", advantages, logp.shape).to(logp.dtype)  # (B, 1) | (B, T)
    m = _bool_mask("policy_loss", mask, logp.shape)                      # (B, T)
    if entropy_coef < 0:
        raise ValueError(f"policy_loss: entropy_coef must be >= 0, got {entropy_coef}")
    if entropy_coef > 0 and logits is None:
        raise ValueError("policy_loss: entropy_coef > 0 needs logits for the entropy bonus")
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    log_ratio = torch.where(m, logp - old_logp.detach(), zero)           # (B, T) 0 off-mask
    ratio = torch.exp(log_ratio)                                         # (B, T) r_t
    surr = ratio * adv                                                   # (B, T) r A
    surr_clip = ratio.clamp(1 - clip_low, 1 + clip_high) * adv           # (B, T) clip(r) A
    per_token = -torch.minimum(surr, surr_clip)                          # (B, T) ℓ_t
    pg_loss = aggregate(per_token, m, agg, normaliser)
    terms = {"surrogate": pg_loss}
    ent = entropy(logits) if entropy_coef > 0 else None                  # (B, T) with grad
    if ent is not None:
        terms["entropy"] = -(entropy_coef * aggregate(ent, m, agg, entropy_normaliser))

    with torch.no_grad():
        high = (adv > 0) & (ratio > 1 + clip_high)                       # (B, T)
        low = (adv < 0) & (ratio < 1 - clip_low)                         # (B, T)
        metrics = {
            "pg_loss": pg_loss.item(),
            "clip_frac": _mean((high | low).float(), m),
            "clip_frac_low": _mean(low.float(), m),
            "clip_frac_high": _mean(high.float(), m),
            "approx_kl": _mean(ratio - 1 - log_ratio, m),
            "n_tokens": int(m.sum()),
        }
        if logits is not None:
            metrics["entropy"] = _mean(ent if ent is not None else entropy(logits), m)
    return terms, metrics


def dgpo_loss(logp, old_logp, advantages, em, mask, *, beta=0.001, teacher="selective",
              kl="full", student_logits=None, teacher_logits=None, teacher_logp=None,
              clip_low=0.2, clip_high=0.2, agg="token-mean", normaliser=None, vocab_size=None,
              entropy_coef=0.0, pg_normaliser=None):
    """DGPO: "reward if correct, mimic the teacher if wrong" (docs/method.md §4, GRPO form).

        L = L_clip(θ) − c_H · aggregate(H, m) + β · aggregate(w_i · KL_t(π_θ‖π_T), m, agg, normaliser)
        w_i = 1[EM_i = 0] (teacher="selective", DGPO) | 1 ("uniform", ablation) | no term ("none")

    The teacher term uses the SAME aggregation and normaliser as the surrogate, i.e. it is divided
    by all loss tokens of the batch, not by the wrong rollouts' tokens only: its scale follows β
    and does not jump with the fraction of wrong rollouts. Only loss-masked tokens of weighted
    rollouts receive gradient from it (exactly zero elsewhere). The visited prefixes are taken as
    given, as in every per-token KL penalty; "exact" below means exact at each visited position.
    pg_normaliser (None = normaliser) divides L_clip alone: with rollouts in the batch only for the
    teacher term (advantage 0, e.g. the constant groups that DAPO-style dynamic sampling keeps for
    it), the surrogate is then averaged over the rollouts that carry a policy gradient.

    kl="full" (default): KL_t = Σ_v π_θ(v)(log π_θ(v) − log π_T(v)) from student_logits and
      teacher_logits (B, T, V) (teacher detached, vocab_size slices padding rows).
    kl="k2" or "k3": sampled, from logp and teacher_logp = log π_T(y_t) (B, T). With y ~ π and
      Δ = log π(y) − log π_T(y), on one position:
        ∇k1 = ∇log π(y),                E_π[∇k1] = Σ_y ∇π(y) = 0: no signal (not offered).
        ∇k2 = Δ ∇log π(y),              E_π[∇k2] = Σ_y (log π − log π_T) ∇π = ∇KL(π‖π_T),
          since ∇KL(π‖π_T) = Σ_y ∇π (log π − log π_T) + Σ_y π ∇log π and the last sum is 0.
        ∇k3 = (1 − π_T(y)/π(y)) ∇log π(y), E_π[∇k3] = −Σ_y π_T ∇log π = ∇KL(π_T‖π): the FORWARD
          KL's gradient, although E_π[k3] is the reverse KL's value (a common misreading takes k3
          for the reverse-KL loss). "k3" stays selectable as a forward-KL pull (the two agree to
          first order near π = π_T); "k2" is the reverse-KL loss.
      Off-policy (later PPO epochs, y ~ π_old) both use sg(ρ)·k with ρ = π_θ(y)/π_old(y) and sg a
      stop-gradient: E_{π_old}[sg(ρ) ∇k] = Σ_y π_old (π/π_old) ∇k = E_π[∇k], so the results above
      hold for any π_old; on-policy ρ = 1 and nothing changes.

    logp, old_logp (B, T); advantages (B,) or (B, T); em (B,); mask (B, T) -> (loss, metrics).
    entropy_coef as in policy_loss (needs student_logits). Metrics add to
    policy_loss's: teacher_kl (mean KL over weighted loss tokens: exact for "full", the k3 value
    for sampled kinds), teacher_term (= β · the aggregated term), n_teacher_tokens, wrong_frac
    (fraction of rollouts with EM = 0), loss. dgpo_terms gives the terms apart.
    """
    terms, metrics = dgpo_terms(
        logp, old_logp, advantages, em, mask, beta=beta, teacher=teacher, kl=kl, student_logits=student_logits,
        teacher_logits=teacher_logits, teacher_logp=teacher_logp, clip_low=clip_low, clip_high=clip_high, agg=agg,
        normaliser=normaliser, vocab_size=vocab_size, entropy_coef=entropy_coef, pg_normaliser=pg_normaliser)
    loss = _sum_terms(terms)
    metrics["loss"] = loss.item()
    return loss, metrics


def dgpo_terms(logp, old_logp, advantages, em, mask, *, beta=0.001, teacher="selective",
               kl="full", student_logits=None, teacher_logits=None, teacher_logp=None,
               clip_low=0.2, clip_high=0.2, agg="token-mean", normaliser=None, vocab_size=None,
               entropy_coef=0.0, pg_normaliser=None):
    """dgpo_loss's terms apart, each a scalar with its gradient, and its metrics (without "loss"):
    {"surrogate": L_clip, "entropy": −c_H · aggregate(H, m) (only when c_H > 0), "teacher":
    β · aggregate(w_i · KL_t, m) (only when teacher != "none")}; dgpo_loss is their sum. Taking
    each term's gradient on its own shows which one moves the policy."""
    if teacher not in ("selective", "uniform", "none"):
        raise ValueError(f"dgpo_loss: teacher must be 'selective', 'uniform' or 'none', got "
                         f"{teacher!r}")
    if kl == "k1":
        raise ValueError("dgpo_loss: kl='k1' has zero expected gradient as a loss; use "
                         "teacher_kl_reward for the paper's k1 reward penalty, or kl='k2'")
    if kl not in ("full", "k2", "k3"):
        raise ValueError(f"dgpo_loss: kl must be 'full', 'k2' or 'k3', got {kl!r}")
    if beta < 0:
        raise ValueError(f"dgpo_loss: beta must be >= 0 (a negative β pushes away from the "
                         f"teacher), got {beta}")
    _check_same("dgpo_loss", "logp", logp, old_logp=old_logp)
    m = _bool_mask("dgpo_loss", mask, logp.shape)                        # (B, T)
    exact = teacher != "none" and kl == "full"
    if exact and (student_logits is None or teacher_logits is None):
        raise ValueError("dgpo_loss: kl='full' needs student_logits and teacher_logits")
    # with the exact KL the entropy comes free from _FullKL, unless the bonus needs its gradient
    metric_logits = None if exact and entropy_coef == 0 else student_logits
    terms, metrics = _policy_terms(logp, old_logp, advantages, m, clip_low, clip_high, agg,
                                   normaliser if pg_normaliser is None else pg_normaliser,
                                   metric_logits, entropy_coef, normaliser)
    metrics["wrong_frac"] = (em == 0).float().mean().item() if em.numel() else 0.0
    if teacher == "none":
        return terms, metrics
    w = _rollout_weights("dgpo_loss", em, teacher, logp.shape[0])[:, None]  # (B, 1) w_i

    if exact:   # KL(π_θ‖π_T) per position; H(π_θ) comes with it (see _FullKL)
        kl_t, ent = _kl_and_entropy("dgpo_loss", student_logits, teacher_logits.detach(),
                                    vocab_size)                          # (B, T), (B, T)
        if kl_t.shape != logp.shape:
            raise ValueError(f"dgpo_loss: logits give {tuple(kl_t.shape)} positions, logp has "
                             f"{tuple(logp.shape)}")
        metrics.setdefault("entropy", _mean(ent, m))
        kl_value = kl_t                                                  # (B, T)
    else:                                                                # "k2" or "k3"
        if teacher_logp is None:
            raise ValueError(f"dgpo_loss: kl={kl!r} needs teacher_logp = log π_T(y_t), (B, T)")
        _check_same("dgpo_loss", "logp", logp, teacher_logp=teacher_logp)
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        lp = torch.where(m, logp, zero)                                  # (B, T) 0 off-mask, so
        lt = torch.where(m, teacher_logp.detach(), zero)                 #   no inf/NaN gradients
        rho = torch.exp(lp - torch.where(m, old_logp, zero)).detach()    # (B, T) sg(π_θ/π_old)
        kl_t = rho * kl_estimate(lp, lt, kl)                             # (B, T)
        kl_value = kl_estimate(lp, lt, "k3").detach()                    # (B, T) value estimate

    teacher_term = aggregate(w * kl_t, m, agg, normaliser)               # scalar
    terms["teacher"] = beta * teacher_term
    with torch.no_grad():
        weighted = m & (w > 0)                                           # (B, T)
        metrics.update({
            "teacher_kl": _mean(kl_value, weighted),
            "teacher_term": beta * teacher_term.item(),
            "n_teacher_tokens": int(weighted.sum()),
        })
    return terms, metrics


def kd_loss(student_logits, teacher_logits, tokens, mask, lam=1.0, normaliser=None,
            vocab_size=None):
    """Cold start on the teacher's correct trajectories (docs/method.md §4):

        L_KD = token-mean over m of [ −log π_θ(y_t) + λ · KL(π_T(·|y_<t) ‖ π_θ(·|y_<t)) ]

    student_logits (B, T, Vs), teacher_logits (B, T, Vt), tokens (B, T) the teacher's tokens,
    mask (B, T) 1 on teacher-written tokens -> (loss, metrics {ce, kl, n_tokens, loss}).
    Vs and Vt may differ by padding rows: vocab_size (the tokenizer length, <= both) slices them;
    differing sizes without it, or a token id >= vocab_size under the mask, is a ValueError.
    The teacher is detached. normaliser as in aggregate (global token count under DDP).
    """
    _check_logits("kd_loss", "student_logits", student_logits)
    _check_logits("kd_loss", "teacher_logits", teacher_logits)
    student, teacher_ = _slice_vocab("kd_loss", student_logits, teacher_logits, vocab_size)
    V = student.shape[-1]
    if student.shape[:-1] != tokens.shape or teacher_.shape[:-1] != tokens.shape:
        raise ValueError(f"kd_loss: logits {tuple(student_logits.shape)} / "
                         f"{tuple(teacher_logits.shape)} do not match tokens {tuple(tokens.shape)}")
    m = _bool_mask("kd_loss", mask, tokens.shape)                        # (B, T)
    y = torch.where(m, tokens, torch.zeros_like(tokens))                 # (B, T) pads may be −100
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= V):
        raise ValueError(f"kd_loss: token ids under the mask must be in [0, {V}) (vocab_size), "
                         f"got [{int(y.min())}, {int(y.max())}]")
    ce = -token_logprobs(student, y)                                     # (B, T) −log π_θ(y_t)
    kl = full_kl(teacher_.detach(), student)                             # (B, T) KL(π_T‖π_θ)
    loss = aggregate(ce + lam * kl, m, "token-mean", normaliser)
    metrics = {"ce": _mean(ce, m), "kl": _mean(kl, m), "n_tokens": int(m.sum()),
               "loss": loss.item()}
    return loss, metrics
