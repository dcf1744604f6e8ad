"""The two errors users catch: a bad policy, and a model we do not know how to drive."""


class PolicyError(ValueError):
    """A policy, preset or one of its fields is malformed; the message names the field path."""


class UnsupportedModelError(TypeError):
    """The object given to ``enable`` is not a model family stepcache has an adapter for."""
