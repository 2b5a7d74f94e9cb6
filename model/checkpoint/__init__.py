"""Loading and exporting weights in the layouts researchers already hold.

``load_pretrained`` reads an HF directory or hub id in the ``kuleshov-group/mdlm-owt``
layout, or a PyTorch Lightning ``.ckpt`` of the MDLM release (EMA weights by default);
``save_pretrained`` writes the mdlm-owt layout.
"""

from model.checkpoint.hf import save_pretrained
from model.checkpoint.load import load_pretrained, load_weights

__all__ = ["load_pretrained", "load_weights", "save_pretrained"]
