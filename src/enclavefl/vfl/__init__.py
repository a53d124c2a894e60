"""Vertical FL: a leader with the labels and followers with other columns of the same samples."""

from __future__ import annotations

from typing import TYPE_CHECKING

from enclavefl.lazy import lazy_exports

if TYPE_CHECKING:
    from enclavefl.vfl.align_channel import align_as_follower, align_as_leader
    from enclavefl.vfl.errors import FollowerRefused, FollowerUnavailable, LeaderUnreachable, ResumeFailed
    from enclavefl.vfl.export import export_model, load_model
    from enclavefl.vfl.follower import Follower, predict_as_follower
    from enclavefl.vfl.leader import Leader, Predictions, SplitMlpLeader, predict_as_leader
    from enclavefl.vfl.storage import Aligned, Storage

__all__ = [
    "Aligned",
    "Follower",
    "FollowerRefused",
    "FollowerUnavailable",
    "Leader",
    "LeaderUnreachable",
    "Predictions",
    "ResumeFailed",
    "SplitMlpLeader",
    "Storage",
    "align_as_follower",
    "align_as_leader",
    "export_model",
    "load_model",
    "predict_as_follower",
    "predict_as_leader",
]

# Each name is imported from its module on first use, not with the package: importing a light
# submodule (vfl.psi, whose X25519 pool processes import it again under spawn) must not pay for
# torch and the rest of the package.
_HOMES = {
    "Aligned": "storage",
    "Follower": "follower",
    "FollowerRefused": "errors",
    "FollowerUnavailable": "errors",
    "Leader": "leader",
    "LeaderUnreachable": "errors",
    "Predictions": "leader",
    "ResumeFailed": "errors",
    "SplitMlpLeader": "leader",
    "Storage": "storage",
    "align_as_follower": "align_channel",
    "align_as_leader": "align_channel",
    "export_model": "export",
    "load_model": "export",
    "predict_as_follower": "follower",
    "predict_as_leader": "leader",
}


__getattr__, __dir__ = lazy_exports(__name__, {name: f"{__name__}.{home}" for name, home in _HOMES.items()}, globals())
