"""schemathesis drives the live server from its own OpenAPI document: no 5xx, no answer off-schema."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings

from edgecompute.server._openapi import openapi_document

from .conftest import KEYS, Server

schema = schemathesis.openapi.from_dict(openapi_document())


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_keeps_its_contract(case: schemathesis.Case, server: Server) -> None:
    case.call_and_validate(base_url=server.url, headers={"Authorization": f"Bearer {KEYS['alice']}"})
