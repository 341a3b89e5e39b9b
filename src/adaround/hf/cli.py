"""`adaround quantize --hf-model FOLDER --calib-text FILE`: the command line for transformers."""

from __future__ import annotations

import argparse
import logging
import time

from adaround import distributed
from adaround.config import QuantConfig
from adaround.errors import AdaRoundError

log = logging.getLogger(__name__)


def add_hf_options(q: argparse.ArgumentParser) -> None:
    g = q.add_argument_group("Hugging Face models (pip install 'adaround[hf]')")
    g.add_argument("--hf-model", metavar="FOLDER",
                   help="local Hugging Face model folder (config.json, weights, tokenizer)")
    g.add_argument("--calib-text", metavar="FILE",
                   help="calibration sentences: a text file, one per line, or a TSV (--tsv-column)")
    g.add_argument("--tsv-column", type=int, metavar="N",
                   help="0-based column of --calib-text to read as a TSV")
    g.add_argument("--skip-header", action="store_true", help="drop the first line / row")
    g.add_argument("--max-length", type=int, default=128, help="tokens per sentence (128)")
    g.add_argument("--hf-blocks", help="name of the ModuleList of blocks (found by itself)")
    g.add_argument("--hf-embeddings", action="store_true",
                   help="also quantize the embedding tables (rounded to nearest)")
    g.add_argument("--hf-head", action="store_true",
                   help="also quantize the Linear layers outside the blocks (pooler, LM head)")
    g.add_argument("--offload", action="store_true",
                   help="keep blocks not in use on the CPU (with --device cuda)")
    g.add_argument("--device", help="device to run on (default: where the model loads, CPU)")
    g.add_argument("--hf-compressed", metavar="FOLDER",
                   help="also write a compressed-tensors checkpoint folder that transformers' "
                   "from_pretrained loads (pip install 'adaround[compressed]'; "
                   "docs/huggingface.md)")


def quantize_hf_from_args(args: argparse.Namespace, cfg: QuantConfig) -> int:
    """Load the folder, read the sentences, quantize block by block, save."""
    from adaround.hf import HFOptions, load_pretrained, quantize_hf, read_sentences

    if not args.calib_text:
        raise AdaRoundError("--hf-model needs --calib-text FILE (sentences, one per line, or "
                            "a TSV with --tsv-column N)")
    model, tokenizer = load_pretrained(args.hf_model)
    if tokenizer is None:
        raise AdaRoundError(f"{args.hf_model} has no tokenizer files: --calib-text needs one "
                            "(tokenizer.json or vocab.txt with tokenizer_config.json)")
    sentences = read_sentences(args.calib_text, args.tsv_column, args.num_calib,
                               args.skip_header)
    opts = HFOptions(blocks=args.hf_blocks, embeddings=args.hf_embeddings, head=args.hf_head,
                     max_length=args.max_length, offload=args.offload, device=args.device)
    log.info("calibrating on %d sentences from %s; %s", len(sentences), args.calib_text, cfg)
    start = time.perf_counter()
    qmodel = quantize_hf(model, sentences, cfg, opts, tokenizer=tokenizer,
                         progress=not args.quiet, checkpoint_dir=args.checkpoint)
    if distributed.rank() > 0:  # under torchrun: process 0 writes and reports
        return 0
    from adaround.checkpoint import save_then_remove

    save_then_remove(qmodel, args.output, args.checkpoint)
    if getattr(args, "hf_compressed", None):
        from adaround.hf.checkpoint import save_compressed

        print(f"compressed-tensors checkpoint -> "
              f"{save_compressed(qmodel, args.hf_compressed, tokenizer)}")
    stats = qmodel.adaround_hf_stats
    print(f"quantized {len(qmodel.adaround_meta['layers'])} layers of {args.hf_model} in "
          f"{time.perf_counter() - start:.1f}s ({stats.tokens} calibration tokens, "
          f"{'/'.join(stats.losses) or 'no'} loss, peak RSS {stats.peak_rss_mb:.0f} MB) "
          f"-> {args.output}")
    return 0
