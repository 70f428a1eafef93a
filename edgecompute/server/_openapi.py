"""The gateway's OpenAPI 3.1 document (written out, not derived: it is the contract tests hold the
server to) and a self-contained docs page rendered from it."""

from __future__ import annotations

import html
from typing import Any

__all__ = ["docs_page", "openapi_document"]

_PROBLEM = {"$ref": "#/components/schemas/Problem"}
_UNTAGGED = {"not": {"pattern": "^\\$"}}


def _problems(*statuses: int) -> dict[str, Any]:
    text = {400: "Malformed request", 401: "No or invalid API key", 403: "The key's scopes do not allow this",
            404: "No such task for this key, or no such algorithm", 406: "Not acceptable",
            409: "Conflict (a second reader of one stream)", 413: "Body over the size limit",
            415: "Unsupported body media type", 422: "Invalid request", 429: "Rate limit or in-flight cap hit "
            "(see Retry-After)", 503: "Queue full or scheduler closing (see Retry-After)"}
    out: dict[str, Any] = {}
    for status in statuses:
        response: dict[str, Any] = {"description": text[status],
                                    "content": {"application/problem+json": {"schema": _PROBLEM}}}
        if status in (429, 503):
            response["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1},
                                                   "description": "Seconds to wait before retrying"}}
        out[str(status)] = response
    return out


_AUTH = (401, 429)
_TASK_CONTENT = {
    "application/json": {"schema": {"$ref": "#/components/schemas/Task"}},
    "application/x-edgecompute": {"schema": {"type": "string", "format": "binary"}},
}
_TASK_ID = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}
_WAIT = {"name": "wait", "in": "query", "required": False,
         "description": "Wait for the task to end: true (up to the server's max_wait), false, or seconds",
         "schema": {"type": "string", "pattern": "^(true|false|[0-9]+(\\.[0-9]+)?)$"}}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "edgecompute gateway", "version": "1",
                 "description": "Submit tasks to an edgecompute scheduler over HTTP; stream their chunks over "
                                "SSE or WebSocket. Every error is an RFC 9457 problem details body."},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/tasks": {"post": {
                "operationId": "submitTask", "summary": "Submit a task (optionally wait for it to end)",
                "parameters": [_WAIT],
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Submit"}},
                    "application/x-edgecompute": {"schema": {"type": "string", "format": "binary"}},
                }},
                "responses": {
                    "200": {"description": "The task ended (within ?wait)", "content": _TASK_CONTENT},
                    "202": {"description": "Queued or running; poll Location or stream it",
                            "headers": {"Location": {"schema": {"type": "string"}}}, "content": _TASK_CONTENT},
                    **_problems(*_AUTH, 400, 403, 404, 413, 415, 422, 503),
                },
            }},
            "/v1/tasks/{task_id}": {
                "get": {"operationId": "getTask", "summary": "A task's state, and its outputs once it ended",
                        "parameters": [_TASK_ID, _WAIT],
                        "responses": {"200": {"description": "The task", "content": _TASK_CONTENT},
                                      **_problems(*_AUTH, 400, 404)}},
                "delete": {"operationId": "cancelTask", "summary": "Cancel a task (no-op once it ended)",
                           "parameters": [_TASK_ID],
                           "responses": {"200": {"description": "The task after cancellation",
                                                 "content": _TASK_CONTENT},
                                         **_problems(*_AUTH, 404)}},
            },
            "/v1/tasks/{task_id}/events": {"get": {
                "operationId": "streamTask",
                "summary": "Server-sent events: 'chunk' per emitted chunk (JSON), then one 'end' with the task",
                "parameters": [_TASK_ID],
                "responses": {"200": {"description": "An event stream",
                                      "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                              **_problems(*_AUTH, 404, 409)}}},
            "/v1/algorithms": {"get": {
                "operationId": "listAlgorithms", "summary": "Algorithms this key may run",
                "responses": {"200": {"description": "Algorithms", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["algorithms"],
                    "properties": {"algorithms": {"type": "array",
                                                  "items": {"$ref": "#/components/schemas/Algorithm"}}},
                }}}}, **_problems(*_AUTH)}}},
            "/v1/executors": {"get": {
                "operationId": "listExecutors", "summary": "Executors this key reaches, with their health",
                "responses": {"200": {"description": "Executors", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["executors"],
                    "properties": {"executors": {"type": "array", "items": {"$ref": "#/components/schemas/Executor"}}},
                }}}}, **_problems(*_AUTH)}}},
            "/healthz": {"get": {"operationId": "healthz", "summary": "Liveness", "security": [],
                                 "responses": {"200": {"description": "The process serves", "content": {
                                     "application/json": {"schema": {"type": "object"}}}}}}},
            "/readyz": {"get": {"operationId": "readyz", "summary": "Readiness: scheduler running, no executor down",
                                "security": [],
                                "responses": {"200": {"description": "Ready", "content": {
                                    "application/json": {"schema": {"type": "object"}}}},
                                    **_problems(503)}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics (text format)",
                                 "security": [],
                                 "responses": {"200": {"description": "Metrics", "content": {
                                     "text/plain": {"schema": {"type": "string"}}}}, **_problems(401, 403, 429)}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "An API key (edgecompute keys new)"}},
            "schemas": {
                # keys starting with "$" are the wire's tags, so a plain object may not use them
                "Value": {"description": "Any JSON whose object keys do not start with '$'; bytes as "
                                         "{\"$bytes\": base64}, arrays as {\"$array\": base64, \"dtype\", "
                                         "\"shape\"}, an object with such keys as {\"$dict\": [[key, value], ...]}",
                          "anyOf": [
                              {"type": ["null", "boolean", "number", "string"]},
                              {"type": "array", "items": {"$ref": "#/components/schemas/Value"}},
                              {"type": "object", "propertyNames": _UNTAGGED,
                               "additionalProperties": {"$ref": "#/components/schemas/Value"}},
                          ]},
                "Submit": {"type": "object", "required": ["algorithm"], "additionalProperties": False, "properties": {
                    "algorithm": {"type": "string", "minLength": 1, "description": "executor/algorithm"},
                    "inputs": {"$ref": "#/components/schemas/Value"},
                    "params": {"type": "object", "propertyNames": _UNTAGGED,
                               "additionalProperties": {"$ref": "#/components/schemas/Value"}},
                    "priority": {"type": "integer", "minimum": -1000, "maximum": 1000},
                    "timeout": {"type": "number", "exclusiveMinimum": 0},
                    "metadata": {"type": "object"},
                    "retries": {"type": "integer", "minimum": 0, "maximum": 10},
                }},
                "Task": {"type": "object", "required": ["id", "algorithm", "state"], "properties": {
                    "id": {"type": "string"},
                    "algorithm": {"type": "string"},
                    "state": {"enum": ["queued", "running", "succeeded", "failed", "cancelled", "timed_out"]},
                    "progress": {"type": "number"},
                    "outputs": {"description": "Present once succeeded; tagged like inputs"},
                    "executor": {"type": "string"},
                    "timings": {"type": "object", "additionalProperties": {"type": "number"}},
                    "error": _PROBLEM,
                }},
                "Problem": {"type": "object", "required": ["type", "title", "status", "detail"], "properties": {
                    "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                    "detail": {"type": "string"}, "instance": {"type": "string"},
                    "error": {"type": "string", "description": "The edgecompute error class"},
                    "request_id": {"type": "string"}, "retry_after": {"type": "integer"},
                }},
                "Algorithm": {"type": "object", "required": ["name", "executor"], "properties": {
                    "name": {"type": "string"}, "executor": {"type": "string"}, "description": {"type": "string"},
                    "resources": {"type": "object"}}},
                "Executor": {"type": "object", "required": ["name", "algorithms"], "properties": {
                    "name": {"type": "string"}, "version": {"type": ["string", "null"]},
                    "algorithms": {"type": "array", "items": {"type": "string"}},
                    "health": {"type": ["object", "null"]}}},
            },
        },
    }


def docs_page(document: dict[str, Any]) -> str:
    """A plain HTML page listing every operation; it loads nothing from elsewhere."""
    rows = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            statuses = ", ".join(operation.get("responses", {}))
            rows.append(f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                        f"<td>{html.escape(operation.get('summary', ''))}</td><td>{statuses}</td></tr>")
    rows.append("<tr><td><code>WS</code></td><td><code>/v1/tasks/{task_id}/ws</code></td><td>WebSocket: "
                "{\"type\": \"chunk\", \"data\"} messages, then {\"type\": \"end\", \"task\"}</td><td></td></tr>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>edgecompute gateway</title></head><body>"
            f"<h1>{html.escape(document['info']['title'])}</h1><p>{html.escape(document['info']['description'])}</p>"
            "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a>. Authenticate with "
            "<code>Authorization: Bearer &lt;key&gt;</code>.</p>"
            "<table border='1' cellpadding='4'><tr><th>Method</th><th>Path</th><th>What</th><th>Statuses</th></tr>"
            + "".join(rows) + "</table></body></html>")
