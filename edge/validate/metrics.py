"""Logit comparison metrics. numpy only: the device mode runs them on a Raspberry Pi without torch.

Each function takes the reference as stored in golden.npz (top-k logits and indices, logsumexp)
and the logits under test at the same positions. The KL divergence is computed over the
reference's top-k plus one tail bucket holding the rest of the mass: by the log-sum inequality
it is a LOWER bound of the full-vocabulary KLD.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


@dataclass
class Reference:
    """The fp32 reference at T positions: top-k logits (sorted, descending) and the full logsumexp."""

    topk_idx: np.ndarray  # (T, k) int
    topk_logit: np.ndarray  # (T, k) float32
    lse: np.ndarray  # (T,) logsumexp over the whole vocabulary

    @classmethod
    def from_logits(cls, logits: np.ndarray, k: int = 128, chunk: int = 64) -> Reference:
        """Rows are processed `chunk` at a time: a (T, 262144) array's temporaries would cost GBs."""
        if logits.shape[0] > chunk:
            parts = [cls.from_logits(logits[i : i + chunk], k, chunk) for i in range(0, logits.shape[0], chunk)]
            return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("topk_idx", "topk_logit", "lse")))
        idx = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
        vals = np.take_along_axis(logits, idx, axis=-1)
        order = np.argsort(-vals, axis=-1, kind="stable")
        idx, vals = np.take_along_axis(idx, order, -1), np.take_along_axis(vals, order, -1)
        lse = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
        return cls(idx.astype(np.int32), vals.astype(np.float32), lse.astype(np.float32))

    @property
    def topk_logp(self) -> np.ndarray:
        return self.topk_logit.astype(np.float64) - self.lse[:, None]


@dataclass
class Observed:
    """What the metrics need from the logits under test, per position, and nothing more.

    A device dumps this instead of its full logits (T x 262144 floats would be ~900 MB for the
    golden prompts): the logits at the reference's top-k ids, the logsumexp, its own argmax and
    top-5, and the logit of the next golden token.
    """

    at_ref_topk: np.ndarray  # (T, k) float32
    lse: np.ndarray  # (T,) float64
    argmax: np.ndarray  # (T,) int64
    top5: np.ndarray  # (T, 5) int64
    at_target: np.ndarray  # (T,) float32, NaN where there is no next token

    FIELDS = ("at_ref_topk", "lse", "argmax", "top5", "at_target")

    def logp_at_ref_topk(self) -> np.ndarray:
        return self.at_ref_topk.astype(np.float64) - self.lse[:, None]

    @classmethod
    def from_logits(cls, ref: Reference, logits: np.ndarray, targets: np.ndarray) -> Observed:
        logits = np.asarray(logits, dtype=np.float32)
        m = logits.max(-1, keepdims=True).astype(np.float64)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(-1))).astype(np.float64)
        valid = targets >= 0
        at_t = np.take_along_axis(logits, np.where(valid, targets, 0)[:, None], -1)[:, 0]
        return cls(
            np.take_along_axis(logits, ref.topk_idx.astype(np.int64), -1),
            lse,
            logits.argmax(-1).astype(np.int64),
            np.argpartition(-logits, 4, axis=-1)[:, :5].astype(np.int64),
            np.where(valid, at_t, np.nan).astype(np.float32),
        )


def bucket_kld(lp_k: np.ndarray, lq_k: np.ndarray) -> np.ndarray:
    """Per-position KLD(p || q) over k named ids plus one bucket for the rest of the vocabulary.

    lp_k, lq_k (T, k): the two distributions' log-probs at the same ids. By the log-sum inequality
    this is a lower bound of the full KLD, tight when the k ids carry nearly all of p's mass.
    """
    p_k = np.exp(lp_k)
    tail_p = np.clip(1.0 - p_k.sum(-1), 0.0, 1.0)
    tail_q = np.clip(1.0 - np.exp(lq_k).sum(-1), 1e-30, 1.0)
    tail = np.where(tail_p > 0, tail_p * (np.log(np.maximum(tail_p, 1e-30)) - np.log(tail_q)), 0.0)
    return np.maximum((p_k * (lp_k - lq_k)).sum(-1) + tail, 0.0)


def between(before: Observed, after: Observed) -> dict[str, np.ndarray]:
    """Per position, what one stage changed against the stage before it (not against the reference):
    KLD(before || after) over the reference's top-k ids plus a tail bucket, and whether the argmax moved.

    The pointwise view of "what lowering added": two stages can sit at the same mean KLD from the
    reference while disagreeing with each other at many positions.
    """
    return {
        "kld": bucket_kld(before.logp_at_ref_topk(), after.logp_at_ref_topk()),
        "same_top1": (before.argmax == after.argmax).astype(np.float64),
    }


def per_position(ref: Reference, obs: Observed, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position metrics of the logits under test (as Observed) against the reference.

    targets (T,): the next golden token at each position, -1 at the last.
    """
    lq_k = obs.logp_at_ref_topk()
    lp_k = ref.topk_logp  # (T, k)
    kld = bucket_kld(lp_k, lq_k)
    ref_top5 = ref.topk_idx[:, :5]
    overlap = np.array([len(set(a) & set(b)) / 5 for a, b in zip(obs.top5.tolist(), ref_top5.tolist(), strict=True)])
    lq_t = obs.at_target.astype(np.float64) - obs.lse
    hit = ref.topk_idx == np.where(targets >= 0, targets, -2)[:, None]
    lp_t = np.where(hit.any(-1), (lp_k * hit).sum(-1), np.nan)
    return {
        "kld": kld,
        "top1": (obs.argmax == ref.topk_idx[:, 0]).astype(np.float64),
        "top5_overlap": overlap,
        "max_abs_dlogit": np.abs(obs.at_ref_topk - ref.topk_logit).max(-1),
        # The reference's log-prob of the next token when it is in its top-k; otherwise unknown (NaN).
        "target_logp": lq_t,
        "target_logp_ref": lp_t,
    }


def kld_stats(kld: np.ndarray) -> dict[str, float]:
    """Positions, mean / p99 / max of per-position KLDs: the first columns of every report row."""
    return {
        "positions": int(kld.size),
        "mean_kld": float(kld.mean()),
        "p99_kld": float(np.percentile(kld, 99)),
        "max_kld": float(kld.max()),
    }


def summarize(pp: dict[str, np.ndarray]) -> dict[str, float]:
    """One row of the report: mean / p99 / max KLD, top-1, top-5 overlap, RMS dp, perplexity ratio, max |dlogit|."""
    row = kld_stats(pp["kld"]) | {
        "top1": float(pp["top1"].mean()),
        "top5_overlap": float(pp["top5_overlap"].mean()),
        "max_abs_dlogit": float(pp["max_abs_dlogit"].max()),
    }
    if "nonfinite" in pp:
        row["nonfinite_positions"] = int(pp["nonfinite"].sum())
    if "target_logp" in pp:
        ok = ~np.isnan(pp["target_logp"]) & ~np.isnan(pp["target_logp_ref"])
        if ok.any():
            lp, lq = pp["target_logp_ref"][ok], pp["target_logp"][ok]
            row["rms_dp"] = float(np.sqrt(np.mean((np.exp(lq) - np.exp(lp)) ** 2)))
            row["ppl_ratio"] = float(np.exp(np.mean(-lq)) / np.exp(np.mean(-lp)))
    return row


def full_kld(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Exact per-position KLD over the whole vocabulary, when both full logit arrays are at hand."""
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)
