"""Per-request sampling on device: greedy, temperature, top-k, top-p, seeded.

Each row draws with its own key, fold_in(PRNGKey(seed), step), so a request's samples do not
depend on which other requests share its batch.
"""

import jax
import jax.numpy as jnp


def sample(logits, temperature, top_k, top_p, seed, step):
  """logits [B, V] f32; temperature/top_p f32 [B]; top_k/seed/step int32 [B] -> tokens int32 [B]."""
  vocab = logits.shape[-1]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]

  sorted_desc = -jnp.sort(-scaled, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
  scaled = jnp.where(scaled < kth, -jnp.inf, scaled)

  # top-p: keep the smallest prefix of the sorted distribution whose mass reaches p.
  sorted_desc = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], sorted_desc, -jnp.inf)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < top_p[:, None]
  cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
  scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)

  def draw(row_logits, row_seed, row_step):
    key = jax.random.fold_in(jax.random.PRNGKey(row_seed), row_step)
    return jax.random.categorical(key, row_logits).astype(jnp.int32)

  sampled = jax.vmap(draw)(scaled, seed, step)
  return jnp.where(temperature > 0, sampled, greedy)
