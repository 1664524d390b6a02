"""Crash- and race-safe file operations for the zoo: stage in root/tmp, then rename into place.

A rename within one filesystem is atomic, so readers see either nothing or a complete
block/manifest, never a half-written one. Staging under the zoo's own tmp/ keeps the
rename on one filesystem.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import uuid
from typing import Any, Iterator


@contextlib.contextmanager
def temp_dir(tmp_root: str) -> Iterator[str]:
  """A fresh private directory under tmp_root, removed (with whatever is left in it) on exit."""
  os.makedirs(tmp_root, exist_ok=True)
  path = os.path.join(tmp_root, f"{os.getpid()}-{uuid.uuid4().hex}")
  os.mkdir(path)
  try:
    yield path
  finally:
    shutil.rmtree(path, ignore_errors=True)


def write_json(path: str, obj: Any) -> None:
  """Writes JSON and fsyncs it (the caller renames it into place)."""
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())


def publish_dir(staged: str, final: str) -> bool:
  """Renames a complete staged directory to `final`; False if `final` already exists.

  Losing the race is fine for content-addressed directories: the winner's content is the
  same by construction. The staged copy stays behind for the caller's temp_dir to remove.
  """
  try:
    os.rename(staged, final)
    return True
  except OSError as e:
    if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and os.path.isdir(final):
      return False
    raise


def replace_dir(staged: str, final: str, trash_root: str) -> None:
  """Puts a staged directory at `final`, moving any existing one out first (into trash_root)."""
  for _ in range(8):
    if publish_dir(staged, final):
      return
    old = os.path.join(trash_root, f"old-{uuid.uuid4().hex}")
    try:
      os.rename(final, old)
    except FileNotFoundError:
      continue  # someone else moved it away meanwhile: try again
    shutil.rmtree(old, ignore_errors=True)
  raise OSError(f"could not replace {final}: it keeps being recreated concurrently")


def remove_dir(path: str, trash_root: str) -> None:
  """Removes a directory by first renaming it away, so it never appears half-deleted."""
  os.makedirs(trash_root, exist_ok=True)
  old = os.path.join(trash_root, f"old-{uuid.uuid4().hex}")
  os.rename(path, old)
  shutil.rmtree(old, ignore_errors=True)


def publish_file(staged: str, final: str, overwrite: bool) -> bool:
  """Moves a staged file to `final`. Without overwrite, False (and nothing moved) if it exists.

  The no-overwrite case uses link(), which fails atomically when `final` exists, so two
  writers can never both believe they created it.
  """
  if overwrite:
    os.replace(staged, final)
    return True
  try:
    os.link(staged, final)
  except FileExistsError:
    return False
  os.remove(staged)
  return True


class ZooLock:
  """An flock on root/zoo.lock: writers (conversions) share it, gc holds it exclusively.

  gc deletes unreferenced blocks; a conversion has written (or decided to reuse) blocks
  that no manifest references until its manifest lands. Holding the shared lock across
  that window keeps gc from deleting them. flock is released by the kernel if a process
  dies, so a crashed conversion never wedges the zoo.
  """

  def __init__(self, root: str):
    self.path = os.path.join(root, "zoo.lock")

  @contextlib.contextmanager
  def _held(self, mode: int) -> Iterator[None]:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, mode)
      yield
    finally:
      os.close(fd)  # closing releases the lock

  def shared(self):
    return self._held(fcntl.LOCK_SH)

  def exclusive(self):
    return self._held(fcntl.LOCK_EX)
