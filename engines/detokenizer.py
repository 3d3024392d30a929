"""Incremental detokenization and the stop conditions every engine shares.

Text is decoded incrementally (a window of recent tokens, so that multi-byte characters
split across tokens come out whole) and checked for stop strings on the text, so a stop
string that spans token boundaries is found. Text that might still turn into a stop
string is held back until it cannot, so a stream never shows text it later retracts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from engines.model.config import ModelLoadError
from engines.request import FinishReason, SamplingParams


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} has no tokenizer.json (a fast tokenizer is required)")
    return Tokenizer.from_file(str(path))


@dataclass
class SampleStream:
    """The output of one sample (one of a request's n): tokens, text, and whether it must stop."""

    tokenizer: Tokenizer
    params: SamplingParams
    prompt_len: int
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # all detokenized text (before truncation at a stop string)
    emitted: int = 0  # characters of ``text`` already returned
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    _prefix_offset: int = 0
    _read_offset: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int) -> str:
        """Add one generated token; return the text that became safe to show."""
        self.token_ids.append(token_id)
        if not (self.params.detokenize or self.params.stop):
            self._check_stop(token_id)
            return ""
        self._decode_new()
        self._check_stop(token_id)
        if self.finished and not isinstance(self.stop_reason, str):
            self._decode_new(flush=True)  # the last bytes, even if they are not a whole character
        return self._release()

    def _decode_new(self, flush: bool = False) -> None:
        ids = self.token_ids
        prefix = self.tokenizer.decode(ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and (flush or not full.endswith("\ufffd")):
            self.text += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(ids)

    def _check_stop(self, token_id: int) -> None:
        p = self.params
        if not p.ignore_eos and token_id in self.eos_token_ids:
            self.finish_reason, self.stop_reason = FinishReason.STOP, None
        elif token_id in p.stop_token_ids:
            self.finish_reason, self.stop_reason = FinishReason.STOP, token_id
        elif p.stop and self._find_stop_string():
            return
        elif len(self.token_ids) >= p.max_tokens or self.prompt_len + len(self.token_ids) >= self.max_model_len:
            self.finish_reason = FinishReason.LENGTH

    def _find_stop_string(self) -> bool:
        longest = max(len(s) for s in self.params.stop)
        start = max(0, self.emitted - longest)
        hits = [(self.text.find(s, start), s) for s in self.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        i, s = min(hits)
        self.text = self.text[: i + len(s)] if self.params.include_stop_str_in_output else self.text[:i]
        self.finish_reason, self.stop_reason = FinishReason.STOP, s
        return True

    def _release(self) -> str:
        end = len(self.text)
        if not self.finished and self.params.stop:
            end = max(self.emitted, end - (max(len(s) for s in self.params.stop) - 1))
        new = self.text[self.emitted : end]
        self.emitted = end
        return new
