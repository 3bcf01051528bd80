"""A trainer's side of the rollout server (`python -m elastic_decode.serve`): the `LLM` calls an RL
loop needs, over HTTP, so trainer and engine can live in two processes (or on two machines).

    client = RolloutClient("http://127.0.0.1:8000")
    batch = client.generate(prompt_ids, SamplingParams(n=8, think_budget=256, solution_budget=64))
    client.pause("keep"); client.update_weights(model.named_parameters()); client.resume()

`generate` returns the same RolloutBatch as `LLM.generate_tensors`; the aliases `generate_tensors`
and `load_weights` let code written for an `LLM` (make_rollout_func for TRL) take a client instead.
Only the standard library speaks HTTP here; weights travel as one safetensors body.
"""
from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence

import torch

from .errors import ElasticDecodeError, InvalidRequestError
from .llm import RolloutBatch, rollout_batch
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams


class RolloutClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float | None = None):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout  # seconds per call; None waits as long as generation takes

    # -- generation -----------------------------------------------------------------------

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """Token ids in, padded tensors out (rows grouped by prompt, `params.n` per prompt), as
        `LLM.generate_tensors` returns them."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        body = {**dataclasses.asdict(params), "prompt_token_ids": [list(p) for p in prompt_token_ids]}
        reply = self._post("/generate", body)
        outputs = [
            RequestOutput(
                request_id=i, prompt=None, prompt_token_ids=row["prompt_token_ids"],
                outputs=[CompletionOutput(
                    index=c["index"], text=c["text"], thinking_text=c["thinking_text"],
                    solution_text=c["solution_text"], token_ids=c["token_ids"], logprobs=c["logprobs"],
                    forced_mask=c["forced_mask"], think_tokens=c["think_tokens"],
                    solution_tokens=c["solution_tokens"], forced_end=c["forced_end"],
                    finish_reason=c["finish_reason"],
                    top_logprobs=None if c.get("top_logprobs") is None
                    else [[tuple(pair) for pair in step] for step in c["top_logprobs"]])
                    for c in row["completions"]])
            for i, row in enumerate(reply["outputs"])
        ]
        return rollout_batch(outputs, reply["pad_token_id"])

    generate_tensors = generate

    def encode(self, text: str) -> list[int]:
        """A raw text prompt's token ids, by the server's tokenizer (as `LLM.encode`)."""
        return self._post("/tokenize", {"prompt": text})["tokens"]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A conversation's prompt ids through the server model's chat template (as `LLM.encode_chat`)."""
        return self._post("/tokenize", {"messages": list(messages)})["tokens"]

    # -- weights and control ----------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Send HF-named weights (e.g. `model.named_parameters()`); the server copies them in place,
        all or nothing. Returns how many it copied."""
        from safetensors.torch import save

        tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in named_tensors}
        return self._post("/update_weights", save(tensors), content_type="application/octet-stream")["updated"]

    load_weights = update_weights

    def update_weights_from_path(self, path: str) -> int:
        """Load the weights of a checkpoint directory on the server's machine."""
        return self._post("/update_weights", {"path": str(path)})["updated"]

    def pause(self, mode: str = "keep") -> None:
        """"keep" holds in-flight requests (they continue after resume), "wait" lets them finish
        first, "abort" ends them with their partial tokens."""
        self._post("/pause", {"mode": mode})

    def resume(self) -> None:
        self._post("/resume", {})

    def health(self) -> dict:
        return self._request(urllib.request.Request(self.url + "/health"))

    # -- HTTP -----------------------------------------------------------------------------

    def _post(self, path: str, body, content_type: str = "application/json") -> dict:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST",
                                         headers={"Content-Type": content_type})
        return self._request(request)

    def _request(self, request: urllib.request.Request) -> dict:
        if self.api_key is not None:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as e:
            try:
                error = json.loads(e.read())["error"]
                message, param = error["message"], error.get("param")
            except (ValueError, KeyError, TypeError):
                message, param = e.reason, None
            kind = InvalidRequestError if 400 <= e.code < 500 else ElasticDecodeError
            raise kind(f"{request.full_url}: {e.code} {message}", **({"param": param} if kind is InvalidRequestError
                                                                     else {})) from None
        except urllib.error.URLError as e:
            raise ElasticDecodeError(f"cannot reach the rollout server at {self.url}: {e.reason}") from None
