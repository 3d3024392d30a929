"""The typed schema of the Hydra config tree, registered in Hydra's ConfigStore.

Every node is a dataclass, so Hydra rejects an unknown key or a value of the wrong type
at composition instead of silently ignoring it. The ``engine/`` group is typed by the
engine dataclasses of ``engines.config`` (the engines' own knobs, never redefined here).
Value checks that a type cannot express (a concurrency below 1, a missing file) live in
``__post_init__``, which runs when the app turns a node into its dataclass.

Resolvers for the YAML files:
- ``${on_device:CPU_VALUE,CUDA_VALUE}``: pick a size by the machine, so that one experiment
  runs in minutes on a laptop CPU and at full size on a GPU.
- ``${max:A,B,...}`` and ``${mul:A,B}``: small arithmetic for sizes that scale with a sweep
  value (e.g. the number of requests with the concurrency); ``${arrivals_in:RATE,SECONDS}``: the
  requests a rate sends in a window (rounded, at least 1), so every point of a rate sweep lasts
  about as long.
- ``${sweep_if_repeats:N}`` (hydra.mode): a multirun when N > 1, so that repeats of a single run sweep.
- ``${repeat_sweep:N}`` (hydra.sweeper.params.repeat): the sweep of ``repeat`` over 0..N-1.
- ``${latest_or_new:BASE,STAMP,RESUME}`` (hydra.run.dir, hydra.sweep.dir): BASE/STAMP, or with
  RESUME the latest directory under BASE (harness.bench.resume).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from engines.config import ENGINE_CONFIGS
from harness.common.errors import UserError
from harness.common.schema import ModelSpec, need, register_engine_schemas
from harness.common.schema import register_resolvers as common_resolvers


def _latest_or_new(base: str, stamp: str, resume: bool) -> str:
    from harness.bench.resume import output_dir

    return output_dir(base, stamp, resume)


def _arrivals_in(rate: Any, seconds: Any) -> int:
    try:
        return max(1, round(float(rate) * float(seconds)))
    except (TypeError, ValueError) as e:
        raise UserError(f"arrivals_in needs a rate and a number of seconds, got {rate!r} and {seconds!r}") from e


def _sweep_if_repeats(repeats: Any) -> Optional[str]:
    return "MULTIRUN" if isinstance(repeats, int) and repeats > 1 else None


def _repeat_sweep(repeats: Any) -> str:
    """The repeats 0..repeats-1 as a sweep (a single 0 for one repeat)."""
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise UserError(f"repeats must be an integer >= 1, got {repeats!r}")
    return f"range(0,{repeats})" if repeats > 1 else "0"


def register_resolvers() -> None:
    common_resolvers()
    for name, fn in (("arrivals_in", _arrivals_in), ("sweep_if_repeats", _sweep_if_repeats), ("repeat_sweep", _repeat_sweep)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    if not OmegaConf.has_resolver("latest_or_new"):  # cached: every job of a sweep resolves the same directory
        OmegaConf.register_new_resolver("latest_or_new", _latest_or_new, use_cache=True)


@dataclass
class LengthDist:
    """Token lengths: ``fixed`` (value), ``uniform`` (low..high inclusive) or ``lognormal``.

    ``lognormal`` has the given ``mean`` and log-space ``sigma`` before clipping to
    [low, high]; with the published means of ShareGPT and Alpaca it gives their long tails.
    """

    dist: str = "fixed"
    value: int = 128
    low: int = 1
    high: int = 1024
    mean: float = 128.0
    sigma: float = 1.0

    def check(self, where: str) -> None:
        need(self.dist in ("fixed", "uniform", "lognormal"), f"{where}.dist must be fixed, uniform or lognormal, got {self.dist!r}")
        if self.dist == "fixed":
            need(self.value >= 1, f"{where}.value must be >= 1, got {self.value}")
        else:
            need(1 <= self.low <= self.high, f"{where} needs 1 <= low <= high, got low={self.low} high={self.high}")
        if self.dist == "lognormal":
            need(self.low <= self.mean <= self.high and self.sigma > 0,
                  f"{where} needs low <= mean <= high and sigma > 0, got mean={self.mean} sigma={self.sigma}")


@dataclass
class DatasetSpec:
    """Real prompts: a ShareGPT-format JSON (conversations) or a JSONL file with one prompt a line."""

    path: Optional[str] = None
    format: str = "auto"  # auto (by extension; no path = synthetic prompts) | sharegpt | jsonl (a path is then required)
    max_prompt_len: int = 1024  # ShareGPT pruning as in vLLM's benchmark
    max_total_len: int = 2048

    def check(self) -> None:
        need(self.format in ("auto", "sharegpt", "jsonl"), f"workload.dataset.format must be auto, sharegpt or jsonl, got {self.format!r}")
        if self.path is None:
            need(self.format == "auto", f"workload.dataset.path needs a value: the {self.format} file of prompts")
            return
        need(Path(self.path).is_file(), f"workload.dataset.path: file {self.path!r} does not exist")


@dataclass
class PrefixSpec:
    """Shared prefixes (system prompts): request i starts with the prefix of group i mod num_groups."""

    num_groups: int = 0  # 0 = no shared prefix
    length: int = 0  # tokens of each group's prefix

    def check(self) -> None:
        need(self.num_groups >= 0 and self.length >= 0, "workload.prefix.num_groups and length must be >= 0")
        need((self.num_groups == 0) == (self.length == 0), "workload.prefix: set both num_groups and length, or neither")


@dataclass
class WorkloadSpec:
    name: str = "fixed"
    num_requests: int = 16
    prompt: LengthDist = field(default_factory=LengthDist)  # the unique part of each prompt
    output: LengthDist = field(default_factory=LengthDist)
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    prefix: PrefixSpec = field(default_factory=PrefixSpec)
    n: int = 1  # parallel samples per request
    temperature: float = 0.0
    ignore_eos: bool = True  # so max_tokens is the exact output length
    # False: the engine returns token ids only (the harness measures tokens; text is host work every step);
    # True: it detokenizes as a server must, so an offline run can be held against a served one
    detokenize: bool = False

    def __post_init__(self) -> None:
        need(self.num_requests >= 1, f"workload.num_requests must be >= 1, got {self.num_requests}")
        need(self.n >= 1, f"workload.n must be >= 1, got {self.n}")
        need(self.temperature >= 0, f"workload.temperature must be >= 0, got {self.temperature}")
        self.prompt.check("workload.prompt")
        self.output.check("workload.output")
        self.dataset.check()
        self.prefix.check()


ARRIVAL_PROCESSES = ("offline", "closed", "poisson", "gamma", "trace")


@dataclass
class ArrivalSpec:
    """When requests arrive: all at t=0, a closed loop of clients, a Poisson/gamma process, or a trace."""

    process: str = "offline"
    concurrency: Optional[int] = None  # closed loop: clients, each sending its next request when the last one ends
    rate: Optional[float] = None  # poisson/gamma: requests per second
    burstiness: float = 1.0  # gamma shape: 1 = Poisson, < 1 burstier, > 1 smoother
    trace: Optional[str] = None  # a file of arrival times in seconds (one per line, or JSONL with "timestamp")
    # poisson/gamma: the offered load in output tokens/s instead of a rate: rate = load / the workload's mean output
    # length, so one sweep of loads suits workloads of different lengths (paper_repro's ShareGPT and Alpaca)
    load: Optional[float] = None
    # poisson/gamma: send the requests of this many seconds, round(rate x window), instead of workload.num_requests,
    # so every point of a rate sweep lasts about as long and a system past its capacity builds the same queue
    window: Optional[float] = None

    def __post_init__(self) -> None:
        need(self.process in ARRIVAL_PROCESSES, f"arrival.process must be one of {', '.join(ARRIVAL_PROCESSES)}, got {self.process!r}")
        if self.process == "closed" or self.concurrency is not None:
            need(self.concurrency is not None and self.concurrency >= 1,
                  f"arrival.concurrency must be an integer >= 1, got {self.concurrency}")
        timed = self.process in ("poisson", "gamma")
        for key in ("load", "window"):
            value = getattr(self, key)
            need(value is None or (timed and value > 0), f"arrival.{key} must be > 0 and needs process poisson or gamma, "
                  f"got {value} with process {self.process}")
        need(self.load is None or self.rate is None, f"arrival: set rate or load, not both (rate={self.rate}, load={self.load})")
        if (timed and self.load is None) or self.rate is not None:
            need(self.rate is not None and self.rate > 0, f"arrival.rate must be > 0 requests/s, got {self.rate}")
        need(self.burstiness > 0, f"arrival.burstiness must be > 0, got {self.burstiness}")
        if self.process == "trace":
            need(self.trace is not None, "arrival.trace needs a value: the file of arrival times")
            need(Path(self.trace).is_file(), f"arrival.trace: file {self.trace!r} does not exist")


@dataclass
class SLOSpec:
    """Goodput counts the requests that meet every limit (None = no limit on that figure)."""

    ttft_s: Optional[float] = 1.0
    tpot_s: Optional[float] = 0.1
    e2e_s: Optional[float] = None


@dataclass
class SaturationSpec:
    """Where a system stops keeping up with a swept rate: the vLLM paper's Fig. 12 reading (harness.bench.sustain,
    harness.bench.saturation). The report's rule: a system sustains a value of ``along`` while the median over repeats of
    its mean normalized latency stays within ``sustain_factor`` x the unloaded latency (the lowest median of any
    series at the sweep's lowest value); its sustainable rate is where its curve crosses that limit."""

    along: str = "arrival.rate"
    sustain_factor: float = 4.0
    # Skip a series' higher values once a lower one exceeded skip_factor x that series' lowest (None: run every point).
    # At least sustain_factor: the point that triggers it is then beyond the report's limit, and the crossing lies below it.
    skip_factor: Optional[float] = None

    def __post_init__(self) -> None:
        need(self.sustain_factor > 1, f"saturation.sustain_factor must be > 1, got {self.sustain_factor}")
        need(self.skip_factor is None or self.skip_factor >= self.sustain_factor,
              f"saturation.skip_factor must be at least sustain_factor ({self.sustain_factor}) so no sustained point is "
              f"skipped, got {self.skip_factor}")


@dataclass
class Config:
    name: str = "default"  # the experiment's name: output folders and report titles
    seed: int = 0
    engine: Any = MISSING  # one of engines.config's dataclasses, chosen in the engine/ group
    model: ModelSpec = field(default_factory=ModelSpec)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    arrival: ArrivalSpec = field(default_factory=ArrivalSpec)
    slo: SLOSpec = field(default_factory=SLOSpec)
    saturation: SaturationSpec = field(default_factory=SaturationSpec)
    # Settings for one kind of engine in a sweep over engines, keyed by the engine kind (engine.name:
    # hf, hf_paged, contiguous, paged), so every config of a kind gets them (contiguous_pow2 those of
    # contiguous); checked against that engine's schema.
    engine_overrides: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    warmup_requests: int = 1  # untimed requests run before the measurement
    torch_threads: Optional[int] = None  # torch's CPU threads for the job (None: torch's default)
    require_cuda: bool = False  # reference workloads at real-model sizes refuse a CPU run
    report: bool = True  # write the report when the run or sweep ends
    report_dir: Optional[str] = None  # where it goes; default: the run or sweep directory
    # Runs of every setting. Above 1 the app sweeps `repeat` over 0..repeats-1 as the outermost
    # dimension, so the repeats interleave (every setting once, then again...) and drift hits every
    # engine alike; repeat r draws its workload and arrivals from seed + r.
    repeats: int = 1
    repeat: int = 0  # this run's repeat (set by the sweep)
    # Continue the latest sweep of this experiment (or hydra.sweep.dir): finished runs whose recorded
    # config equals the requested one are kept, unfinished and failed ones run again.
    resume: bool = False
    # Keep the engine loaded between consecutive runs of a sweep with the same engine and model settings, as one
    # server serves every rate of a `vllm bench serve` sweep (harness.bench.engine_keeper); false builds one per run.
    reuse_engine: bool = False
    # Also write each run as `vllm bench serve --save-result` does (vllm_result.json beside the tables, vLLM's fields).
    save_vllm_result: bool = False


# Top-level keys that say how to run or report, not what a run measures: a resumed sweep may change them.
NOT_MEASURED = ("repeats", "resume", "report", "report_dir", "reuse_engine", "saturation", "save_vllm_result")


def check_run_settings(cfg: Any) -> None:
    """Value checks of the top-level knobs (the nodes check themselves in __post_init__)."""
    need(cfg.repeats >= 1, f"repeats must be >= 1, got {cfg.repeats}")
    need(0 <= cfg.repeat, f"repeat must be >= 0, got {cfg.repeat}")
    need(cfg.warmup_requests >= 0, f"warmup_requests must be >= 0, got {cfg.warmup_requests}")
    need(cfg.torch_threads is None or cfg.torch_threads >= 1, f"torch_threads must be >= 1 (or null), got {cfg.torch_threads}")
    for key in cfg.engine_overrides:
        need(key in ENGINE_CONFIGS, f"engine_overrides: {key!r} is not an engine kind; the keys are engine kinds "
              f"(engine.name), one of: {', '.join(sorted(ENGINE_CONFIGS))}")


def register_configs() -> None:
    """The base config, and the engine schemas that conf/engine extends (under schema/, not a user choice), with the
    benchmark's one target that is not an engine of ours: a server over HTTP (``engine=http``)."""
    from harness.bench.http.config import HTTPConfig

    register_resolvers()
    register_engine_schemas()
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="schema/engine", name="http", node=HTTPConfig)
