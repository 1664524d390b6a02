"""KV replay: rebuild a running request's KV by running its tokens through its chain again.

When some of a request's block instances lose their KV (their worker died and they were
re-hosted empty, or the request was moved onto other instances), the request is paused and then
resumed with a replay:

  pause(scheduler, req)   # its queued step is dropped; a step still in flight is ignored on return
  ...                     # re-host instances / change req.segments
  resume(scheduler, req)  # prefill of every token it had cached, then its pending step

The replayed tokens are the prompt and the tokens already generated (all but the last, which is
the input of the pending decode step), sent as non-final prefill chunks: nothing is sampled or
emitted while replaying, so the stream goes on exactly where it stopped. Its page leases are
kept, and KV writes are positional, so the replay overwrites the same pages in every instance
(except registered prefix pages, which are read-only: the replay starts after them).
The pending step then runs with the same position and sampling step as it would have: greedy
(and seeded) output equals an undisturbed run's.
"""

from typing import Iterable

from jblock.runtime.scheduler import Request, Scheduler


def uses(req: Request, keys: set[str]) -> bool:
  """Whether any segment of the request's chain runs an instance with one of these keys."""
  return any(inst.key in keys for seg in req.segments for inst in seg.instances)


def replay_tokens(req: Request) -> list[int]:
  """The tokens whose KV the request holds: what a replay writes again."""
  return (req.prompt + req.generated)[:req.cached]


def pause(scheduler: Scheduler, req: Request) -> None:
  """Takes the request's work out of the queues; a batch still running it is ignored when it
  comes back (the request's epoch moves on)."""
  req.epoch += 1
  item = req.item
  if item is not None and not req.in_flight:
    queue = scheduler.queues.get(req.segments[item.pos].key)
    if queue is not None and item in queue:
      queue.remove(item)
  req.item = None
  req.in_flight = False


def resume(scheduler: Scheduler, req: Request) -> None:
  """Queues a paused request again: a replay of its cached tokens (from the longest prefix its
  KV pages still hold registered), then its pending step (Scheduler.resume).

  A request still in its prompt restarts the prompt (nothing was sampled yet).
  """
  scheduler.resume(req)


def pause_all(scheduler: Scheduler, keys: set[str]) -> list[Request]:
  """Pauses every active request whose chain uses one of `keys`; returns them."""
  affected = [r for r in scheduler.active if not r.done and uses(r, keys)]
  for req in affected:
    pause(scheduler, req)
  return affected


def resume_all(scheduler: Scheduler, requests: Iterable[Request]) -> None:
  for req in requests:
    resume(scheduler, req)
