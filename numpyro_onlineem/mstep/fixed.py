"""The ``"fixed"`` M step: sites held at their initial value (a constant to the model)."""

from __future__ import annotations

from typing import Any, NamedTuple

from numpyro_onlineem.mstep.base import EStepBatch, MStepContext


class Fixed(NamedTuple):
    """Holds ``sites`` at their value: no statistics, no state, no change.

    Attributes
    ----------
    sites : tuple of str
    """

    sites: tuple

    @property
    def name(self) -> str:
        return "<fixed>"

    @property
    def estimated(self) -> tuple:
        return self.sites

    def init(self, params: dict) -> tuple:
        return ()

    def statistics(self, batch: EStepBatch) -> dict:
        return {}

    def update(
        self, stats: dict, params: dict, mstep_state: Any, context: MStepContext
    ) -> tuple[dict, Any]:
        return params, mstep_state
