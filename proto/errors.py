"""The one exception of the wire-protocol layer."""


class ProtoError(ValueError):
    """A message is malformed, violates a limit, or does not fit its context.

    The message names the offending field and its value. Decoders raise nothing else,
    whatever bytes they are given.
    """
