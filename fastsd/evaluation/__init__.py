"""What a model scores and where its learning signal falls.

    metrics.py    `evaluate` (entry point): avg@k, pass@k, maj@k over k samples per held-out question
    advantage.py  the per-token advantage A_t and the segment of a rollout each token falls in
    report.py     `fastsd-report RUN_DIR`: a run's logged figures computed again from its files
"""

from .metrics import evaluate, fmt_eval, majority_vote, score_samples

__all__ = ["evaluate", "fmt_eval", "majority_vote", "score_samples"]
