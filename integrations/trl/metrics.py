"""R2M's metrics in a TRL trainer: the one table of their names and meanings, and the one place that reaches into
TRL's internals to log them (`TrainerMetrics`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Metric:
    """A logged metric: its name, when it is logged (``call``: each reward call; ``update``: each R2M update) and
    what it means."""

    name: str
    when: str
    meaning: str


METRICS = (
    Metric("r2m/reward_mean", "call", "mean R2M reward of the batch (finite rewards)"),
    Metric("r2m/vanilla_reward_mean", "call", "mean of the wrapped reward model's (or judge's) own reward"),
    Metric("r2m/omega", "call", "w(t) of Eq. 4 at the scoring step"),
    Metric("r2m/extra_forward_share", "call", "share of samples whose states needed an extra policy forward"),
    Metric("r2m/capture_ms", "call", "host ms spent capturing policy states since the previous generation batch "
                                     "(hooks, stitching, refresh and any extra forward)"),
    Metric("r2m/reward_nonfinite", "call", "rewards returned as None (not finite)"),
    Metric("r2m/hidden_nonfinite", "call", "samples scored with the vanilla reward because their states were not "
                                           "finite"),
    Metric("r2m/state_similarity", "call", "over-optimisation monitor: mean cosine similarity of the policy's "
                                           "mean-pooled states of a group's responses, averaged over groups "
                                           "(`r2m.monitor`)"),
    Metric("r2m/labelled_share", "call", "share of samples the labeller labelled (labeller=)"),
    Metric("r2m/label_ms", "call", "host ms the labeller took (labeller=)"),
    Metric("r2m/loss", "update", "GREBT loss (plus the anchor terms) of the update"),
    Metric("r2m/bt", "update", "Bradley-Terry term on the groups' pseudo-label pairs"),
    Metric("r2m/gre", "update", "group reward entropy term"),
    Metric("r2m/groups_used", "update", "groups the update trained on"),
    Metric("r2m/groups_skipped", "update", "groups skipped for a non-finite reward, RTE or state"),
    Metric("r2m/groups_degenerate", "update", "groups whose fused rewards were tied (zero GRE gradient)"),
    Metric("r2m/groups_labelled", "update", "groups with a labelled pair (labeller=)"),
    Metric("r2m/anchor_bt", "update", "Bradley-Terry loss on the labelled pairs (labeller=)"),
    Metric("r2m/groups_replayed", "update", "labelled groups of earlier updates replayed (R2MConfig.label_replay)"),
    Metric("r2m/fused_scale", "update", "kappa of fused_scale='base_spread' (1 otherwise)"),
    Metric("r2m/update_ms", "update", "host ms of the update"),
    Metric("r2m/update_size", "update", "||theta' - theta|| / ||theta|| of the fusion and head weights"),
    Metric("r2m/refreshed", "update", "share of samples whose states came from the policy's training pass"),
    Metric("r2m/anchor_set_bt", "update", "Bradley-Terry loss on the fixed anchor pairs (anchor_pairs=)"),
    Metric("r2m/anchor_forwards", "update", "policy forwards run for the anchor set so far (anchor_pairs=)"),
    Metric("r2m/anchor_ms", "update", "host ms refreshing the anchor set's states (anchor_pairs=)"),
)
NAMES = {metric.name: metric for metric in METRICS}


def metrics_doc() -> str:
    """The table as docstring text (appended to `R2MReward`'s docstring)."""
    lines = [f"    ``{m.name}`` ({m.when}): {m.meaning}" for m in METRICS]
    return "\n\n    Logged metrics (`r2m.integrations.trl.metrics.METRICS`):\n\n" + "\n".join(lines) + "\n"


class TrainerMetrics:
    """The one place R2M reaches into TRL's internals (trl 1.16; pinned by ``tests/test_trl_metrics.py``).

    TRL hands each reward call ``log_metric``, a bound method of the trainer: `bind` keeps it, and `trainer` is its
    ``__self__`` (the accelerator, model, tools and chat template R2M's own forwards use). Metrics of a reward call
    go through ``log_metric`` itself. Update metrics are computed in a callback, between reward calls: they go into
    the trainer's metrics for its coming log (``trainer._metrics["train"]``), so each update shows in the log of
    the step that ran it.
    """

    def __init__(self) -> None:
        self._log_metric: Callable[[str, float], None] | None = None
        self._warned = False

    def bind(self, log_metric: Callable[[str, float], None] | None) -> None:
        """Keep the ``log_metric`` of the latest reward call (None outside a trainer)."""
        if log_metric is not None:
            self._log_metric = log_metric

    @property
    def trainer(self) -> object | None:
        """The TRL trainer behind ``log_metric``, when known."""
        return getattr(self._log_metric, "__self__", None)

    def log_call(self, metrics: dict[str, float], log_metric: Callable[[str, float], None] | None) -> None:
        """Metrics of one reward call, through TRL's ``log_metric`` (averaged over processes by TRL)."""
        if log_metric is not None:
            for name, value in _registered(metrics).items():
                log_metric(name, value)

    def log_update(self, metrics: dict[str, float]) -> None:
        """Metrics of one R2M update, into the trainer's metrics for its coming log."""
        metrics = _registered(metrics)
        store = getattr(self.trainer, "_metrics", None)
        train = store.get("train") if isinstance(store, dict) else None
        if train is None:
            if not self._warned:
                logger.warning("R2M: this TRL trainer keeps no `_metrics['train']` (trl 1.16 does): the update "
                               "metrics (%s) are not logged", ", ".join(metrics))
                self._warned = True
            return
        for name, value in metrics.items():
            train[name].append(value)


def _registered(metrics: dict[str, float]) -> dict[str, float]:
    unknown = sorted(set(metrics) - set(NAMES))
    if unknown:
        raise KeyError(f"R2M metrics {unknown} are not in r2m.integrations.trl.metrics.METRICS")
    return metrics


__all__ = ["METRICS", "Metric", "TrainerMetrics", "metrics_doc"]
