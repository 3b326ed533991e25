"""A Django-style project: ``proj/celery.py`` makes the app, ``shop/tasks.py`` holds ``@shared_task`` steps.

As in a Django project, nothing in ``shop`` names the app: the tasks module
is imported by the app's autodiscovery, and the saga runs on the current app.
"""
