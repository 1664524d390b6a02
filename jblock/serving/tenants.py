"""Tenants: API keys (stored as SHA-256 hex only), the models each may use, and quotas.

The tenants file (`--tenants`):

  {"admin_key_sha256": "<64 hex>",
   "tenants": [{"name": "acme", "api_key_sha256": "<64 hex>", "models": ["base", "variant-1"],
                "requests_per_minute": 60, "max_concurrent": 4, "accuracy_budget": 0.01}]}

`models` may be ["*"] (every model the server holds). `requests_per_minute` and
`max_concurrent` are optional (absent or 0 = unlimited); `accuracy_budget` (optional, in
[0, 1], default 0) is the top-1 disagreement with a model's own blocks the tenant accepts when
the engine reroutes its steps onto equivalent blocks (jblock.runtime.reroute); 0 = never.
Make a key's hash with: printf %s "$KEY" | sha256sum
"""

import collections
import dataclasses
import hashlib
import hmac
import json
import math
import re
import threading
import time
from typing import Sequence

from jblock.errors import JBlockError, OverloadedError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ALL_MODELS = "*"
RATE_WINDOW_S = 60.0


class TenantsFileError(JBlockError):
  """The tenants file is unreadable or malformed: the server's set-up."""

  grpc_code = "FAILED_PRECONDITION"


class UnauthenticatedError(JBlockError):
  """No API key, or one that matches no tenant."""

  grpc_code = "UNAUTHENTICATED"


class PermissionDeniedError(JBlockError):
  """The caller is known but may not do this (Admin without the admin key)."""

  grpc_code = "PERMISSION_DENIED"


class QuotaExceededError(OverloadedError):
  """A tenant's request-rate or concurrency quota is used up; retry after `retry_after_s`."""

  def __init__(self, message: str, retry_after_s: float):
    super().__init__(message)
    self.retry_after_s = retry_after_s


def key_sha256(key: str) -> str:
  return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Tenant:
  name: str
  api_key_sha256: str
  models: tuple[str, ...]
  requests_per_minute: int = 0  # 0 = unlimited
  max_concurrent: int = 0  # 0 = unlimited
  accuracy_budget: float | None = None

  def may_use(self, model: str) -> bool:
    return ALL_MODELS in self.models or model in self.models


@dataclasses.dataclass(frozen=True)
class Principal:
  """Who a request comes from. tenant None: an open server (no tenants file)."""
  tenant: Tenant | None
  is_admin: bool = False

  @property
  def label(self) -> str:
    """The tenant's name for metrics and logs."""
    if self.tenant is not None:
      return self.tenant.name
    return "admin" if self.is_admin else "open"

  def may_use(self, model: str) -> bool:
    return self.tenant is None or self.tenant.may_use(model)


OPEN = Principal(tenant=None, is_admin=True)


def _field(entry: dict, key: str, kind, where: str, default=dataclasses.MISSING):
  if key not in entry:
    if default is dataclasses.MISSING:
      raise TenantsFileError(f"{where}: {key!r} is required")
    return default
  value = entry[key]
  if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
    raise TenantsFileError(f"{where}: {key!r} must be a non-negative integer, got {value!r}")
  if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                        or not math.isfinite(value) or value < 0):
    raise TenantsFileError(f"{where}: {key!r} must be a non-negative number, got {value!r}")
  if kind is str and not isinstance(value, str):
    raise TenantsFileError(f"{where}: {key!r} must be a string")
  return value


def _hash(entry: dict, key: str, where: str) -> str:
  value = _field(entry, key, str, where).lower()
  if not _HEX64.match(value):
    raise TenantsFileError(f"{where}: {key!r} must be 64 hex digits (the key's SHA-256), "
                           "never the key itself")
  return value


def parse_tenants(data) -> tuple[str, list[Tenant]]:
  """(admin key hash, tenants) from the file's JSON; TenantsFileError names what is wrong."""
  if not isinstance(data, dict):
    raise TenantsFileError("tenants file: the top level must be a JSON object")
  unknown = set(data) - {"admin_key_sha256", "tenants"}
  if unknown:
    raise TenantsFileError(f"tenants file: unknown keys {sorted(unknown)}")
  admin = _hash(data, "admin_key_sha256", "tenants file")
  entries = data.get("tenants", [])
  if not isinstance(entries, list):
    raise TenantsFileError("tenants file: 'tenants' must be a list")
  tenants, names, hashes = [], set(), {admin}
  allowed = {"name", "api_key_sha256", "models", "requests_per_minute", "max_concurrent",
             "accuracy_budget"}
  for i, entry in enumerate(entries):
    where = f"tenants[{i}]"
    if not isinstance(entry, dict):
      raise TenantsFileError(f"{where}: must be an object")
    unknown = set(entry) - allowed
    if unknown:
      raise TenantsFileError(f"{where}: unknown keys {sorted(unknown)}")
    name = _field(entry, "name", str, where)
    if not _NAME.match(name) or name in ("open", "admin"):
      raise TenantsFileError(f"{where}: name {name!r} must be 1-64 of [A-Za-z0-9._-] "
                             "(not 'open' or 'admin')")
    if name in names:
      raise TenantsFileError(f"{where}: tenant name {name!r} appears twice")
    key_hash = _hash(entry, "api_key_sha256", f"{where} ({name})")
    if key_hash in hashes:
      raise TenantsFileError(f"{where} ({name}): api_key_sha256 is used twice")
    models = entry.get("models")
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
      raise TenantsFileError(f"{where} ({name}): 'models' must be a list of model names")
    budget = _field(entry, "accuracy_budget", float, where, None)
    if budget is not None and budget > 1:
      raise TenantsFileError(f"{where} ({name}): 'accuracy_budget' must be in [0, 1], got {budget!r}")
    tenants.append(Tenant(
        name=name, api_key_sha256=key_hash, models=tuple(models),
        requests_per_minute=_field(entry, "requests_per_minute", int, where, 0),
        max_concurrent=_field(entry, "max_concurrent", int, where, 0),
        accuracy_budget=None if budget is None else float(budget)))
    names.add(name)
    hashes.add(key_hash)
  return admin, tenants


class Tenants:
  """Key checks and quotas. Thread-safe."""

  def __init__(self, admin_key_sha256: str, tenants: Sequence[Tenant], clock=time.monotonic):
    self._admin = admin_key_sha256
    self.tenants = list(tenants)
    self._clock = clock
    self._lock = threading.Lock()
    self._recent: dict[str, collections.deque] = {t.name: collections.deque() for t in tenants}
    self._running: dict[str, int] = {t.name: 0 for t in tenants}

  @classmethod
  def from_file(cls, path: str) -> "Tenants":
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except (OSError, ValueError) as e:
      raise TenantsFileError(f"cannot read tenants file {path}: {e}") from None
    return cls(*parse_tenants(data))

  def authenticate(self, api_key: str | None) -> Principal:
    if not api_key:
      raise UnauthenticatedError("an API key is required (HTTP: 'Authorization: Bearer KEY'; "
                                 "gRPC: metadata 'authorization: Bearer KEY')")
    digest = key_sha256(api_key)
    # Compare against every hash, in constant time each: no early exit that times a match.
    found, admin = None, hmac.compare_digest(digest, self._admin)
    for tenant in self.tenants:
      if hmac.compare_digest(digest, tenant.api_key_sha256):
        found = tenant
    if admin:
      return Principal(tenant=None, is_admin=True)
    if found is None:
      raise UnauthenticatedError("invalid API key")
    return Principal(tenant=found)

  def is_admin(self, api_key: str | None) -> bool:
    """True for the admin key (constant-time); False for anything else, no key included."""
    return bool(api_key) and hmac.compare_digest(key_sha256(api_key), self._admin)

  def acquire(self, principal: Principal) -> None:
    """Counts one request against the tenant's quotas; QuotaExceededError when over."""
    tenant = principal.tenant
    if tenant is None:
      return
    with self._lock:
      now = self._clock()
      recent = self._recent[tenant.name]
      while recent and recent[0] <= now - RATE_WINDOW_S:
        recent.popleft()
      if tenant.requests_per_minute and len(recent) >= tenant.requests_per_minute:
        retry = max(0.0, recent[0] + RATE_WINDOW_S - now)
        raise QuotaExceededError(
            f"tenant {tenant.name!r} is over its quota of {tenant.requests_per_minute} "
            f"requests per minute; retry after {math.ceil(retry)}s", retry)
      if tenant.max_concurrent and self._running[tenant.name] >= tenant.max_concurrent:
        raise QuotaExceededError(
            f"tenant {tenant.name!r} already has {tenant.max_concurrent} requests running "
            "(its max_concurrent quota); retry after one finishes", 1.0)
      recent.append(now)
      self._running[tenant.name] += 1

  def release(self, principal: Principal) -> None:
    if principal.tenant is None:
      return
    with self._lock:
      self._running[principal.tenant.name] -= 1
