"""Vertical FL: a leader with the labels and followers with other columns of the same samples."""

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
