"""Evaluation: memorization (strict, loose, Levenshtein, match length), quotes, perplexity, nDCG@k against a
reference, the position-perturbation stress test, and the memorized-set miner.

Entry points: :func:`evaluate` with an :class:`EvalConfig` (one results record per call) and
:func:`find_memorized` with a :class:`MinerConfig`.
"""

from .memorization import greedy_generate, memorization_metrics, score_record, summarize
from .miner import MinerConfig, find_memorized
from .ndcg import ndcg_at_k, ndcg_scores, reference_topk
from .perplexity import perplexity_metrics
from .perturbation import perturbation_metrics, perturbed_prompts
from .records import MemRecord, load_records
from .suite import EvalConfig, check_inputs, evaluate, flat_metrics, headline_metrics

__all__ = [
    "EvalConfig",
    "MemRecord",
    "MinerConfig",
    "check_inputs",
    "evaluate",
    "find_memorized",
    "flat_metrics",
    "greedy_generate",
    "headline_metrics",
    "load_records",
    "memorization_metrics",
    "ndcg_at_k",
    "ndcg_scores",
    "perplexity_metrics",
    "perturbation_metrics",
    "perturbed_prompts",
    "reference_topk",
    "score_record",
    "summarize",
]
