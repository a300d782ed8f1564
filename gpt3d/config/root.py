"""`Config`: the whole configuration, every section (schema.py), built from a dict (values.py) and checked by the
rules (rules.py). Kept apart from the sections so the rules and the value readers never import what they serve.
"""
from __future__ import annotations

from dataclasses import dataclass

from .schema import Sections
from .values import apply_flat, flatten


@dataclass
class Config(Sections):
    @classmethod
    def from_dict(cls, d: dict) -> Config:
        cfg = cls()
        apply_flat(cfg, flatten(d))
        return cfg

    def validate(self, world_size: int = 1) -> None:
        """ConfigError (one line naming the flag) for any value or combination a run would refuse."""
        from .rules import validate   # imported when used: `config` loads no rules it does not run
        validate(self, world_size)
