"""One benchmark job, from its typed spec to a finished run directory.

A job whose lower rate already saturated its series is recorded as skipped (harness.bench.saturation).
Build the requests and their arrival times first (so a bad workload fails before a model
loads), load the engine or take the one the last run kept (harness.bench.engine_keeper; an engine
that has not landed is recorded as skipped), warm it up, run the workload in real time, close
or keep the engine, and write the tables and metadata.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines import EngineNotAvailable, create_engine
from engines.detokenizer import load_tokenizer
from engines.model.config import ModelConfig
from harness.bench import kv_breakdown, metrics, step_anatomy
from harness.bench.arrivals import arrival_offsets, timed_plan
from harness.bench.engine_keeper import KEEPER, engine_key
from harness.bench.results import write_run
from harness.bench.roofline import device_ceilings, roofline
from harness.bench.runner import RunRecord, run_workload
from harness.bench.saturation import saturated
from harness.bench.schema import ArrivalSpec, SaturationSpec, SLOSpec, WorkloadSpec
from harness.bench.workload import PlannedRequest, build_workload, mean_output_tokens
from harness.common.engine import (
    compute_dtype,
    regular_token_ids,
    resolve_model_dir,
    warm_up,
)
from harness.common.errors import UserError
from harness.common.schema import ModelSpec, cuda_available
from harness.common.system_info import (
    git_state,
    hardware,
    hardware_label,
    model_shape,
    versions,
)

log = logging.getLogger(__name__)


@dataclass
class JobSpec:
    name: str
    seed: int  # the seed this run draws its workload and arrivals from: the config's seed + repeat
    engine_label: str  # the engine/ config chosen (e.g. contiguous_pow2); engine.name is the engine
    engine: Any  # an engines.config dataclass
    model: ModelSpec
    workload: WorkloadSpec
    arrival: ArrivalSpec
    slo: SLOSpec
    saturation: SaturationSpec = field(default_factory=SaturationSpec)
    warmup_requests: int = 1
    torch_threads: int | None = None
    require_cuda: bool = False
    repeat: int = 0  # which of the config's repeats this run is
    reuse_engine: bool = False  # keep the engine for the next run if it asks for the same one
    params: dict[str, Any] = field(default_factory=dict)  # the job's overrides (what a sweep varies)
    config: dict[str, Any] = field(default_factory=dict)  # the full resolved config, for the record


def workload_label(w: WorkloadSpec, a: ArrivalSpec) -> str:
    """A short description for captions: lengths, count and arrivals."""
    def length(d) -> str:
        return {"fixed": f"{d.value}", "uniform": f"U[{d.low},{d.high}]", "lognormal": f"mean {d.mean:g}"}[d.dist]

    source = f"dataset {Path(w.dataset.path).name}" if w.dataset.path else f"prompt {length(w.prompt)}"
    rate = f"{a.rate:.4g} req/s" if a.rate is not None else ""
    arrival = {"offline": "all at t=0", "closed": f"closed loop c={a.concurrency}", "poisson": f"Poisson {rate}",
               "gamma": f"gamma {rate} (burstiness {a.burstiness})", "trace": "trace replay"}[a.process]
    if a.load is not None:
        arrival += f" (offered {a.load:g} output tok/s)"
    extras = (f", shared prefix {w.prefix.length} x {w.prefix.num_groups}" if w.prefix.num_groups else "") + (f", n={w.n}" if w.n > 1 else "")
    return f"{w.name}: {w.num_requests} requests, {source}, output {length(w.output)}{extras}, {arrival}"


def plan_requests(workload: WorkloadSpec, arrival: ArrivalSpec, tokenizer, vocab_size: int, max_len: int, seed: int
                  ) -> tuple[WorkloadSpec, ArrivalSpec, list[PlannedRequest], np.ndarray | None]:
    """The requests and when each is sent, for offline and HTTP runs alike, with an arrival load or window resolved
    into the rate and the number of requests it means (the returned specs say which)."""
    if arrival.load is not None or arrival.window is not None:
        arrival, workload = timed_plan(arrival, workload, mean_output_tokens(workload, tokenizer))
    requests = build_workload(workload, tokenizer, vocab_size, max_len, seed)
    return workload, arrival, requests, arrival_offsets(arrival, len(requests), seed)


def concurrency_bound(spec: JobSpec, num_sequences: int) -> int:
    """The most sequences that can decode together: the clients, the engine's batch cap, or all of them."""
    bounds = [num_sequences, getattr(spec.engine, "max_num_seqs", None), getattr(spec.engine, "batch_size", None)]
    if spec.arrival.process == "closed":
        bounds.append(spec.arrival.concurrency * spec.workload.n)
    return min(b for b in bounds if b)


def _params_row(spec: JobSpec, model_dir: Path, device: torch.device, label: str, compute_dtype: str | None = None) -> dict[str, Any]:
    a, w = spec.arrival, spec.workload
    row = {
        "experiment": spec.name, "engine": spec.engine.name, "engine_label": spec.engine_label,
        "model": spec.model.preset if spec.model.path is None else model_dir.name, "device": device.type,
        "model_source": spec.model.source,
        "compute_dtype": compute_dtype,  # None where unknown: an engine that did not load, a server that does not say
        "workload": w.name, "workload_label": label, "arrival": a.process, "concurrency": a.concurrency,
        "rate": a.rate, "load": a.load, "burstiness": a.burstiness, "n": w.n, "seed": spec.seed, "repeat": spec.repeat,
    }
    row.update({f"engine.{k}": v for k, v in asdict(spec.engine).items()})
    row.update({f"param.{k}": _scalar(v) for k, v in spec.params.items()})
    return row


def _scalar(value: Any) -> Any:
    """A table cell: a dict or list override (``workload.prompt={...}``) as its JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def _run_figures(spec: JobSpec, record: RunRecord, model_cfg: ModelConfig, device: torch.device) -> tuple[dict, Any, Any]:
    """The run row's figures, the per-sample table and the per-step KV table."""
    requests = metrics.request_table(record)
    steps = step_anatomy.with_times(kv_breakdown.kv_steps(record.kv, record.samples, record.start), record.kv)
    duration = record.end - record.start
    figures = metrics.summarize(requests, duration, spec.slo.ttft_s, spec.slo.tpot_s, spec.slo.e2e_s)
    figures.update(kv_breakdown.summarize(steps, duration, record.kv.breakdown))
    figures.update(step_anatomy.summarize(steps, duration))
    figures.update(
        max_in_flight=record.max_in_flight,
        peak_gpu_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else math.nan,
    )
    ceilings = device_ceilings(device)
    if ceilings is not None:
        first = requests.groupby("request_id")["prompt_tokens"].first()
        figures.update(roofline(model_cfg, first.tolist(), requests["prompt_tokens"].tolist(), requests["output_tokens"].tolist(),
                                concurrency_bound(spec, len(requests)), duration, *ceilings))
    return figures, requests, steps


def check_device(spec: JobSpec) -> None:
    """A GPU reference workload refuses a CPU, before anything is built."""
    if spec.require_cuda and not cuda_available():
        raise UserError(f"experiment {spec.name!r} is a GPU reference workload at a real model's size; "
                        "no CUDA device here (set require_cuda=false to run it anyway)")


def _skip(spec: JobSpec, job_dir: Path, model_dir: Path, device: torch.device, label: str, metadata: dict[str, Any],
          reason: str) -> str:
    hw = hardware(device)
    row = {**_params_row(spec, model_dir, device, label), "status": "skipped", "reason": reason, "hardware": hardware_label(hw)}
    write_run(job_dir, row, {**metadata, "status": "skipped", "reason": reason, "hardware": hw})
    log.warning("skipped %s: %s", spec.engine_label, reason)
    return "skipped"


def execute(spec: JobSpec, job_dir: Path, progress: bool = False) -> str:
    """Run one job into ``job_dir`` and return its status: ok, skipped (engine not landed, or saturated) or failed.

    An engine that fails mid-run is recorded as failed, not raised, so that the rest of a
    sweep still runs and its report says what failed; the app's exit status reports it too.
    """
    device = torch.device("cuda" if cuda_available() else "cpu")
    check_device(spec)
    if spec.torch_threads is not None:
        torch.set_num_threads(spec.torch_threads)
    model_dir = resolve_model_dir(spec.model)
    model_cfg = ModelConfig.from_dir(model_dir)
    tokenizer = load_tokenizer(model_dir)
    max_len = spec.engine.max_model_len or model_cfg.max_context
    workload, arrival, requests, offsets = plan_requests(spec.workload, spec.arrival, tokenizer, model_cfg.vocab_size,
                                                         max_len, spec.seed)
    spec = dataclasses.replace(spec, workload=workload, arrival=arrival)
    label = workload_label(spec.workload, spec.arrival)
    metadata = {"name": spec.name, "engine_label": spec.engine_label, "engine": asdict(spec.engine), "model_dir": str(model_dir),
                "model_source": spec.model.source,
                "model_shape": model_shape(model_cfg), "workload_label": label, "git": git_state(),
                "versions": versions(), "params": spec.params, "config": spec.config, "seed": spec.seed, "repeat": spec.repeat}
    reason = saturated(spec.saturation, spec.params, spec.repeat, job_dir.parent)
    if reason is not None:
        return _skip(spec, job_dir, model_dir, device, label, metadata, reason)
    key = engine_key(model_dir, spec.engine)
    try:
        engine, reused = KEEPER.acquire(key, lambda: create_engine(model_dir, spec.engine))
    except EngineNotAvailable as e:
        return _skip(spec, job_dir, model_dir, device, label, metadata, str(e))
    except ValueError as e:  # the engine refused its settings: a user error, like a bad value in the config
        raise UserError(f"engine {spec.engine_label}: {e}") from e
    metadata["engine_reused"] = reused
    device = getattr(engine, "device", device)
    hw = hardware(device)
    metadata["compute_dtype"] = compute_dtype(engine)  # the checkpoint's dtype stays in model_shape
    row = {**_params_row(spec, model_dir, device, label, metadata["compute_dtype"]), "hardware": hardware_label(hw)}
    try:
        warm_up(engine, regular_token_ids(tokenizer, model_cfg.vocab_size), spec.warmup_requests)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        desc = " ".join([spec.engine_label] + [f"{k}={v}" for k, v in spec.params.items() if k != "engine"])
        record = run_workload(engine, requests, offsets, spec.arrival.concurrency, desc=desc, progress=progress)
        figures, request_rows, steps = _run_figures(spec, record, model_cfg, device)
    except BaseException as e:
        KEEPER.release(engine, key, keep=False)  # never kept: a failed or interrupted run's engine may hold requests
        if not isinstance(e, Exception):
            raise
        reason = f"{type(e).__name__}: {e}"
        write_run(job_dir, {**row, "status": "failed", "reason": reason}, {**metadata, "status": "failed", "reason": reason, "hardware": hw})
        log.error("failed %s: %s", spec.engine_label, reason)
        return "failed"
    KEEPER.release(engine, key, keep=spec.reuse_engine)
    write_run(job_dir, {**row, "status": "ok", **figures}, {**metadata, "status": "ok", "hardware": hw}, request_rows, steps)
    log.info("%s: %.1f output tok/s, p95 TTFT %.3f s, p95 TPOT %.4f s, KV token states %.1f%% of capacity",
             desc, figures["output_tok_s"], figures["ttft_p95"], figures["tpot_p95"], 100 * figures["kv_token_states_frac"])
    return "ok"
