"""A seeded multi-tenant workload: the S-LoRA / AlpaServe recipe.

N variants with power-law popularity (p_i ∝ 1/i^alpha), Gamma inter-arrival times with a mean
rate (req/s) and a coefficient of variation (cv=1 is Poisson; larger is burstier), and prompt
and output lengths drawn from fixed values or uniform ranges. The same spec and seed give the
same requests, so every serving mode sees exactly the same work.
"""

import dataclasses
import re
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class LengthDist:
  """A token count: fixed (lo == hi) or uniform over [lo, hi]."""
  lo: int
  hi: int

  @classmethod
  def parse(cls, text: str) -> "LengthDist":
    """'32' (fixed) or '16-64' / '16:64' (uniform, inclusive)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[-:]\s*(\d+)\s*)?", str(text))
    if not match:
      raise ValueError(f"bad length {text!r}: expected N or LO-HI")
    lo = int(match.group(1))
    hi = int(match.group(2)) if match.group(2) else lo
    if lo < 1 or hi < lo:
      raise ValueError(f"bad length {text!r}: need 1 <= LO <= HI")
    return cls(lo, hi)

  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(self.lo, self.hi + 1, size=n)

  def __str__(self) -> str:
    return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
  n_variants: int
  rate: float  # mean requests per second
  alpha: float = 1.0  # popularity skew; 0 = uniform
  cv: float = 1.0  # inter-arrival coefficient of variation; 1 = Poisson
  duration_s: float | None = 30.0  # arrivals within [0, duration); or
  num_requests: int | None = None  # exactly this many arrivals (wins over duration)
  input_len: LengthDist = LengthDist(32, 32)
  output_len: LengthDist = LengthDist(32, 32)
  vocab_size: int = 256  # prompt tokens are uniform in [0, vocab_size)
  seed: int = 0

  def validate(self) -> None:
    if self.n_variants < 1:
      raise ValueError(f"n_variants must be >= 1, got {self.n_variants}")
    if not self.rate > 0:
      raise ValueError(f"rate must be > 0, got {self.rate}")
    if not self.cv > 0:
      raise ValueError(f"cv must be > 0, got {self.cv}")
    if self.alpha < 0:
      raise ValueError(f"alpha must be >= 0, got {self.alpha}")
    if self.num_requests is None and not (self.duration_s and self.duration_s > 0):
      raise ValueError("give a positive duration_s or num_requests")
    if self.num_requests is not None and self.num_requests < 1:
      raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")


@dataclasses.dataclass(frozen=True)
class PlannedRequest:
  index: int
  arrival_s: float  # seconds after the run starts
  variant: int  # 0-based: variant 0 is the most popular
  prompt_tokens: tuple[int, ...]
  max_new_tokens: int


def popularity(n: int, alpha: float) -> np.ndarray:
  """p_i ∝ 1 / i^alpha for i = 1..n, normalised."""
  weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** alpha
  return weights / weights.sum()


def gamma_arrivals(rng: np.random.Generator, rate: float, cv: float,
                   duration_s: float | None, num_requests: int | None) -> np.ndarray:
  """Arrival times with Gamma(shape=1/cv², scale=1/(rate·shape)) gaps: mean gap 1/rate."""
  shape = 1.0 / cv ** 2
  scale = 1.0 / (rate * shape)
  if num_requests is not None:
    return np.cumsum(rng.gamma(shape, scale, size=num_requests))
  # Draw in chunks until past the horizon (bounded: the expected count is rate * duration).
  times = np.zeros(0)
  last = 0.0
  for _ in range(1000):
    chunk = last + np.cumsum(rng.gamma(shape, scale, size=max(16, int(rate * duration_s))))
    times = np.concatenate([times, chunk])
    last = chunk[-1]
    if last >= duration_s:
      break
  return times[times < duration_s]


def build(spec: WorkloadSpec) -> list[PlannedRequest]:
  """The requests of a workload, in arrival order."""
  spec.validate()
  rng = np.random.default_rng(spec.seed)
  arrivals = gamma_arrivals(rng, spec.rate, spec.cv, spec.duration_s, spec.num_requests)
  n = len(arrivals)
  variants = rng.choice(spec.n_variants, size=n, p=popularity(spec.n_variants, spec.alpha))
  in_lens = spec.input_len.sample(rng, n)
  out_lens = spec.output_len.sample(rng, n)
  return [PlannedRequest(i, float(arrivals[i]), int(variants[i]),
                         tuple(int(t) for t in rng.integers(0, spec.vocab_size, size=in_lens[i])),
                         int(out_lens[i]))
          for i in range(n)]


def describe(requests: Sequence[PlannedRequest], n_variants: int) -> dict:
  """Counts a report shows beside the results: what was actually drawn."""
  counts = np.bincount([r.variant for r in requests], minlength=n_variants)
  span = requests[-1].arrival_s if requests else 0.0
  return {"requests": len(requests), "span_s": round(span, 3),
          "per_variant": counts.tolist(),
          "input_tokens": int(sum(len(r.prompt_tokens) for r in requests)),
          "max_output_tokens": int(sum(r.max_new_tokens for r in requests))}
