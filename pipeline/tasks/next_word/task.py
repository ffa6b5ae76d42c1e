"""Next-word prediction: a text in, a probability for every word that may come next;
a prompt in, its continuation.

Through the task interface (pipeline/tasks/base.py):
- raw examples: a corpus of documents (plain-text files, one document per file or per
  blank-line block; a text column of csv / jsonl / parquet files; a Hub data set)
  (corpus.py, collect.py);
- preprocessing saved in the bundle: `tokenizer.json`, trained on the training split;
  splits are contiguous blocks of whole documents, and the leakage rule counts held-out
  lines that repeat training text (preprocess.py);
- models: a decoder-only Transformer and an LSTM language model over token blocks
  (models.py, lm.py);
- loss and metrics: token cross-entropy; perplexity and top-1 / top-5 next-word
  accuracy beside an interpolated Kneser-Ney n-gram fitted on the same training text
  (scoring.py, ngram.py);
- export signature: token ids, attention mask and the key/value cache -> next-token
  logits and the grown cache, so that each generated token costs one step (export.py);
- service: texts -> the top-k next words; prompts -> continuations (serving/bundle/
  decoding.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import Dataset
from omegaconf import DictConfig, OmegaConf

from pipeline.config import Paths
from pipeline.data.splits import column
from pipeline.tasks.base import Task
from pipeline.tasks.next_word.processed import profile_of, prompts, typed_lengths
from serving.bundle.tasks import NEXT_WORD

TOKENIZER_FILE = "tokenizer.json"


class NextWord(Task):
    name = NEXT_WORD

    def collect(self, data: DictConfig, seed: int, paths: Paths) -> dict:
        from pipeline.tasks.next_word.collect import collect

        return collect(data, seed, paths)

    def preprocess(self, cfg: DictConfig, seed: int, paths: Paths) -> dict:
        from pipeline.tasks.next_word.preprocess import preprocess

        return preprocess(cfg, seed, paths)

    def profile_summary(self, profile: dict) -> str:
        tokenizer, test = profile["tokenizer"], profile["splits"]["test"]
        return (f"{tokenizer['type']} tokenizer of {tokenizer['vocab_size']} tokens, "
                f"blocks of {profile['block_size']}; test unknown-token rate "
                f"{test['unk_rate']:.4f}")

    def datamodule(self, cfg: DictConfig, paths: Paths, transfer: Path | None = None):
        from pipeline.tasks.next_word.datamodule import NextWordDataModule

        if transfer is not None:
            raise ValueError("distill.teacher: distillation is for text classification; "
                             "set distill.teacher=null for next-word prediction")
        return NextWordDataModule(processed_dir=paths.processed,
                                  pad_id=profile_of(paths)["special"]["pad_id"],
                                  batch_size=cfg.train.batch_size, seed=cfg.seed,
                                  num_workers=cfg.train.num_workers)

    def module(self, cfg: DictConfig, paths: Paths, distilling: bool = False):
        from pipeline.tasks.classifier import optimizer_settings
        from pipeline.tasks.next_word.lm import NextWordModule

        profile = profile_of(paths)
        return NextWordModule(
            model=OmegaConf.to_container(cfg.model, resolve=True),
            vocab_size=profile["tokenizer"]["vocab_size"],
            pad_id=profile["special"]["pad_id"],
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            warmup_ratio=cfg.train.warmup_ratio,
            optimizer=optimizer_settings(cfg),
            label_names=[],
        )

    def load_module(self, checkpoint: Path):
        from pipeline.tasks.next_word.inference import load_module

        return load_module(checkpoint)

    def model_inputs(self, split: Dataset, paths: Paths) -> list[list[int]]:
        """The split's blocks of token ids (each block's targets are its ids shifted by
        one)."""
        return column(split, "ids")

    def requests(self, split: Dataset) -> list[str]:
        """What a client sends: texts. `split` is a split of `processed/documents` (the
        blocks hold token ids only; `prompts` reads the documents)."""
        return column(split, "text")

    def predict_logits(self, module, rows: list[list[int]], batch_size: int) -> np.ndarray:
        from pipeline.tasks.next_word.inference import predict_logits

        return predict_logits(module, rows, batch_size)

    def export(self, module, path: Path, opset: int) -> None:
        from pipeline.tasks.next_word.export import export_onnx

        export_onnx(module.model, path, opset)

    def quantize(self, fp32: Path, int8: Path, module, val: Dataset, paths: Paths,
                 cfg: DictConfig) -> dict:
        from pipeline.tasks.next_word.export import quantize_int8

        # a block's inputs are its ids but the last (the last is only a target): as
        # many positions as training fed, which a Transformer has embeddings for
        inputs = [block[:-1] for block in self.model_inputs(val, paths)]
        return quantize_int8(fp32, int8, module, inputs, cfg)

    def scoring(self):
        from pipeline.tasks.next_word.scoring import NextWordScoring

        return NextWordScoring()

    def check_bundle(self, bundle_dir: Path, module, test: Dataset, paths: Paths,
                     cfg: DictConfig) -> dict:
        """The bundle's tokenizer.json gives the test documents the very token blocks
        training scored (`preprocessing_mismatches`), then the model checks of
        parity.py: fp32 and cached logits, greedy continuations, int8 agreement,
        batch invariance."""
        from pipeline.tasks.next_word.parity import check_bundle
        from pipeline.tasks.next_word.preprocess import pack, stream
        from pipeline.tasks.parity import DeployError
        from serving.bundle.bundle import read_meta
        from serving.bundle.next_word_inputs import NextWordInputs

        documents = prompts(paths, "test")
        meta = read_meta(bundle_dir)
        ids = NextWordInputs(bundle_dir, meta).encode(documents)
        ours = [b.tolist() for b in pack(stream(ids, meta["special"]["eos_id"]),
                                         profile_of(paths)["block_size"])]
        theirs = column(test, "ids")
        mismatched = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b]
        if mismatched or len(ours) != len(theirs):
            first = mismatched[0] if mismatched else min(len(ours), len(theirs))
            raise DeployError(f"tokenizer.json gives other token ids than training for the "
                              f"test documents: {len(mismatched)} of {len(theirs)} blocks "
                              f"differ (first: block {first})")
        return {"preprocessing_mismatches": 0,
                **check_bundle(bundle_dir, module, documents, cfg)}

    def drift_reference(self, bundle_dir: Path, paths: Paths, cfg: DictConfig) -> dict:
        """The validation documents' surprisal (mean nats per token) under the bundle,
        as the service measures each prompt's (serving/bundle/decoding.py
        `topk_surprisal`), as decile bins: what prompts are compared with."""
        from serving.bundle import Bundle

        decoder = Bundle.load(bundle_dir, precision="fp32").decoder
        return {"surprisal": surprisal_reference(decoder, prompts(paths, "val"),
                                                 profile_of(paths)["block_size"])}

    def bundle_fields(self, cfg: DictConfig, module, profile: dict) -> dict:
        recurrent = module.hparams.model["name"] == "lm_lstm"
        return {"max_len": None if recurrent else int(module.hparams.model["max_len"]),
                "cache": "last" if recurrent else "all",
                "special": profile["special"],  # pad_id, unk_id, eos_id
                "tokenizer": profile["tokenizer"],
                "generation": OmegaConf.to_container(cfg.serve.generation, resolve=True),
                "files": {"tokenizer": TOKENIZER_FILE}}

    def card_text(self, meta: dict) -> tuple[str, str, str]:
        tokenizer = meta["tokenizer"]
        context = (f"a context of at most {meta['max_len']} tokens" if meta["max_len"]
                   else "a context of any length (a recurrent state)")
        model = (f"A `{meta['model']['name']}` language model predicting the next token "
                 f"of a text over a vocabulary of {tokenizer['vocab_size']} "
                 f"{tokenizer['type']}-level tokens, from {context}; exported to ONNX "
                 "(fp32 and int8) with its cache as input and output, so that "
                 "generating a token costs one step.")
        inputs = ("Texts are normalised and split into tokens by `tokenizer.json`, "
                  "trained on the training split alone; tokens seen fewer times than "
                  "the tokenizer's minimum become `[UNK]`, and `[EOS]` ends a document.")
        use = ("Suggesting the next word while someone types, and continuing a prompt in "
               "the style of the training text, with a person choosing what to keep. It "
               "repeats what its corpus says, biases included; it is not a source of "
               "facts.")
        return model, inputs, use


def surprisal_reference(decoder, texts: list[str], block_size: int) -> dict:
    """Decile bins of the surprisal under `decoder` (a serving Decoder) of the texts cut
    as a service sees them (`typed_lengths`), and to the model's context (an LSTM's: a
    training block)."""
    from pipeline.data.profile import reference_histogram

    room = (decoder.max_len or block_size) - 1
    encoded = [row for row in decoder.inputs.encode(texts) if row]
    cuts = typed_lengths([len(row) for row in encoded])
    ids = sorted((row[:min(int(n), room)] for row, n in zip(encoded, cuts, strict=True)),
                 key=len)  # calls over prompts of like length pad little
    values: list[float] = []
    for start in range(0, len(ids), 64):
        values += decoder.topk_surprisal(ids[start:start + 64], 1)[1]
    # rounded: float noise across CPUs should not change the bundle's bytes
    return reference_histogram(np.round(values, 4))
