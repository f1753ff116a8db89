"""The ``dfmod`` command line: run the API, the workers, migrations, the embedded stack, API keys, training,
evaluation and benchmarks.

Each command reads :class:`~dfmod.settings.Settings` from the environment once and passes it down; heavy
imports (torch, timm) happen inside the commands that need them so ``dfmod --help`` stays instant.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer

app = typer.Typer(
    name="dfmod",
    help="Deepfake-image moderation: ingest, batched classification, verdicts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _global_options(
    data_dir: Path | None = typer.Option(
        None, "--data-dir", envvar="DFMOD_DATA_DIR",
        help="Where the embedded database, broker and objects live (DFMOD_DATA_DIR); every command uses it.",
    ),
) -> None:
    # Commands read Settings from the environment, so one place makes `dfmod --data-dir D keys list`
    # find the same database as `dfmod up --data-dir D`, from any working directory.
    if data_dir is not None:
        os.environ["DFMOD_DATA_DIR"] = str(data_dir.resolve())


def _settings(**overrides):
    from dfmod.settings import Settings

    # Settings() reads the environment; explicit command-line values win over it.
    return Settings(**{key: value for key, value in overrides.items() if value is not None})


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level_option() -> typer.models.OptionInfo:
    """The one ``--log-level`` option every long-running command takes (the same spelling everywhere)."""
    return typer.Option("info", "--log-level", help=f"One of {', '.join(LOG_LEVELS)} (any case).")


def _checked_level(value: str) -> str:
    level = value.strip().lower()
    if level not in LOG_LEVELS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(LOG_LEVELS)}", param_hint="--log-level")
    return level


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@app.command()
def migrate(
    revision: str = typer.Option("head", help="Target revision (upgrade)."),
    downgrade: bool = typer.Option(False, "--downgrade", help="Downgrade to REVISION instead."),
) -> None:
    """Apply the database migrations (Alembic) and exit. Run before starting a new version."""
    from dfmod import migrate as migrations

    settings = _settings()
    _logging()
    if downgrade:
        migrations.downgrade(settings, revision)
    else:
        migrations.upgrade(settings, revision)
    current = migrations.current_revision(settings.resolved_database_url)
    typer.echo(f"database at revision {current}")


@app.command()
def api(
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, help="Port to bind."),
    workers: int = typer.Option(1, help="uvicorn worker processes."),
    log_level: str = _log_level_option(),
) -> None:
    """Run the HTTP API (uvicorn). Does not load the model and does not migrate."""
    import uvicorn

    log_level = _checked_level(log_level)
    _logging(log_level.upper())

    if workers > 1:
        uvicorn.run("api.main:app_from_env", factory=True, host=host, port=port, workers=workers, log_level=log_level)
        return
    from api.main import create_app

    uvicorn.run(create_app(_settings()), host=host, port=port, log_level=log_level)


@app.command()
def worker(
    log_level: str = _log_level_option(),
    hostname: str | None = typer.Option(None, help="Celery node name (default: celery@HOST)."),
    queues: str | None = typer.Option(
        None, help="Comma-separated queues to consume (default: the classify and the events queue). "
        "Run `--queues dfmod-events` as its own process so slow callback receivers never hold classification.",
    ),
) -> None:
    """Run a classification worker: batched Celery consumer, stuck-item sweep, Prometheus metrics."""
    from dfmod.detector import ModelNotAvailable

    level = _checked_level(log_level).upper()
    settings = _settings()
    _logging(level)
    from worker.app import run_worker

    try:
        run_worker(settings, log_level=level, hostname=hostname, queues=queues.split(",") if queues else None)
    except ModelNotAvailable as exc:
        _fail(str(exc))


@app.command("worker-alive")
def worker_alive(
    max_age: float = typer.Option(
        ..., "--max-age", min=0.1,
        help="Seconds: fail when the consuming loop's heartbeat is older, or a batch has run longer. "
        "Set it above the longest batch.",
    ),
) -> None:
    """Liveness check of the worker in this container (exit 0 alive, 1 hung): the Kubernetes exec probe."""
    from worker.liveness import check

    verdict = check(_settings().resolved_heartbeat_dir, max_age)
    typer.echo(verdict.reason, err=not verdict.alive)
    raise typer.Exit(code=0 if verdict.alive else 1)


@app.command()
def sweep() -> None:
    """Re-enqueue items stuck in queued/processing once (workers also do this periodically)."""
    from dfmod.db import make_engine, make_session_factory
    from dfmod.lifecycle import sweep_stuck_items
    from dfmod.queue import make_celery

    settings = _settings()
    factory = make_session_factory(make_engine(settings.resolved_database_url))
    count = sweep_stuck_items(factory, make_celery(settings), settings)
    typer.echo(f"re-enqueued {count} item(s)")


keys_app = typer.Typer(
    help="API keys: create (printed once), list, revoke. Scopes: ingest, review, admin.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")


def _key_session():
    from dfmod import migrate as migrations
    from dfmod.db import make_engine, make_session_factory, session_scope

    settings = _settings()
    current = migrations.current_revision(settings.resolved_database_url)
    if current != migrations.head_revision():
        _fail(f"the database is at revision {current}, not {migrations.head_revision()}: run `dfmod migrate` first")
    engine = make_engine(settings.resolved_database_url, pool_size=1)
    return engine, session_scope(make_session_factory(engine))


@keys_app.command("create")
def keys_create(
    name: str = typer.Option(..., "--name", help="Who or what holds the key; reviews are signed with it."),
    scope: list[str] = typer.Option(..., "--scope", help="ingest, review or admin; repeat for several."),
    tenant: list[str] = typer.Option(
        [], "--tenant",
        help="Tenant name or id: an ingest key's one tenant (default: default); repeat to limit a review key "
        "to several tenants (none: it reviews every tenant).",
    ),
) -> None:
    """Create a key and print it. It is shown this once: only its hash is stored."""
    from dfmod.keys import KeyProblem, create_key

    engine, scope_ctx = _key_session()
    try:
        with scope_ctx as session:
            created = create_key(session, name, [part for value in scope for part in value.split(",")], tenant)
            tenants_text = ",".join(t.name for t in created.key.review_tenants) or "all"
            summary = (
                f"created key {created.key.name!r} (id {created.key.id}, scopes {created.key.scopes}, "
                f"tenants {tenants_text})"
            )
    except KeyProblem as exc:
        _fail(str(exc))
    finally:
        engine.dispose()
    typer.echo(summary, err=True)
    typer.echo(created.plaintext)


@keys_app.command("list")
def keys_list(all_keys: bool = typer.Option(False, "--all", help="Include revoked keys.")) -> None:
    """List keys: id, name, scopes, prefix, created, last used (never the keys themselves)."""
    from dfmod.keys import list_keys

    engine, scope_ctx = _key_session()
    try:
        with scope_ctx as session:
            rows = [
                (k.id, k.name, k.scopes, ",".join(t.name for t in k.review_tenants) or "all",
                 k.prefix + "…", f"{k.created_at:%Y-%m-%d %H:%M}",
                 f"{k.last_used_at:%Y-%m-%d %H:%M}" if k.last_used_at else "never",
                 f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active")
                for k in list_keys(session, include_revoked=all_keys)
            ]
    finally:
        engine.dispose()
    _table(("ID", "NAME", "SCOPES", "TENANTS", "PREFIX", "CREATED", "LAST USED", "STATE"), rows)


def _table(header: tuple[str, ...], rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(str(value).ljust(width) for value, width in zip(row, widths, strict=True)).rstrip())


@keys_app.command("revoke")
def keys_revoke(name_or_id: str = typer.Argument(..., help="The key's id or name.")) -> None:
    """Revoke a key: requests with it get 401 from now on, and its image links stop working."""
    from dfmod.keys import KeyProblem, revoke_key

    engine, scope_ctx = _key_session()
    try:
        with scope_ctx as session:
            key = revoke_key(session, name_or_id)
            message = f"revoked key {key.name!r} (id {key.id})"
    except KeyProblem as exc:
        _fail(str(exc))
    finally:
        engine.dispose()
    typer.echo(message)


tenants_app = typer.Typer(
    help="Tenants (the platforms dfmod serves): create, list, update, disable, rotate their secrets.",
    no_args_is_help=True,
)
app.add_typer(tenants_app, name="tenants")


def _tenant_command(action):
    """Run ``action(session, settings)`` in one transaction; a TenantProblem is a clean error."""
    from dfmod.tenants import TenantProblem

    settings = _settings()
    engine, scope_ctx = _key_session()
    try:
        with scope_ctx as session:
            return action(session, settings)
    except TenantProblem as exc:
        _fail(exc.message)
    finally:
        engine.dispose()


def _echo_tenant(tenant) -> None:
    buckets = ",".join(row.bucket for row in tenant.buckets) or "-"
    typer.echo(
        f"tenant {tenant.name} (id {tenant.id}): callback {tenant.callback_url or '-'}, buckets {buckets}, "
        f"threshold {tenant.threshold if tenant.threshold is not None else 'model'}, "
        f"review band {tenant.review_band if tenant.review_band is not None else 'default'}"
        + (f", disabled {tenant.disabled_at:%Y-%m-%d %H:%M}" if tenant.disabled_at else ""),
        err=True,
    )


def _echo_secrets(made) -> None:
    # Secrets go to stdout (pipeable), once; everything else to stderr.
    if made.events_token:
        typer.echo(f"events token:    {made.events_token}")
    if made.callback_secret:
        typer.echo(f"callback secret: {made.callback_secret}")


@tenants_app.command("create")
def tenants_create(
    name: str = typer.Option(..., "--name", help="The platform's name (a-z 0-9 . _ -)."),
    callback_url: str | None = typer.Option(None, "--callback-url", help="Where its verdict and review events go."),
    bucket: list[str] = typer.Option([], "--bucket", help="A bucket of its own (repeat); a bucket has one tenant."),
    threshold: float | None = typer.Option(None, help="Its decision threshold (default: the model's)."),
    review_band: float | None = typer.Option(None, help="Its review band (default: DFMOD_REVIEW_BAND)."),
) -> None:
    """Create a tenant; prints its events token and callback secret, shown this once."""
    from dfmod import tenants

    def action(session, settings):
        made = tenants.create_tenant(
            session, tenants.secret_box(settings), name, callback_url, bucket, threshold, review_band
        )
        _echo_tenant(made.tenant)
        _echo_secrets(made)

    _tenant_command(action)


@tenants_app.command("list")
def tenants_list() -> None:
    """List tenants: name, id, callback URL, buckets, state (never their secrets)."""
    from dfmod import tenants

    def action(session, _settings):
        rows = [
            (t.name, t.id, t.callback_url or "-", ",".join(b.bucket for b in t.buckets) or "-",
             "events token" if t.events_token_hash else "-",
             f"disabled {t.disabled_at:%Y-%m-%d %H:%M}" if t.disabled_at else "active")
            for t in tenants.list_tenants(session)
        ]
        _table(("NAME", "ID", "CALLBACK", "BUCKETS", "EVENTS", "STATE"), rows)

    _tenant_command(action)


@tenants_app.command("update")
def tenants_update(
    name: str = typer.Argument(..., help="The tenant's name or id."),
    callback_url: str | None = typer.Option(None, "--callback-url", help="New callback URL ('' clears it)."),
    add_bucket: list[str] = typer.Option([], "--add-bucket", help="Give it a bucket (repeat)."),
    remove_bucket: list[str] = typer.Option([], "--remove-bucket", help="Take a bucket away (repeat)."),
    threshold: float | None = typer.Option(None, help="Its decision threshold."),
    review_band: float | None = typer.Option(None, help="Its review band."),
    enable: bool = typer.Option(False, "--enable", help="Enable a disabled tenant."),
    rotate_callback_secret: bool = typer.Option(
        False, "--rotate-callback-secret", help="New callback secret (printed once); the old one signs too during --overlap."
    ),
    overlap: int = typer.Option(86400, help="Seconds the previous callback secret stays valid after a rotation."),
    rotate_events_token: bool = typer.Option(False, "--rotate-events-token", help="New events token (printed once)."),
) -> None:
    """Change a tenant; rotate its callback secret or events token."""
    from dfmod import tenants

    def action(session, settings):
        tenant = tenants.get_tenant(session, name)
        changes = {}
        if callback_url is not None:
            changes["callback_url"] = callback_url
        if threshold is not None:
            changes["threshold"] = threshold
        if review_band is not None:
            changes["review_band"] = review_band
        tenants.update_tenant(
            session, tenant, add_buckets=add_bucket, remove_buckets=remove_bucket, enabled=True if enable else None,
            **changes,
        )
        if rotate_callback_secret:
            _echo_secrets(tenants.rotate_callback_secret(session, tenants.secret_box(settings), tenant, overlap))
        if rotate_events_token:
            _echo_secrets(tenants.rotate_events_token(session, tenant))
        _echo_tenant(tenant)

    _tenant_command(action)


@tenants_app.command("disable")
def tenants_disable(name: str = typer.Argument(..., help="The tenant's name or id.")) -> None:
    """Disable a tenant: its keys and events token get 401 from now on; its items stay."""
    from dfmod import tenants

    def action(session, _settings):
        _echo_tenant(tenants.disable_tenant(session, tenants.get_tenant(session, name)))

    _tenant_command(action)


@tenants_app.command("reencrypt")
def tenants_reencrypt() -> None:
    """Re-encrypt every tenant's callback secret with the first DFMOD_SECRET_KEY (after adding a new key first)."""
    from dfmod import tenants

    def action(session, settings):
        typer.echo(f"re-encrypted {tenants.reencrypt_secrets(session, tenants.secret_box(settings))} secret(s)")

    _tenant_command(action)


@tenants_app.command("secret-key")
def tenants_secret_key() -> None:
    """Print a new random DFMOD_SECRET_KEY (the key that encrypts tenants' callback secrets)."""
    from dfmod.tenants import generate_secret_key

    typer.echo(generate_secret_key())


@app.command()
def up(
    host: str = typer.Option("127.0.0.1", help="Interface for the API."),
    port: int = typer.Option(8000, help="Port for the API."),
    data_dir: Path | None = typer.Option(None, help="Where the embedded database, broker and objects live."),
) -> None:
    """Run API and worker together on embedded defaults: SQLite, a local folder, a filesystem broker.

    Needs no Redis, Postgres or S3; set DFMOD_* variables to point either process at real services.
    """
    from dfmod import migrate as migrations
    from dfmod.detector import ModelNotAvailable, read_meta, resolve_checkpoint_path

    settings = _settings(data_dir=data_dir)
    _logging()
    try:
        checkpoint = resolve_checkpoint_path(settings.checkpoint)
    except ModelNotAvailable as exc:
        _fail(str(exc))
    meta = read_meta(checkpoint)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # The embedded stack is a single-user, single-machine setup: migrating here is the documented first-run
    # step. Production runs `dfmod migrate` as a separate job and never migrates at start-up.
    migrations.upgrade(settings)
    api_key = _up_key(settings)

    from dfmod.loopback import free_port

    child_env = dict(
        os.environ,
        DFMOD_DATA_DIR=str(settings.data_dir.resolve()),
        # Each worker's metrics on a free loopback port: a second `dfmod up` never collides with the first.
        DFMOD_METRICS_ADDR="127.0.0.1",
    )
    # Classification and callback/heatmap deliveries in separate processes: a slow callback receiver can
    # never hold the worker that classifies.
    def worker_env(name: str) -> dict[str, str]:
        # Each worker its own metrics port and its own liveness heartbeat folder.
        heartbeat = settings.data_dir.resolve() / "heartbeat" / name
        return child_env | {"DFMOD_METRICS_PORT": str(free_port()), "DFMOD_HEARTBEAT_DIR": str(heartbeat)}

    workers = [
        WorkerSupervisor("classify", ["--queues", settings.queue], worker_env("classify")),
        WorkerSupervisor("events", ["--queues", settings.events_queue], worker_env("events")),
    ]
    for supervised in workers:
        supervised.start()

    def _stop_worker(*_args) -> None:
        for supervised in workers:
            supervised.stop()

    # uvicorn re-raises the signal that stopped it once it has shut down; with the default handler that
    # would kill this process before it stops its workers. Our handler turns it into a normal exit.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)

    base = f"http://{host}:{port}"
    typer.secho(
        f"\ndfmod is up: API {base}  (model {meta.model_version}, threshold {meta.threshold:.3f})\n"
        f"  data:     {settings.data_dir.resolve()}\n"
        f"  key:      {api_key}\n"
        f"            (every scope; a new one each start. `dfmod keys create` makes lasting, narrower keys)\n"
        f"  upload:   curl -H 'Authorization: Bearer {api_key}' -F file=@face.jpg {base}/v1/images\n"
        f"  verdict:  curl -H 'Authorization: Bearer {api_key}' {base}/v1/images/ID\n"
        f"  review:   {base}/review  (sign in with the key)\n",
        fg=typer.colors.GREEN,
    )
    import uvicorn

    from api.main import create_app

    try:
        time.sleep(0.5)
        if any(supervised.process.poll() is not None for supervised in workers):
            _fail("a worker exited at start; see its log above")
        for supervised in workers:
            supervised.watch()
        # One machine, one stack: not ready while no worker consumes (uploads would wait for ever).
        api_settings = settings.model_copy(update={"ready_requires_worker": True})
        uvicorn.run(create_app(api_settings), host=host, port=port, log_level="info")
    finally:
        _stop_worker()


def _exit_on_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)


class WorkerSupervisor:
    """One ``dfmod worker`` child of ``dfmod up``: started, restarted if it crashes, stopped with its parent."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], restart_delay_s: float = 2.0) -> None:
        import threading

        self.name = name
        self.args = args
        self.env = env
        self.restart_delay_s = restart_delay_s
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            from dfmod.loopback import start_child

            # Its own process group: a Ctrl-C in the terminal reaches `dfmod up`, which stops the workers in order.
            self.process = start_child(
                [sys.executable, "-m", "dfmod", "worker", *self.args, "--hostname", f"{self.name}-{os.getpid()}@%h"],
                env=self.env, own_process_group=True,
            )

    def watch(self) -> None:
        import threading

        def loop() -> None:
            while not self._stopping.wait(1.0):
                process = self.process
                if process is not None and process.poll() is not None and not self._stopping.is_set():
                    self.restarts += 1
                    logging.getLogger("dfmod.up").warning(
                        "the %s worker exited with %s; restarting it (restart %d)", self.name, process.returncode,
                        self.restarts,
                    )
                    if self._stopping.wait(self.restart_delay_s):
                        return
                    self.start()

        threading.Thread(target=loop, name=f"dfmod-supervise-{self.name}", daemon=True).start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        with self._lock:
            process = self.process
        if process is not None:
            from dfmod.loopback import stop_child

            stop_child(process, timeout_s)


def _up_key(settings) -> str:
    """A key with every scope for this run of ``dfmod up`` (ingesting into the default tenant, admin of all),
    printed like a notebook server's token.

    The previous run's key is revoked: a key printed to a terminal should not outlive the process.
    """
    from dfmod.db import DEFAULT_TENANT_ID, make_engine, make_session_factory, session_scope
    from dfmod.keys import SCOPES, rotate_key

    engine = make_engine(settings.resolved_database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            return rotate_key(session, "dfmod-up", SCOPES, [DEFAULT_TENANT_ID]).plaintext
    finally:
        engine.dispose()


from dfmod.bench import bench_command  # noqa: E402 - commands defined in their own modules
from dfmod.export import export_command  # noqa: E402
from dfmod.training.commands import (  # noqa: E402
    calibrate_command,
    evaluate_command,
    evaluate_faces_command,
    loso_command,
    train_command,
)

app.command("train")(train_command)
app.command("evaluate")(evaluate_command)
app.command("calibrate")(calibrate_command)
app.command("loso")(loso_command)
app.command("evaluate-faces")(evaluate_faces_command)
app.command("bench")(bench_command)
app.command("export")(export_command)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
