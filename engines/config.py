"""Typed engine configs: one dataclass per engine, the schema of Hydra's ``engine/`` group.

Names follow vLLM where a vLLM user would look for them (max_model_len, max_num_seqs,
max_num_batched_tokens, gpu_memory_utilization, block_size, swap_space,
enable_prefix_caching, enforce_eager).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class RuntimeConfig:
    """How our model runs: shared by the paged and contiguous engines."""

    dtype: str = "auto"  # auto = checkpoint dtype on GPU, float32 on CPU
    device: str = "auto"  # auto = cuda if available
    attn_backend: str = "auto"  # auto = triton on CUDA, torch elsewhere
    max_model_len: Optional[int] = None  # default: the model's context
    seed: int = 0  # for requests without their own seed
    # Log KV memory after every step's admissions (the KV breakdown's data); false only to
    # measure what that costs (benchmarks/kv_accounting.py).
    record_kv_steps: bool = True
    # Time every step by phase on the host and by CUDA events on the device (the step anatomy:
    # docs/methodology.md); false only to measure what that costs (benchmarks/step_anatomy.py).
    step_anatomy: bool = True
    # Which logits a request's logprobs describe: raw (the model's, as vLLM's default raw_logprobs) or
    # processed (after penalties and temperature, before top-k/top-p/min-p; vLLM's processed_logprobs).
    logprobs_mode: str = "raw"
    # GPUs one model is split over (vLLM's --tensor-parallel-size): attention heads and MLP columns, Megatron-style;
    # one process per GPU, started by the engine (on a CPU, processes over gloo). KV budgets are per GPU.
    tensor_parallel_size: int = 1
    # Seconds a collective or a worker's start-up may take before it is an error (a dead worker is found sooner)
    distributed_timeout_s: float = 600.0


@dataclass
class SchedulerConfig:
    """Continuous batching, shared by the paged and contiguous engines."""

    max_num_seqs: int = 256  # sequences running at once
    max_num_batched_tokens: int = 8192  # token budget of one step (decodes + prefill chunks)
    enable_chunked_prefill: bool = True  # else a prompt must fit the budget whole
    preemption_mode: str = "recompute"  # recompute | swap
    # Decode steps a decode-only batch runs on the device between host syncs (vLLM's
    # --num-scheduler-steps): more amortizes host overhead, tokens then arrive in bursts.
    num_scheduler_steps: int = 1
    # Schedule and launch step N+1 before reading step N's tokens (vLLM's --async-scheduling),
    # so the host's work overlaps the device's. A sample that stops on a token it has not read
    # yet runs one step more, discarded; n > 1 prompts and penalties wait for their tokens.
    async_scheduling: bool = True


@dataclass
class KVBudgetConfig:
    """How much KV memory an engine gets; the paged and contiguous engines size it alike."""

    gpu_memory_utilization: float = 0.9  # of the device, minus weights and peak activations
    kv_budget_gb: Optional[float] = None  # an explicit budget instead (the budget sweeps use it)
    num_kv_slots: Optional[int] = None  # or an exact number of token slots
    cpu_kv_budget_gb: float = 0.5  # the budget on a CPU device when none is given
    swap_space: float = 4.0  # GiB of pinned CPU memory for swapped-out sequences


@dataclass
class CudaGraphConfig:
    """CUDA graphs of our engines' steps on a GPU, shared by the paged, contiguous and vattention engines."""

    enforce_eager: bool = False  # True turns CUDA graphs off
    cuda_graph_max_batch: int = 256  # decode batches up to this size replay a graph of the whole step
    # Other steps (prompt chunks, larger decode batches) of up to this many tokens replay piecewise graphs: all but
    # attention, which runs eagerly between them (vLLM's piecewise mode). None: the step budget
    # (max_num_batched_tokens); 0: those steps run eagerly. Not yet with tensor_parallel_size > 1.
    cuda_graph_max_tokens: Optional[int] = None
    # The piecewise graphs' token counts: powers of two from 8 below this, then its multiples; a step pads up to
    # the next one (more sizes pad less, and take longer to capture)
    cuda_graph_token_step: int = 256


@dataclass
class PagedConfig(RuntimeConfig, SchedulerConfig, KVBudgetConfig, CudaGraphConfig):
    name: str = "paged"
    block_size: int = 16
    num_blocks: Optional[int] = None  # overrides the budget when set
    enable_prefix_caching: bool = True


@dataclass
class ContiguousConfig(RuntimeConfig, SchedulerConfig, KVBudgetConfig, CudaGraphConfig):
    name: str = "contiguous"
    reservation: str = "max"  # max | pow2 | oracle
    allocator: str = "first_fit"  # first_fit | best_fit


@dataclass
class VAttentionConfig(RuntimeConfig, SchedulerConfig, KVBudgetConfig, CudaGraphConfig):
    """Virtual-contiguous KV (vAttention): contiguous addresses per request, physical pages mapped on demand."""

    name: str = "vattention"
    # KiB of one physical page (one layer's K or V for a run of tokens); None: the allocation granularity, the
    # driver's minimum on CUDA (2 MiB on an H100), the host's page size elsewhere. A multiple of it.
    page_size_kb: Optional[int] = None
    # Keep a finished sequence's pages mapped for the next one in its slot; unmap only when memory is short.
    deferred_reclamation: bool = True
    # With deferred reclamation: map the whole pool at start-up, spread over the slots (page 0 of each, then page 1,
    # ...), so a run maps only to take idle pages back; false: a page is mapped when a sequence first needs it.
    premap: bool = True
    # After launching a step, map the pages each decoding sequence's next step will need, on a worker thread,
    # while the device runs (the paper's overlap of allocation with compute).
    overlap_mapping: bool = True


@dataclass
class HFConfig:
    name: str = "hf"
    batch_size: int = 1  # 1 = one request at a time; more = static padded batches
    dtype: str = "auto"
    device: str = "auto"
    attn_implementation: str = "sdpa"
    max_model_len: Optional[int] = None


@dataclass
class HFPagedConfig:
    name: str = "hf_paged"
    dtype: str = "auto"
    device: str = "auto"
    attn_implementation: str = "paged|sdpa"
    block_size: int = 256
    num_blocks: Optional[int] = None
    max_batch_tokens: Optional[int] = None
    max_memory_percent: Optional[float] = None
    use_cuda_graph: Optional[bool] = None
    allow_block_sharing: bool = True
    do_sample: bool = False  # per-request temperature/top-k/top-p need it
    max_model_len: Optional[int] = None


ENGINE_CONFIGS = {"hf": HFConfig, "hf_paged": HFPagedConfig, "contiguous": ContiguousConfig, "paged": PagedConfig,
                  "vattention": VAttentionConfig}
