"""jblock: multi-tenant LLM serving on JAX with models cut into shared, content-addressed blocks."""

from typing import TYPE_CHECKING

from jblock.blocks import Block

if TYPE_CHECKING:
  from jblock.models.reference import Model

__all__ = ["Block", "Engine", "Model", "from_hf", "from_zoo"]


def from_hf(hf_dir: str, dtype: str = "float32", layers_per_block: int = 1) -> "Model":
  """Converts a Hugging Face causal-LM directory (safetensors) into a Model."""
  from jblock import convert
  from jblock.models.reference import Model
  converted = convert.convert(hf_dir, dtype=dtype, layers_per_block=layers_per_block)
  return Model(converted.config, converted.blocks)


def from_zoo(zoo_dir: str, name: str) -> "Model":
  """Loads a model from a block zoo; equal to from_hf of the checkpoint it was converted from."""
  from jblock.zoo.store import Zoo
  return Zoo(zoo_dir).load_model(name)


def __getattr__(name):
  # Engine pulls in the runtime; import it only when asked for.
  if name == "Engine":
    from jblock.runtime.engine import Engine
    return Engine
  if name == "Model":
    from jblock.models.reference import Model
    return Model
  raise AttributeError(name)
