"""The request lifecycle: the engine (requests in, steps, outputs out), the loop that runs it on a thread of
its own, start-up on a device, the tokenizer, and the two-call budget recipe kept to measure against."""
from .llm_engine import LLMEngine, Request
from .loop import EngineLoop

__all__ = ["EngineLoop", "LLMEngine", "Request"]
