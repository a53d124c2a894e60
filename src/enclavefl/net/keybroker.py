"""Key broker: data keys released only over the attested channel, only to attested peers.

The broker is an attested server whose own policy decides who gets keys (admission
verifies the client's evidence against it). Keys live in a directory, one key file per
name (32 raw bytes or 64 hex characters, mode 0600, as `file:` keys). Parties use a key
through the ``broker:HOST:PORT/KEYNAME`` key spec, which this module registers with
`enclavefl.seal`: the key then travels only inside TLS, from and to an attested enclave.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from enclavefl.errors import ConfigError, FormatError, Rejected, UsageError
from enclavefl.net.admission import PartyCredentials, Peer
from enclavefl.net.client import AttestedClient, split_target
from enclavefl.net.server import AttestedServer
from enclavefl.net.tensors import Message
from enclavefl.seal.keys import KEK_SIZE, FileKeySource, KeySource, register_key_scheme, write_random_key

__all__ = [
    "BROKER_SCHEME",
    "KEY_METHOD",
    "BrokerKeySource",
    "configure_broker_access",
    "create_broker_key",
    "serve_key_broker",
]

log = logging.getLogger("enclavefl.net")

KEY_METHOD = "keybroker.get-key"
BROKER_SCHEME = "broker"
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _check_key_name(name: Any) -> str:
    if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
        raise UsageError(f"key name must match {_KEY_NAME.pattern}, got {name!r}")
    return name


def create_broker_key(keys_dir: str | Path, name: str) -> Path:
    """Make a fresh random key `name` in the broker's key directory (never overwrites)."""
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
            raise Rejected(f"party {peer.party} is not attested: keys go only to attested peers", check="attestation")
        path = self._keys_dir / name
        if not path.is_file():
            raise Rejected(f"key {name!r} is not held by this broker", check="key-name")
        key = FileKeySource(path).kek()
        log.info(
            "released key %s to party %s (tee=%s mr_enclave=%s)",
            name,
            peer.party,
            peer.claims.tee.value,
            peer.claims.short_id(),
        )
        return Message(meta={"key": name}, tensors={"key": np.frombuffer(key, dtype=np.uint8)})


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

    def kek(self) -> bytes:
        with AttestedClient(self.target, self.credentials) as client:
            answer = client.call(KEY_METHOD, Message(meta={"key": self.key_name}))
        key = answer.tensors.get("key")
        if not isinstance(key, np.ndarray) or key.dtype != np.uint8 or key.shape != (KEK_SIZE,):
            raise FormatError(f"key broker {self.target} answered without a {KEK_SIZE}-byte key")
        return key.tobytes()


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
