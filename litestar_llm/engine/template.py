"""The conversation as chat templates take it (Hugging Face's message dicts), for every engine that renders one."""

from __future__ import annotations

import json
from typing import Any

from litestar_llm.engine.types import ChatMessage


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Hugging Face's chat-template form: assistant `tool_calls` with their arguments as an object (what Qwen,
    Llama and Hermes templates expect), tool results with `tool_call_id` and `name`, and earlier thinking as
    `reasoning_content` (templates that show it read that key; the others drop it)."""
    rendered = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.text}
        if message.tool_calls:
            item["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": json.loads(call.arguments or "{}")},
                }
                for call in message.tool_calls
            ]
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            item["name"] = message.name
        if message.reasoning:
            item["reasoning_content"] = message.reasoning
        rendered.append(item)
    return rendered
