"""What a save's coordinator tells every rank through the plan, and plans DCP hands back
from an earlier save.

Every save draws a new checkpoint id, and a name tag for its data files when the directory
holds a committed checkpoint (new names must not reuse its files).  DCP's plan caching
(``DefaultSavePlanner(enable_plan_caching=True)``) hands a rank whose plan did not change
the final plan of an earlier save: its id and file names are that save's, and writing them
would reuse the id and overwrite the committed files in place.  A writer that planned the
save (the coordinator, or one rank saving alone) writes with this save's id instead.  Any
other rank cannot learn that id without a new plan, so it draws an id and file tag of its
own, and its items record the id they are bound to (``manifest.SAVE_ID_RECORD``).
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
    # an id this rank drew for itself (a cached plan): not the one the checkpoint commits
    own_id: bool = False


class SavePlanning:
    """One writer's plan data: what it drew for the current save, if it planned it."""

    def __init__(self) -> None:
        self.fresh: PlanData | None = None
        # the id the next save draws: DCP asks for it (storage_meta) before the save is planned
        self.next_id = uuid.uuid4().hex

    def begin(self) -> None:
        """A new save starts; nothing is planned yet."""
        self.fresh = None

    def draw(self, prefix: str, committed: bool) -> PlanData:
        """New plan data for the save this writer plans (``committed``: the directory holds
        a committed checkpoint, so data files get a name tag)."""
        self.fresh = PlanData(prefix, self.next_id, uuid.uuid4().hex[:12] if committed else None)
        self.next_id = uuid.uuid4().hex
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
            prefix = getattr(data, "prefix", None if fresh is None else fresh.prefix)
            if not isinstance(prefix, str):
                raise ConfigError(
                    f"{where}: DCP handed this rank the plan of an earlier save ({_describe(data)}), "
                    "as DefaultSavePlanner(enable_plan_caching=True) does when a rank's plan has not changed, "
                    "and it names no file prefix to write under. Save without plan caching. This rank wrote "
                    "nothing; the save is not committed"
                )
            if fresh is not None:
                data = dataclasses.replace(fresh, prefix=prefix)
            else:
                own = uuid.uuid4().hex
                data = PlanData(prefix, own, own[:12], own_id=True)
        _WRITTEN_IDS.add(data.checkpoint_id)
        return data


def _describe(data: object) -> str:
    if isinstance(data, PlanData):
        return f"checkpoint id {data.checkpoint_id}"
    return f"planned by another storage writer: {type(data).__name__}"
