"""The project package: importing it makes its Celery app the current one, as Django's convention does."""

from .celery import app as celery_app

__all__ = ["celery_app"]
