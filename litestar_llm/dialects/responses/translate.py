"""Responses API requests → the engine's GenerationRequest, and the generated text → Response objects."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from litestar_llm.config import ModelConfig
from litestar_llm.dialects.common import arguments_text, strict_schema
from litestar_llm.dialects.responses import wire
from litestar_llm.engine.base import ModelInfo
from litestar_llm.engine.types import (
    ChatMessage,
    GenerationRequest,
    NamedToolChoice,
    ReasoningOptions,
    SamplingParams,
    Tool,
    ToolCall,
    Usage,
)
from litestar_llm.errors import InvalidRequestError
from litestar_llm.serving import sampling

_TEXT_PARTS = frozenset({"input_text", "output_text"})  # an assistant turn sent back comes as output_text
_STATUS = {"stop": "completed", "tool_calls": "completed", "length": "incomplete", "cancelled": "cancelled"}


def check_supported(body: wire.CreateResponse) -> None:
    """Refuse what would change the answer and cannot be honoured; harmless fields (user, truncation, include,
    ...) are accepted and ignored."""
    for i, tool in enumerate(body.tools or ()):
        if tool.type != "function":
            raise InvalidRequestError(
                f"tools of type '{tool.type}' are not supported by this server; send function tools",
                param=f"tools[{i}].type",
            )
    if body.background:
        raise InvalidRequestError("background responses are not supported by this server", param="background")
    if body.conversation is not None:
        raise InvalidRequestError(
            "conversations are not supported by this server; continue with previous_response_id", param="conversation"
        )
    if body.prompt is not None:
        raise InvalidRequestError("prompt templates are not supported by this server", param="prompt")


def input_messages(body: wire.CreateResponse) -> list[ChatMessage]:
    """This turn's input as chat messages: developer messages are system messages, as in the chat dialect;
    consecutive `function_call` items are one assistant turn's calls; a `function_call_output` is a tool message."""
    if isinstance(body.input, str):
        return [ChatMessage(role="user", content=body.input)]
    messages: list[ChatMessage] = []
    for i, item in enumerate(body.input or []):
        if item.type == "function_call":
            if not item.call_id or not item.name:
                missing = "call_id" if not item.call_id else "name"
                raise InvalidRequestError(f"input[{i}].{missing}: required field is missing", param=f"input[{i}]")
            call = ToolCall(
                id=item.call_id, name=item.name, arguments=arguments_text(item.arguments, f"input[{i}].arguments")
            )
            if messages and messages[-1].role == "assistant" and not messages[-1].text:
                messages[-1].tool_calls.append(call)
            else:
                messages.append(ChatMessage(role="assistant", tool_calls=[call]))
        elif item.type == "function_call_output":
            if not item.call_id:
                raise InvalidRequestError(f"input[{i}].call_id: required field is missing", param=f"input[{i}].call_id")
            output = item.output if isinstance(item.output, str) else _item_text(item.output or [], i)
            messages.append(ChatMessage(role="tool", content=output, tool_call_id=item.call_id, name=item.name))
        elif item.type == "reasoning":
            continue
        elif item.type == "message":
            if item.role is None:
                raise InvalidRequestError(f"input[{i}].role: required field is missing", param=f"input[{i}].role")
            if item.content is None:
                raise InvalidRequestError(f"input[{i}].content: required field is missing", param=f"input[{i}].content")
            role = "system" if item.role == "developer" else item.role
            messages.append(ChatMessage(role=role, content=_item_text(item.content, i)))
        else:
            raise InvalidRequestError(
                f"input items of type '{item.type}' are not supported by this server; send messages and function "
                "call outputs",
                param=f"input[{i}]",
            )
    _name_tool_results(messages)
    return messages


def _name_tool_results(messages: list[ChatMessage]) -> None:
    """A function_call_output carries no name; templates that show it get the name of the call it answers."""
    names = {call.id: call.name for m in messages for call in m.tool_calls}
    for message in messages:
        if message.role == "tool" and message.name is None:
            message.name = names.get(message.tool_call_id or "")


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


def _sent(body: wire.CreateResponse) -> dict[str, object]:
    """The sampling values the client sent. The Responses API has no stop, seed or top_k of its own, so those
    come from [models.defaults] alone."""
    fmt = body.text.format if body.text is not None else wire.TextFormat(type="text")
    if fmt.type == "json_schema" and not isinstance(fmt.schema, dict):
        raise InvalidRequestError("text.format.schema: a JSON schema object is required", param="text.format.schema")
    sent: dict[str, object] = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_tokens": body.max_output_tokens,
    }
    if fmt.type == "json_object":
        sent["json_object"] = True
    elif fmt.type == "json_schema":
        sent["json_schema"] = strict_schema(fmt.schema) if fmt.strict is True else fmt.schema
    return sent


def tools_of(body: wire.CreateResponse) -> list[Tool]:
    return [
        Tool(
            name=t.name or "",
            description=t.description,
            parameters=t.parameters if t.parameters is not None else {"type": "object"},
            strict=bool(t.strict),
        )
        for t in body.tools or ()
    ]


def generation_request(
    body: wire.CreateResponse, conversation: list[ChatMessage]
) -> Callable[[ModelConfig, ModelInfo], GenerationRequest]:
    if not conversation:
        raise InvalidRequestError("input is required (a string or a list of messages)", param="input")
    instructions = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
    sent = _sent(body)
    tools = tools_of(body)
    choice = body.tool_choice
    tool_choice = NamedToolChoice(name=choice.name) if isinstance(choice, wire.NamedFunction) else choice or "auto"
    effort = body.reasoning.effort if body.reasoning is not None else None

    def build(model: ModelConfig, _info: ModelInfo) -> GenerationRequest:
        return GenerationRequest(
            model=body.model,
            messages=instructions + conversation,
            sampling=sampling(sent, model.defaults),
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=body.parallel_tool_calls,
            reasoning=ReasoningOptions(
                enabled=False if effort == "none" else None, effort=None if effort in (None, "none") else effort
            ),
        )

    return build


def param_name(field: str) -> str:
    """The engine's field names as the Responses API spells them."""
    if field.startswith("messages"):  # the conversation also holds earlier turns: its indexes are not input's
        return "input"
    return {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format"}.get(field, field)


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
        tool_choice=body.tool_choice or "auto",
        tools=body.tools or [],
        reasoning=body.reasoning,
        top_p=sampling.top_p,
        metadata=body.metadata or {},
    )


def usage(total: Usage) -> wire.Usage:
    return wire.Usage(
        input_tokens=total.prompt_tokens,
        input_tokens_details=wire.InputTokensDetails(cached_tokens=total.cached_prompt_tokens),
        output_tokens=total.completion_tokens,
        output_tokens_details=wire.OutputTokensDetails(reasoning_tokens=total.reasoning_tokens),
        total_tokens=total.total_tokens,
    )


def message(item_id: str, text: str, status: wire.ItemStatus) -> wire.OutputMessage:
    return wire.OutputMessage(id=item_id, status=status, content=[wire.OutputText(text=text)])


def reasoning_item(item_id: str, text: str, status: wire.ItemStatus) -> wire.Reasoning:
    return wire.Reasoning(id=item_id, status=status, content=[wire.ReasoningText(text=text)])


def function_call(item_id: str, call: ToolCall, status: wire.ItemStatus) -> wire.FunctionCall:
    return wire.FunctionCall(id=item_id, call_id=call.id, name=call.name, arguments=call.arguments, status=status)


def status_of(finish_reason: str | None) -> wire.Status:
    return _STATUS.get(finish_reason or "stop", "completed")


def finished(
    draft: wire.Response, output: list[wire.OutputItem], finish_reason: str | None, used: wire.Usage, now: int
) -> wire.Response:
    status = status_of(finish_reason)
    return msgspec.structs.replace(
        draft,
        status=status,
        completed_at=now if status == "completed" else None,
        incomplete_details=wire.IncompleteDetails("max_output_tokens") if status == "incomplete" else None,
        output=output,
        usage=used,
    )


def failed(draft: wire.Response, status_code: int, text: str) -> wire.Response:
    """OpenAI's error codes for a response are few: a rate limit, a prompt it will not take, or its own fault."""
    code = "rate_limit_exceeded" if status_code == 429 else "invalid_prompt" if status_code < 500 else "server_error"
    return msgspec.structs.replace(draft, status="failed", error=wire.ResponseError(code, text))
