"""AdaRound on transformers: tiny random BERT- and Llama-like models built from configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaround
from adaround import CalibrationDataError, ModelError, QuantConfig
from adaround.hf import HFOptions, calibration_batches, quantize_hf, read_sentences, token_mask
from adaround.hf.blocks import find_blocks, token_rows
from adaround.hf.store import BatchStore, Budget
from adaround.nn.quant_layer import QuantLayer

transformers = pytest.importorskip("transformers")
from tiny_hf import padded_batch, tiny_bert, tiny_llama  # noqa: E402

CFG = QuantConfig(iters=60, loss="quadratic", per_channel=True)


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantLayer)]


def test_bert_every_block_linear_is_quantized_and_beats_nearest(tmp_path) -> None:
    model, batch = tiny_bert(), padded_batch()
    qmodel = quantize_hf(model, batch, CFG, HFOptions(forward_batch=8))
    names = _linears(qmodel)
    assert len(names) == 12 and all(n.startswith("encoder.layer.") for n in names)
    assert not any(isinstance(m, QuantLayer) for m in model.modules())  # left unchanged
    report = qmodel.adaround_report
    assert [r.name for r in report] == names  # execution order, block after block
    assert all(r.objective == "quadratic" for r in report)
    assert sum(r.loss_adaround for r in report) < sum(r.loss_nearest for r in report)
    nearest = quantize_hf(model, batch, QuantConfig(rounding="nearest", per_channel=True))
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        keep = batch["attention_mask"].bool()

        def err(m: nn.Module) -> float:
            return (m(**batch).last_hidden_state - ref)[keep].pow(2).mean().item()

        assert err(qmodel) < err(nearest)
    stats = qmodel.adaround_hf_stats
    assert stats.tokens == int(batch["attention_mask"].sum()) and stats.peak_rss_mb > 0
    path = tmp_path / "bert.w4.safetensors"
    adaround.save(qmodel, path)
    back = adaround.load(path, model)
    with torch.no_grad():
        assert torch.equal(back(**batch).last_hidden_state, qmodel(**batch).last_hidden_state)


def test_llama_groups_embeddings_and_head() -> None:
    model, batch = tiny_llama(), padded_batch()
    cfg = QuantConfig(weight_bits=3, group_size=16, iters=40, loss="quadratic")
    qmodel = quantize_hf(model, batch, cfg, HFOptions(embeddings=True, head=True))
    q = qmodel.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(q, QuantLayer) and q.scale.shape == (32, 64 // 16)
    assert isinstance(qmodel.model.embed_tokens, QuantLayer)
    assert isinstance(qmodel.lm_head, QuantLayer) and qmodel.lm_head.mode == "quantized"
    assert qmodel.adaround_report[-1].name == "lm_head"
    assert len(_linears(qmodel)) == 2 * 7 + 2
    with torch.no_grad():
        logits = qmodel(**batch).logits
    assert torch.isfinite(logits).all()


def test_padding_never_reaches_the_loss() -> None:
    """Changing what sits at padded positions (ids and, through them, every layer's input
    there) leaves the rounding unchanged: those rows are not in any loss."""
    model = tiny_bert()
    batch = padded_batch()
    other = {k: v.clone() for k, v in batch.items()}
    pad = other["attention_mask"] == 0
    other["input_ids"][pad] = torch.randint(1, 64, (int(pad.sum()),))
    a = quantize_hf(model, batch, CFG, HFOptions(forward_batch=8))
    b = quantize_hf(model, other, CFG, HFOptions(forward_batch=8))
    for name in _linears(a):
        assert torch.equal(a.get_submodule(name).codes, b.get_submodule(name).codes), name
    # ... whereas the same change unmasked changes the data and so, somewhere, the rounding
    c = quantize_hf(model, {"input_ids": other["input_ids"]}, CFG, HFOptions(forward_batch=8))
    assert any(not torch.equal(a.get_submodule(n).codes, c.get_submodule(n).codes)
               for n in _linears(a))


def test_token_rows_keep_real_tokens_only() -> None:
    x = torch.arange(2 * 3 * 2).float().reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    assert token_rows(x, mask).tolist() == [[0, 1], [2, 3], [6, 7]]
    assert token_rows(x[:, 0], mask).shape == (2, 2)  # a pooler's input: every row
    assert token_mask({"input_ids": torch.ones(2, 3, dtype=torch.long)}).all()


def test_text_calibration_with_a_tokenizer_and_files(tmp_path) -> None:
    class WordTokenizer:  # no download: ids from word lengths, padded per batch
        def __call__(self, texts, padding, truncation, max_length, return_tensors):
            rows = [[len(w) % 60 + 1 for w in t.split()][:max_length] for t in texts]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    text = tmp_path / "calib.txt"
    text.write_text("a short one\n\nthe second sentence is longer\nthird\n")
    assert read_sentences(text) == ["a short one", "the second sentence is longer", "third"]
    tsv = tmp_path / "calib.tsv"
    tsv.write_text("id\ttext\n1\thello there\n2\tgeneral kenobi\n")
    assert read_sentences(tsv, column=1, skip_header=True) == ["hello there", "general kenobi"]
    with pytest.raises(CalibrationDataError, match="--tsv-column between 0 and 1"):
        read_sentences(tsv, column=2)
    sentences = read_sentences(text) * 12
    batches = calibration_batches(sentences, WordTokenizer(), batch_size=16)
    assert [b["input_ids"].shape[0] for b in batches] == [16, 16, 4]
    qmodel = quantize_hf(tiny_bert(), sentences, CFG, tokenizer=WordTokenizer())
    assert len(qmodel.adaround_report) == 12
    with pytest.raises(CalibrationDataError, match="no tokenizer"):
        quantize_hf(tiny_bert(), sentences, CFG)


def test_bad_inputs_name_the_fix() -> None:
    model = tiny_bert()
    with pytest.raises(CalibrationDataError, match="empty"):
        quantize_hf(model, [], CFG)
    with pytest.raises(CalibrationDataError, match="rejected a calibration batch"):
        quantize_hf(model, {"input_ids": torch.ones(4, 5)}, CFG)  # float ids
    with pytest.raises(ModelError, match="blocks="):
        quantize_hf(model, padded_batch(), CFG, HFOptions(blocks="encoder.nothing"))
    with pytest.raises(ModelError, match="no nn.Linear"):
        quantize_hf(model, padded_batch(), QuantConfig(exclude=("*",)))
    with pytest.raises(adaround.ConfigError, match="divisor of 32"):
        quantize_hf(model, padded_batch(), QuantConfig(group_size=24))
    with pytest.raises(adaround.ConfigError, match="drop act_bits"):
        quantize_hf(model, padded_batch(), QuantConfig(act_bits=8))
    assert find_blocks(model)[0] == "encoder.layer"


def test_memory_budget_spills_block_inputs_to_disk_with_the_same_result() -> None:
    model, batch = tiny_bert(), padded_batch()
    opts = HFOptions(forward_batch=4, offload=True, device="cpu")
    in_memory = quantize_hf(model, batch, CFG, opts)
    spilled = quantize_hf(model, batch, CFG, HFOptions(forward_batch=4, memory_budget_mb=0))
    assert spilled.adaround_hf_stats.spilled_mb > 0 and in_memory.adaround_hf_stats.spilled_mb == 0
    for name in _linears(in_memory):
        assert torch.equal(in_memory.get_submodule(name).codes, spilled.get_submodule(name).codes)


class _Killed(Exception):
    """Raised once the first block's progress is written: the job killed there."""


def test_an_interrupted_run_resumes_after_the_last_block_with_the_same_codes(
        tmp_path, monkeypatch) -> None:
    """Killed after block 0 (progress written), started again: blocks 0's codes restored, not
    rounded again, blocks 1 and the head rounded as in an uninterrupted run, bit for bit."""
    from adaround import checkpoint

    model, batch = tiny_llama(), padded_batch()
    cfg = QuantConfig(iters=60, loss="sampled", per_channel=True, batch_size=16)
    opts = HFOptions(forward_batch=8, head=True)
    whole = quantize_hf(model, batch, cfg, opts)
    record = checkpoint.Checkpoint.record

    def killed_after_first(self, *args) -> None:
        record(self, *args)
        raise _Killed

    monkeypatch.setattr(checkpoint.Checkpoint, "record", killed_after_first)
    with pytest.raises(_Killed):
        quantize_hf(model, batch, cfg, opts, checkpoint_dir=tmp_path)
    monkeypatch.setattr(checkpoint.Checkpoint, "record", record)
    assert torch.load(tmp_path / checkpoint.FILE, weights_only=False)["done"] == ["model.layers.0"]
    rounded: list[str] = []
    real_round = adaround.hf.pipeline._round
    monkeypatch.setattr(adaround.hf.pipeline, "_round",
                        lambda name, *a: (rounded.append(name), real_round(name, *a))[1])
    resumed = quantize_hf(model, batch, cfg, opts, checkpoint_dir=tmp_path)
    assert rounded and not any(n.startswith("model.layers.0.") for n in rounded)
    assert "lm_head" in rounded  # the head after the blocks
    assert [r.name for r in resumed.adaround_report] == [r.name for r in whole.adaround_report]
    for name in _linears(whole):  # the sampled loss: the generator's state was restored too
        assert torch.equal(whole.get_submodule(name).codes, resumed.get_submodule(name).codes)
    with pytest.raises(adaround.CheckpointError, match="HFOptions"):
        quantize_hf(model, batch, cfg, HFOptions(forward_batch=8), checkpoint_dir=tmp_path)
    # where and how fast it runs is not part of the fingerprint
    quantize_hf(model, batch, cfg, HFOptions(forward_batch=8, head=True, memory_budget_mb=0),
                checkpoint_dir=tmp_path)


def test_batch_store_accounts_for_memory() -> None:
    budget = Budget(limit_mb=1 / 1024)  # 1 KiB
    store = BatchStore(budget)
    store.append(torch.zeros(64))  # 256 bytes: kept
    store.append(torch.ones(512))  # 2 KiB: spilled
    assert budget.in_memory == 256 and budget.spilled == 2048
    assert torch.equal(store[1], torch.ones(512))
    store.clear()
    assert budget.in_memory == 0
    budget.close()


def test_cli_quantizes_a_local_model_folder_from_a_tsv_column(tmp_path) -> None:
    from adaround.cli import main

    folder = tmp_path / "tiny-bert"
    words = "the a cat dog sat on mat ran far away".split()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    transformers.BertTokenizer(vocab_file=str(vocab)).save_pretrained(folder)
    tiny_bert().save_pretrained(folder)
    tsv = tmp_path / "calib.tsv"
    rows = [f"{i}\t{' '.join(words[i % 5:i % 5 + 3 + i % 4])}\t0.5" for i in range(40)]
    tsv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "q.safetensors"
    argv = ["--quiet", "quantize", "--hf-model", str(folder), "--calib-text", str(tsv),
            "--tsv-column", "1", "--bits", "4", "--group-size", "16", "--iters", "20",
            "-o", str(out)]
    progress = tmp_path / "progress"
    assert main([*argv, "--checkpoint", str(progress)]) == 0 and out.is_file()
    assert not progress.exists()  # the output written: the progress folder removed
    fp = transformers.BertModel.from_pretrained(str(folder)).eval()
    back = adaround.load(out, fp)
    assert back.encoder.layer[0].intermediate.dense.scale.shape == (64, 2)
    assert main([*argv[:-2], "--tsv-column", "7", "-o", str(out)]) == 2
    assert main(["quantize", "--hf-model", str(tmp_path), "-o", str(out),
                 "--calib-text", str(tsv)]) == 2  # no config.json there
