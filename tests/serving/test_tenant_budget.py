"""A tenant's accuracy budget (tenants file) reaches the engine's submit."""

import json

import pytest

from jblock.runtime.mock_engine import MockEngine
from jblock.serving.frontend import Frontend, GenerationRequest
from jblock.serving.tenants import OPEN, Principal, Tenant, Tenants, TenantsFileError


class BudgetEngine(MockEngine):
  """Records the keywords the frontend passes."""

  def submit(self, model, prompt_tokens, *, tenant=None, accuracy_budget=None, **kwargs):
    self.seen.append((tenant, accuracy_budget))
    return super().submit(model, prompt_tokens, **kwargs)


def test_the_tenants_budget_reaches_the_engine(catalog, tmp_path):
  engine = BudgetEngine(catalog)
  engine.seen = []
  frontend = Frontend(engine)
  try:
    for principal in (Principal(Tenant("acme", "0" * 64, ("*",), accuracy_budget=0.03)),
                      Principal(Tenant("zero", "1" * 64, ("*",), accuracy_budget=0.0)),
                      Principal(Tenant("none", "2" * 64, ("*",))), OPEN):
      g = frontend.generate(principal, GenerationRequest(model="mock-a", text="hi", max_tokens=2))
      assert len(list(g)) >= 1
  finally:
    frontend.close()
    engine.close()
  assert engine.seen == [("acme", 0.03), ("zero", 0.0), ("none", None), (None, None)]
  path = tmp_path / "tenants.json"
  path.write_text(json.dumps({"admin_key_sha256": "b" * 64,
                              "tenants": [{"name": "a", "api_key_sha256": "a" * 64,
                                           "models": ["*"], "accuracy_budget": 1.5}]}))
  with pytest.raises(TenantsFileError, match="accuracy_budget"):
    Tenants.from_file(str(path))
