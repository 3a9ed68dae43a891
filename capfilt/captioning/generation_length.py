"""Whether a captioner's text positions hold its prompt and ``max_new_tokens``.

Refused before any work, by the round's driver (no torch or transformers: the prompt is
counted with the ``tokenizers`` library), and again by the captioners themselves.
"""

from __future__ import annotations

from pathlib import Path

from capfilt.models.source import ModelSourceError, read_config

BLIP_PROMPT = "a picture of "

# A tokenizer.json is a few MiB.
TOKENIZER_BYTES = 64 << 20


def check_generation_length(source: str, max_new_tokens: int, prompt: str = BLIP_PROMPT) -> None:
    """Refuse, before any work, a ``max_new_tokens`` that would run the captioner past its text
    positions (every shard would fail with a shape error). Encoder-decoder language models
    (T5) have relative positions and no such limit."""
    config = read_config(source)
    text = config.get("text_config") or {}
    positions = text.get("max_position_embeddings")
    if not positions or text.get("is_encoder_decoder"):
        return
    if config.get("model_type") == "blip":
        used = 1 + count_tokens(source, prompt)  # [DEC], then the prompt without [CLS]/[SEP]
    else:
        lead = 1 if text.get("bos_token_id") is not None else 0
        used = config.get("num_query_tokens", 32) + lead + count_tokens(source, prompt.strip())
    fit_generation(f"captioner model {source}", max_new_tokens, used, positions)


def fit_generation(what: str, max_new_tokens: int, prompt_tokens: int, positions: int) -> None:
    """One check, shared by the driver and the captioners themselves."""
    if prompt_tokens + max_new_tokens <= positions:
        return
    room = positions - prompt_tokens
    fix = f"use --max-new-tokens {room} or fewer" if room > 0 else "use a shorter prompt"
    raise ModelSourceError(
        f"{what}: --max-new-tokens {max_new_tokens} needs {prompt_tokens} + {max_new_tokens} "
        f"text positions; the captioner has {positions} (text_config.max_position_embeddings): "
        f"{fix}")


def count_tokens(source: str, text: str) -> int:
    """Tokens of ``text`` without special tokens, by the folder's ``tokenizer.json`` (the
    ``tokenizers`` library, not transformers); else its UTF-8 bytes, which no tokenizer's
    count exceeds."""
    file = Path(source) / "tokenizer.json"
    if file.is_file() and file.stat().st_size <= TOKENIZER_BYTES:
        from tokenizers import Tokenizer

        try:
            return len(Tokenizer.from_file(str(file)).encode(text, add_special_tokens=False).ids)
        except Exception as exc:  # noqa: BLE001 - the library raises plain Exception, no subclass
            if type(exc) is not Exception:
                raise
    return len(text.encode("utf-8"))
