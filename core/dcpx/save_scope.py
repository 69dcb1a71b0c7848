"""What one save owns in its checkpoint directory: the lock it holds and the files its
cleanup may remove.

A collective save owns the whole directory.  With ``use_collectives=False`` every rank
saves a checkpoint of its own (``__<rank>.metadata``, files ``__<rank>_*``) and owns only
that: ranks never remove each other's files.  No cleanup removes a file that any committed
metadata file in the directory uses (see format.md, commit protocol).
"""

from __future__ import annotations

from . import commit
from .checkpoint_files import metadata_files, referenced_files


class SaveScope:
    def __init__(self, directory: str, rank: int | None) -> None:
        self.directory, self.rank = directory, rank
        self.metadata_name = commit.metadata_name(rank)
        self.lock = commit.SaveLock(directory, rank)
        self._replacing: set[str] = set()  # files the checkpoint this save replaces uses

    def lock_and_clean(self) -> None:
        """Take the lock, then remove what interrupted saves left in this scope."""
        self.lock.busy = True
        self.lock.acquire()
        replacing = referenced_files(self.directory, [self.metadata_name])
        keep = referenced_files(self.directory, self._other_metadata())
        self._replacing = replacing or set()
        if keep is not None and replacing is not None:
            self._remove_unused(keep | replacing)

    def clean_after_commit(self, written: set[str]) -> None:
        """The previous checkpoint of this scope is replaced: remove what only it used."""
        others = referenced_files(self.directory, self._other_metadata())
        if others is not None:
            self._remove_unused(others | written)

    def _other_metadata(self) -> list[str]:
        """The committed metadata files, besides the one this save replaces, that may use
        files in this scope: all of them for a collective save; for a rank saving on its own
        only the global ``.metadata`` (other ranks' own checkpoints use only their files)."""
        if self.rank is not None:
            return [commit.METADATA]
        return [n for n in metadata_files(self.directory) if n != self.metadata_name]

    def _remove_unused(self, keep: set[str]) -> None:
        names = commit.owned_leftovers(self.directory, keep)
        if self.rank is not None:
            names = [n for n in names if n.startswith(f"__{self.rank}_") or n in self._replacing]
        commit.remove_files(self.directory, names)
