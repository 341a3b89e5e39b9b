"""AdaRound for transformers (Hugging Face models or any network built of a list of blocks).

`quantize_hf` rounds every nn.Linear inside the transformer blocks, block by block, with
calibration batches that are dicts of tensors or sentences with a tokenizer; padding is left
out of the loss. `load_pretrained` loads a local Hugging Face model folder (needs
`pip install 'adaround[hf]'`). `save_compressed` writes a quantized model as a
compressed-tensors checkpoint folder that transformers' `from_pretrained` loads.

Example:
    >>> from adaround.hf import quantize_hf, load_pretrained  # doctest: +SKIP
    >>> model, tokenizer = load_pretrained("path/to/model")  # doctest: +SKIP
    >>> qmodel = quantize_hf(model, sentences, tokenizer=tokenizer)  # doctest: +SKIP
"""

from adaround.hf.checkpoint import save_compressed
from adaround.hf.data import calibration_batches, read_sentences, token_mask
from adaround.hf.loading import load_pretrained
from adaround.hf.options import HFOptions, HFStats
from adaround.hf.pipeline import quantize_hf

__all__ = ["HFOptions", "HFStats", "calibration_batches", "load_pretrained", "quantize_hf",
           "read_sentences", "save_compressed", "token_mask"]
