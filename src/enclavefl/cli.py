"""The `enclavefl` command.

Exit codes are a contract that scripts and later checks rely on: 0 accepted / done,
1 rejected by a security check (reason on stderr), 2 usage or unreadable input.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from enclavefl.errors import EnclaveflError, JobFailed, Rejected, UsageError

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("enclavefl.cli")


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if not sys.stderr.isatty():
        # Party logs, containers, CI: one unwrapped line per record, so logs grep and ship well.
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr, force=True)
        return
    from rich.logging import RichHandler

    from enclavefl.console import stderr_console

    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=stderr_console, show_path=False, markup=False)],
        force=True,
    )


def _fail(err: EnclaveflError) -> None:
    kind = "rejected" if isinstance(err, Rejected) else "error"
    click.echo(f"enclavefl: {kind}: {err.reason}", err=True)
    sys.exit(err.exit_code)


def _command_name(ctx: click.Context) -> str:
    """The command path below `enclavefl`: "run", "gramine build"."""
    names: list[str] = []
    while ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(reversed(names))


def _require_extras(kwargs: dict[str, Any]) -> None:
    """Before a command runs: the optional extras it and its job file need (enclavefl.extras)."""
    from enclavefl import extras

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return
    command = _command_name(ctx)
    extras.require_for_command(command)
    job_file = kwargs.get("job_file")
    if command in extras.JOB_COMMANDS and job_file is not None:
        from enclavefl.jobs.config import load_job

        extras.require_for_job(load_job(job_file), job_file)


def typed_errors(fn: F) -> F:
    """Turn enclavefl errors into a one-line reason and the contract's exit code.

    Every command goes through here, so this is also where a missing optional extra is
    reported (before the command runs, and for any import of an extra's module that fails
    anyway) as the exact `pip install` line instead of an import traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _require_extras(kwargs)
            return fn(*args, **kwargs)
        except EnclaveflError as err:
            _fail(err)
        except ModuleNotFoundError as err:
            from enclavefl.extras import missing_extra_for

            missing = missing_extra_for(err, needed_for=f"`enclavefl {_command_name(click.get_current_context())}`")
            if missing is None:
                raise
            _fail(missing)
        except OSError as err:
            # Unreadable or unwritable paths are input errors, not crashes.
            _fail(UsageError(f"{err.strerror or err}: {err.filename or ''}".rstrip(": ")))
        except KeyboardInterrupt:
            click.echo("enclavefl: interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="enclavefl")
def main(verbose: bool) -> None:
    """Confidential federated learning between mutually attested TEEs."""
    _setup_logging(verbose)


# --------------------------------------------------------------------------- trust


@main.command()
@click.option("--quote", "quote_path", type=click.Path(path_type=Path), help="Raw SGX/TDX quote file.")
@click.option("--cert", "cert_path", type=click.Path(path_type=Path), help="RA-TLS certificate (PEM or DER).")
@click.option("--url", help="HOST:PORT of a live RA-TLS server to probe.")
@click.option("--collateral", type=click.Path(path_type=Path), help="Offline collateral JSON file.")
@click.option("--pccs", help="PCCS URL to fetch collateral from (cached until nextUpdate).")
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(path_type=Path),
    help="Policy JSON (default: UpToDate only, no debug, no simulated).",
)
@click.option("--at", type=int, help="Verification time, unix seconds (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@typed_errors
def verify(
    quote_path: Path | None,
    cert_path: Path | None,
    url: str | None,
    collateral: Path | None,
    pccs: str | None,
    policy_path: Path | None,
    at: int | None,
    as_json: bool,
) -> None:
    """Verify a quote, an RA-TLS certificate or a live server against a policy."""
    from enclavefl.tee import Claims, Verdict, check_quote, collateral_source, load_policy, verify_certificate

    given = [x for x in (quote_path, cert_path, url) if x is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --quote, --cert, --url")
    policy = load_policy(policy_path)
    source = collateral_source(collateral, pccs)

    def verify_given() -> Claims:
        if quote_path is not None:
            return check_quote(_read_input(quote_path), policy=policy, collateral=source, at=at)
        if cert_path is not None:
            return verify_certificate(_read_input(cert_path), policy=policy, collateral=source, at=at)
        from enclavefl.net import probe_and_verify, split_target

        host, port = split_target(url or "")
        return probe_and_verify(host, port, policy=policy, collateral=source, at=at)

    verdict = Verdict.of(verify_given)
    _report(verdict.to_json(), verdict.error, as_json)


def _report(result: dict[str, Any], error: Rejected | None, as_json: bool) -> None:
    """Print a verification result; a refusal also goes to stderr and sets exit code 1."""
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        _print_claims(result)
    if error is not None:
        click.echo(f"enclavefl: rejected: {error.reason}", err=True)
        sys.exit(error.exit_code)


def _read_input(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _print_claims(result: dict[str, Any]) -> None:
    from rich.table import Table

    from enclavefl.console import stdout_console

    rows = []
    for key, value in result.items():
        if key in ("accepted",) or value is None:
            continue
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value) or "-"
        rows.append((key, str(value)))
    if not stdout_console.is_terminal:
        # Piped: whole values, one per line (a table would cut measurements to the width).
        click.echo("accepted" if result["accepted"] else "rejected")
        for key, value in rows:
            click.echo(f"{key}: {value}")
        return
    title = "[green]accepted[/green]" if result["accepted"] else "[red]rejected[/red]"
    table = Table(title=title, show_header=False)
    table.add_column()
    table.add_column(overflow="fold")  # never hide part of a measurement
    for key, value in rows:
        table.add_row(key, value)
    stdout_console.print(table)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), help="Write the RA-TLS certificate (PEM) here.")
@click.option(
    "--attester",
    type=click.Choice(["auto", "gramine", "tdx", "simulated"]),
    default="auto",
    show_default=True,
)
@click.option(
    "--job", "job_file", type=click.Path(path_type=Path), help="Job file to include in the simulated measurement."
)
@click.option(
    "--allow-simulated-insecure",
    is_flag=True,
    help="Let 'auto' fall back to INSECURE simulated evidence when no TEE is present.",
)
@typed_errors
def attest(out: Path | None, attester: str, job_file: Path | None, allow_simulated_insecure: bool) -> None:
    """Make a fresh key in this TEE and an RA-TLS certificate binding it to evidence."""
    from enclavefl.jobs.measure import measure_job
    from enclavefl.tee import make_attester, make_certificate

    measurement = measure_job(job_file)
    att = make_attester(
        attester,
        allow_simulated_insecure=allow_simulated_insecure or attester == "simulated",
        measurement=measurement,
    )
    identity = make_certificate(att)
    if out is not None:
        from enclavefl.fsutil import atomic_write_bytes

        atomic_write_bytes(out, identity.cert_pem)
        click.echo(f"wrote {out} ({att.tee.value} evidence); the private key never leaves this process")
    else:
        click.echo(identity.cert_pem.decode())


@main.command()
@click.option("--sig", type=click.Path(path_type=Path), help="Read the measurement from a Gramine .sig (SIGSTRUCT).")
@click.option(
    "--job", "job_file", type=click.Path(path_type=Path), help="Job file measured with the package (simulated)."
)
@click.option("--isv-prod-id", type=int, default=0, show_default=True)
@click.option("--isv-svn", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@typed_errors
def measure(sig: Path | None, job_file: Path | None, isv_prod_id: int, isv_svn: int, as_json: bool) -> None:
    """Print mr_enclave, mr_signer, isv_prod_id, isv_svn of this install or of a .sig file."""
    from enclavefl.jobs.measure import measure_job
    from enclavefl.tee import read_sigstruct

    if sig is not None:
        m = read_sigstruct(sig)
        source = f"sigstruct {sig}"
    else:
        m = measure_job(job_file, isv_prod_id=isv_prod_id, isv_svn=isv_svn)
        source = "simulated (hash of the installed package files" + (", the job and its code)" if job_file else ")")
    data = m.to_json()
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(f"# {source}")
        for key, value in data.items():
            click.echo(f"{key}: {value}")


@main.group()
def policy() -> None:
    """Write and inspect attestation policies."""


@policy.command("init")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Policy file to write.")
@click.option(
    "--from-measure",
    "from_measure",
    type=click.Path(path_type=Path),
    help="JSON written by `enclavefl measure --json` (repeatable via several files).",
    multiple=True,
)
@click.option("--mr-enclave", multiple=True, help="Allowed mr_enclave (hex); repeat for several.")
@click.option("--mr-signer", help="Required mr_signer (hex).")
@click.option("--isv-prod-id", type=int, help="Required isv_prod_id.")
@click.option("--isv-svn", type=int, help="Minimum isv_svn.")
@click.option("--allow-tcb-status", multiple=True, help="TCB status to accept besides UpToDate (repeatable).")
@click.option("--allow-debug-insecure", is_flag=True, help="Accept debug enclaves (INSECURE).")
@click.option("--allow-simulated-insecure", is_flag=True, help="Accept simulated evidence (INSECURE).")
@click.option("--max-epsilon", type=float, help="Differential-privacy budget: the largest epsilon any party may spend.")
@click.option("--delta", type=float, help="Differential-privacy delta of the budget (0 only for --privacy-unit label).")
@click.option(
    "--privacy-unit",
    type=click.Choice(["record", "worker", "label"]),
    help="What the budget protects: a training record, a worker's whole data, or the vfl leader's labels.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@typed_errors
def policy_init(
    out: Path,
    from_measure: tuple[Path, ...],
    mr_enclave: tuple[str, ...],
    mr_signer: str | None,
    isv_prod_id: int | None,
    isv_svn: int | None,
    allow_tcb_status: tuple[str, ...],
    allow_debug_insecure: bool,
    allow_simulated_insecure: bool,
    max_epsilon: float | None,
    delta: float | None,
    privacy_unit: str | None,
    force: bool,
) -> None:
    """Write a policy pinning the given measurements (and, optionally, a privacy budget)."""
    from enclavefl.tee import Policy, read_measurement

    if out.exists() and not force:
        raise UsageError(f"{out} exists (use --force to overwrite)")
    entries = [read_measurement(path) for path in from_measure]
    entries.extend({"mr_enclave": value} for value in mr_enclave)
    pinned = any(value is not None for value in (mr_signer, isv_prod_id, isv_svn))
    privacy_flags = {"--max-epsilon": max_epsilon, "--delta": delta, "--privacy-unit": privacy_unit}
    missing = [flag for flag, value in privacy_flags.items() if value is None]
    if missing and len(missing) < len(privacy_flags):
        raise UsageError(
            f"a privacy budget needs --max-epsilon, --delta and --privacy-unit; missing {', '.join(missing)}"
        )
    privacy = None if missing else {"unit": privacy_unit, "max_epsilon": max_epsilon, "delta": delta}
    if not entries and not pinned and not (allow_simulated_insecure and privacy):
        raise UsageError("nothing to pin: give --from-measure, --mr-enclave or --mr-signer")
    pol = Policy.from_measurements(
        entries,
        mr_signer=mr_signer,
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        allowed_tcb_status=["UpToDate", *allow_tcb_status],
        allow_debug=allow_debug_insecure,
        allow_simulated=allow_simulated_insecure,
        privacy=privacy,
    )
    pol.save(out)
    budget = f"; privacy budget: {pol.privacy.describe()}" if pol.privacy else ""
    click.echo(f"wrote {out} (policy sha256 {pol.digest().hex()[:16]}…{budget})")


@policy.command("show")
@click.argument("path", type=click.Path(path_type=Path))
@typed_errors
def policy_show(path: Path) -> None:
    """Print a policy, normalized, with its digest."""
    from enclavefl.tee import Policy

    pol = Policy.load(path)
    click.echo(json.dumps(pol.to_json(), indent=2))
    click.echo(f"# sha256 {pol.digest().hex()}")


# --------------------------------------------------------------------------- sealing


def _seal_options(fn: F) -> F:
    fn = click.option(
        "--policy",
        "policy_path",
        type=click.Path(path_type=Path),
        help="With --key broker:...: the policy the key broker must satisfy.",
    )(fn)
    fn = click.option(
        "--attester",
        type=click.Choice(["auto", "gramine", "tdx", "simulated"]),
        default="auto",
        show_default=True,
        help="With --key broker:...: how this process attests to the broker.",
    )(fn)
    fn = click.option(
        "--version",
        "artifact_version",
        type=int,
        default=1,
        show_default=True,
        help="Artifact version (an older one is refused).",
    )(fn)
    fn = click.option("--job-id", default="default", show_default=True, help="Job the artifact belongs to.")(fn)
    fn = click.option("--name", required=True, help="Artifact name bound into the file.")(fn)
    fn = click.option(
        "--key",
        "key_spec",
        required=True,
        help="Key source: file:PATH, sgx-seal:mrenclave|mrsigner, broker:HOST:PORT/NAME.",
    )(fn)
    fn = click.argument("dst", type=click.Path(path_type=Path))(fn)
    fn = click.argument("src", type=click.Path(path_type=Path))(fn)
    return fn


def _key_source(spec: str, *, job_id: str, attester: str, policy_path: Path | None) -> Any:
    """Parse a key spec; a broker: spec first gets this process an attested identity."""
    from enclavefl.seal import parse_key_spec

    if spec.startswith("broker:"):
        from enclavefl.net import configure_broker_access

        setup = _PartySetup(
            policy_path=policy_path,
            attester=attester,
            allow_simulated_insecure=False,
            party="enclavefl-cli",
            job_id=job_id,
        )
        configure_broker_access(setup.credentials())
    return parse_key_spec(spec)


def _seal_command(
    operation: Callable[..., None],
    done: str,
    *,
    src: Path,
    dst: Path,
    key_spec: str,
    name: str,
    job_id: str,
    artifact_version: int,
    attester: str,
    policy_path: Path | None,
) -> None:
    """`seal` and `unseal`: the same key and binding, `operation` from SRC to DST."""
    key = _key_source(key_spec, job_id=job_id, attester=attester, policy_path=policy_path)
    operation(src, dst, key=key, job_id=job_id, name=name, version=artifact_version)
    click.echo(f"{done} {src} -> {dst}")


@main.command()
@_seal_options
@typed_errors
def seal(**options: Any) -> None:
    """Encrypt and authenticate SRC into DST, bound to (job id, name, version)."""
    from enclavefl.seal import seal_file

    _seal_command(seal_file, "sealed", **options)


@main.command()
@_seal_options
@typed_errors
def unseal(**options: Any) -> None:
    """Check and decrypt SRC into DST; refuses altered, truncated or swapped files."""
    from enclavefl.seal import unseal_file

    _seal_command(unseal_file, "unsealed", **options)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@typed_errors
def keygen(path: Path) -> None:
    """Create a random key file for `--key file:PATH` (development only: the key sits on the host)."""
    from enclavefl.insecure import create_key_file

    create_key_file(path)
    click.echo(f"wrote key file {path} (mode 0600); use --key file:{path}")


# --------------------------------------------------------------------------- attested channel

# enclavefl.net.ECHO_JOB, spelled out: the CLI imports the network stack (gRPC) only when used.
_ECHO_JOB = "enclavefl-echo"


@dataclass(frozen=True)
class _PartySetup:
    """Who this process is on the attested channel: its attester, policy, name, job and mode."""

    policy_path: Path | None
    attester: str
    allow_simulated_insecure: bool
    party: str
    job_id: str
    mode: str = "two-way"
    collateral: Path | None = None
    pccs: str | None = None

    def credentials(self) -> Any:
        """Fresh credentials: a new key in this TEE, bound to new evidence (never printed)."""
        from enclavefl.net import PartyCredentials

        return PartyCredentials.from_options(
            self.attester,
            policy_path=self.policy_path,
            party=self.party,
            job_id=self.job_id,
            allow_simulated_insecure=self.allow_simulated_insecure,
            mode=self.mode,
            collateral_file=self.collateral,
            pccs_url=self.pccs,
        )


def _party_options(
    *, default_party: str, default_job_id: str, policy_help: str, policy_required: bool = False
) -> Callable[[F], F]:
    """The options every attested-channel command shares; the command gets them as `setup`."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(
            *args: Any,
            policy_path: Path | None,
            attester: str,
            allow_simulated_insecure: bool,
            party: str,
            job_id: str,
            mode: str,
            collateral: Path | None,
            pccs: str | None,
            **kwargs: Any,
        ) -> Any:
            setup = _PartySetup(policy_path, attester, allow_simulated_insecure, party, job_id, mode, collateral, pccs)
            return fn(*args, setup=setup, **kwargs)

        options = [
            click.option(
                "--policy", "policy_path", type=click.Path(path_type=Path), required=policy_required, help=policy_help
            ),
            click.option(
                "--attester",
                type=click.Choice(["auto", "gramine", "tdx", "simulated"]),
                default="auto",
                show_default=True,
                help="How this party attests ('simulated' is INSECURE).",
            ),
            click.option(
                "--allow-simulated-insecure",
                is_flag=True,
                help="Let 'auto' fall back to INSECURE simulated evidence when no TEE is present.",
            ),
            click.option("--party", default=default_party, show_default=True, help="This party's name."),
            click.option(
                "--job-id", default=default_job_id, show_default=True, help="Job id; both ends must use the same."
            ),
            click.option(
                "--mode",
                type=click.Choice(["two-way", "server", "client"]),
                default="two-way",
                show_default=True,
                help="Who is attested: both ends, only the server or only the client (both ends must agree).",
            ),
            click.option("--collateral", type=click.Path(path_type=Path), help="Offline collateral JSON file."),
            click.option("--pccs", help="PCCS URL to fetch collateral from (cached until nextUpdate)."),
        ]
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper  # type: ignore[return-value]

    return decorate


def _serve_until_interrupted(server: Any, host: str) -> None:
    """Announce the listening address, serve until SIGINT or SIGTERM, then stop cleanly."""
    click.echo(f"listening on {_join_host_port(host, server.port)}")
    try:
        server.wait()
    except KeyboardInterrupt:
        log.info("party %s: interrupted, stopping", server.party)
    finally:
        server.stop()


def _stop_on_signals() -> None:
    # SIGTERM (docker stop, kill) stops a server as Ctrl-C does; SIGINT is set again because a
    # process started in the background inherits it ignored.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)


@main.command("echo-server")
@click.option("--port", type=click.IntRange(0, 65535), required=True, help="Port to listen on (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@_party_options(
    default_party="echo-server",
    default_job_id=_ECHO_JOB,
    policy_help="Policy clients must satisfy (default: UpToDate only, no debug, no simulated).",
)
@typed_errors
def echo_server(port: int, host: str, setup: _PartySetup) -> None:
    """A minimal attested echo server, for checking a deployment; serves until interrupted."""
    from enclavefl.net import start_echo_server

    _stop_on_signals()
    server = start_echo_server(setup.credentials(), host=host, port=port)
    _serve_until_interrupted(server, host)


@main.command("echo-client")
@click.argument("target", metavar="HOST:PORT")
@click.option(
    "--megabytes",
    type=click.FloatRange(min=0),
    default=16.0,
    show_default=True,
    help="Payload to echo (10**6 bytes each way).",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the server to be up.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_party_options(
    default_party="echo-client",
    default_job_id=_ECHO_JOB,
    policy_help="Policy the server must satisfy (default: UpToDate only, no debug, no simulated).",
)
@typed_errors
def echo_client(target: str, megabytes: float, wait_s: float, as_json: bool, setup: _PartySetup) -> None:
    """Attest the echo server at HOST:PORT, echo a payload through it, print its claims and the throughput."""
    from enclavefl.net import run_echo_client, split_target
    from enclavefl.tee import Verdict

    split_target(target)  # a malformed target fails before anything is attested
    credentials = setup.credentials()
    server_party = claims = None
    figures: dict[str, Any] = {}
    error: Rejected | None = None
    try:
        echo = run_echo_client(target, credentials, megabytes=megabytes, wait_s=wait_s)
        server_party, claims = echo.server.party, echo.server.claims
        figures = {key: value for key, value in echo.to_json().items() if key not in ("server_party", "server_claims")}
    except Rejected as err:
        error, claims = err, err.claims
    result = {"server": target, "server_party": server_party, **Verdict(claims, error).to_json(), **figures}
    _report(result, error, as_json)


@main.group()
def keybroker() -> None:
    """A key broker: releases data keys only over the attested channel, to peers its policy admits."""


@keybroker.command("serve")
@click.option(
    "--keys",
    "keys_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Directory of key files (make them with `keybroker create-key`).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=50070,
    show_default=True,
    help="Port to listen on (0: any free port).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@_party_options(
    default_party="keybroker",
    default_job_id="default",
    policy_required=True,
    policy_help="Policy a client must satisfy to get keys.",
)
@typed_errors
def keybroker_serve(keys_dir: Path, port: int, host: str, setup: _PartySetup) -> None:
    """Serve the keys in --keys to attested clients (`--key broker:HOST:PORT/NAME`) until interrupted.

    Clients must run the same job id (seal/unseal --job-id) and enforce the same policy.
    """
    from enclavefl.net import serve_key_broker

    _stop_on_signals()
    server = serve_key_broker(keys_dir, setup.credentials(), host=host, port=port)
    _serve_until_interrupted(server, host)


@keybroker.command("create-key")
@click.option(
    "--keys",
    "keys_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="The broker's key directory (created, mode 0700, if missing).",
)
@click.argument("name")
@typed_errors
def keybroker_create_key(keys_dir: Path, name: str) -> None:
    """Make a fresh random key NAME in the broker's key directory (never overwrites; never prints it)."""
    from enclavefl.net import create_broker_key

    path = create_broker_key(keys_dir, name)
    click.echo(f"wrote key {path} (mode 0600); clients use --key broker:HOST:PORT/{name}")


# --------------------------------------------------------------------------- jobs


@main.command()
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), help="Output directory (default: the job's output.dir)."
)
@click.option("--resume", is_flag=True, help="Resume every party from its newest sealed checkpoint.")
@click.option(
    "--write-split",
    is_flag=True,
    help="Write the validation ids (each party's own file in the output folder; never sent anywhere).",
)
@typed_errors
def run(job_file: Path, out_dir: Path | None, resume: bool, write_split: bool) -> None:
    """Run every party of JOB_FILE as a local process, with progress; writes summary.json."""
    from enclavefl.console import stdout_console
    from enclavefl.jobs.progress import run_with_progress
    from enclavefl.jobs.report import print_results

    result = run_with_progress(job_file, out_dir=out_dir, resume=resume, write_split=write_split)
    print_results(stdout_console, [result.summary])
    stdout_console.print(f"outputs in {result.out_dir}")
    result.raise_if_failed()


@main.command()
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Which party of the job this process is.")
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), help="Output directory (default: the job's output.dir)."
)
@click.option("--resume", is_flag=True, help="Resume from this party's newest sealed checkpoint.")
@click.option(
    "--task",
    type=click.Choice(["train", "align", "predict"]),
    default="train",
    show_default=True,
    help="align and predict: vertical jobs only.",
)
@click.option(
    "--input",
    "input_path",
    type=click.Path(path_type=Path),
    help="predict: this party's rows to predict (same columns as its training data).",
)
@click.option("--write-split", is_flag=True, help="Write this party's validation ids to its output folder.")
@typed_errors
def party(
    job_file: Path, name: str, out_dir: Path | None, resume: bool, task: str, input_path: Path | None, write_split: bool
) -> None:
    """Run one party of JOB_FILE (for separate hosts, containers or Gramine)."""
    from enclavefl.jobs.party import run_party

    run_party(job_file, name, out_dir, resume=resume, task=task, input_path=input_path, write_split=write_split)


def _run_task(job_file: Path, out_dir: Path | None, task: str, inputs: dict[str, Path] | None = None) -> Any:
    from enclavefl.console import stderr_console
    from enclavefl.jobs.launcher import run_job

    with stderr_console.status(f"{task}: attesting parties…") as status:
        result = run_job(
            job_file,
            out_dir=out_dir,
            task=task,
            inputs=inputs,
            on_phase=lambda phase: status.update(f"{task}: {phase}…"),
        )
    result.raise_if_failed()
    return result


@main.command()
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), help="Output directory (default: the job's output.dir)."
)
@typed_errors
def align(job_file: Path, out_dir: Path | None) -> None:
    """Only align the samples of a vertical job (kept sealed when the job has storage; training reuses it)."""
    result = _run_task(job_file, out_dir, "align")
    summary = result.summary
    sealed = "sealed; training reuses it" if summary.get("sealed") else "NOT kept: the job has no storage section"
    click.echo(f"{summary.get('alignment')}: {summary.get('intersection')} common samples ({sealed})")


def _party_input(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise UsageError(f"--input {value!r}: expected NAME=PATH (one per party of the job)")
    return name, Path(path)


@main.command()
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option(
    "--input",
    "inputs",
    multiple=True,
    required=True,
    metavar="NAME=PATH",
    help="Each party's rows to predict (same columns as its training data); repeat for every party.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    help="Output directory of the training run (default: the job's output.dir).",
)
@typed_errors
def predict(job_file: Path, inputs: tuple[str, ...], out_dir: Path | None) -> None:
    """Joint prediction of a trained vertical job through the attested bridge; writes the leader's predictions."""
    pairs = [_party_input(value) for value in inputs]
    names = [name for name, _ in pairs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"--input given twice for {duplicates}")
    result = _run_task(job_file, out_dir, "predict", dict(pairs))
    summary = result.summary
    scored = ", ".join(f"{k} {v:.4f}" for k, v in summary.get("metrics", {}).items() if isinstance(v, float))
    click.echo(
        f"{summary.get('rows')} predictions written to {summary.get('predictions')}"
        + (f" (labelled input: {scored})" if scored else "")
    )
    for name, info in summary.get("parties", {}).items():
        if info.get("dropped_rows"):
            click.echo(
                f"{name}: {info['dropped_rows']} of its {info['input_rows']} input rows are not held by "
                "every party: no prediction for them"
            )


@main.command()
@click.option(
    "--work",
    type=click.Path(path_type=Path),
    default=Path("runs/demo"),
    show_default=True,
    help="Where the demo writes its data, jobs and outputs.",
)
@typed_errors
def demo(work: Path) -> None:
    """Run a small horizontal (digits) and vertical (breast cancer) job in INSECURE simulation mode."""
    from enclavefl.console import stdout_console
    from enclavefl.jobs.demo import run_demo
    from enclavefl.jobs.report import print_results

    stdout_console.print(
        "[yellow]enclavefl demo: SIMULATED attestation (no TEE): INSECURE, for trying things out[/yellow]"
    )
    results = run_demo(work)
    print_results(stdout_console, [r.summary for r in results])
    failed = [f"{r.summary.get('job')}: {', '.join(r.failed)}" for r in results if not r.ok]
    if failed:
        raise JobFailed(f"demo parties failed ({'; '.join(failed)}); logs under {work}")
    stdout_console.print(f"outputs (metrics.jsonl, summary.json, metrics.png, logs) under {work}")


@main.command()
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@click.option(
    "-t", "--template", default="hfl-tabular", show_default=True, help="Project template (`--list` shows them)."
)
@click.option("--list", "list_templates", is_flag=True, help="List the project templates and exit.")
@typed_errors
def new(directory: Path | None, template: str, list_templates: bool) -> None:
    """Write a small runnable project into DIRECTORY: job, policy, model code, data, README."""
    from enclavefl.scaffold import TEMPLATES, create_project

    if list_templates:
        width = max(len(name) for name in TEMPLATES)
        for name, entry in TEMPLATES.items():
            click.echo(f"{name:<{width}}  {entry.summary}")
        return
    if directory is None:
        raise UsageError("give the project directory: enclavefl new DIR --template NAME (or --list)")
    job = create_project(directory, template)
    click.echo(f"wrote {template} project {directory}; next (README.md has the rest):")
    click.echo(f"  enclavefl run {job}")


# --------------------------------------------------------------------------- deployment


@main.group()
def gramine() -> None:
    """Gramine-SGX enclaves for the parties of a job."""


@gramine.command("build")
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--name", "party", required=True, help="The party whose enclave to build.")
@click.option(
    "--key",
    "signing_key",
    type=click.Path(path_type=Path),
    help="Enclave signing key, RSA-3072 PEM (default: Gramine's ~/.config/gramine/enclave-key.pem).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    help="Build directory (default: build/gramine/<job name>/<party>).",
)
@click.option("--enclave-size", default="8G", show_default=True, help="sgx.enclave_size.")
@click.option("--max-threads", type=int, default=64, show_default=True, help="sgx.max_threads.")
@click.option("--torch-threads", type=int, default=4, show_default=True, help="Torch/OpenMP threads in the enclave.")
@click.option("--isv-prod-id", type=int, default=0, show_default=True)
@click.option("--isv-svn", type=int, default=0, show_default=True)
@click.option("--edmm", is_flag=True, help="sgx.edmm_enable (SGX2, Linux 6.0+).")
@click.option(
    "--measure-policy/--no-measure-policy",
    default=None,
    help="Measure the policy file (default: unless it pins mr_enclave).",
)
@click.option("--template", type=click.Path(path_type=Path), help="Manifest template (default: the shipped one).")
@typed_errors
def gramine_build(
    job_file: Path,
    party: str,
    signing_key: Path | None,
    out_dir: Path | None,
    enclave_size: str,
    max_threads: int,
    torch_threads: int,
    isv_prod_id: int,
    isv_svn: int,
    edmm: bool,
    measure_policy: bool | None,
    template: Path | None,
) -> None:
    """Render (and, where Gramine is installed, sign) the manifest of one party's enclave."""
    from enclavefl.jobs.gramine import EnclaveParams, build_enclave

    params = EnclaveParams(
        enclave_size=enclave_size,
        max_threads=max_threads,
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        edmm=edmm,
        torch_threads=torch_threads,
    )
    result = build_enclave(
        job_file,
        party,
        out_dir=out_dir,
        signing_key=signing_key,
        params=params,
        template=template,
        measure_policy=measure_policy,
    )
    for note in result.plan.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {result.template} (policy {'measured' if result.plan.policy_measured else 'not measured'})")
    if not result.signed:
        click.echo(
            f"note: Gramine not installed ({', '.join(result.missing_tools)} not found): the manifest is "
            "rendered but not signed, so there is no measurement yet. Install Gramine and run this again, "
            "or build the Gramine party image (docs/deploy.md).",
            err=True,
        )
        return
    assert result.measurement is not None
    click.echo(f"signed {result.manifest_sgx} and {result.sigstruct}")
    for key, value in result.measurement.to_json().items():
        click.echo(f"{key}: {value}")
    click.echo(f"# for `enclavefl policy init --from-measure`: {result.out_dir / 'measurement.json'}")


@main.command()
@click.argument("target")
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(path_type=Path),
    help="Also verify the party's evidence against this policy.",
)
@click.option("--collateral", type=click.Path(path_type=Path), help="Offline collateral JSON file.")
@click.option("--pccs", help="PCCS URL to fetch collateral from.")
@click.option("--timeout", "timeout_s", type=float, default=5.0, show_default=True, help="Seconds for one probe.")
@click.option("--wait", "wait_s", type=float, help="Probe until ready, for at most this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@typed_errors
def health(
    target: str,
    policy_path: Path | None,
    collateral: Path | None,
    pccs: str | None,
    timeout_s: float,
    wait_s: float | None,
    as_json: bool,
) -> None:
    """Is the party listening at TARGET (HOST:PORT) up and ready? Exit 0 ready, 1 not."""
    from enclavefl.net import check_health, wait_healthy
    from enclavefl.tee import collateral_source, load_policy

    policy = load_policy(policy_path) if policy_path is not None else None
    source = collateral_source(collateral, pccs) if policy is not None else None
    if wait_s is not None:
        result = wait_healthy(target, timeout_s=wait_s, policy=policy, collateral=source)
    else:
        result = check_health(target, policy=policy, collateral=source, timeout_s=timeout_s)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        state = "ready" if result.ready else "NOT ready"
        attested = f", attested {result.claims.tee.value} {result.claims.short_id()}" if result.claims else ""
        click.echo(f"{target}: party {result.party} {state}{attested}")
    if not result.ready:
        sys.exit(1)
