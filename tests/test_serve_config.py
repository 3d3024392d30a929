"""`harness serve` configuration: vLLM-style flags and Hydra overrides of conf/serve.yaml, and their errors."""

from __future__ import annotations

import pytest

from engines.config import ContiguousConfig, PagedConfig
from harness import cli
from harness.serve.cli import load


def test_defaults_are_paged_on_loopback():
    resolved, names = load([])
    assert isinstance(resolved.engine, PagedConfig)
    assert resolved.server.host == "127.0.0.1" and resolved.server.port == 8000
    assert resolved.server.api_key is None
    assert names == [resolved.model.preset]


def test_vllm_flags(tiny_model, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.delenv("KVBENCH_API_KEY", raising=False)
    model_dir = tiny_model("tiny-qwen3")
    resolved, names = load(["--model", str(model_dir), "--port", "8011", "--host", "0.0.0.0", "--max-model-len", "2048",
                            "--gpu-memory-utilization", "0.8", "--served-model-name", "mine", "other",
                            "--api-key", "k=1", "--block-size", "32", "--max-num-seqs", "64", "--no-enable-prefix-caching",
                            "--max-queue", "7", "--seed", "3"])
    assert resolved.model.path == str(model_dir.resolve())
    assert (resolved.server.port, resolved.server.host, resolved.server.api_key) == (8011, "0.0.0.0", "k=1")
    assert resolved.server.max_queue == 7
    e = resolved.engine
    assert (e.max_model_len, e.gpu_memory_utilization, e.block_size, e.max_num_seqs, e.enable_prefix_caching, e.seed) == (
        2048, 0.8, 32, 64, False, 3)
    assert names == ["mine", "other"]


def test_model_directory_is_the_default_served_name(tiny_model):
    model_dir = str(tiny_model("tiny-qwen3"))
    _, names = load(["--model", model_dir])
    assert names == [model_dir]
    _, names = load(["--model", "tiny-llama"])
    assert names == ["tiny-llama"]


def test_hydra_overrides_and_flags_mix():
    resolved, _ = load(["--port", "9001", "engine=contiguous_pow2", "engine.max_num_seqs=8", "server.max_n=2",
                        "model=tiny-mistral"])
    assert isinstance(resolved.engine, ContiguousConfig) and resolved.engine.reservation == "pow2"
    assert resolved.engine_label == "contiguous_pow2" and resolved.engine.max_num_seqs == 8
    assert resolved.server.port == 9001 and resolved.server.max_n == 2
    assert resolved.model.preset == "tiny-mistral"
    resolved, _ = load(["--engine", "hf", "server.host=127.0.0.1"])
    assert resolved.engine.name == "hf"
    resolved, _ = load(["--tensor-parallel-size", "2"])
    assert resolved.engine.name == "paged" and resolved.engine.tensor_parallel_size == 2


def test_overrides_after_served_names_stay_overrides():
    resolved, names = load(["--served-model-name", "a", "b", "server.max_n=3"])
    assert names == ["a", "b"] and resolved.server.max_n == 3


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    resolved, _ = load([])
    assert resolved.server.api_key == "from-env"
    resolved, _ = load(["--api-key", "flag"])
    assert resolved.server.api_key == "flag"


@pytest.mark.parametrize("argv, words", [
    (["--model", "no-such-model-or-dir"], "neither a model directory nor a preset"),
    (["engine=nope"], "unknown engine"),
    (["server.prot=1"], "server.prot"),
    (["server.port=-5"], "server.port"),
    (["server.max_queue=0"], "server.max_queue"),
    (["server.engine_start_timeout_s=0"], "server.engine_start_timeout_s"),
    (["--engine", "hf", "--tensor-parallel-size", "2"], "--tensor-parallel-size: engine hf runs on one device"),
    (["--model", "tiny-qwen3", "--tensor-parallel-size", "3"], "tensor_parallel_size=3 does not divide"),
    (["--engine", "hf", "--block-size", "16"], "block_size"),
    (["--model", "tiny-qwen3", "--max-model-len", "999999"], "max_model_len 999999"),  # refused in the engine process
    (["server.api_server_count=0"], "server.api_server_count must be >= 1"),
    (["--api-server-count", "2", "server.engine_process=false"], "needs server.engine_process=true"),
    (["--model", "tiny-qwen3", "--api-server-count", "2", "--max-model-len", "999999"], "max_model_len 999999"),
])
def test_user_errors_exit_2_with_one_line(argv, words, capsys):
    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_unknown_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--no-such-flag", "1"])
    assert e.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_help_lists_the_vllm_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--port", "--max-model-len", "--gpu-memory-utilization", "--served-model-name", "--api-key",
                 "--api-server-count"):
        assert flag in out


def test_the_server_stands_on_its_own():
    """`harness serve` imports nothing of the benchmark: what both need lives in harness.common."""
    import subprocess
    import sys

    code = ("import sys, harness.serve.cli, harness.serve.app, harness.serve.engine_process, harness.serve.engine_worker; "
            "print(sorted(m for m in sys.modules if m.startswith('harness.bench')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_engine_http_is_not_an_engine_to_serve(capsys):
    assert cli.main(["serve", "engine=http"]) == 2
    assert "not an engine to serve" in capsys.readouterr().err
