"""The configuration of an exported MDLM checkpoint, for ``trust_remote_code=True``.

Reads the ``config.json`` that ``python -m pretrain.export`` writes (the
``kuleshov-group/mdlm-owt`` field names) with nothing but ``transformers``. This file is
copied beside the weights: it must not import anything of this project.
"""

from transformers import PretrainedConfig


class MDLMConfig(PretrainedConfig):
    """``backbone`` is ``dit`` (MDLM, SEDD, D3PM: bidirectional, adaLN time conditioning) or
    ``ar`` (the causal transformer of the autoregressive baseline)."""

    model_type = "mdlm"

    def __init__(self, vocab_size=50258, model_length=1024, hidden_dim=768, cond_dim=128,
                 n_blocks=12, n_heads=12, dropout=0.1, time_conditioning=False,
                 backbone="dit", parameterization="subs", mask_index=None, **kwargs):
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.model_length = model_length
        self.hidden_dim = hidden_dim
        self.cond_dim = cond_dim
        self.n_blocks = n_blocks
        self.n_heads = n_heads
        self.dropout = dropout
        self.time_conditioning = time_conditioning
        self.backbone = backbone
        self.parameterization = parameterization
        # the release's GPT-2 model: the mask token is the last entry of the vocabulary
        self.mask_index = vocab_size - 1 if mask_index is None else mask_index
