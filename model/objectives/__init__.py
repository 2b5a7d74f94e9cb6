"""Training objectives: one module per parameterization, plus the time sampling they share.

Each loss function returns per-token losses of shape (batch, length); the model averages
them over real (attention-mask) tokens.

Each ``*_rows`` function is the same loss at selected positions only, from raw logits of
shape (k, vocab) -> (k,): what the masked-only loss path projects and scores in chunks.
"""

from model.objectives.ar import ar_loss, ar_rows
from model.objectives.d3pm import (
    d3pm_parameterization,
    discrete_time_loss,
    discrete_time_rows,
    reconstruction_loss,
    reconstruction_rows,
)
from model.objectives.sedd import (
    esigm1_log,
    score_entropy,
    score_entropy_rows,
    sedd_parameterization,
)
from model.objectives.subs import (
    NEG_INFINITY,
    reweighted_weight,
    subs_fill,
    subs_loss,
    subs_parameterization,
    subs_rows,
    subs_weight,
)
from model.objectives.timesteps import discretize, q_xt, sample_t

__all__ = [
    "NEG_INFINITY",
    "ar_loss",
    "ar_rows",
    "d3pm_parameterization",
    "discrete_time_loss",
    "discrete_time_rows",
    "discretize",
    "esigm1_log",
    "q_xt",
    "reconstruction_loss",
    "reconstruction_rows",
    "reweighted_weight",
    "sample_t",
    "score_entropy",
    "score_entropy_rows",
    "sedd_parameterization",
    "subs_loss",
    "subs_parameterization",
    "subs_fill",
    "subs_rows",
    "subs_weight",
]
