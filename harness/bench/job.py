"""One benchmark job, from its typed spec to a finished run directory.

A job whose lower rate already saturated its series is recorded as skipped (harness.bench.saturation).
The job's target (harness.bench.target: an engine of ours in this process, or a server over
HTTP) gives the tokenizer to build the requests and their arrival times first (so a bad
workload fails before a model loads); then the target starts (an engine loads, or the kept one
is taken: harness.bench.engine_keeper; an engine that has not landed is recorded as skipped),
warms up and runs the workload in real time, and the tables and metadata are written. The same
code records and summarises both kinds of target, so a definition is written once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines import EngineNotAvailable
from harness.bench import kv_breakdown, metrics, step_anatomy
from harness.bench.arrivals import arrival_offsets, timed_plan
from harness.bench.results import write_json, write_run
from harness.bench.roofline import roofline
from harness.bench.runner import RunRecord
from harness.bench.saturation import saturated
from harness.bench.schema import ArrivalSpec, SaturationSpec, SLOSpec, WorkloadSpec
from harness.bench.target import Target, open_target
from harness.bench.vllm_result import VLLM_RESULT, vllm_result
from harness.bench.workload import PlannedRequest, build_workload, mean_output_tokens
from harness.common.errors import UserError
from harness.common.schema import ModelSpec, cuda_available
from harness.common.system_info import git_state, model_shape, versions

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
    save_vllm_result: bool = False  # also write the run as `vllm bench serve --save-result` does
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


def _params_row(spec: JobSpec, target: Target, label: str) -> dict[str, Any]:
    a, w = spec.arrival, spec.workload
    row = {
        "experiment": spec.name, "engine": spec.engine.name, "engine_label": spec.engine_label,
        "model": target.model_name, "device": target.device.type if target.device is not None else "unknown",
        "model_source": spec.model.source,
        "compute_dtype": target.compute_dtype,
        "workload": w.name, "workload_label": label, "arrival": a.process, "concurrency": a.concurrency,
        "rate": a.rate, "load": a.load, "burstiness": a.burstiness, "n": w.n, "seed": spec.seed, "repeat": spec.repeat,
    }
    row.update({f"engine.{k}": v for k, v in asdict(spec.engine).items()})
    row.update({f"param.{k}": _scalar(v) for k, v in spec.params.items()})
    return row


def _scalar(value: Any) -> Any:
    """A table cell: a dict or list override (``workload.prompt={...}``) as its JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def _run_figures(spec: JobSpec, record: RunRecord, target: Target) -> tuple[dict, Any, Any]:
    """The run row's figures, the per-sample table and the per-step KV table."""
    requests = metrics.request_table(record)
    steps = step_anatomy.with_times(kv_breakdown.kv_steps(record.kv, record.samples, record.start), record.kv)
    duration = record.end - record.start
    figures = metrics.summarize(requests, duration, spec.slo.ttft_s, spec.slo.tpot_s, spec.slo.e2e_s)
    figures.update(kv_breakdown.summarize(steps, duration, record.kv.breakdown))
    figures.update(step_anatomy.summarize(steps, duration))
    figures.update(max_in_flight=record.max_in_flight, peak_gpu_memory_bytes=target.peak_memory())
    ceilings = target.ceilings()
    if ceilings is not None:
        first = requests.groupby("request_id")["prompt_tokens"].first()
        figures.update(roofline(target.model_cfg, first.tolist(), requests["prompt_tokens"].tolist(),
                                requests["output_tokens"].tolist(), concurrency_bound(spec, len(requests)), duration,
                                *ceilings, *target.parallelism()))
    return figures, requests, steps


def check_device(spec: JobSpec) -> None:
    """A GPU reference workload refuses a CPU, before anything is built (a server runs it where it runs)."""
    if spec.require_cuda and not cuda_available() and spec.engine.name != "http":
        raise UserError(f"experiment {spec.name!r} is a GPU reference workload at a real model's size; "
                        "no CUDA device here (set require_cuda=false to run it anyway)")


def _write(spec: JobSpec, job_dir: Path, target: Target, row: dict[str, Any], metadata: dict[str, Any], status: str,
           reason: str | None = None, requests: Any = None, steps: Any = None) -> str:
    facts = target.metadata()
    row = {**row, "status": status, "hardware": facts.pop("hardware_label")}
    metadata = {**metadata, **facts, "status": status}
    if reason is not None:
        row["reason"] = metadata["reason"] = reason
    write_run(job_dir, row, metadata, requests, steps)
    return status


def execute(spec: JobSpec, job_dir: Path, progress: bool = False) -> str:
    """Run one job into ``job_dir`` and return its status: ok, skipped (engine not landed, or saturated) or failed.

    A target that fails mid-run is recorded as failed, not raised, so that the rest of a sweep still runs and
    its report says what failed; so is a run in which no request completed. The app's exit status reports both.
    """
    check_device(spec)
    if spec.torch_threads is not None:
        import torch

        torch.set_num_threads(spec.torch_threads)
    target = open_target(spec)
    try:
        status = _execute(spec, target, job_dir, progress)
    except BaseException:
        target.close(keep=False)  # never kept: a failed or interrupted run's engine may hold requests
        raise
    target.close(keep=spec.reuse_engine and status == "ok")
    return status


def _execute(spec: JobSpec, target: Target, job_dir: Path, progress: bool) -> str:
    workload, arrival, requests, offsets = plan_requests(spec.workload, spec.arrival, target.tokenizer,
                                                         target.model_cfg.vocab_size, target.max_len, spec.seed)
    spec = dataclasses.replace(spec, workload=workload, arrival=arrival)
    label = workload_label(spec.workload, spec.arrival)
    metadata = {"name": spec.name, "engine_label": spec.engine_label, "engine": asdict(spec.engine),
                "model_dir": str(target.model_dir), "model_source": spec.model.source,
                "model_shape": model_shape(target.model_cfg), "workload_label": label, "git": git_state(),
                "versions": versions(), "params": spec.params, "config": spec.config, "seed": spec.seed,
                "repeat": spec.repeat}
    reason = saturated(spec.saturation, spec.params, spec.repeat, job_dir.parent)
    if reason is None:
        try:
            target.start()
        except EngineNotAvailable as e:
            reason = str(e)
        except ValueError as e:  # the engine refused its settings: a user error, like a bad value in the config
            if isinstance(e, UserError):
                raise
            raise UserError(f"engine {spec.engine_label}: {e}") from e
    if reason is not None:
        log.warning("skipped %s: %s", spec.engine_label, reason)
        return _write(spec, job_dir, target, _params_row(spec, target, label), metadata, "skipped", reason)
    spec = dataclasses.replace(spec, engine=target.engine, engine_label=target.engine_label)  # a server's own
    metadata.update(engine_label=spec.engine_label, engine=asdict(spec.engine))
    row = _params_row(spec, target, label)
    desc = " ".join([spec.engine_label] + [f"{k}={v}" for k, v in spec.params.items() if k != "engine"])
    try:
        target.warm_up(spec.warmup_requests)
        record = target.run(requests, offsets, spec.arrival.concurrency, desc, progress)
        figures, request_rows, steps = _run_figures(spec, record, target)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        log.error("failed %s: %s", spec.engine_label, reason)
        return _write(spec, job_dir, target, row, metadata, "failed", reason)
    run = {**row, **figures}
    status, reason = "ok", None
    if not figures["completed"]:
        errors = request_rows["error"].dropna()
        status, reason = "failed", "no request completed" + (f"; the first error: {errors.iloc[0]}" if len(errors) else "")
    if spec.save_vllm_result:  # before the run's metadata, whose presence marks it finished
        write_json(job_dir / VLLM_RESULT, vllm_result({**run, "status": status}, request_rows, backend=target.backend,
                                                      model_id=target.served_model, tokenizer_id=str(target.model_dir)))
    _write(spec, job_dir, target, run, metadata, status, reason, request_rows, steps)
    log.info("%s: %.1f output tok/s, p95 TTFT %.3f s, p95 TPOT %.4f s, KV token states %.1f%% of capacity, "
             "%d of %d requests failed", desc, figures["output_tok_s"], figures["ttft_p95"], figures["tpot_p95"],
             100 * figures["kv_token_states_frac"], figures["failed"], figures["num_requests"])
    if status == "failed":
        log.error("failed %s: %s", spec.engine_label, reason)
    return status
