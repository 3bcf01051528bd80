"""Errors caused by what a user asked for. The CLI prints these as one line, no traceback.

They subclass ValueError so that code written against plain ValueError still catches them.
"""


class ElasticDecodeError(ValueError):
    """Base class for user-facing errors (bad input, bad model path, bad settings)."""


class ModelLoadError(ElasticDecodeError):
    """The model path is missing, unreadable or not a supported checkpoint."""


class InvalidRequestError(ElasticDecodeError):
    """A prompt or sampling setting that cannot be served (empty, too long, out of range).

    `param` names the offending field where one is to blame (the server puts it in its error JSON)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class NonFiniteLogitsError(ElasticDecodeError):
    """The model produced NaN or inf logits (its weights, or the inputs to a weight update, hold
    non-finite values); the requests of that call are dropped."""
