"""Errors that end a command with one line and exit code 1: not bad input (a ValueError, exit
2) but something that happened while it ran. Light to import (the CLI catches them)."""

from __future__ import annotations


class TrainingStopped(RuntimeError):
    """A training run stopped before its end for a reason its message names."""


class RunFolderRemoved(TrainingStopped):
    """A training run's out_dir (or its ``train_config.json``) was removed while it trained."""


class TrainingDiverged(TrainingStopped):
    """The weights stopped being finite numbers (the loss went to nan or inf)."""
