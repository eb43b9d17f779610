"""What one rank of an estimator has sent to other ranks, by kind, and read from data files. No MPI."""

from __future__ import annotations

import pickle

import numpy as np

from .stream import StreamStats

KINDS = ("probabilities", "exchange", "parameters", "gradients", "results", "metadata")


class ByteCounter:
    """Bytes this rank sent, by kind (`count`, `totals`), and its reads of data files (`io`,
    the stream.StreamStats its streams add to; `bytes_read`)."""

    def __init__(self):
        self.sent = dict.fromkeys(KINDS, 0)
        self.io = StreamStats()

    def count(self, kind: str, payload):
        """Count `payload` (a byte count, an array, or any object as pickled) as sent."""
        if isinstance(payload, (int, np.integer)):
            self.sent[kind] += int(payload)
        else:
            self.sent[kind] += payload.nbytes if hasattr(payload, "nbytes") else len(pickle.dumps(payload))

    def totals(self, gradients: int = 0) -> dict:
        """{kind: bytes, ..., "total": their sum}, with `gradients` more gradient bytes (those
        a data-parallel group counts itself)."""
        sent = dict(self.sent)
        sent["gradients"] += gradients
        sent["total"] = sum(sent.values())
        return sent

    @property
    def bytes_read(self) -> int:
        return self.io.bytes_read
