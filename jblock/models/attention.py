"""Attention over a paged KV cache: one op, one signature, for every model family.

KV layout of a layers block: {"k", "v"} each [layers, pages, page_size, kv_heads, head_dim].
A request owns a list of pages (its page table); token position p of a row lives in page
`page_table[row, p // page_size]` at offset `p % page_size`. Step metadata (`meta`) holds per-row
int32 arrays: `page_table` [B, W], `starts` [B] (tokens already cached = position of the row's
first query) and `n_valid` [B] (real tokens in the row; the rest is padding and writes nothing).

The read covers the W pages of the page table only, so its cost follows the batch's longest real
context (the engine buckets W), not the cache's capacity. `paged_attention` is the XLA
implementation: it serves CPU and is the reference a GPU/TPU kernel (Pallas ragged paged
attention) must match; `attend` is the seam where such a kernel is chosen.
"""

import jax
import jax.numpy as jnp

PAGE_TABLE, STARTS, N_VALID = "page_table", "starts", "n_valid"
DEFAULT_PAGE_SIZE = 16  # tokens per KV page


def write_kv(kv, layer: int, k, v, meta):
  """Writes this chunk's keys/values [B, T, KVH, hd] into the rows' pages, in place.

  Padding tokens (past n_valid) go to an out-of-range page and are dropped. Indexing the whole
  block's buffer (not a per-layer slice restacked afterwards) lets XLA update the donated buffer
  in place.
  """
  b, t = k.shape[:2]
  num_pages, page_size = kv["k"].shape[1:3]
  offsets = jnp.arange(t, dtype=jnp.int32)[None, :]
  pos = meta[STARTS][:, None] + offsets  # [B, T]
  width = meta[PAGE_TABLE].shape[1]
  logical = jnp.minimum(pos // page_size, width - 1)
  page = jnp.take_along_axis(meta[PAGE_TABLE], logical, axis=1)
  page = jnp.where(offsets < meta[N_VALID][:, None], page, num_pages)  # padding: dropped
  off = pos % page_size
  return {"k": kv["k"].at[layer, page, off].set(k.astype(kv["k"].dtype), mode="drop"),
          "v": kv["v"].at[layer, page, off].set(v.astype(kv["v"].dtype), mode="drop")}


def paged_attention(q, kv, layer: int, meta, *, scale: float, window: int = 0,
                    softcap: float = 0.0):
  """Causal (optionally sliding-window, soft-capped) attention of q [B, T, H, hd] over the
  rows' pages; returns [B, T, H, hd]. Reads W * page_size positions per row."""
  b, t, h, hd = q.shape
  page_size, kvh = kv["k"].shape[2], kv["k"].shape[3]
  table = meta[PAGE_TABLE]
  span = table.shape[1] * page_size
  keys = kv["k"][layer][table].reshape(b, span, kvh, hd)
  values = kv["v"][layer][table].reshape(b, span, kvh, hd)
  qpos = meta[STARTS][:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
  kpos = jnp.arange(span, dtype=jnp.int32)[None, None, :]
  mask = kpos <= qpos[:, :, None]
  if window:
    mask &= kpos > qpos[:, :, None] - window
  qg = q.reshape(b, t, kvh, h // kvh, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys, preferred_element_type=jnp.float32) * scale
  if softcap:
    scores = jnp.tanh(scores / softcap) * softcap
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", probs, values).reshape(b, t, h, hd)


def attend(q, k, v, kv, layer: int, meta, *, scale: float, window: int = 0, softcap: float = 0.0):
  """Writes k/v of this chunk into the cache, then attends q over everything cached so far.

  q: [B, T, H, hd], k/v: [B, T, KVH, hd], already position-encoded. Returns (out [B, T, H, hd],
  kv). The one place a device-specific kernel would be dispatched.
  """
  kv = write_kv(kv, layer, k, v, meta)
  return paged_attention(q, kv, layer, meta, scale=scale, window=window, softcap=softcap), kv


def init_kv(num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
            dtype) -> dict[str, jax.Array]:
  shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def contiguous_page_table(batch: int, max_len: int, page_size: int = DEFAULT_PAGE_SIZE):
  """Row i owns pages [i * W, (i + 1) * W): the simple layout of the reference model path."""
  width = -(-max_len // page_size)
  return jnp.arange(batch * width, dtype=jnp.int32).reshape(batch, width)


def contiguous_meta(batch: int, max_len: int, starts, n_valid,
                    page_size: int = DEFAULT_PAGE_SIZE) -> dict[str, jax.Array]:
  """Step metadata for rows laid out as in `contiguous_page_table` (reference and training paths)."""
  return {PAGE_TABLE: contiguous_page_table(batch, max_len, page_size),
          STARTS: jnp.broadcast_to(jnp.asarray(starts, jnp.int32), (batch,)),
          N_VALID: jnp.broadcast_to(jnp.asarray(n_valid, jnp.int32), (batch,))}
