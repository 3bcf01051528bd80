"""Text side of the engine: encoding, chat templates, the end-of-thinking marker, decoding."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InvalidRequestError, ModelLoadError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
THINK_CLOSE_FALLBACK = "\n</think>\n\n"


class Tokenizer:
    def __init__(self, path: Path, hf_config):
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # a missing or broken tokenizer file can raise anything
            raise ModelLoadError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}") from None
        self.eos_ids = self._eos_ids(path, hf_config)
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_ids[0]
        opened = self.hf(THINK_OPEN, add_special_tokens=False)["input_ids"]
        self.think_open: int | None = opened[0] if len(opened) == 1 else None  # the model's <think> token, if any
        self.assistant_start = self._assistant_start()
        self.model_type = getattr(hf_config, "model_type", "")

    def _eos_ids(self, path: Path, hf_config) -> tuple[int, ...]:
        ids: list[int] = []

        def add(value) -> None:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, int) and v not in ids:
                    ids.append(v)

        add(self.hf.eos_token_id)
        add(getattr(hf_config, "eos_token_id", None))
        gen = path / "generation_config.json"
        if gen.is_file():
            add(json.loads(gen.read_text()).get("eos_token_id"))
        if not ids:
            raise ModelLoadError(f"the checkpoint in {path} defines no EOS token")
        return tuple(ids)

    def _assistant_start(self) -> tuple[int, ...]:
        """The tokens the chat template puts before an assistant turn's text (what add_generation_prompt adds;
        with the opening of the thinking block for templates that open it, e.g. DeepSeek-R1's "<think>\n").
        Empty without a chat template."""
        if not getattr(self.hf, "chat_template", None):
            return ()
        turn = [{"role": "user", "content": "x"}]
        try:
            bare = self.hf.apply_chat_template(turn, tokenize=False, add_generation_prompt=False)
            asked = self.hf.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template that refuses this turn: no start to find
            return ()
        if not asked.startswith(bare) or asked == bare:
            return ()
        return tuple(self.hf(asked[len(bare):], add_special_tokens=False)["input_ids"])

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text)["input_ids"])

    def encode_chat(self, messages: list[dict], continue_final_message: bool = False,
                    chat_template_kwargs: dict | None = None) -> list[int]:
        """A conversation through the chat template, ready for the assistant's next turn; or, with
        `continue_final_message`, with its last (assistant) message left open to be continued."""
        if not getattr(self.hf, "chat_template", None):
            raise InvalidRequestError(
                "this model has no chat template; pass raw prompts (--no-chat-template on the CLI)"
            )
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=not continue_final_message,
                                           continue_final_message=continue_final_message, **(chat_template_kwargs or {}))
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def marker(self, end_think: str | tuple[int, ...] | None) -> tuple[int, ...]:
        """The end-of-thinking marker E as token ids (docs/architecture.md, "The budget contract")."""
        if isinstance(end_think, tuple):
            return end_think
        if end_think is None:
            ids = self.hf(THINK_CLOSE, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                ids = self.hf(THINK_CLOSE_FALLBACK, add_special_tokens=False)["input_ids"]
        else:
            ids = self.hf(end_think, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidRequestError(f"end_think {end_think!r} encodes to no tokens")
        return tuple(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def deer_transitions(self) -> tuple[str, ...]:
        """DEER's default transition strings for this model family: the reasoning models built on Qwen2/Qwen3
        (DeepSeek-R1 distills, QwQ, Qwen3) turn with "Wait" and "Alternatively" (the DEER paper's transitions);
        other models, which rarely say either, at paragraph breaks."""
        return ("Wait", "Alternatively") if self.model_type in ("qwen2", "qwen3") else ("Wait", "\n\n")
