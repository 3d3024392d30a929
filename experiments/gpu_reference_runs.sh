#!/usr/bin/env bash
# The reference runs recorded under experiments/, on one GPU. Usage: experiments/gpu_reference_runs.sh OUT PART
#   PART a: the `throughput` experiment (hf_paged, contiguous, paged), and the paged engine
#           served over HTTP (bench-serve, 64 closed-loop streams) beside the same workload offline
#   PART b: the `memory_waste` experiment at full size
#   PART serve: where the HTTP path's time goes: the serve workload offline (token ids only, and with
#           text as a server makes it), then served with the engine in its own process (behind one API
#           process, and behind two: server.api_server_count=2) and on a thread of the server, with the CPU
#           seconds of every process and thread (experiments/proc_cpu.py)
#   PART measure: what KV accounting costs a step (benchmarks/kv_accounting.py) and `throughput` for contiguous
#           and paged, 3 interleaved repeats (the prefill kernel's extra paged stage, benchmarks/prefill_stages.py
#           until 2026-11-27, is gone: experiments/h100-2026-11-27-prefill/)
#   PART sweep: the main job, `concurrency_sweep`, for our engines (every contiguous reservation
#           policy and paged) at CONCURRENCY (default 1,4,16,64,256), REPEATS interleaved repeats (default 3)
#   PART baselines: the same sweep for the transformers baselines (hf, hf_paged), BASELINE_REPEATS (default 1)
#   PART paper: the vLLM paper's experiments (`paper_repro`: llama-2-13b, 12 GiB of KV), stopped at LIMIT seconds
#           (default 550) with Ctrl-C so that one device call stays inside its 10 minutes; RESUME=true continues
#           the sweep in RUNS; each engine's runs are packed apart (a device call returns files of 16 MiB at most)
#   PART tp: two GPUs of one host: the tensor-parallel GPU tests (tests/test_gpu_tensor_parallel.py, ~4 min), then
#           `seed_8b` for contiguous and paged at tensor_parallel_size 1 and 2, stopped at LIMIT seconds (default 300)
#   PART large: two GPUs: `large_model` (llama-3.1-70b, TP 2), stopped at LIMIT seconds (default 550); RESUME=true
#           continues it in RUNS (a second device call on the same warm machine: 24 runs take about 15 minutes)
# Each experiment's directory is packed as OUT/NAME.tgz. Reports are generated afterwards, from the
# unpacked runs, with `harness report`.
set -uo pipefail
out=${1:?output directory}; part=${2:?part a or b}
py=${PYTHON:-python3}
mkdir -p "$out"
runs=${RUNS:-$out}  # where sweeps run (RUNS outside OUT keeps them for a later resume=true)
pack() { tar czf "$out/$1.tgz" -C "$runs" "$1" && { [ "$runs" != "$out" ] || rm -rf "${out:?}/$1"; }; }
model=${MODEL:-qwen3-0.6b}  # MODEL=tiny-qwen3 REQUESTS=16 for a smoke run on a CPU
serve_workload=(model=$model workload=fixed workload.num_requests=${REQUESTS:-256} workload.prompt.value=512
                workload.output.value=128 arrival=closed arrival.concurrency=64)
levels=${CONCURRENCY:-1,4,16,64,256}
if [ "$part" = measure ]; then
  $py -m benchmarks.kv_accounting --out "$out/kv_accounting.csv" 2>&1 | tee "$out/kv_accounting.log"
  $py -m harness +experiment=throughput engine=contiguous,paged repeats=3 report=false \
      hydra.sweep.dir="$runs/throughput" 2>&1 | tee "$out/throughput.log"
  pack throughput
elif [ "$part" = sweep ]; then
  $py -m harness +experiment=concurrency_sweep engine=contiguous,contiguous_pow2,contiguous_oracle,paged \
      arrival.concurrency=$levels repeats=${REPEATS:-3} resume=${RESUME:-false} report=false \
      hydra.sweep.dir="$runs/concurrency_sweep" 2>&1 | tee -a "$out/concurrency_sweep.log"
  pack concurrency_sweep
elif [ "$part" = baselines ]; then
  timeout ${BASELINE_TIMEOUT:-100000} $py -m harness +experiment=concurrency_sweep engine=hf,hf_paged \
      arrival.concurrency=$levels repeats=${BASELINE_REPEATS:-1} report=false \
      hydra.sweep.dir="$runs/concurrency_sweep_baselines" 2>&1 | tee "$out/concurrency_sweep_baselines.log"
  pack concurrency_sweep_baselines
elif [ "$part" = a ]; then
  $py -m harness +experiment=throughput engine=hf_paged,contiguous,paged hydra.sweep.dir="$out/throughput"
  pack throughput
  $py -m harness engine=paged "${serve_workload[@]}" name=offline64 hydra.run.dir="$out/offline64"
  pack offline64
  $py -m harness serve model=qwen3-0.6b engine=paged server.port=8000 > "$out/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 120); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 1; done
  $py -m harness bench-serve --base-url http://127.0.0.1:8000 --model qwen3-0.6b --out "$out/serve64" \
      "${serve_workload[@]}" name=serve64
  kill -TERM $server; wait $server
  pack serve64
elif [ "$part" = serve ]; then
  seeds=${SEEDS:-0,1,2}  # each path runs the workload once per seed: closed-loop waves make single runs noisy
  $py -m harness -m engine=paged "${serve_workload[@]}" seed=$seeds name=offline64 hydra.sweep.dir="$out/offline64"
  pack offline64
  $py -m harness -m engine=paged "${serve_workload[@]}" workload.detokenize=true seed=$seeds name=offline64_text \
      hydra.sweep.dir="$out/offline64_text"
  pack offline64_text
  for mode in process processes thread; do  # processes: two API processes sharing the engine process
    flag=$([ $mode = thread ] && echo false || echo true)
    count=$([ $mode = processes ] && echo 2 || echo 1)
    $py -m harness serve model=$model engine=paged server.port=8000 server.engine_process=$flag \
        server.api_server_count=$count > "$out/serve_$mode.log" 2>&1 &
    server=$!
    for _ in $(seq 180); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 1; done
    before=$($py experiments/proc_cpu.py $server)
    TIMEFORMAT='{"user": %U, "sys": %S, "wall": %R}'
    client=$( { time $py -m harness bench-serve -m --base-url http://127.0.0.1:8000 --model $model \
        --out "$out/serve64_$mode" "${serve_workload[@]}" seed=$seeds name=serve64_$mode >> "$out/serve_$mode.log" 2>&1 ; } 2>&1 )
    after=$($py experiments/proc_cpu.py $server)
    echo "{\"server_before\": $before, \"server_after\": $after, \"client\": $client}" > "$out/serve64_$mode/cpu.json"
    curl -s http://127.0.0.1:8000/metrics > "$out/serve64_$mode/metrics.txt"
    kill -TERM $server; wait $server
    pack serve64_$mode
  done
elif [ "$part" = tp ] || [ "$part" = large ]; then
  if [ "$part" = tp ]; then
    $py -m pytest -q -s -m gpu tests/test_gpu_tensor_parallel.py -k "not killed" 2>&1 | tee "$out/tp_tests.log"
    # a hang here is what the test is for: a deadline of its own keeps it from taking the call
    timeout -k 10 240 $py -m pytest -q -s -m gpu tests/test_gpu_tensor_parallel.py -k killed 2>&1 | tee -a "$out/tp_tests.log"
    exp=seed_8b extra="engine=contiguous,paged engine.tensor_parallel_size=1,2 model.source=random" limit=${LIMIT:-300}
  else
    exp=large_model extra="" limit=${LIMIT:-550}
  fi
  timeout -s INT -k 30 $limit $py -m harness +experiment=$exp $extra resume=${RESUME:-false} report=false \
      hydra.sweep.dir="$runs/$exp" 2>&1 | tee -a "$out/$exp.log"
  find "$runs/$exp" -name '*.csv' -delete  # the Parquet tables hold the same rows
  pack $exp  # one archive: run directories' names hold "," and "=", which a device call does not return as files
elif [ "$part" = paper ]; then
  timeout -s INT -k 30 ${LIMIT:-550} $py -m harness +experiment=paper_repro resume=${RESUME:-false} report=false \
      hydra.sweep.dir="$runs/paper_repro" 2>&1 | tee -a "$out/paper_repro.log"
  find "$runs/paper_repro" -name '*.csv' -delete  # the Parquet tables hold the same rows
  for e in contiguous contiguous_pow2 contiguous_oracle paged; do
    (cd "$runs" && find paper_repro -maxdepth 1 -name "*engine=${e},*" -print0 | tar czf "$out/paper_repro_$e.tgz" --null -T -)
  done
  tar czf "$out/paper_repro_sweep.tgz" -C "$runs" --exclude='*=*' paper_repro
  $py experiments/paper_repro_table.py "$runs/paper_repro"
else
  $py -m harness +experiment=memory_waste hydra.sweep.dir="$out/memory_waste"
  pack memory_waste
fi
