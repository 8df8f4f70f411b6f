"""Responses API requests → the engine's GenerationRequest, and the generated text → Response objects."""

from __future__ import annotations

import msgspec

from litestar_llm.config import SamplingDefaults
from litestar_llm.dialects.responses import wire
from litestar_llm.engine.base import ModelInfo
from litestar_llm.engine.types import ChatMessage, GenerationRequest, SamplingParams
from litestar_llm.errors import InvalidRequestError

_TEXT_PARTS = frozenset({"input_text", "output_text"})  # an assistant turn sent back comes as output_text
_STATUS = {"stop": "completed", "length": "incomplete", "cancelled": "cancelled"}


def check_supported(body: wire.CreateResponse, info: ModelInfo) -> None:
    """Refuse what would change the answer and cannot be honoured; harmless fields (user, truncation,
    parallel_tool_calls, reasoning, include, ...) are accepted and ignored."""
    text_format = body.text.format.type if body.text is not None else "text"
    if text_format != "text" and not info.structured_output:
        raise InvalidRequestError(
            f"text.format '{text_format}' needs constrained decoding, which the {info.backend} backend serving "
            f"'{info.name}' does not support",
            param="text.format",
        )
    if body.tools:
        raise InvalidRequestError("tools are not supported by this server", param="tools")
    if body.tool_choice is not None and body.tool_choice not in ("auto", "none"):
        raise InvalidRequestError("tool_choice needs tools, which this server does not support", param="tool_choice")
    if body.background:
        raise InvalidRequestError("background responses are not supported by this server", param="background")
    if body.conversation is not None:
        raise InvalidRequestError(
            "conversations are not supported by this server; continue with previous_response_id", param="conversation"
        )
    if body.prompt is not None:
        raise InvalidRequestError("prompt templates are not supported by this server", param="prompt")


def input_messages(body: wire.CreateResponse) -> list[ChatMessage]:
    """This turn's input as chat messages; developer messages are system messages, as in the chat dialect."""
    if isinstance(body.input, str):
        return [ChatMessage(role="user", content=body.input)]
    messages = []
    for i, item in enumerate(body.input or []):
        if item.type != "message":
            raise InvalidRequestError(
                f"input items of type '{item.type}' are not supported by this server; send messages",
                param=f"input[{i}]",
            )
        if item.role is None:
            raise InvalidRequestError(f"input[{i}].role: required field is missing", param=f"input[{i}].role")
        if item.content is None:
            raise InvalidRequestError(f"input[{i}].content: required field is missing", param=f"input[{i}].content")
        role = "system" if item.role == "developer" else item.role
        messages.append(ChatMessage(role=role, content=_item_text(item.content, i)))
    return messages


def _item_text(content: str | list[wire.InputPart], index: int) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type not in _TEXT_PARTS:
            raise InvalidRequestError(
                f"content parts of type '{part.type}' are not supported by this server; send input_text",
                param=f"input[{index}].content[{j}]",
            )
        texts.append(part.text or "")
    return "".join(texts)


def sampling_params(body: wire.CreateResponse, defaults: SamplingDefaults) -> SamplingParams:
    """The request's values, else the model's defaults, else OpenAI's. The Responses API has no stop, seed or
    top_k of its own, so those come from [models.defaults] alone."""
    fmt = body.text.format if body.text is not None else wire.TextFormat(type="text")
    if fmt.type == "json_schema" and not isinstance(fmt.schema, dict):
        raise InvalidRequestError("text.format.schema: a JSON schema object is required", param="text.format.schema")

    def pick(sent: float | None, configured: float | None) -> float:
        return sent if sent is not None else (configured if configured is not None else 1.0)

    return SamplingParams(
        temperature=pick(body.temperature, defaults.temperature),
        top_p=pick(body.top_p, defaults.top_p),
        top_k=defaults.top_k or 0,
        min_p=defaults.min_p or 0.0,
        repetition_penalty=defaults.repetition_penalty,
        seed=defaults.seed,
        max_tokens=body.max_output_tokens or defaults.max_tokens,
        stop=list(defaults.stop or []),
        json_object=fmt.type == "json_object",
        json_schema=fmt.schema if fmt.type == "json_schema" else None,
    )


def generation_request(
    body: wire.CreateResponse, conversation: list[ChatMessage], defaults: SamplingDefaults
) -> GenerationRequest:
    if not conversation:
        raise InvalidRequestError("input is required (a string or a list of messages)", param="input")
    instructions = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
    return GenerationRequest(
        model=body.model, messages=instructions + conversation, sampling=sampling_params(body, defaults)
    )


# -- generated text → Response objects ----------------------------------------------------------------------


def in_progress(
    body: wire.CreateResponse, sampling: SamplingParams, response_id: str, created_at: int
) -> wire.Response:
    """The response as created: every field the request decides, echoed; no output yet."""
    return wire.Response(
        id=response_id,
        created_at=created_at,
        status="in_progress",
        instructions=body.instructions,
        max_output_tokens=sampling.max_tokens,
        model=body.model,
        parallel_tool_calls=body.parallel_tool_calls,
        previous_response_id=body.previous_response_id,
        store=body.store,
        temperature=sampling.temperature,
        text=body.text or wire.TextConfig(),
        tool_choice=body.tool_choice if isinstance(body.tool_choice, str) else "auto",
        top_p=sampling.top_p,
        metadata=body.metadata or {},
    )


def usage(prompt_tokens: int, completion_tokens: int) -> wire.Usage:
    return wire.Usage(
        input_tokens=prompt_tokens,
        input_tokens_details=wire.InputTokensDetails(),
        output_tokens=completion_tokens,
        output_tokens_details=wire.OutputTokensDetails(),
        total_tokens=prompt_tokens + completion_tokens,
    )


def message(item_id: str, text: str, status: wire.ItemStatus) -> wire.OutputMessage:
    return wire.OutputMessage(id=item_id, status=status, content=[wire.OutputText(text=text)])


def finished(
    draft: wire.Response, item_id: str, text: str, finish_reason: str | None, used: wire.Usage, now: int
) -> wire.Response:
    status = _STATUS.get(finish_reason or "stop", "completed")
    return msgspec.structs.replace(
        draft,
        status=status,
        completed_at=now if status == "completed" else None,
        incomplete_details=wire.IncompleteDetails("max_output_tokens") if status == "incomplete" else None,
        output=[message(item_id, text, "incomplete" if status == "incomplete" else "completed")],
        usage=used,
    )


def failed(draft: wire.Response, status_code: int, text: str) -> wire.Response:
    """OpenAI's error codes for a response are few: a rate limit, a prompt it will not take, or its own fault."""
    code = "rate_limit_exceeded" if status_code == 429 else "invalid_prompt" if status_code < 500 else "server_error"
    return msgspec.structs.replace(draft, status="failed", error=wire.ResponseError(code, text))
