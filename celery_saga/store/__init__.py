"""Saga stores: the contract and its Redis implementation."""

from __future__ import annotations

from .base import SagaStore, StartRequest, Transition
from .redis import RedisSagaStore, mask_url

__all__ = ["RedisSagaStore", "SagaStore", "StartRequest", "Transition", "mask_url"]
