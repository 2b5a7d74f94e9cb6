"""Training objectives: one module per parameterization, plus the time sampling they share.

Each loss function returns per-token losses of shape (batch, length); the model averages
them over real (attention-mask) tokens.
"""

from model.objectives.ar import ar_loss
from model.objectives.d3pm import d3pm_parameterization, discrete_time_loss, reconstruction_loss
from model.objectives.sedd import score_entropy, sedd_parameterization
from model.objectives.subs import NEG_INFINITY, subs_loss, subs_parameterization
from model.objectives.timesteps import discretize, q_xt, sample_t

__all__ = [
    "NEG_INFINITY",
    "ar_loss",
    "d3pm_parameterization",
    "discrete_time_loss",
    "discretize",
    "q_xt",
    "reconstruction_loss",
    "sample_t",
    "score_entropy",
    "sedd_parameterization",
    "subs_loss",
    "subs_parameterization",
]
