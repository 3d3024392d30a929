"""Model presets: the exact shapes of real architectures (random weights), and tiny ones for tests.

Each preset is the ``config.json`` a Hugging Face checkpoint of that model carries, plus
the chat format its tokenizer uses. Speed and memory depend on these shapes only, so a
preset measures like the real model; its generated text is meaningless.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class ChatFormat:
    """Special tokens (placed at the end of the vocabulary) and the chat template of a family.

    Templates that start with BOS render it themselves, as the real ones do: encode a
    rendered chat with ``add_special_tokens=False``."""

    specials: tuple[str, ...]
    bos: str | None
    eos: tuple[str, ...]  # the first is the tokenizer's eos_token
    pad: str
    add_bos: bool
    template: str


CHATML = ChatFormat(
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos=None,
    eos=("<|im_end|>", "<|endoftext|>"),
    pad="<|endoftext|>",
    add_bos=False,
    template=(
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
)

LLAMA3 = ChatFormat(
    specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    bos="<|begin_of_text|>",
    eos=("<|eot_id|>", "<|end_of_text|>"),
    pad="<|end_of_text|>",
    add_bos=True,
    template=(
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
        "message['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
)

MISTRAL = ChatFormat(
    specials=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
    bos="<s>",
    eos=("</s>",),
    pad="</s>",
    add_bos=True,
    template=(
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + '</s>' }}"
        "{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    ),
)

# Llama 2's chat format: Mistral's [INST] ... [/INST] turns without their special tokens, a system prompt in <<SYS>>.
LLAMA2 = replace(
    MISTRAL,
    specials=("<unk>", "<s>", "</s>"),
    template=(
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' </s>' }}"
        "{% else %}{{ '<<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}{% endif %}{% endfor %}"
    ),
)


@dataclass(frozen=True)
class Preset:
    name: str
    config: dict[str, Any]
    chat: ChatFormat
    tiny: bool = False
    # Tiny test models use a wide init so greedy outputs vary token to token (a sharp test of
    # exactness); real shapes use the usual 0.02.
    init_std: float = 0.02


def _llama(**shape: Any) -> dict[str, Any]:
    base = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "torch_dtype": "bfloat16",
    }
    return {**base, **shape}


def _qwen3(**shape: Any) -> dict[str, Any]:
    base = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
        "attention_bias": False, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "torch_dtype": "bfloat16",
        "use_sliding_window": False, "sliding_window": None,
    }
    return {**base, **shape}


def _qwen2(**shape: Any) -> dict[str, Any]:
    base = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "torch_dtype": "bfloat16",
        "use_sliding_window": False, "sliding_window": None,
    }
    return {**base, **shape}


def _mistral(**shape: Any) -> dict[str, Any]:
    base = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "torch_dtype": "bfloat16", "sliding_window": None,
    }
    return {**base, **shape}


_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 4096}

_MISTRAL_7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 32768,
               "tie_word_embeddings": False}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny-llama", _llama(**_TINY, head_dim=16, tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024}), LLAMA3, tiny=True, init_std=0.3),
        Preset("tiny-qwen3", _qwen3(**_TINY, head_dim=32, tie_word_embeddings=True), CHATML, tiny=True, init_std=0.3),
        Preset("tiny-qwen2", _qwen2(**_TINY, tie_word_embeddings=False), CHATML, tiny=True, init_std=0.3),
        Preset("tiny-mistral", _mistral(**_TINY, head_dim=16, tie_word_embeddings=False), MISTRAL, tiny=True, init_std=0.3),
        # A 64-token sliding window over the 4,096-token context (the sliding_window experiment on a CPU).
        Preset("tiny-mistral-sw", _mistral(**_TINY, head_dim=16, tie_word_embeddings=False, sliding_window=64),
               MISTRAL, tiny=True, init_std=0.3),
        Preset("qwen3-0.6b", _qwen3(
            hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
            tie_word_embeddings=True), CHATML),
        Preset("llama-3.2-1b", _llama(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
            tie_word_embeddings=True, rope_scaling={
                "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}), LLAMA3),
        Preset("llama-3.1-8b", _llama(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
            tie_word_embeddings=False, rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}), LLAMA3),
        # Llama-3.1-70B: 141 GB of bf16 weights, more than a GPU (or the GPU machines' disks) holds: run it with
        # model.source=random (each rank draws its shard on its device) and tensor_parallel_size >= 2.
        Preset("llama-3.1-70b", _llama(
            hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
            num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
            rope_theta=500000.0, tie_word_embeddings=False, rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}), LLAMA3),
        # The vLLM paper's memory setting (Kwon et al. 2023, section 6): 40 layers x 40 KV heads x 128 x K and V x
        # 2 bytes = 800 KiB of KV per token, as OPT-13B; 12 GiB of KV is then 15,728 token slots.
        Preset("llama-2-13b", _llama(
            hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
            num_key_value_heads=40, head_dim=128, vocab_size=32000, max_position_embeddings=4096,
            rope_theta=10000.0, tie_word_embeddings=False), LLAMA2),
        Preset("mistral-7b", _mistral(**_MISTRAL_7B, vocab_size=32768), MISTRAL),
        # Mistral-7B-v0.1: the same shape with its 4,096-token sliding window and 32,000-token vocabulary.
        Preset("mistral-7b-v0.1", _mistral(**_MISTRAL_7B, vocab_size=32000, rope_theta=10000.0, sliding_window=4096),
               MISTRAL),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
