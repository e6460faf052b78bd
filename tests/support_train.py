"""Test-only helpers for train.py / train_config.py (moved out of the project: no script uses them)."""

from train_config import TrainConfig, parse_flags


def parse_args(argv=None) -> TrainConfig:
    """The TrainConfig that `train.py argv` would run (the preset with the given flags applied)."""
    return parse_flags(argv)[0]
