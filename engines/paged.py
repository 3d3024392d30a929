"""The paged engine: the shared engine loop over a paged KV cache (block tables, prefix caching, CoW, swap)."""

from __future__ import annotations

from engines.config import PagedConfig
from engines.kv.block_manager import PagedKVManager
from engines.llm_engine import LLMEngine
from kernels.checks import check_block_size


class PagedEngine(LLMEngine):
    name = "paged"
    cfg: PagedConfig

    def make_kv_manager(self, num_slots: int) -> PagedKVManager:
        bs = self.cfg.block_size
        check_block_size(bs)
        return PagedKVManager(
            self.cfg.num_blocks or num_slots // bs, bs, max_model_len=self.max_model_len,
            num_host_blocks=self.host_slots(bs) // bs,
            enable_prefix_caching=self.cfg.enable_prefix_caching,
        )
