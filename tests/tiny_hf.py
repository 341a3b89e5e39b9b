"""Tiny random transformers (BERT- and Llama-like, built from configs: nothing downloaded) and
padded calibration batches, shared by the Hugging Face tests. Needs transformers."""

from __future__ import annotations

import torch
import transformers
from torch import nn


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32)
    return transformers.BertModel(config).eval()


def tiny_llama(tie_word_embeddings: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, max_position_embeddings=32,
                                      tie_word_embeddings=tie_word_embeddings)
    return transformers.LlamaForCausalLM(config).eval()


def padded_batch(n: int = 16, length: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random token ids, each sequence padded (ids and attention_mask 0) after 3 to `length`
    real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i, k in enumerate(torch.randint(3, length + 1, (n,), generator=g).tolist()):
        mask[i, k:] = 0
        ids[i, k:] = 0
    return {"input_ids": ids, "attention_mask": mask}
