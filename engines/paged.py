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
        window = self.model_config.sliding_window
        if window is not None and self.cfg.preemption_mode == "swap":
            raise ValueError(f"preemption_mode=swap with a sliding-window model (window {window}) is not supported: "
                             "its freed blocks cannot be swapped; use preemption_mode=recompute")
        return PagedKVManager(
            self.cfg.num_blocks or num_slots // bs, bs, max_model_len=self.max_model_len,
            num_host_blocks=self.host_slots(bs) // bs,
            enable_prefix_caching=self.cfg.enable_prefix_caching, window=window,
            max_step_tokens=max(self.cfg.max_num_batched_tokens, self.cfg.num_scheduler_steps),
            publish_lag=2 * self.cfg.num_scheduler_steps,  # decodes publish when their tokens are read: a step late
        )
