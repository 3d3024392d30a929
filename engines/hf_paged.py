"""``hf_paged``: transformers' own continuous batching behind the Engine contract
(``init_continuous_batching`` with a ``ContinuousBatchingConfig``)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from engines.base import Engine, KVStats
from engines.hf_common import (
    POLL_SECONDS,
    Row,
    error_output,
    load_hf_model,
    require_weight_files,
)
from engines.model.loader import resolve_device
from engines.request import (
    FinishReason,
    Request,
    RequestError,
    RequestOutput,
    SamplingParams,
)


def cb_attn_implementation(name: str) -> str:
    """``name`` as the installed transformers spells it for continuous batching.

    transformers 5.17 names its paged kernels ``paged|sdpa``, ``paged|flash_attention_2``...; later
    versions take the plain names (and warn about the prefix), keeping only ``paged|eager``.
    Either spelling is accepted; the installed version's registry decides.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base = name.removeprefix("paged|")
    paged = f"paged|{base}"
    return paged if paged in ALL_ATTENTION_FUNCTIONS else base


def cb_config_kwargs(block_size: int) -> dict[str, Any]:
    """The ContinuousBatchingConfig arguments whose names differ between transformers versions.

    The tokens of one cache block are ``block_size`` in 5.17 and ``page_size`` later (where
    ``block_size`` is deprecated). Later versions also switch sdpa to flash attention unless told
    not to; 5.17 keeps the ``paged|...`` implementation it is given, so both run what is named.
    """
    from transformers import ContinuousBatchingConfig

    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    kwargs: dict[str, Any] = {"page_size" if "page_size" in fields else "block_size": block_size}
    if "auto_switch_to_flash" in fields:
        kwargs["auto_switch_to_flash"] = False
    return kwargs


def _page_size(cache: Any) -> int:
    """Tokens per block of transformers' paged cache: ``block_size`` in 5.17, its allocators' pages later."""
    if hasattr(cache, "block_size"):
        return cache.block_size
    return min(allocator.tokens_per_page for allocator in cache.cache_allocators.values())


def _free_blocks(cache: Any) -> int | None:
    """Free blocks of transformers' paged cache: counted in 5.17, a fraction of its capacity later."""
    if hasattr(cache, "get_num_free_blocks"):
        return cache.get_num_free_blocks()
    if hasattr(cache, "compute_free_capacity"):
        return round(cache.compute_free_capacity(relative=True) * cache.num_blocks)
    return None


class HFPagedEngine(Engine):
    """transformers' continuous batching (paged attention over its own block cache)."""

    name = "hf_paged"
    kv_breakdown = False  # transformers exposes its pool's size and free blocks only

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        device: str = "auto",
        attn_implementation: str = "paged|sdpa",
        block_size: int = 256,
        num_blocks: int | None = None,
        max_batch_tokens: int | None = None,
        max_memory_percent: float | None = None,
        use_cuda_graph: bool | None = None,
        allow_block_sharing: bool = True,
        do_sample: bool = False,
        max_model_len: int | None = None,
    ) -> None:
        from transformers import ContinuousBatchingConfig

        super().__init__(model_dir, max_model_len)
        require_weight_files(self.name, self.model_config)
        self.device = resolve_device(device)
        self.attn_implementation = cb_attn_implementation(attn_implementation)
        self.model = load_hf_model(self.model_dir, dtype, self.device, self.attn_implementation, self.model_config)
        self.do_sample = do_sample
        self.cb_config = ContinuousBatchingConfig(
            **cb_config_kwargs(block_size), num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
            max_memory_percent=max_memory_percent, use_cuda_graph=use_cuda_graph,
            allow_block_sharing=allow_block_sharing, per_request_processors=do_sample,
        )
        gen = GenerationConfig(do_sample=do_sample, max_new_tokens=self.max_model_len, eos_token_id=-1,
                               pad_token_id=self.model.config.pad_token_id)
        if do_sample:
            # transformers creates a per-request processor only for a setting whose default is not
            # neutral; every request then passes its own values (add_request).
            gen.temperature, gen.top_k, gen.top_p = 0.5, 50, 0.5
        self.manager = self.model.init_continuous_batching(generation_config=gen, continuous_batching_config=self.cb_config)
        self.manager.start()
        self.rows: dict[str, Row] = {}  # "<request id>#<index>" -> row

    def _check_supported(self, p: SamplingParams) -> None:
        unsupported = [name for name, on in (
            ("min_p", p.min_p > 0), ("presence_penalty", p.presence_penalty != 0),
            ("frequency_penalty", p.frequency_penalty != 0), ("repetition_penalty", p.repetition_penalty != 1),
            ("seed", p.seed is not None),
            ("temperature/top_p/top_k (start hf_paged with do_sample=true)", not self.do_sample and not p.greedy),
        ) if on]
        if unsupported:
            raise RequestError(f"engine hf_paged does not support {', '.join(unsupported)}")

    def add_request(self, request: Request) -> None:
        self.check_request(request)
        p = request.sampling_params
        self._check_supported(p)
        sampling = {}
        if self.do_sample:  # a greedy request samples from its top-1 token
            sampling = {"temperature": float(p.temperature) if not p.greedy else 1.0,
                        "top_k": 1 if p.greedy else p.top_k or self.model_config.vocab_size, "top_p": float(p.top_p)}
        eos = -1 if p.ignore_eos else list(self.model_config.eos_token_ids) or -1
        for i in range(p.n):
            key = f"{request.request_id}#{i}"
            self.rows[key] = Row(request, i, self.new_stream(request))
            self.manager.add_request(
                request.prompt_token_ids, request_id=key,
                max_new_tokens=min(p.max_tokens, self.max_model_len - request.num_prompt_tokens),
                streaming=True, record_timestamps=True, eos_token_id=eos, **sampling,
            )

    def has_unfinished(self) -> bool:
        return bool(self.rows)

    def abort(self, request_id: str) -> None:
        for key, row in list(self.rows.items()):
            if row.request.request_id == request_id:
                self.manager.cancel_request(key)
                del self.rows[key]
                self.report_aborted(request_id, row.index, row.request.num_prompt_tokens)

    def _step(self) -> list[RequestOutput]:
        outputs = []
        result = self.manager.get_result(timeout=POLL_SECONDS)
        while result is not None:
            out = self._convert(result)
            if out is not None:
                outputs.append(out)
            result = self.manager.get_result(timeout=0)
        if not outputs and self.rows and not self.manager.is_running():
            error = "transformers' continuous batching loop stopped"
            outputs = [error_output(r, RuntimeError(error)) for r in self.rows.values()]
            self.rows.clear()
        return outputs

    def _convert(self, result) -> RequestOutput | None:
        row = self.rows.get(result.request_id)
        if row is None:  # aborted or finished already
            return None
        if result.error:
            del self.rows[result.request_id]
            return error_output(row, RuntimeError(result.error))
        done = len(row.stream.token_ids)
        new = result.generated_tokens[done:]
        times = (result.timestamps or [])[done:]
        times = times + [time.perf_counter()] * (len(new) - len(times))
        text = "".join(row.stream.append(t) for t in new if not row.stream.finished)
        new = row.stream.token_ids[done:]
        finished = row.stream.finished or result.is_finished()
        if finished:
            del self.rows[result.request_id]
            if not result.is_finished():
                self.manager.cancel_request(result.request_id)  # our stop rule ended it early
        reason = row.stream.finish_reason or (FinishReason.LENGTH if finished else None)
        return RequestOutput(
            request_id=row.request.request_id, index=row.index, new_token_ids=new, token_times=times[: len(new)],
            text=text, finished=finished, finish_reason=reason, stop_reason=row.stream.stop_reason,
            num_prompt_tokens=row.request.num_prompt_tokens,
            first_scheduled_time=result.lifespan[0] if done == 0 and result.lifespan[0] > 0 else None,
        )

    def kv_stats(self) -> KVStats:
        """Only what the manager exposes: its block pool's size and free blocks, when it has them (no breakdown)."""
        stats = KVStats(0, 0, 0, 0, 0, num_running=len(self.rows), breakdown=self.kv_breakdown)
        cache = getattr(getattr(self.manager, "batch_processor", None), "cache", None)
        if cache is not None and hasattr(cache, "num_blocks"):
            page = _page_size(cache)
            capacity = cache.num_blocks * page
            free_blocks = _free_blocks(cache)
            if free_blocks is not None:
                free = free_blocks * page
                stats = KVStats(capacity, 0, capacity - free, free, free, num_running=len(self.rows), breakdown=self.kv_breakdown)
        return stats

    def close(self) -> None:
        self.manager.stop(block=True, timeout=10)
        self.model.destroy_cached_continuous_batching_manager()
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
