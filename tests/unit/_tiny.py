"""Tiny stand-ins for a tokenizer, shared by the unit tests that run tiny random models."""

from __future__ import annotations


class CharTokenizer:
    """Printable ASCII → ids 2..95, ids 0/1 pad/eos (a tiny model needs no real tokenizer)."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True):
        return {"input_ids": [2 + (b - 32) % 94 for b in text.encode()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + int(i) - 2) for i in ids if int(i) > 1)
