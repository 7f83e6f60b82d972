"""Prompt sets: the JSONL format, loading with exact error locations, synthetic generators."""

from megatron_rl.data.arithmetic import generate_arithmetic_prompts
from megatron_rl.data.prompts import ChatMessage, PromptRecord, load_prompts, write_prompts

__all__ = ["ChatMessage", "PromptRecord", "generate_arithmetic_prompts", "load_prompts", "write_prompts"]
