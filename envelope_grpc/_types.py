"""What identity resolvers see and say: the call, its peer, and refusals.

Below the core, so that resolvers (envelope_grpc.identity) and the core both
build on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from envelope_grpc.v1.envelope_pb2 import EnvelopeFlag, Principal


@dataclasses.dataclass(frozen=True, slots=True)
class Peer:
    """The immediate caller as the transport sees it."""

    address: str
    auth_context: Mapping[str, Sequence[bytes]]


@dataclasses.dataclass(frozen=True)
class CallInfo:
    """What an identity resolver sees of a call (metadata: first value per key)."""

    method: str
    metadata: Mapping[str, str | bytes]
    peer: Peer
    #: Flags a resolver raises for the envelope (e.g. untrusted gateway headers).
    flags: list[EnvelopeFlag.ValueType] = dataclasses.field(default_factory=list)
    #: Metadata keys sent more than once. ``metadata`` holds the first value
    #: only, so a resolver must refuse an identity header found here: a
    #: gateway that appends instead of replacing would leave the caller's copy first.
    repeated: frozenset[str] = frozenset()


class Unauthenticated(Exception):
    """Raised by a resolver for a missing, forged or expired credential.

    The message must name no token, key or secret: it reaches the caller.
    """

    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.message = message


class Resolver(Protocol):
    """Resolves who is calling; None when it has nothing to say."""

    def __call__(self, call: CallInfo, /) -> Principal | None: ...


#: Whether a peer's envelope may become lineage.
TrustPeer = Callable[[Peer], bool]
