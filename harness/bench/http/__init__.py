"""A server over HTTP as a benchmark target (``engine=http engine.base_url=URL``; ``harness bench-serve``).

One concept per file: ``config`` (the target's typed config), ``server`` (what the server is and serves),
``client`` (one request streamed into ``RequestOutput``s), ``kv_poller`` (KV memory during a run) and ``target``
(the job's view of it all: plan from its tokenizer, warm it up, run the workload). The run itself goes through
harness.bench.runner, and what is recorded through the same job code as an engine of ours in process.
"""
