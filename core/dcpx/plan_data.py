"""What a save's coordinator tells every rank through the plan, and plans DCP hands back
from an earlier save.

Every save draws a new checkpoint id, and a name tag for its data files when the directory
holds a committed checkpoint (new names must not reuse its files).  DCP's plan caching
(``DefaultSavePlanner(enable_plan_caching=True)``) hands a rank whose plan did not change
the final plan of an earlier save: its id and file names are that save's, and writing them
would reuse the id and overwrite the committed files in place.  Where one writer planned the
save alone (one process, or ``use_collectives=False``) it writes this save's own data
instead; ranks of a collective save cannot agree on a new id without the plan, so they
refuse it.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass

from .errors import ConfigError

# checkpoint ids this process has written data for: a plan naming one again is a cached plan
_WRITTEN_IDS: set[str] = set()


@dataclass(frozen=True)
class PlanData:
    """File prefix, shared checkpoint id and name tag: what each rank writes with."""

    prefix: str
    checkpoint_id: str
    tag: str | None


class SavePlanning:
    """One writer's plan data: what it drew for the current save, if it planned it."""

    def __init__(self) -> None:
        self.fresh: PlanData | None = None
        self.alone = False  # the save's only rank
        # the id the next save draws: DCP asks for it (storage_meta) before the save is planned
        self.next_id = uuid.uuid4().hex

    def begin(self) -> None:
        """A new save starts; nothing is planned yet."""
        self.fresh = None

    def draw(self, prefix: str, committed: bool, alone: bool) -> PlanData:
        """New plan data for the save this writer plans (``committed``: the directory holds
        a committed checkpoint, so data files get a name tag)."""
        self.fresh = PlanData(prefix, self.next_id, uuid.uuid4().hex[:12] if committed else None)
        self.next_id = uuid.uuid4().hex
        self.alone = alone
        return self.fresh

    def resolve(self, data: PlanData, where: str) -> PlanData:
        """The plan data to write with, given what the plan carries."""
        fresh = self.fresh
        if not isinstance(data, PlanData):  # another writer's plan, cached by DCP for this planner class
            stale = True
        elif fresh is not None:  # this writer planned the save
            stale = data.checkpoint_id != fresh.checkpoint_id
        else:  # another rank planned it: a plan naming an id already written is a cached one
            stale = data.checkpoint_id in _WRITTEN_IDS
        if stale:
            if fresh is None or not self.alone:
                raise ConfigError(
                    f"{where}: DCP handed this rank the plan of an earlier save ({_describe(data)}), "
                    "as DefaultSavePlanner(enable_plan_caching=True) does when a rank's "
                    "plan has not changed; writing it would reuse that checkpoint's id and files. Save without "
                    "plan caching when several ranks save together (it works for a single process and with "
                    "use_collectives=False). This rank wrote nothing; the save is not committed"
                )
            data = dataclasses.replace(fresh, prefix=getattr(data, "prefix", fresh.prefix))
        _WRITTEN_IDS.add(data.checkpoint_id)
        return data


def _describe(data: object) -> str:
    if isinstance(data, PlanData):
        return f"checkpoint id {data.checkpoint_id}"
    return f"planned by another storage writer: {type(data).__name__}"
