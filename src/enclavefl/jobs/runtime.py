"""What every party of a job needs before its role starts: evidence, identity, policy, peers.

The runtime attests this process (a fresh key bound into the TEE's evidence), loads the
policy the whole federation enforces, and builds the attested server (coordinator) or
client (member). Roles receive these objects and never touch certificates or quotes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enclavefl.errors import ConfigError
from enclavefl.fsutil import atomic_write_bytes
from enclavefl.jobs.config import JobConfig, PartyConfig
from enclavefl.jobs.measure import job_measurement
from enclavefl.net import AttestedClient, AttestedServer, Mode, PartyCredentials, RetryPolicy
from enclavefl.net.keybroker import configure_broker_access
from enclavefl.seal import KeySource, ensure_development_key, parse_key_spec
from enclavefl.seal.keys import GRAMINE_KEYS_DIR
from enclavefl.tee.attesters import make_attester
from enclavefl.tee.collateral import collateral_source
from enclavefl.tee.policy import Policy, PrivacyBudget

__all__ = ["PartyRuntime", "storage_key"]

log = logging.getLogger("enclavefl.jobs")


def storage_key(job: JobConfig) -> KeySource | None:
    """The job's storage key source (None: no storage section).

    In simulation mode (`tee.allow_simulated_insecure: true`) a `file:` key that does not
    exist yet is created, with the same loud warning as the demo's: a simulated run is
    INSECURE anyway, and the examples then run as written. Outside simulation a missing
    key file is an error that names the `enclavefl keygen` command.
    """
    if job.storage is None:
        return None
    source = parse_key_spec(job.storage.key)
    if job.tee.allow_simulated_insecure and ensure_development_key(source):
        log.warning("INSECURE: simulation mode created the missing storage key %s; "
                    "outside simulation, create keys yourself (enclavefl keygen PATH) or use sgx-seal:/broker:",
                    source.spec)
    return source


@dataclass
class PartyRuntime:
    """One party of one job, attested and ready to serve or dial."""

    job: JobConfig
    job_file: Path
    party: PartyConfig
    out_dir: Path
    policy: Policy
    credentials: PartyCredentials
    measurement: Any
    tee: str
    peers_seen: dict[str, dict[str, Any]] = field(default_factory=dict)
    privacy: PrivacyBudget | None = None
    """The policy's privacy budget, checked against the job's privacy settings at start."""
    record_extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, job: JobConfig, job_file: Path, name: str, out_dir: Path) -> PartyRuntime:
        party = job.party(name)
        policy = Policy.load(job.policy)
        if policy.allow_simulated and not job.tee.allow_simulated_insecure:
            raise ConfigError(
                "policy allows simulated evidence but tee.allow_simulated_insecure is false: "
                "set both to run INSECURE simulated parties, or neither"
            )
        if job.tee.attester == "simulated" and not policy.allow_simulated:
            raise ConfigError(
                f"tee.attester is simulated but the policy {job.policy} does not allow simulated evidence: "
                "no peer enforcing it would accept this party"
            )
        from enclavefl.jobs.privacy import check_job_privacy

        budget = check_job_privacy(job, policy)  # before attesting: a job over budget never starts
        measurement = job_measurement(job, job_file)
        attester = make_attester(
            job.tee.attester,
            allow_simulated_insecure=job.tee.allow_simulated_insecure,
            measurement=measurement,
        )
        credentials = PartyCredentials.create(
            attester,
            policy,
            party=name,
            job_id=job.job.id,
            mode=Mode(job.tee.verify),
            collateral=collateral_source(job.tee.collateral, job.tee.pccs_url),
        )
        runtime = cls(
            job=job,
            job_file=job_file,
            party=party,
            out_dir=out_dir,
            policy=policy,
            credentials=credentials,
            measurement=measurement,
            tee=attester.tee.value,
            privacy=budget,
        )
        # A broker: storage key is fetched over the attested channel with this identity.
        configure_broker_access(credentials)
        runtime.write_party_record(fresh=True)  # nothing of an earlier run's record survives
        return runtime

    def key_source(self) -> KeySource | None:
        """The key that seals this party's checkpoints and exports (None: no storage configured)."""
        return storage_key(self.job)

    def prepare_storage(self, *, keys_dir: Path = GRAMINE_KEYS_DIR) -> bool:
        """Under Gramine-SGX, give the encrypted checkpoint mount its key before first use.

        `sgx-seal:` keys are Gramine's own; any other key source (broker:, file:) is turned
        into the mount key inside the enclave. Returns whether a key was provisioned.
        """
        from enclavefl.jobs.gramine import CHECKPOINT_KEY_NAME, mount_key_name, provision_mount_key

        storage = self.job.storage
        if storage is None or self.tee != "sgx" or mount_key_name(storage.key) != CHECKPOINT_KEY_NAME:
            return False
        provision_mount_key(parse_key_spec(storage.key), keys_dir=keys_dir)
        return True

    def server(self, *, max_workers: int = 32) -> AttestedServer:
        address = self.party.address
        if address is None:
            raise ConfigError(f"parties[{self.party.name}].address: the {self.party.role} must listen somewhere")
        host = "0.0.0.0" if address.host not in ("localhost", "127.0.0.1", "::1") else "127.0.0.1"
        return AttestedServer(self.credentials, host=host, port=address.port, max_workers=max_workers)

    def client(self, *, retry: RetryPolicy | None = None) -> AttestedClient:
        address = self.job.coordinator().address
        assert address is not None  # the job schema requires the coordinator's address
        return AttestedClient(f"{address.host}:{address.port}", self.credentials, retry=retry or RetryPolicy())

    def phase(self, name: str) -> None:
        """The coordinator announces its phase (aligning, training, exporting, ...) to progress displays."""
        if self.party.name == self.job.coordinator().name:
            from enclavefl.jobs.launcher import write_phase

            write_phase(self.out_dir, name)
            log.info("phase: %s", name)

    def write_party_record(self, *, fresh: bool = False, **extra: Any) -> None:
        """Who this party is (its own measurement; never a key), for the run summary.

        `extra` adds to what earlier calls recorded (verified coordinator, privacy spent)."""
        self.record_extra.update(extra)
        path = self.out_dir / "parties" / f"{self.party.name}.json"
        try:  # keep what this run recorded earlier (e.g. verified_coordinator)
            earlier = json.loads(path.read_text()) if path.exists() and not fresh else {}
        except (OSError, ValueError):
            earlier = {}
        record = {
            **earlier,
            "party": self.party.name,
            "role": self.party.role,
            "tee": self.tee,
            "mr_enclave": self.measurement.mr_enclave.hex(),
            "mr_signer": self.measurement.mr_signer.hex(),
            "policy_sha256": self.policy.digest().hex(),
            **self.record_extra,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(record, indent=2).encode())

    def connected(self, client: AttestedClient, *, timeout_s: float = 300.0) -> None:
        """Wait for the coordinator by readiness (parties start in any order), attest to it,
        and record that this member verified it."""
        client.wait_ready(timeout_s=timeout_s)
        server = client.connect()
        self.write_party_record(verified_coordinator=server.attested)

    def record_peer(self, party: str, claims: Any) -> None:
        """Remember a peer this party verified (claims None when the mode does not attest it)."""
        self.peers_seen[party] = {
            "attested": claims is not None,
            "tee": claims.tee.value if claims is not None else None,
            "mr_enclave": claims.mr_enclave.hex() if claims is not None else None,
            "tcb_status": claims.tcb_status if claims is not None else None,
        }
