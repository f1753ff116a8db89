"""Request-scoped dependencies: one database session per request, and the app-wide singletons.

The singletons (settings, engine, storage, Celery producer) are built once in :func:`api.main.create_app`
and kept on ``app.state``; endpoints receive them through ``Depends`` so tests can build an app on any
settings without touching globals.
"""

from __future__ import annotations

from typing import Annotated, Iterator

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from dfmod.db import session_scope
from dfmod.settings import Settings
from dfmod.storage import Storage


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Iterator[Session]:
    with session_scope(request.app.state.session_factory) as session:
        yield session


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_db)]
StorageDep = Annotated[Storage, Depends(get_storage)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
