"""Byte-level BPE, trained with Hugging Face `tokenizers`, or any `tokenizer.json` loaded as is.

Digits are split into single tokens before BPE (as AFM and Llama do), so numbers tokenize the same
whatever their neighbours. Id 0 is the end-of-document token `<|endoftext|>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from crosstrain.errors import UserError

EOT = "<|endoftext|>"
MIN_VOCAB = 256 + 1  # the byte alphabet plus the end-of-document token


TRAIN_LINE_CHARS = 4096


def training_lines(texts: Iterable[str]) -> Iterator[str]:
    """Text for BPE training, with lines cut to TRAIN_LINE_CHARS: merge counting over one
    multi-megabyte "word" (a minified or base64 line) takes hours and teaches nothing useful."""
    for text in texts:
        if len(text) <= TRAIN_LINE_CHARS:
            yield text
            continue
        for line in text.splitlines(keepends=True):
            for i in range(0, len(line), TRAIN_LINE_CHARS):
                yield line[i : i + TRAIN_LINE_CHARS]


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    if vocab_size < MIN_VOCAB:
        raise UserError(
            f"model.vocab: {vocab_size} is smaller than a byte-level BPE needs ({MIN_VOCAB}: 256 bytes + end-of-document)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_lines(texts), trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"data.tokenizer: {path} not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise UserError(f"data.tokenizer: {path} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None


def eot_id(tok: Tokenizer) -> int:
    """The end-of-document id: <|endoftext|>, or the tokenizer's own EOS-like special token."""
    for name in (EOT, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise UserError("data.tokenizer: the tokenizer has no end-of-document token (<|endoftext|> or </s>)")
