"""Exceptions raised by tpcomm. Every message names what failed and what to do about it."""
from __future__ import annotations


class TpcommError(RuntimeError):
    """Base class of tpcomm's errors."""


class PeerTimeoutError(TpcommError):
    """A peer did not arrive at a synchronization point within the Communicator's timeout.

    Attributes name the op, its sequence number, this rank and the peers that were missing, so
    a hang in a serving engine can be traced to the rank that fell behind.
    """

    def __init__(self, op: str, seq: int, rank: int, peers: list[int], timeout_s: float,
                 detail: str = "", algorithm: str = "", nbytes: int = -1):
        self.op, self.seq, self.rank, self.peers = op, seq, rank, list(peers)
        self.timeout_s, self.algorithm, self.nbytes = timeout_s, algorithm, nbytes
        what = f"{op}" + (f" ({algorithm}, {nbytes} bytes)" if algorithm else "")
        super().__init__(f"tpcomm {what} #{seq}: {self._describe(detail)}; the Communicator is "
                         f"now broken: close it and create a new one")

    def _describe(self, detail: str) -> str:
        msg = (f"rank {self.rank} waited {self.timeout_s:g} s for peer(s) {self.peers} that did "
               f"not arrive")
        msg += f" ({detail})" if detail else ""
        return msg + " (raise timeout_s / TPCOMM_TIMEOUT_S if the peer is only slow)"


class PeerDiedError(PeerTimeoutError):
    """A peer exited, closed its Communicator or aborted while this rank needed it."""

    def _describe(self, detail: str) -> str:
        return f"rank {self.rank} cannot complete: {detail or f'peer(s) {self.peers} gone'}"


class CommunicatorBrokenError(TpcommError):
    """The Communicator failed earlier (timeout, dead peer) and refuses further calls."""


class CommunicatorClosedError(TpcommError):
    """The Communicator was closed."""


class MismatchError(TpcommError, ValueError):
    """Ranks called the same collective with different sizes, dtypes or ops."""
