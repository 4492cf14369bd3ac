"""DeepSeek-V4's chat format on the way out: a generation read back as reasoning, content and tool calls."""

from dsv4.chat.output import ChatOutput, ChatOutputParser, ToolCall, parse_chat_output

__all__ = ["ChatOutput", "ChatOutputParser", "ToolCall", "parse_chat_output"]
