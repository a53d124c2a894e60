"""The attested gRPC channel: RA-TLS server, probing and pinning client, admission,
tensor streaming and the key broker. FL code sees only `Peer` and `Message`."""

from enclavefl.net.admission import Mode, PartyCredentials, Peer, make_identity
from enclavefl.net.allocator import bound_allocator, tune_allocator
from enclavefl.net.client import AttestedClient, RetryPolicy, split_target
from enclavefl.net.echo import ECHO_JOB, EchoResult, run_echo_client, run_echo_server, start_echo_server
from enclavefl.net.errors import CallFailed, ConnectFailed, HandshakeFailed, PeerRefused
from enclavefl.net.health import Health, check_health, wait_healthy
from enclavefl.net.keybroker import configure_broker_access, create_broker_key, serve_key_broker
from enclavefl.net.probe import probe_and_verify
from enclavefl.net.server import AttestedServer
from enclavefl.net.tensors import (
    ArraySink,
    DigestSink,
    LazyTensor,
    Limits,
    MemmapSink,
    Message,
    TensorDigest,
    TensorSink,
)

__all__ = [
    "ECHO_JOB",
    "ArraySink",
    "AttestedClient",
    "AttestedServer",
    "CallFailed",
    "ConnectFailed",
    "DigestSink",
    "EchoResult",
    "HandshakeFailed",
    "Health",
    "LazyTensor",
    "Limits",
    "MemmapSink",
    "Message",
    "Mode",
    "PartyCredentials",
    "Peer",
    "PeerRefused",
    "RetryPolicy",
    "TensorDigest",
    "TensorSink",
    "configure_broker_access",
    "create_broker_key",
    "make_identity",
    "probe_and_verify",
    "run_echo_client",
    "run_echo_server",
    "serve_key_broker",
    "split_target",
    "start_echo_server",
    "tune_allocator",
    "bound_allocator",
    "check_health",
    "wait_healthy",
]
