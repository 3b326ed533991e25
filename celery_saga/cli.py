"""``celery -A proj saga ...``: the operator's commands, a thin layer over `celery_saga.admin`.

Commands::

    celery -A proj saga list [--status S] [--name N] [--since T] [--limit N] [--where KEY=VALUE ...] [--json]
                                     --where: by business key (Saga(search_keys=...)), as in order_id=7
    celery -A proj saga show ID [--json]
    celery -A proj saga stats [--json]
    celery -A proj saga retry ID     re-drive what gave up in a FAILED saga: compensations, or
                                     the steps past its pivot
    celery -A proj saga rerun ID [--again]
                                     start a COMPENSATED or FAILED saga anew: a new saga, its kwargs
    celery -A proj saga retry|purge|cancel|rerun [--name N] [--status S ...] [--reason R]
                            [--failed-step STEP] [--since T] [--until T] [--where KEY=VALUE ...]
                            [--dry-run] [--yes]
                                     the same for every saga the filters match (celery_saga.bulk_actions):
                                     a count and the first ids first, then a confirmation
    celery -A proj saga locks [LOCK] [--json]
                                     the locks and running limits held or waited for: holders, waiters
    celery -A proj saga unlock ID    give back the locks of a FAILED saga (its entity repaired by hand)
    celery -A proj saga signal ID EVENT [--data JSON]
                                     deliver an outside event to the saga's wait_for(EVENT)
    celery -A proj saga purge ID     remove a finished saga (COMPLETED, COMPENSATED or FAILED)
    celery -A proj saga cancel ID    stop a running saga and compensate it (exit 1 if it had finished)
    celery -A proj saga sweep [--once] [--interval S]
                                     act on due deadlines: a standalone sweeper (workers run one too)
    celery -A proj saga check [--timeout S]
                                     is every step and compensation registered on a running worker,
                                     those of the plans running sagas still follow too?
                                     (exit 1 if not, 69 if no worker answers)
    celery -A proj saga web [--address A] [--port P] [--url-prefix U] [--flower-url F]
                            [--basic-auth USER:PASSWORD ...] [--enable-actions]
                                     sagas in a browser, /metrics and /api (the web extra)

``--since`` takes ISO-8601 (``2026-11-27T03:00``, UTC unless it has an
offset) or a time ago: ``30s``, ``10m``, ``2h``, ``1d``, ``1w``. It filters on
when the saga entered its status. ``list`` reads the status indexes, newest
first, and skips entries whose record expired.

JSON (``--json``), a stable schema; times are ISO-8601 UTC with milliseconds
and a ``Z`` (``"2026-11-27T03:25:09.640Z"``), or null when unknown:

* list: ``{"sagas": [{"id", "name", "status", "status_at", "created_at",
  "failed_step", "error"}]}``, newest first. A record that cannot be read
  is listed with ``"corrupt": true`` and its ``error`` (its ``status`` is
  that of the index it was found in).
* show: ``{"id", "name", "status", "status_at", "created_at",
  "idempotency_key", "failed_step", "error", "reason", "kwargs", "data",
  "settings", "timeout", "deadline", "steps": [{"name", "task", "stage",
  "status", "attempts", "started_at", "ended_at", "error", "result",
  "timeout", "deadline", "stopped_by", "late", "compensation"}]}``, where
  ``reason`` is "failure", "timeout" or "cancelled" once rolling back;
  ``late`` is null unless the step finished after it was compensated blind,
  else ``{"status", "result", "error", "at"}``; ``compensation`` is null for
  a step with nothing to undo, else ``{"task", "status", "attempts",
  "started_at", "ended_at", "error", "deadline", "round2"}`` (``status`` null
  until it is dispatched; ``round2`` null, or the second round's ``{"status",
  "attempts", "started_at", "ended_at", "error"}``). ``reason`` may also be
  "rejected" (a wait's reject event), "parent" (a child saga its parent
  undid) or "forward" (a step past the pivot gave up). After the steps:
  ``"search_keys"`` ({key: value as text}, empty without business keys),
  ``"rerun_of"`` (the saga this one re-runs, or null) and ``"reruns"`` (its
  re-runs' ids). Only where they
  apply: ``"pivot"`` and ``"passed_pivot"``, with ``"retriable"`` and
  ``"forward_retries"`` on every step (a saga with a pivot); ``"parent":
  {"id", "step"}`` (a child saga); ``"child"``, the child's id, on a step
  that is a child saga. A wait is the step ``wait:<event>``.
* stats: ``{"by_status": {status: n}, "by_name": {name: {status: n}}}``,
  every status present; finished sagas count within ``saga_retention``. Once
  sagas were met lost in a reset of the store, also ``"lost_in_reset": n``.

Exit codes: 0 ok; 1 not found or expired, not allowed in the saga's status,
corrupt record or other saga error; 2 usage; 69 saga store unavailable.
Errors are one line on stderr: never a traceback, never a password.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import click
import redis
from celery.bin.base import CeleryCommand, CeleryOption
from celery.exceptions import CeleryCommandException
from kombu.exceptions import OperationalError

from . import admin, bulk_actions, locks, search, views
from . import rerun as reruns
from .admin import parse_since
from .errors import SagaError, SagaStoreMisconfigured, SagaStoreUnavailable
from .registry import sagas_of
from .settings import redact_keys
from .shutdown import interrupted_by_signals
from .state import SagaStatus
from .sweeper import SweeperThread
from .sweeper import sweep as sweep_once

__all__ = ["parse_since", "saga"]

EX_REFUSED = 1  # not found or expired, not allowed in its status, corrupt record
EX_UNAVAILABLE = 69  # sysexits.h, as Celery's own commands use
#: Seconds ``saga sweep`` waits for a pass in progress to end, once asked to stop.
STOP_GRACE = 2.0


def _since(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | timedelta | None:
    if value is None:
        return None
    try:
        return parse_since(value)
    except OverflowError:
        raise click.BadParameter(f"{value!r} is too far back: give a time after the year 1") from None
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither ISO-8601 nor a time ago like 30s, 10m, 2h, 1d") from None


@contextmanager
def _errors() -> Iterator[None]:
    """Our errors as one line and an exit code; click prints ``Error: <message>`` on stderr."""
    try:
        yield
    # The store's errors have the URL with its password masked.
    except SagaStoreMisconfigured as exc:  # it answers, and refuses: permissions, a key of the wrong type
        raise CeleryCommandException(message=str(exc), exit_code=EX_REFUSED) from exc
    except SagaStoreUnavailable as exc:
        raise CeleryCommandException(message=str(exc), exit_code=EX_UNAVAILABLE) from exc
    except OperationalError as exc:  # publishing a retry: the broker is down
        raise CeleryCommandException(message=f"broker unavailable: {exc}", exit_code=EX_UNAVAILABLE) from exc
    except SagaError as exc:
        raise CeleryCommandException(message=str(exc), exit_code=EX_REFUSED) from exc
    except redis.RedisError as exc:
        raise CeleryCommandException(
            message=f"saga store error: {type(exc).__name__}: {exc}", exit_code=EX_REFUSED
        ) from exc


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def _app(ctx: click.Context) -> Any:
    return ctx.obj.app


def _hint(ctx: click.Context, *words: str) -> str:
    """A command to run next, with the ``-A`` this one was given."""
    given = ctx.find_root().params.get("app")
    return views.command(given if isinstance(given, str) else _app(ctx).main, *words)


_JSON = click.option("--json", "as_json", cls=CeleryOption, is_flag=True, help="Print JSON (schema: see cli.py).")


@click.group(name="saga")
def saga() -> None:
    """Operate on sagas: list, show, stats, retry, rerun, signal, purge, cancel, locks, unlock, sweep, check, web."""


@saga.command(name="list", cls=CeleryCommand)
@click.option(
    "--status",
    cls=CeleryOption,
    type=click.Choice([s.value for s in SagaStatus], case_sensitive=False),
    metavar="STATUS",
    help=f"Only sagas in this status: {', '.join(s.value for s in SagaStatus)} (default: all).",
)
@click.option("--name", cls=CeleryOption, help="Only sagas of this name.")
@click.option(
    "--since",
    cls=CeleryOption,
    callback=_since,
    metavar="TIME",
    help="Entered the status since: ISO-8601, or 10m, 2h, 1d.",
)
@click.option("--limit", cls=CeleryOption, type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--where",
    cls=CeleryOption,
    multiple=True,
    metavar="KEY=VALUE",
    help="Only sagas with this business key (Saga(search_keys=...)), as in order_id=7; repeatable.",
)
@_JSON
@click.pass_context
def list_(
    ctx: click.Context,
    status: str | None,
    name: str | None,
    since: datetime | timedelta | None,
    limit: int,
    where: tuple[str, ...],
    as_json: bool,
) -> None:
    """List sagas, newest first, from the status indexes (from the business key index with --where)."""
    try:
        pairs = dict(search.where_pairs(where)) if where else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--where") from exc
    with _errors():
        found = admin.list_sagas(
            _app(ctx), status=status.upper() if status else None, name=name, since=since, limit=limit, where=pairs
        )
    if pairs and not found:
        declared = {k for s in sagas_of(_app(ctx)) for k in s.search_keys}
        unknown = sorted(set(pairs) - declared)
        if unknown and not as_json:
            click.echo(
                f"no saga of this app declares {', '.join(unknown)} in search_keys=(...): "
                "only business keys are indexed",
                err=True,
            )
    if as_json:
        # A corrupt record's entry also says so, as the web view's API does.
        _echo_json({"sagas": [{**s.to_json(), "corrupt": True} if s.corrupt else s.to_json() for s in found]})
        return
    click.echo(views.list_table(found) if found else "no sagas found")
    if any(s.corrupt for s in found):
        click.echo(f"\ncorrupt records cannot be read: `{_hint(ctx, 'show', 'ID')}` says why; purge a finished one")


@saga.command(cls=CeleryCommand)
@click.argument("saga_id")
@_JSON
@click.pass_context
def show(ctx: click.Context, saga_id: str, as_json: bool) -> None:
    """Show one saga: its status and the timeline of its steps and compensations."""
    with _errors():
        state = admin.saga_state(_app(ctx), saga_id)
        workers = admin.step_workers(_app(ctx), state)
        held = locks.lock_status(_app(ctx), state)
    if as_json:
        _echo_json(views.state_json(state, redact_keys(_app(ctx)), workers, held))
        return
    with _errors():
        children = admin.child_states(_app(ctx), state)
    click.echo(views.saga_text(state, children, workers, held))


@saga.command(cls=CeleryCommand)
@_JSON
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Count sagas by status and by saga name."""
    with _errors():
        counts = admin.saga_stats(_app(ctx))
    if as_json:
        _echo_json(counts.to_json())
        return
    click.echo(views.stats_tables(counts))


def _bulk_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The filters of a bulk action (`celery_saga.bulk_actions`), given instead of an id."""
    options = [
        click.option("--name", cls=CeleryOption, help="Only sagas of this name."),
        click.option(
            "--status",
            "statuses",
            cls=CeleryOption,
            multiple=True,
            type=click.Choice([s.value for s in SagaStatus], case_sensitive=False),
            metavar="STATUS",
            help="Only sagas in this status (repeatable; default: the statuses the action applies to).",
        ),
        click.option(
            "--reason", cls=CeleryOption, help="Only sagas whose rollback had this reason (failure, timeout ...)."
        ),
        click.option("--failed-step", cls=CeleryOption, help="Only sagas whose rollback this step started."),
        click.option("--since", cls=CeleryOption, callback=_since, metavar="TIME", help="Entered the status since."),
        click.option("--until", cls=CeleryOption, callback=_since, metavar="TIME", help="Entered the status until."),
        click.option(
            "--where", cls=CeleryOption, multiple=True, metavar="KEY=VALUE", help="Only sagas started with this kwarg."
        ),
        click.option(
            "--dry-run", cls=CeleryOption, is_flag=True, help="Print the count and the first ids; change nothing."
        ),
        click.option("--yes", cls=CeleryOption, is_flag=True, help="Do not ask for confirmation."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _run_bulk(ctx: click.Context, action: str, saga_id: str | None, **filters: Any) -> bool:
    """Run a bulk action if filters were given instead of an id; False if it is a single-saga call."""
    dry_run, yes = filters.pop("dry_run"), filters.pop("yes")
    given = {k: v for k, v in filters.items() if v not in (None, ())}
    if saga_id is not None:
        if given or dry_run:
            raise click.UsageError("give a saga id, or filters (--name, --status ...), not both")
        return False
    if not given:
        raise click.UsageError(f"give a saga id, or filters for a bulk {action} (--name, --status, --since ...)")
    try:
        where = search.parse_where(given.pop("where", ()))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--where") from exc
    statuses = given.pop("statuses", None)
    kwargs = {**given, "status": [s.upper() for s in statuses] if statuses else None, "where": where}
    app = _app(ctx)
    with _errors():
        if dry_run or not yes or _on_tty():
            counted = bulk_actions.bulk(app, action, dry_run=True, **kwargs)
            _print_dry_run(counted, action)
            if dry_run or counted.interrupted:
                return True
            if counted.matched == 0:
                return True
            if not yes:
                click.confirm(f"{action} {counted.matched:,} sagas?", abort=True)
        report = _with_progress(app, action, kwargs, counted.matched if _on_tty() else None)
    _print_report(report)
    if report.interrupted:
        raise CeleryCommandException(message="interrupted: run the same command again to finish", exit_code=130)
    return True


def _on_tty() -> bool:
    return sys.stdout.isatty()


def _with_progress(app: Any, action: str, kwargs: dict[str, Any], total: int | None) -> bulk_actions.BulkReport:
    if total is None:
        return bulk_actions.bulk(app, action, **kwargs)
    with click.progressbar(length=total, label=f"{action}") as bar:
        done = [0]

        def advance(matched: int) -> None:
            bar.update(min(matched, total) - done[0])
            done[0] = min(matched, total)

        return bulk_actions.bulk(app, action, progress=advance, **kwargs)


def _print_dry_run(report: bulk_actions.BulkReport, action: str) -> None:
    click.echo(f"{report.matched:,} sagas match: {action} would act on each")
    for saga_id in report.sample:
        click.echo(f"  {saga_id}")
    if report.matched > len(report.sample):
        click.echo(f"  ... and {report.matched - len(report.sample):,} more")


def _print_report(report: bulk_actions.BulkReport) -> None:
    click.echo(f"{report.action}: {report.matched:,} matched, {report.acted:,} done")
    for why, n in sorted(report.skipped.items()):
        click.echo(f"  skipped {n:,}: {why}")
    if report.error_count:
        click.echo(f"  errors {report.error_count:,}:")
        for saga_id, error in report.errors:
            click.echo(f"    {saga_id}: {error}")


@saga.command(cls=CeleryCommand)
@click.argument("saga_id", required=False)
@_bulk_options
@click.pass_context
def retry(ctx: click.Context, /, saga_id: str | None, **filters: Any) -> None:
    """Re-drive what gave up in a FAILED saga (or in every saga the filters match)."""
    if _run_bulk(ctx, "retry", saga_id, **filters):
        return
    assert saga_id is not None
    with _errors():
        admin.retry_saga(_app(ctx), saga_id)
    follow_it = _hint(ctx, "show", saga_id)
    click.echo(f"saga {saga_id}: what gave up was sent again; follow it with `{follow_it}`")


@saga.command("signal", cls=CeleryCommand)
@click.argument("saga_id")
@click.argument("event")
@click.option("--data", cls=CeleryOption, default=None, help="The event's data, as JSON (an object is merged).")
@click.pass_context
def signal_command(ctx: click.Context, saga_id: str, event: str, data: str | None) -> None:
    """Deliver an outside event to a saga waiting for it; exit 1 if it cannot take it."""
    try:
        value = None if data is None else json.loads(data)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--data") from exc
    with _errors():
        accepted = admin.signal_saga(_app(ctx), saga_id, event, value)
    if not accepted:
        raise CeleryCommandException(
            message=f"saga {saga_id} did not take event {event!r}: it has finished, has no wait for it, "
            f"or that wait is over; see `{_hint(ctx, 'show', saga_id)}`",
            exit_code=EX_REFUSED,
        )
    click.echo(f"saga {saga_id}: event {event!r} accepted")


@saga.command(cls=CeleryCommand)
@click.argument("saga_id", required=False)
@_bulk_options
@click.pass_context
def purge(ctx: click.Context, /, saga_id: str | None, **filters: Any) -> None:
    """Remove a finished saga (or every one the filters match) and its index entries."""
    if _run_bulk(ctx, "purge", saga_id, **filters):
        return
    assert saga_id is not None
    with _errors():
        admin.purge_saga(_app(ctx), saga_id)
    click.echo(f"saga {saga_id} purged")


@saga.command(name="locks", cls=CeleryCommand)
@click.argument("lock", required=False)
@_JSON
@click.pass_context
def locks_(ctx: click.Context, lock: str | None, as_json: bool) -> None:
    """List the locks and running limits sagas hold or wait for (or one LOCK): holders, then waiters in order."""
    with _errors():
        found = locks.list_locks(_app(ctx), lock)
    if as_json:
        _echo_json({"locks": [q.to_json() for q in found]})
        return
    if not found:
        click.echo(f"no saga holds or waits for {lock}" if lock else "no saga holds or waits for a lock")
        return
    for q in found:
        click.echo(f"{q.lock}: held by {', '.join(q.holders) or 'nobody'}")
        for n, waiter in enumerate(q.waiters, 1):
            click.echo(f"  {n}. {waiter}")


@saga.command(cls=CeleryCommand)
@click.argument("saga_id")
@click.pass_context
def unlock(ctx: click.Context, saga_id: str) -> None:
    """Give back the locks of a FAILED saga whose entity was repaired by hand; the next waiters start."""
    with _errors():
        locks.unlock_saga(_app(ctx), saga_id)
    click.echo(f"saga {saga_id}: its locks were given back; the sagas waiting for them start")


@saga.command(cls=CeleryCommand)
@click.argument("saga_id", required=False)
@click.option(
    "--again", cls=CeleryOption, is_flag=True, help="Re-run a saga that was re-run already (an id, not filters)."
)
@_bulk_options
@click.pass_context
def rerun(ctx: click.Context, /, saga_id: str | None, again: bool, **filters: Any) -> None:
    """Start a COMPENSATED or FAILED saga anew, as a new saga with its kwargs (or every one the filters match)."""
    if again and saga_id is None:
        raise click.UsageError("--again takes a saga id: a bulk re-run skips the sagas re-run already")
    if _run_bulk(ctx, "rerun", saga_id, **filters):
        return
    assert saga_id is not None
    with _errors():
        done = reruns.rerun(_app(ctx), saga_id, again=again)
    if done.plan_changed:
        click.echo(
            f"the saga's definition changed since {saga_id} started (plan {done.old_plan[:12]}, now "
            f"{done.new_plan[:12]}): the re-run runs the current one"
        )
    click.echo(f"saga {saga_id} re-run as {done.result.id}; follow it with `{_hint(ctx, 'show', done.result.id)}`")


@saga.command(cls=CeleryCommand)
@click.argument("saga_id", required=False)
@_bulk_options
@click.pass_context
def cancel(ctx: click.Context, /, saga_id: str | None, **filters: Any) -> None:
    """Stop a running saga (or every one the filters match) and compensate it; exit 1 if it had finished."""
    if _run_bulk(ctx, "cancel", saga_id, **filters):
        return
    assert saga_id is not None
    with _errors():
        cancelled = admin.cancel_saga(_app(ctx), saga_id)
    if not cancelled:
        raise CeleryCommandException(
            message=f"saga {saga_id} had already finished, or is past its pivot (it then finishes forward)",
            exit_code=EX_REFUSED,
        )
    click.echo(f"saga {saga_id} cancelled: it is being compensated; follow it with `{_hint(ctx, 'show', saga_id)}`")


@saga.command(cls=CeleryCommand)
@click.option(
    "--timeout",
    cls=CeleryOption,
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds to wait for the workers' answers.",
)
@click.pass_context
def check(ctx: click.Context, timeout: float) -> None:
    """Check that every step and compensation of the app's sagas is registered on some running worker."""
    with _errors():
        report = admin.check_registration(_app(ctx), timeout=timeout)
    if not report.workers:
        raise CeleryCommandException(
            message=f"no worker answered within {timeout:g}s: start the workers, or pass a longer --timeout",
            exit_code=EX_UNAVAILABLE,
        )
    click.echo(f"{len(report.workers)} worker(s) answered: {', '.join(report.workers)}")
    if report.running:
        click.echo("running sagas, by plan (a running saga keeps the plan it started with):")
        for plan in report.running:
            click.echo(f"  {plan}")
    if report.missing:
        click.echo("not registered on any worker:")
        for missing in report.missing:
            click.echo(f"  {missing}")
    if report.missing or report.stranded:
        problems = []
        if report.missing:
            problems.append(f"{len(report.missing)} task(s) the sagas need are not registered on any worker")
        if report.stranded:
            stranded = sum(p.count for p in report.stranded)
            problems.append(
                f"{stranded} running saga(s) need a task no worker has: keep it registered until they drain"
            )
        raise CeleryCommandException(message="; ".join(problems), exit_code=EX_REFUSED)
    click.echo("every step and compensation is registered, those of running sagas too")


@saga.command(cls=CeleryCommand)
@click.option("--once", cls=CeleryOption, is_flag=True, help="Sweep once, print what was done, and exit.")
@click.option(
    "--interval",
    cls=CeleryOption,
    type=click.FloatRange(min=0.01),
    default=None,
    help="Seconds between sweeps (default: saga_sweep_interval).",
)
@click.pass_context
def sweep(ctx: click.Context, once: bool, interval: float | None) -> None:
    """Act on due step, saga and compensation deadlines, like the sweeper inside every worker."""
    app = _app(ctx)
    if once:
        with _errors():
            report = sweep_once(app)
        dropped = f", dropped {report.dropped}" if report.dropped else ""
        click.echo(f"claimed {report.claimed}, acted on {report.acted}, errors {report.errors}{dropped}")
        return
    with _errors():
        thread = SweeperThread(app, name="celery_saga-sweeper")
    if interval is not None:
        thread.interval = interval
    # SIGINT and SIGTERM (a supervisor's stop) end it within STOP_GRACE
    # seconds, whatever the sweeper is doing: the thread is a daemon, so one
    # stuck in a Redis call does not hold the exit. Claims are leases, so even
    # a kill loses nothing; this keeps the exit clean and 0.
    with interrupted_by_signals():
        try:
            with _errors():
                admin.ping(app)
            click.echo(f"sweeping saga deadlines every {thread.interval:g}s; Ctrl-C to stop")
            thread.start()
            while thread.is_alive():
                thread.join(0.5)
        except KeyboardInterrupt:
            pass
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C while it stops
            click.echo("stopping")
            thread.stop(STOP_GRACE)


@saga.command(cls=CeleryCommand)
@click.option("--address", cls=CeleryOption, default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", cls=CeleryOption, type=click.IntRange(0, 65535), default=5557, show_default=True)
@click.option(
    "--url-prefix",
    cls=CeleryOption,
    default="",
    help="Serve under this path (letters, digits and -._~ segments, like /sagas), behind a proxy.",
)
@click.option("--flower-url", cls=CeleryOption, default=None, help="Link task ids to this Flower's task pages.")
@click.option(
    "--basic-auth",
    cls=CeleryOption,
    multiple=True,
    metavar="USER:PASSWORD",
    help="Require HTTP basic auth with these credentials (repeatable), like Flower's. Others on the host see "
    "them in ps: prefer --basic-auth-file, or CELERY_SAGA_WEB_AUTH (user:password pairs separated by commas).",
)
@click.option(
    "--basic-auth-file",
    cls=CeleryOption,
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Require HTTP basic auth with the credentials in this file: user:password, one a line ('#' comments).",
)
@click.option(
    "--enable-actions", cls=CeleryOption, is_flag=True, help="Show cancel, retry and purge buttons (POST, with CSRF)."
)
@click.option(
    "--behind-proxy",
    cls=CeleryOption,
    is_flag=True,
    help="Trust X-Real-Ip, X-Forwarded-For, X-Forwarded-Proto and X-Forwarded-Host: only behind a proxy "
    "that sets them (any client can send them).",
)
@click.pass_context
def web(
    ctx: click.Context,
    address: str,
    port: int,
    url_prefix: str,
    flower_url: str | None,
    basic_auth: tuple[str, ...],
    basic_auth_file: str | None,
    enable_actions: bool,
    behind_proxy: bool,
) -> None:
    """Serve a web view of the sagas: list, timelines, /metrics and /api/sagas."""
    try:
        from .web import SettingError, WebSettings, credentials, serve
    except ImportError as exc:
        raise click.UsageError(f"celery saga web needs Tornado: pip install 'celery-saga-engine[web]' ({exc})") from exc
    app = _app(ctx)
    with _errors():
        admin.ping(app)
    try:
        pairs = credentials(basic_auth, file=basic_auth_file)  # and CELERY_SAGA_WEB_AUTH's
        settings = WebSettings(url_prefix, flower_url, pairs, enable_actions=enable_actions, behind_proxy=behind_proxy)
    except SettingError as exc:
        raise click.BadParameter(str(exc), param_hint=exc.option) from exc
    where = f"http://{address}:{port}{settings.url('/')}"
    try:
        serve(
            app,
            address,
            port,
            settings,
            ready=lambda: click.echo(f"serving the sagas of {app.main} at {where}; Ctrl-C to stop"),
        )
    except OSError as exc:  # the port is taken, the address is not this host's ...
        raise CeleryCommandException(
            message=f"cannot listen on {address}:{port}: {exc.strerror or exc}; choose another --port or --address",
            exit_code=EX_UNAVAILABLE,
        ) from exc
    click.echo("stopped")
