"""Typed dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from iqa.service import IQAService
from iqa.settings import Settings


def get_service(request: Request) -> IQAService:
    """The process's service object, built at start-up."""
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    """The settings the app was built with."""
    return request.app.state.service.settings


ServiceDep = Annotated[IQAService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
