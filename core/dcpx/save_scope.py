"""What one save owns in its checkpoint directory: the lock it holds and the files its
cleanup may remove.

A collective save owns the whole directory.  With ``use_collectives=False`` every rank
saves a checkpoint of its own (``__<rank>.metadata``, files ``__<rank>_*``) and owns only
that: ranks never remove each other's files.  No cleanup removes a file that any committed
metadata file in the directory uses (see format.md, commit protocol).

A rank's own checkpoint has a manifest and temporary files that name no rank, so a crash
during its commit or the cleanup after it leaves files no prefix attributes to the rank.
Before committing, a rank notes those names (the new checkpoint's and the replaced one's) in
its lock file; its next save removes the ones no committed checkpoint uses.
"""

from __future__ import annotations

from . import commit, manifest
from .checkpoint_files import metadata_files, referenced_files


class SaveScope:
    def __init__(self, directory: str, rank: int | None) -> None:
        self.directory, self.rank = directory, rank
        self.metadata_name = commit.metadata_name(rank)
        self.lock = commit.SaveLock(directory, rank)
        self._replacing: set[str] = set()  # files the checkpoint this save replaces uses
        self._interrupted: set[str] = set()  # what the last save here noted before committing

    def lock_and_clean(self) -> None:
        """Take the lock, then remove what interrupted saves left in this scope.  The lock is
        busy (not to be taken over) only while this runs: a save that fails before it writes
        (a planner raising between planning and writing) must not keep the path locked."""
        self.lock.busy = True
        try:
            self.lock.acquire()
            self._interrupted = self.lock.noted()
            replacing = referenced_files(self.directory, [self.metadata_name])
            keep = referenced_files(self.directory, self._other_metadata())
            self._replacing = replacing or set()
            if keep is not None and replacing is not None:
                self._remove_unused(keep | replacing)
        finally:
            self.lock.busy = False

    def begin_commit(self, checkpoint_id: str, sync: bool) -> None:
        """Note the files of this rank's own checkpoint that its data-file prefix does not
        name: the manifest and temporary files of ``checkpoint_id`` and the replaced manifest.
        (A collective save's cleanup removes every file no checkpoint uses: nothing to note.)"""
        if self.rank is None:
            return
        name = manifest.manifest_name(checkpoint_id)
        unprefixed = {n for n in self._replacing if not n.startswith(f"__{self.rank}_")}
        self.lock.note({name, name + ".tmp", commit.metadata_tmp_name(checkpoint_id)} | unprefixed, sync)

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
            mine = self._replacing | self._interrupted
            names = [n for n in names if n.startswith(f"__{self.rank}_") or n in mine]
        commit.remove_files(self.directory, names)
