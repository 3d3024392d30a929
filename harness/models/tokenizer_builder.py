"""A real byte-level BPE tokenizer for preset models, trained on text shipped with the project.

The BPE merges come from ``harness/models/data/corpus.txt``; the vocabulary is then filled up to
the model's exact ``vocab_size`` with unique byte strings (decodable, never produced by
encoding) and ends with the family's special tokens, so that every id a random-weight model
can sample decodes to text.
"""

from __future__ import annotations

import itertools
import json
from importlib import resources

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from harness.models.presets import ChatFormat

# Enough merges to tokenize English prose well; the rest of a large vocabulary is filler.
MAX_TRAINED_VOCAB = 8192


def corpus_text() -> str:
    return resources.files("harness.models").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def build_tokenizer(vocab_size: int, chat: ChatFormat) -> Tokenizer:
    num_regular = vocab_size - len(chat.specials)
    if num_regular < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer (needs >= {300 + len(chat.specials)})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(num_regular, MAX_TRAINED_VOCAB),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(keepends=True), trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for filler in _filler_strings(set(vocab)):
        if len(vocab) >= num_regular:
            break
        vocab[filler] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(list(chat.specials))
    if chat.add_bos and chat.bos:
        bos_id = tok.token_to_id(chat.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{chat.bos} $A", pair=f"{chat.bos} $A {chat.bos} $B", special_tokens=[(chat.bos, bos_id)]
        )
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    return tok


def _filler_strings(taken: set[str]):
    """Unique strings over the byte-level alphabet, shortest first, in a fixed order."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for length in itertools.count(2):
        for chars in itertools.product(alphabet, repeat=length):
            s = "".join(chars)
            if s not in taken:
                yield s
