"""OpenAI's request and response shapes (``/v1/completions``, ``/v1/chat/completions``), as pydantic models.

Types are strict: a field of the wrong JSON type (``"max_tokens": "ten"``, ``"n": 1.5``,
``"stream": "yes"``) is a 400 naming the field, never a coercion. Fields OpenAI defines but
this server cannot honour (``logit_bias``, ``suffix``, ``tools``...) are refused with a 400
that says so, rather than ignored. Unknown fields are ignored, as vLLM does (and logged).
Sampling extras follow vLLM's names (top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids, include_stop_str_in_output, min_tokens).
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Body):
    include_usage: Optional[bool] = None
    continuous_usage_stats: Optional[bool] = None  # vLLM: usage in every chunk


class _Sampling(_Body):
    """Fields both endpoints share."""

    model: Optional[str] = None
    n: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[Dict[str, float]] = None
    user: Optional[str] = None
    min_tokens: int = 0
    skip_special_tokens: bool = True
    best_of: Optional[int] = None
    return_tokens_as_token_ids: bool = False  # vLLM: logprobs name tokens "token_id:<id>"


class CompletionRequest(_Sampling):
    # tried in this order, token ids first: a smart union validated a 512-token prompt as every member (5x the time)
    prompt: Union[List[int], str, List[str], List[List[int]]] = Field(union_mode="left_to_right")
    max_tokens: Optional[int] = 16
    echo: bool = False
    logprobs: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(_Body):
    type: str
    text: Optional[str] = None


class ChatMessage(_Body):
    role: str
    content: Optional[Union[str, List[TextPart]]] = None
    name: Optional[str] = None


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    response_format: Optional[Dict[str, Any]] = None
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None


class TokenizeCompletionRequest(_Body):
    """``POST /tokenize`` with a prompt, as vLLM takes it: the ids a completion of it would compute."""

    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Body):
    """``POST /tokenize`` with messages: the ids a chat completion of them would compute (the chat template's)."""

    model: Optional[str] = None
    messages: List[ChatMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None


class DetokenizeRequest(_Body):
    model: Optional[str] = None
    tokens: List[int]


# -- responses ---------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape: parallel lists, one entry per token (echoed prompt tokens first)."""

    tokens: List[str]
    token_logprobs: List[Optional[float]]
    top_logprobs: List[Optional[Dict[str, float]]]
    text_offset: List[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: List[TopLogprob]


class ChatLogprobs(BaseModel):
    content: Optional[List[ChatTokenLogprob]] = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: List[CompletionChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[ChatChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvbench"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: List[int]
    token_strs: Optional[List[str]] = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard] = Field(default_factory=list)
