"""How ``celery saga web`` was started: its options, each checked here once, before anything is served.

A check that fails raises `SettingError`, which names the option, so the CLI
says in one line which one is wrong. Errors about credentials say where the
bad entry is (``line 3 of FILE``), never what it holds: it may be a password.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["AUTH_ENV", "MAX_DEPTH", "MAX_LIMIT", "PAGE_SIZE", "SettingError", "WebSettings", "credentials"]

PAGE_SIZE = 50
#: The most sagas ``/api/sagas`` returns, whatever its ``limit`` asks for.
MAX_LIMIT = 500
#: How far back the list's pages go (page x page size): each page reads every saga before it.
MAX_DEPTH = 10_000
#: The environment variable that holds credentials: ``user:password`` pairs separated by commas.
AUTH_ENV = "CELERY_SAGA_WEB_AUTH"

# A prefix is path segments of RFC 3986's unreserved characters: nothing in it
# means anything to a route's regex (but ".", escaped there), to a URL or to HTML.
_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+")


class SettingError(ValueError):
    """An option of ``celery saga web`` that cannot be used.

    Attributes:
        option: The option, as the CLI spells it (``--url-prefix``), or the
            environment variable.
    """

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        super().__init__(message)


class WebSettings:
    """How ``celery saga web`` was started.

    Args:
        url_prefix: Serve under this path (``/sagas``): path segments of
            letters, digits and ``-._~``.
        flower_url: Link task ids to this Flower (an http or https URL).
        basic_auth: ``user:password`` pairs (a password may hold ":"); none:
            no authentication.
        enable_actions: Show cancel, retry and purge buttons (POST, with CSRF).
        page_size: Sagas on a page of the list.
        behind_proxy: Trust ``X-Real-Ip``, ``X-Forwarded-For`` and
            ``X-Forwarded-Proto`` / ``X-Scheme``: only behind a reverse proxy that
            sets them, since any client can send them.

    Raises:
        SettingError: one of them cannot be used.
    """

    def __init__(
        self,
        url_prefix: str = "",
        flower_url: str | None = None,
        basic_auth: Sequence[str] = (),
        enable_actions: bool = False,
        page_size: int = PAGE_SIZE,
        behind_proxy: bool = False,
    ) -> None:
        if page_size < 1:
            raise SettingError("page_size", f"page_size must be at least 1, not {page_size}")
        self.page_size = page_size
        self.url_prefix = _url_prefix(url_prefix)
        self.flower_url = _flower_url(flower_url)
        for i, pair in enumerate(basic_auth, 1):
            _check_pair(pair, "--basic-auth", f"--basic-auth value {i}")
        self.basic_auth = tuple(basic_auth)
        #: The pairs as UTF-8 bytes, as a request's ``Authorization`` header is compared with them.
        self.credentials = tuple(pair.encode() for pair in basic_auth)
        self.enable_actions = enable_actions
        self.behind_proxy = behind_proxy

    @property
    def max_page(self) -> int:
        """The last page of the list that may be asked for."""
        return max(1, MAX_DEPTH // self.page_size)

    def url(self, path: str) -> str:
        return f"{self.url_prefix}{path}"


def credentials(
    given: Sequence[str] = (), environ: Mapping[str, str] | None = None, file: str | Path | None = None
) -> list[str]:
    """Every ``user:password`` of ``--basic-auth``, of `AUTH_ENV` and of ``--basic-auth-file``, in that order.

    The variable (in ``environ``, by default the process's) holds pairs separated by commas; the
    file one a line, skipping blank lines and lines that start with ``#``.
    Spaces around an entry of either are dropped: a password that holds a
    comma goes in the file, one that starts or ends with a space only on
    ``--basic-auth``. The variable and the file keep passwords out of the
    command line others see (``ps``).

    Raises:
        SettingError: an entry is not ``user:password``, or the file cannot
            be read as UTF-8.
    """
    pairs = list(given)  # WebSettings checks these
    env = (os.environ if environ is None else environ).get(AUTH_ENV, "")
    if env.strip():
        for i, entry in enumerate(env.split(","), 1):
            pairs.append(_check_pair(entry.strip(), AUTH_ENV, f"entry {i} of {AUTH_ENV}"))
    if file is not None:
        try:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = "it is not UTF-8" if isinstance(exc, UnicodeDecodeError) else exc.strerror or str(exc)
            raise SettingError("--basic-auth-file", f"cannot read {file}: {reason}") from exc
        for i, line in enumerate(lines, 1):
            entry = line.strip()
            if entry and not entry.startswith("#"):
                pairs.append(_check_pair(entry, "--basic-auth-file", f"line {i} of {file}"))
    return pairs


def _check_pair(pair: str, option: str, where: str) -> str:
    user, colon, password = pair.partition(":")
    if not (user and colon and password):
        # Not the entry itself: without its ":" it may be a password alone.
        raise SettingError(option, f"{where} is not user:password (a user, ':', then a password)")
    return pair


def _url_prefix(text: str) -> str:
    stripped = text.strip("/")
    if not stripped:
        return ""
    for segment in stripped.split("/"):
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise SettingError(
                "--url-prefix",
                f"the URL prefix {text!r} must be path segments of letters, digits and '-._~', like /sagas",
            )
    return "/" + stripped


def _flower_url(text: str | None) -> str | None:
    if not text:
        return None
    if not re.fullmatch(r"https?://[^\s\"'<>]+", text):
        raise SettingError("--flower-url", f"the Flower URL {text!r} must be an http:// or https:// URL")
    return text.rstrip("/")
