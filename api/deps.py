"""Request-scoped dependencies: one database session per request, and the app-wide singletons.

The transaction rule: a request's session (:data:`SessionDep`) commits when the endpoint returns and rolls
back when anything raises, before the answer is sent (the dependency's ``scope="function"``), so a
failed commit is the client's error answer, never a success that did not happen. Endpoints do not
commit. Work that must wait for the commit (enqueueing a task that reads the row) is registered with
:func:`after_commit`; the one other commit, record -> commit -> enqueue, belongs to
:func:`dfmod.lifecycle.record_and_enqueue`.

The singletons (settings, engine, storage, Celery producer) are built once in :func:`api.main.create_app`
and kept on ``app.state``; endpoints receive them through ``Depends`` so tests can build an app on any
settings without touching globals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from dfmod.db import session_scope
from dfmod.settings import Settings
from dfmod.storage import Storage


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


_AFTER_COMMIT = "dfmod_after_commit"


def get_db(request: Request) -> Iterator[Session]:
    with session_scope(request.app.state.session_factory) as session:
        yield session
    for callback in session.info.pop(_AFTER_COMMIT, []):
        callback()


def after_commit(session: Session, callback: Callable[[], object]) -> None:
    """Run ``callback`` once the request's transaction has committed (never if it rolls back)."""
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_db, scope="function")]
StorageDep = Annotated[Storage, Depends(get_storage)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
