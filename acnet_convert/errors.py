"""Exceptions users can cause."""


class ACNetError(Exception):
    """A model, option or file that acnet-convert cannot work with; the message says how to fix it."""


class VerificationError(ACNetError):
    """A converted model whose outputs differ from the reference beyond tolerance."""
