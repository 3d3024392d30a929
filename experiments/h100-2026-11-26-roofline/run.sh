#!/usr/bin/env bash
# Issue 13, third round (session 11): fewer kernels a layer (rotary_write_kv, attention writing in place), a
# cheaper eager launch path, the prefill tile by sequence length. Usage on the GPU machine, from the repo root:
#   experiments/h100-2026-11-26-roofline/run.sh OUT PART
#   PART tests: the GPU tests of the kernels, the engines against one-at-a-time greedy, asynchronous scheduling,
#               the step anatomy, vattention, the kernel peers against ours.
#   PART ab:    old (OLD=dir: the session's starting commit, from git archive) against new, one after the other,
#               twice each: step_profile.py decode and prefill, and launch_probe.py (eager host cost).
#   PART throughput, PART seed_8b: the head, contiguous and paged, 3 interleaved repeats each.
#   PART serve: the serve workload offline (seeds 0-2), then through `harness serve` + `harness bench-serve`
#               (seeds 0-2), as experiments/h100-2026-11-26-async/run.sh part 4.
#   PART peers: `python -m kernels.bench --sections peers --quick` (ours beside FlashInfer, FlexAttention, SDPA).
set -uo pipefail
out=${1:?output directory}; part=${2:?part}
py=${PYTHON:-python3}
here=experiments/h100-2026-11-26-roofline
mkdir -p "$out"
runs=${RUNS:-$out/runs}
if [ "$part" = tests ]; then
  timeout 150 $py -m pytest -q -m gpu tests/test_kernels_triton.py 2>&1 | tail -2
  timeout 420 $py -m pytest -q -m gpu -s tests/test_gpu_model.py 2>&1 | grep -E "requests equal|passed|failed" | tail -12
  for t in tests/test_async_scheduling.py tests/test_step_anatomy.py tests/test_gpu_vattention.py; do
    timeout 240 $py -m pytest -q $t 2>&1 | tail -1
  done
  timeout 200 $py -m pytest -q -m gpu tests/test_kernel_peers.py -k "not section" 2>&1 | tail -1
elif [ "$part" = ab ]; then
  for pass in 1 2; do for side in old new; do
    root=$PWD; [ $side = old ] && root=${OLD:?OLD=dir of the old tree}
    echo "### $side, pass $pass"
    (cd "$root" && PYTHONPATH=$root timeout 150 $py "$OLDPWD/$here/step_profile.py" decode prefill 2>&1 \
        | grep -E "^## |device .* per call|kernels per call|wall " | head -12)
    (cd "$root" && PYTHONPATH=$root timeout 60 $py "$OLDPWD/$here/launch_probe.py" 2>&1 | grep -E "^  [a-z_ ].* [0-9.]+$")
  done; done
elif [ "$part" = throughput ] || [ "$part" = seed_8b ]; then
  extra=(); [ $part = seed_8b ] && extra=(model.source=random)
  timeout ${SWEEP_TIMEOUT:-330} $py -m harness +experiment=$part engine=contiguous,paged repeats=3 report=false \
      hydra.sweep.dir="$runs/$part" "${extra[@]}" 2>&1 | grep -v WARNING | tail -2
  tar czf "$out/$part.tgz" -C "$runs" $part
elif [ "$part" = serve ]; then  # as experiments/h100-2026-11-26-async/run.sh part 4
  serve=(model=qwen3-0.6b engine=paged workload=fixed workload.num_requests=256 workload.prompt.value=512
         workload.output.value=128 arrival=closed arrival.concurrency=64)
  timeout 200 $py -m harness -m "${serve[@]}" seed=0,1,2 reuse_engine=true name=offline64 report=false \
      hydra.sweep.dir="$runs/serve/offline64" 2>&1 | grep -v WARNING | tail -3
  $py -m harness serve model=qwen3-0.6b engine=paged server.port=8000 > "$out/serve_server.log" 2>&1 &
  server=$!
  for _ in $(seq 180); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 1; done
  curl -s http://127.0.0.1:8000/kvbench/info > "$out/serve_info_before.json"
  timeout 200 $py -m harness bench-serve -m --base-url http://127.0.0.1:8000 --model qwen3-0.6b \
      --out "$runs/serve/serve64" "${serve[@]}" seed=0,1,2 name=serve64 report=false 2>&1 | grep -v WARNING | tail -3
  curl -s http://127.0.0.1:8000/kvbench/info > "$out/serve_info_after.json"
  kill -TERM $server; wait $server
  tar czf "$out/serve.tgz" -C "$runs" serve
elif [ "$part" = peers ]; then
  timeout ${PEERS_TIMEOUT:-400} $py -m kernels.bench --sections peers --quick --out "$out/kernels" 2>&1 \
      | tee "$out/peers.log" | tail -45
fi
