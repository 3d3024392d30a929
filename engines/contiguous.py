"""The contiguous (Orca-style) engine: the shared engine loop over an arena of per-request regions."""

from __future__ import annotations

from engines.config import ContiguousConfig
from engines.kv.contiguous_manager import ContiguousKVManager
from engines.llm_engine import LLMEngine


class ContiguousEngine(LLMEngine):
    name = "contiguous"
    cfg: ContiguousConfig

    def make_kv_manager(self, num_slots: int) -> ContiguousKVManager:
        return ContiguousKVManager(
            num_slots, reservation=self.cfg.reservation, allocator=self.cfg.allocator, max_model_len=self.max_model_len,
        )
