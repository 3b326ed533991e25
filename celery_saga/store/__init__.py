"""Saga stores: the contract, its Redis implementation, and the protocol of their transitions."""

from __future__ import annotations

from .base import SagaStore, StartRequest
from .protocol import Due, EndNotice, Op, Outcome, Transition
from .redis import RedisSagaStore, mask_url

__all__ = ["Due", "EndNotice", "Op", "Outcome", "RedisSagaStore", "SagaStore", "StartRequest", "Transition", "mask_url"]
