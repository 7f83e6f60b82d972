"""From prompt records to the token ids the engine generates from, and from response ids back to text."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from megatron_rl.data.prompts import PromptRecord
from megatron_rl.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedPrompt:
    record: PromptRecord
    input_ids: list[int]


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise UserError(f"{model_dir} has no usable tokenizer ({error}); RL needs one to format prompts and read "
                        "answers: put the model's tokenizer files next to its config.json") from None


def encode_prompts(records: list[PromptRecord], tokenizer, apply_chat_template: bool, max_prompt_tokens: int,
                   source: str, system_prompt: str | None = None) -> list[EncodedPrompt]:
    """Token ids of each prompt: through the chat template when asked and the tokenizer has one.

    `system_prompt` is put first into conversations that have no system message of their own (many
    templates otherwise insert a default one).

    Prompts longer than `max_prompt_tokens` (the context left after the response budget) cannot be
    answered; they are dropped with a warning that names the first of them.
    """
    use_template = apply_chat_template and bool(getattr(tokenizer, "chat_template", None))
    encoded, too_long = [], []
    for record in records:
        if use_template:
            messages = record.chat_messages()
            if system_prompt is not None and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system_prompt}, *messages]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        elif record.prompt is not None:
            input_ids = tokenizer(record.prompt)["input_ids"]
        else:
            raise UserError(f"{source}: prompt '{record.id}' is given as 'messages', but the tokenizer has no chat "
                            "template (or data.apply_chat_template is false); give it as 'prompt' text")
        if not input_ids:
            raise UserError(f"{source}: prompt '{record.id}' encodes to no tokens; give it some text")
        (too_long if len(input_ids) > max_prompt_tokens else encoded).append(EncodedPrompt(record, list(input_ids)))
    if too_long:
        logger.warning("%s: %d prompt(s) longer than %d tokens (the context left after rollout.max_new_tokens) "
                       "are skipped, e.g. '%s'", source, len(too_long), max_prompt_tokens, too_long[0].record.id)
    if not encoded:
        raise UserError(f"{source}: no prompt fits in {max_prompt_tokens} tokens; lower rollout.max_new_tokens "
                        "or use shorter prompts")
    return encoded
