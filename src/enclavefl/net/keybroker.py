"""Key broker: data keys released only over the attested channel, only to attested peers.

The broker is an attested server whose own policy decides who gets keys (admission
verifies the client's evidence against it). Keys live in a directory, one key file per
name (32 raw bytes or 64 hex characters, mode 0600, as `file:` keys). Parties use a key
through the ``broker:HOST:PORT/KEYNAME`` key spec, which this module registers with
`enclavefl.seal`: the key then travels only inside TLS, from and to an attested enclave.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from enclavefl.errors import Check, ConfigError, FormatError, Rejected, UsageError
from enclavefl.fsutil import atomic_write_bytes
from enclavefl.net.admission import PartyCredentials, Peer
from enclavefl.net.client import AttestedClient, split_target
from enclavefl.net.server import AttestedServer
from enclavefl.net.tensors import Message
from enclavefl.seal.keys import KEK_SIZE, FileKeySource, KeySource, register_key_scheme, write_random_key
from enclavefl.validate import is_int

__all__ = [
    "BROKER_SCHEME",
    "KEY_METHOD",
    "BrokerKeySource",
    "configure_broker_access",
    "create_broker_key",
    "serve_key_broker",
]

log = logging.getLogger("enclavefl.net")

__all__ = [
    "BROKER_SCHEME",
    "KEY_METHOD",
    "VERSIONS_FILE",
    "VERSION_METHOD",
    "BrokerKeySource",
    "BrokerVersions",
    "VersionRegister",
    "configure_broker_access",
    "create_broker_key",
    "serve_key_broker",
]

KEY_METHOD = "keybroker.get-key"
VERSION_METHOD = "keybroker.version"
VERSIONS_FILE = ".versions.json"  # beside the keys; no key name starts with "."
BROKER_SCHEME = "broker"
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _check_key_name(name: Any) -> str:
    if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
        raise UsageError(f"key name must match {_KEY_NAME.pattern}, got {name!r}")
    return name


def create_broker_key(keys_dir: str | Path, name: str) -> Path:
    """Make a fresh random key `name` in the broker's key directory (created, mode 0700, if
    missing); never overwrites."""
    # Not create_key_file: its development-only warning is about keys on a party's host,
    # and the broker's key directory is where keys are meant to live.
    path = write_random_key(Path(keys_dir) / _check_key_name(name))
    log.info("created broker key %r in %s", name, keys_dir)
    return path


class _KeyHandler:
    def __init__(self, keys_dir: Path) -> None:
        self._keys_dir = keys_dir

    def __call__(self, peer: Peer, request: Message) -> Message:
        name = _check_key_name(request.meta.get("key"))
        if peer.claims is None:
            raise Rejected(
                f"party {peer.party} is not attested: keys go only to attested peers", check=Check.ATTESTATION
            )
        path = self._keys_dir / name
        if not path.is_file():
            raise Rejected(f"key {name!r} is not held by this broker", check=Check.KEY_NAME)
        key = FileKeySource(path).kek()
        log.info(
            "released key %s to party %s (tee=%s mr_enclave=%s)",
            name,
            peer.party,
            peer.claims.tee.value,
            peer.claims.short_id(),
        )
        return Message(meta={"key": name}, tensors={"key": np.frombuffer(key, dtype=np.uint8)})


class VersionRegister:
    """The broker's monotonic register of sealed-artifact versions, per (party, artifact).

    A party records each checkpoint version it sealed and, before resuming, asks for the
    newest: the host of a party can delete its newest checkpoints, but cannot make the
    broker forget them. Entries are keyed by the attested session's party name (the job is
    the broker's own), so no party moves another's register. Kept in VERSIONS_FILE in the
    key directory, written atomically; whoever controls the broker's host can still roll
    that file back (see docs/deploy.md).
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._versions: dict[str, int] = {}
        if path.exists():
            try:
                loaded = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise FormatError(f"{path}: version register does not load: {exc}") from None
            if not isinstance(loaded, dict) or not all(
                isinstance(k, str) and is_int(v) for k, v in loaded.items()
            ):
                raise FormatError(f"{path}: version register must map names to integers")
            self._versions = loaded

    def __call__(self, peer: Peer, request: Message) -> Message:
        if peer.claims is None:
            raise Rejected(
                f"party {peer.party} is not attested: versions go only to attested peers", check=Check.ATTESTATION
            )
        artifact = _check_key_name(request.meta.get("artifact"))
        entry = f"{peer.party}/{artifact}"
        record = request.meta.get("record")
        with self._lock:
            current = self._versions.get(entry)
            if record is not None:
                if not is_int(record) or record < 0:
                    raise UsageError(f"a recorded version must be an int >= 0, got {record!r}")
                if current is not None and record < current:
                    raise Rejected(
                        f"{artifact} of party {peer.party}: version {record} is older than version {current} "
                        "this key broker recorded: the party's state would roll back",
                        check=Check.FRESHNESS,
                    )
                if record != current:
                    self._versions[entry] = record
                    atomic_write_bytes(self._path, json.dumps(self._versions, sort_keys=True).encode(), mode=0o600)
                current = record
        return Message(meta={"artifact": artifact, "version": -1 if current is None else current})


def serve_key_broker(
    keys_dir: str | Path, credentials: PartyCredentials, *, host: str = "127.0.0.1", port: int = 0
) -> AttestedServer:
    """Start a key broker serving the keys in `keys_dir` (returns the started server).

    Its credentials' policy decides who gets keys; the mode must attest clients.
    """
    directory = Path(keys_dir)
    if not directory.is_dir():
        raise ConfigError(f"key directory {directory} does not exist")
    if not credentials.mode.verifies_client:
        raise UsageError("a key broker must attest its clients: mode 'server' is not allowed")
    # Keys go by policy, not by party name, and its clients are short-lived commands (seal,
    # then unseal): a name is held only while a call under it is in progress.
    server = AttestedServer(credentials, host=host, port=port, session_hold_s=0)
    server.register(KEY_METHOD, _KeyHandler(directory))
    server.register(VERSION_METHOD, VersionRegister(directory / VERSIONS_FILE))
    server.start()
    return server


@dataclass(frozen=True)
class BrokerKeySource:
    """A KEK fetched from an attested key broker on every use (never stored)."""

    target: str
    key_name: str
    credentials: PartyCredentials

    def __post_init__(self) -> None:
        split_target(self.target)
        _check_key_name(self.key_name)

    @property
    def spec(self) -> str:
        return f"{BROKER_SCHEME}:{self.target}/{self.key_name}"

    def versions(self) -> BrokerVersions:
        """The broker's version register, for rollback protection of what this key seals."""
        return BrokerVersions(self.target, self.credentials)

    def kek(self) -> bytes:
        with AttestedClient(self.target, self.credentials) as client:
            answer = client.call(KEY_METHOD, Message(meta={"key": self.key_name}))
        key = answer.tensors.get("key")
        if not isinstance(key, np.ndarray) or key.dtype != np.uint8 or key.shape != (KEK_SIZE,):
            raise FormatError(f"key broker {self.target} answered without a {KEK_SIZE}-byte key")
        return key.tobytes()


@dataclass(frozen=True)
class BrokerVersions:
    """This party's entries in a key broker's version register (over the attested channel)."""

    target: str
    credentials: PartyCredentials

    @property
    def where(self) -> str:
        return f"key broker {self.target}"

    def recorded(self, artifact: str) -> int | None:
        """The newest version of `artifact` this party recorded, or None."""
        version = self._call({"artifact": artifact})
        return None if version < 0 else version

    def record(self, artifact: str, version: int) -> None:
        """Record that `version` of `artifact` is sealed; an older one than recorded is Rejected."""
        self._call({"artifact": artifact, "record": version})

    def _call(self, meta: dict[str, Any]) -> int:
        with AttestedClient(self.target, self.credentials) as client:
            answer = client.call(VERSION_METHOD, Message(meta=meta))
        version = answer.meta.get("version")
        if not is_int(version):
            raise FormatError(f"key broker {self.target} answered without a version")
        return version


_credentials: PartyCredentials | None = None
_credentials_lock = threading.Lock()


def configure_broker_access(credentials: PartyCredentials | None) -> None:
    """Set the credentials `broker:` key specs connect with (the party does this at start-up:
    a key source is made from a spec string alone)."""
    global _credentials
    with _credentials_lock:
        _credentials = credentials


def _broker_source(rest: str) -> KeySource:
    target, sep, name = rest.rpartition("/")
    if not sep or not target or not name:
        raise ConfigError(f"key spec {BROKER_SCHEME}:{rest} must be {BROKER_SCHEME}:HOST:PORT/KEYNAME")
    with _credentials_lock:
        credentials = _credentials
    if credentials is None:
        raise ConfigError(
            f"key spec {BROKER_SCHEME}:{rest} needs this party's attested identity: call "
            "enclavefl.net.keybroker.configure_broker_access() first"
        )
    try:
        return BrokerKeySource(target, name, credentials)
    except UsageError as exc:
        raise ConfigError(f"key spec {BROKER_SCHEME}:{rest}: {exc}") from exc


register_key_scheme(BROKER_SCHEME, _broker_source)
