"""Readiness probes of a listening party: moved to enclavefl.net.health (a probe is transport).

Kept so that `from enclavefl.jobs.health import check_health` (container health checks,
docs/deploy.md) goes on working.
"""

from __future__ import annotations

from enclavefl.net.health import Health, check_health, wait_healthy

__all__ = ["Health", "check_health", "wait_healthy"]
