"""The ``edgecompute`` command: list executors, run one request, show a demo."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from .config import Config
from .errors import EdgeComputeError

__all__ = ["main"]


def _jsonable(value: Any) -> Any:
    """Outputs as JSON: arrays become lists, bytes are summarised, unknown objects use repr."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    return repr(value)


def _read_input(text: str | None) -> Any:
    if text is None:
        return None
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise click.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint="--input") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--input") from exc


def _load_config(path: str | None) -> Config:
    try:
        return Config.load(path)
    except EdgeComputeError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Configuration file (default: $EDGECOMPUTE_CONFIG or ./edgecompute.toml).")
@click.version_option(package_name="edgecompute")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """edgecompute: native, ML and sandboxed work through one in-process scheduler."""
    logging.basicConfig(format="edgecompute: %(message)s", level=logging.WARNING)
    ctx.obj = config_path


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--no-health", is_flag=True, help="Do not ask executors for their health.")
@click.pass_obj
def executors(config_path: str | None, as_json: bool, no_health: bool) -> None:
    """List discovered executors, their versions, algorithms and health."""
    import anyio

    from ._registry import Registry
    from .errors import PluginError

    config = _load_config(config_path)
    # this command prints plugin problems itself, once, below the table
    for name in ("edgecompute.plugins", "edgecompute.registry"):
        logging.getLogger(name).setLevel(logging.ERROR)
    registry = Registry.discover(settings=config.executors)
    health = {} if no_health else anyio.run(registry.health)
    rows = []
    for entry in registry.executors():
        row: dict[str, Any] = {"name": entry.name, "source": entry.source}
        try:
            executor = registry.get(entry.name)
        except PluginError as exc:
            row.update(version=None, algorithms=[], error=str(exc))
        else:
            row.update(version=executor.version,
                       algorithms=[{"name": f"{entry.name}/{a.name}", "description": a.description,
                                    "resources": str(a.resources)} for a in entry.algorithms.values()])
        if entry.name in health:
            row["health"] = {"status": health[entry.name].status.value, "message": health[entry.name].message}
        rows.append(row)
    problems = [str(problem) for problem in registry.problems]
    if as_json:
        click.echo(json.dumps({"executors": rows, "problems": problems}, indent=2))
        return
    if not rows:
        click.echo("No executors installed. Install one, e.g.: pip install edgecompute-cpp")
    for row in rows:
        status = row.get("health", {}).get("status", "")
        click.echo(f"{row['name']} {row['version'] or '(broken)'}  [{row['source']}]  {status}")
        if "error" in row:
            click.echo(f"  error: {row['error']}")
        for algorithm in row["algorithms"]:
            click.echo(f"  {algorithm['name']:32} {algorithm['description']}")
    for problem in problems:
        click.echo(f"problem: {problem}", err=True)


def _chunk_text(chunk: Any) -> str:
    # a token or a line prints as itself, anything else as one line of JSON
    return chunk if isinstance(chunk, str) else json.dumps(_jsonable(chunk))


@main.command()
@click.argument("algorithm")
@click.option("--input", "input_text", help="Inputs as JSON, or @FILE holding JSON.")
@click.option("--param", "params", multiple=True, metavar="KEY=JSON",
              help="A parameter; the value is JSON if it parses, else a string. Repeatable.")
@click.option("--priority", type=int, default=0, show_default=True)
@click.option("--timeout", type=float, default=None, help="Deadline in seconds (queue + run).")
@click.option("--retries", type=click.IntRange(min=0), default=None,
              help="Retries of a retryable failure (default: the configuration's retries).")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Print each streamed chunk on its own line as it comes, before the outputs.")
@click.option("--config", "run_config", type=click.Path(dir_okay=False), default=None,
              help="Configuration file (same as the global --config).")
@click.pass_obj
def run(config_path: str | None, algorithm: str, input_text: str | None, params: tuple[str, ...],
        priority: int, timeout: float | None, retries: int | None, stream: bool, run_config: str | None) -> None:
    """Run ALGORITHM (executor/algorithm) once: print its chunks as they come, then its outputs as JSON."""
    from ._runtime import Runtime
    from .models import Request

    parsed: dict[str, Any] = {}
    for item in params:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        try:
            parsed[key] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key] = raw
    inputs = _read_input(input_text)
    request = Request(algorithm, inputs, params=parsed, priority=priority, timeout=timeout, retries=retries)
    try:
        with Runtime(config=_load_config(run_config or config_path)) as rt:
            if stream:
                scheduler = rt.scheduler

                async def follow() -> Any:
                    handle = scheduler.submit(request)
                    # the chunks are printed on the loop's thread: this process runs nothing else
                    async for chunk in handle.stream():
                        click.echo(_chunk_text(chunk))
                    return await handle.result()

                response = rt.portal.call(follow)
            else:
                response = rt.run(request)
    except EdgeComputeError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    click.echo(json.dumps({"outputs": _jsonable(response.outputs), "executor": response.executor,
                           "timings": dict(response.timings)}, indent=2))


@main.command()
@click.pass_obj
def demo(config_path: str | None) -> None:
    """A tour: the scheduler at work, then every installed executor's own demo."""
    from . import _demo as tour

    try:
        tour.run(_load_config(config_path), click.echo)
    except EdgeComputeError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


@main.command()
@click.option("--config", "serve_config", type=click.Path(dir_okay=False), default=None,
              help="Configuration file (same as the global --config).")
@click.option("--host", default=None, help="Address to listen on (default: server.host, 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default: server.port, 8000).")
@click.option("--grpc-port", type=int, default=None,
              help="Also serve gRPC on this port (default: server.grpc_port; none: no gRPC). Needs edgecompute[grpc].")
@click.option("--executor", "extra", multiple=True, metavar="MODULE:ATTR",
              help="Also serve this executor object (e.g. a FunctionExecutor of your application). Repeatable.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.pass_obj
def serve(config_path: str | None, serve_config: str | None, host: str | None, port: int | None,
          grpc_port: int | None, extra: tuple[str, ...], log_level: str) -> None:
    """Serve the scheduler over HTTP and WebSocket (needs: pip install "edgecompute[server]")."""
    try:
        from .server import serve as run_server
    except ImportError as exc:
        raise click.ClickException(f"the server needs its extra: pip install \"edgecompute[server]\" ({exc})") from exc
    from ._registry import Registry

    config = _load_config(serve_config or config_path)
    registry = Registry.discover(settings=config.executors)
    if extra and "" not in sys.path and os.getcwd() not in sys.path:
        # MODULE is looked up from the current folder too, as uvicorn's APP argument is
        sys.path.insert(0, os.getcwd())
    for spec in extra:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise click.BadParameter(f"{spec!r} is not MODULE:ATTR", param_hint="--executor")
        import importlib

        try:
            executor = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise click.BadParameter(f"cannot load {spec}: {exc}", param_hint="--executor") from exc
        registry.register(executor)
    try:
        if grpc_port is not None or config.server.get("grpc_port") is not None:
            # gRPC on its own port, in the same process and on the same scheduler (docs/grpc.md)
            try:
                from .server.grpc import serve as run_both
            except ImportError as exc:
                raise click.ClickException(f"gRPC needs its extra: pip install \"edgecompute[grpc]\" ({exc})") from exc
            run_both(config, registry=registry, host=host, port=port, grpc_port=grpc_port, log_level=log_level)
        else:
            run_server(config, registry=registry, host=host, port=port, log_level=log_level)
    except EdgeComputeError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


@main.group()
def keys() -> None:
    """Make API keys for the server, stored in the config as hashes."""


@keys.command("new")
@click.option("--name", default="app", show_default=True, help="The key's name in the config.")
@click.option("--scope", "scopes", multiple=True, default=("*",), show_default=True,
              help="executor/algorithm pattern the key may run. Repeatable.")
def keys_new(name: str, scopes: tuple[str, ...]) -> None:
    """Print a new random key (give it to the client) and its [[server.keys]] entry (put it in the config)."""
    import hashlib
    import secrets

    key = "ec_" + secrets.token_urlsafe(32)
    click.echo(f"key: {key}", err=True)
    digest = hashlib.sha256(key.encode()).hexdigest()
    click.echo(f"[[server.keys]]\nname = {json.dumps(name)}\nhash = \"sha256:{digest}\"\n"
               f"scopes = {json.dumps(list(scopes))}")


@keys.command("hash")
@click.argument("key", required=False)
def keys_hash(key: str | None) -> None:
    """Print the stored form of KEY (read from stdin when not given)."""
    import hashlib
    import sys

    if key is None:
        key = sys.stdin.readline().strip()
    if not key:
        raise click.BadParameter("empty key", param_hint="KEY")
    click.echo("sha256:" + hashlib.sha256(key.encode()).hexdigest())


if __name__ == "__main__":  # pragma: no cover
    main()
