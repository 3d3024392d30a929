"""The virtual-contiguous (vAttention) engine: the shared engine loop, the contiguous kernels, KV pages mapped on demand.

Same model, scheduler, runner, sampler and kernels as the contiguous engine; the
differences are the KV manager (``engines.kv.virtual_manager``: a request slot per
sequence, page groups mapped as it grows) and the storage under the cache tensor
(``engines.kv.cuda_vmm`` on CUDA: a virtual address reservation; ``HostPageStorage``
elsewhere).
"""

from __future__ import annotations

from engines.config import VAttentionConfig
from engines.kv.storage import KVStorage, PageGeometry, host_granularity, page_storage
from engines.kv.virtual_manager import VirtualKVManager
from engines.llm_engine import LLMEngine
from engines.scheduler import ScheduledBatch
from engines.tensor_parallel.driver import ShardedModel


class VAttentionEngine(LLMEngine):
    name = "vattention"
    cfg: VAttentionConfig

    @property
    def _token_bytes(self) -> int:
        """One token of one layer's K (or V): the unit a page holds a whole number of."""
        return self.slot_bytes // (2 * self.model_config.num_layers)

    def _page_bytes(self) -> int:
        """One page's bytes: the configured size, checked against the device's granularity and one token's K."""
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            from engines.kv.cuda_vmm import granularity

            gran, where = granularity(self.device), "the driver's allocation granularity"
        else:
            gran, where = host_granularity(), "the host's page size"
        size = gran if self.cfg.page_size_kb is None else self.cfg.page_size_kb * 1024
        if size <= 0 or size % gran:
            raise ValueError(f"page_size_kb={self.cfg.page_size_kb}: a page must be a positive multiple of {where} "
                             f"({gran // 1024} KiB)")
        token = self._token_bytes
        if size % token:
            raise ValueError(f"a page of {size} B does not hold a whole number of tokens of one layer's K "
                             f"({token} B each)")
        return size

    def make_kv_manager(self, num_slots: int) -> VirtualKVManager:
        page = self._page_bytes()
        tokens_per_page = page // self._token_bytes
        num_groups = num_slots // tokens_per_page - 1  # one group backs the planes' anchor pages
        if num_groups * tokens_per_page < self.max_model_len:
            raise ValueError(
                f"the KV budget holds {num_groups} page groups of {tokens_per_page} tokens beside the anchor "
                f"({num_groups * tokens_per_page} tokens): too few for one request of max_model_len "
                f"({self.max_model_len}); raise the budget or lower max_model_len"
            )
        return VirtualKVManager(
            num_groups, tokens_per_page, num_request_slots=self.cfg.max_num_seqs, max_model_len=self.max_model_len,
            deferred_reclamation=self.cfg.deferred_reclamation, premap=self.cfg.premap,
        )

    def make_kv_storage(self) -> KVStorage:
        kv: VirtualKVManager = self.kv
        mc = self.model_config
        geometry = PageGeometry(mc.num_layers, kv.num_request_slots, kv.slot_tokens, kv.tokens_per_page,
                                self._token_bytes)
        shape = (mc.num_layers, 2, geometry.plane_tokens, self.model.num_kv_heads, mc.head_dim)
        ops = kv.take_ops()  # the premapped pool, mapped now: a start-up cost, not the first step's
        if isinstance(self.model, ShardedModel):  # every GPU maps its shard of the same pages
            self.model.page_storage(geometry, kv.num_groups, shape, ops)
        storage = page_storage(geometry, kv.num_groups, shape, self.model.dtype, self.device)
        storage.apply(ops.unmaps, ops.maps)
        storage.startup_map_seconds, storage.map_seconds = storage.map_seconds, 0.0
        return storage

    def kv_layout(self) -> dict:
        """Pages, slots and what mapping has cost (cumulative since start-up: an engine may serve several runs)."""
        kv, storage = self.kv, self.runner.storage
        return {
            "tokens_per_page": kv.tokens_per_page, "page_kib": storage.geometry.page_bytes // 1024,
            "page_groups": kv.num_groups, "anchor_groups": 1, "request_slots": kv.num_request_slots,
            "slot_tokens": kv.slot_tokens, "virtual_gib": storage.geometry.total_bytes / 2**30,
            "premap": self.cfg.premap and self.cfg.deferred_reclamation, "startup_map_s": storage.startup_map_seconds,
            "map_s": storage.map_seconds, "driver_calls": storage.num_map_calls, "group_maps": kv.num_maps,
            "group_unmaps": kv.num_unmaps,
        }

    def after_launch(self, batch: ScheduledBatch) -> None:
        """Map the pages the decodes' next step will need while the device runs this one (``overlap_mapping``)."""
        if not self.cfg.overlap_mapping or not batch.decodes:
            return
        self.clock.lap("postprocess")
        self.kv.map_ahead(batch.decodes, max(batch.decode_steps))
        ops = self.kv.take_ops()
        if ops:
            self.runner.map_ahead(ops)
        self.clock.lap("map")
