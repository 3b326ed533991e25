"""Tests of the example shop, written with the celery_saga.testing plugin."""
