"""Tiny stand-ins (a tokenizer, a causal LM) and small helpers shared by the unit tests that
run tiny random models."""

from __future__ import annotations

import time


class CharTokenizer:
    """Printable ASCII → ids 2..95, ids 0/1 pad/eos (a tiny model needs no real tokenizer)."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True):
        return {"input_ids": [2 + (b - 32) % 94 for b in text.encode()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + int(i) - 2) for i in ids if int(i) > 1)


def tiny_llama_and_tokenizer():
    """A 1-layer random Llama (hidden 16, seed 0: every call the same weights) and a
    character-level fast tokenizer for ``a``-``z`` (ids 0/1 pad/eos)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, **{chr(97 + i): 2 + i for i in range(26)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>"
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
        )
    )
    return model, tok


def wait_for(pred, timeout: float = 10.0, step: float = 0.005) -> bool:
    """Poll ``pred`` until it is true (True) or ``timeout`` seconds pass (its last value)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()
