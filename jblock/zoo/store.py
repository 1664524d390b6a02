"""The block zoo: content-addressed blocks on orbax-checkpoint, and model manifests over them.

Layout under the zoo root:
  blocks/<id>/              orbax checkpoint of the block's params, plus block.json
  parts/<id>/               blocks with experts are stored as parts, each expert once
                            (jblock.zoo.experts); their block.json lists the parts
  models/<name>.json        manifest: config, chain of block ids, hf_config, lineage
  models/<name>.tokenizer/  tokenizer files copied from the HF directory (when it has any)
  equivalence/<model>/      equivalence records (jblock.zoo.records); gc removes them with
                            their blocks
  tmp/                      staging: everything is written here first, then renamed into place
  zoo.lock                  flock: conversions hold it shared, gc exclusively

Concurrency: blocks and manifests appear by atomic rename, so readers never see partial
files, and two conversions may write into one zoo at once (a block both write is the same
content; the second rename loses and its copy is dropped). gc takes the lock exclusively, so
it never deletes a block a running conversion has written or chosen to reuse but not yet
referenced from a manifest. Readers (load_*) take no lock: gc only removes unreferenced blocks.
"""

import json
import os
import re
import shutil
from typing import Any, Callable

from jblock.blocks import EMBED, HEAD, Block
from jblock.convert import hf
from jblock.errors import CorruptedBlockError, JBlockError, NotFoundError
from jblock.models.config import ModelConfig
from jblock.models.reference import Model
from jblock.zoo import atomic, blockio, experts, records
from jblock.zoo import manifest as manifests
from jblock.zoo.manifest import CorruptedManifestError, ModelExistsError
from jblock.zoo.reports import ConvertReport, GcReport, ZooStats

_BLOCK_ID = re.compile(r"[0-9a-f]{64}")


class Zoo:
  """A block zoo rooted at a directory (created on first write)."""

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    self.blocks_dir = os.path.join(self.root, "blocks")
    self.models_dir = os.path.join(self.root, "models")
    self.tmp_dir = os.path.join(self.root, "tmp")
    self.records_dir = os.path.join(self.root, records.RECORDS_DIR)
    self._lock = atomic.ZooLock(self.root)
    self._parts = experts.PartStore(self.root, self.tmp_dir)

  # ---- blocks

  def _block_dir(self, block_id: str) -> str:
    if not isinstance(block_id, str) or not _BLOCK_ID.fullmatch(block_id):
      raise NotFoundError(f"{block_id!r} is not a block id (64 hex digits)")
    return os.path.join(self.blocks_dir, block_id)

  def has_block(self, block_id: str) -> bool:
    try:
      return os.path.isfile(os.path.join(self._block_dir(block_id), blockio.RECORD_FILE))
    except NotFoundError:
      return False

  def block_ids(self) -> list[str]:
    """Ids of every stored block (directories under blocks/ named like an id)."""
    if not os.path.isdir(self.blocks_dir):
      return []
    return sorted(e for e in os.listdir(self.blocks_dir) if _BLOCK_ID.fullmatch(e))

  def block_record(self, block_id: str) -> dict[str, Any]:
    """block.json: id, kind, config, nbytes, leaves {path: {dtype, shape}}."""
    directory = self._block_dir(block_id)
    if not self.has_block(block_id):
      raise NotFoundError(f"no block {block_id} in the zoo at {self.root}")
    try:
      record = blockio.read_record(directory)
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
      raise CorruptedBlockError(f"corrupted block {block_id}: unreadable "
                                f"{blockio.RECORD_FILE}: {e}") from e
    if record["id"] != block_id:
      raise CorruptedBlockError(f"corrupted block {block_id}: {blockio.RECORD_FILE} names "
                                f"id {record['id']}")
    return record

  def read_part(self, pid: str) -> dict[str, Any]:
    """One expert-level part's params (numpy), checked against its id."""
    try:
      part = self._parts.read(pid)
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      raise CorruptedBlockError(f"corrupted part {pid}: unreadable: {type(e).__name__}: "
                                f"{_first_line(e)}") from e
    if experts.part_id(part) != pid:
      raise CorruptedBlockError(f"corrupted part {pid}: its params hash to {experts.part_id(part)}")
    return part

  def load_block(self, block_id: str, sharding: blockio.ShardingSpec = None) -> Block:
    """Restores a block and checks that it hashes to its id.

    sharding: None (numpy params), a pytree of jax Shardings shaped like the params, or a
    function '/'-joined param path -> Sharding; then params are jax Arrays restored straight
    onto the devices, and the hash is still checked over their bytes.
    """
    record = self.block_record(block_id)
    layout = record.get("parts")
    args = blockio.restore_args(record["leaves"], sharding)  # a misfit sharding is a ValueError
    try:
      if layout:
        params = experts.assemble(layout, self._parts.read)
        if sharding is not None:
          params = blockio.place(params, sharding)
      else:
        params = blockio.restore(self._block_dir(block_id), args)
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      raise CorruptedBlockError(f"corrupted block {block_id}: unreadable params: "
                                f"{type(e).__name__}: {_first_line(e)}") from e
    block = Block(record["kind"], record["config"], params)
    actual = block.id
    if actual != block_id:
      raise CorruptedBlockError(f"corrupted block {block_id}: its stored kind, config and "
                                f"params hash to {actual}")
    described = blockio.record(block, block_id)
    for key in ("leaves", "nbytes"):  # the hash does not cover these descriptive fields
      if record[key] != described[key]:
        raise CorruptedBlockError(f"corrupted block {block_id}: {blockio.RECORD_FILE} "
                                  f"'{key}' disagrees with the stored params")
    return block

  def writing(self):
    """The zoo lock held shared while a conversion writes blocks and publishes its manifest
    (gc holds it exclusively, so it never removes a block written but not yet referenced)."""
    return self._lock.shared()

  def write_block(self, block: Block, block_id: str) -> bool:
    """Stores one block (under `writing()`); False if another writer stored the same id first."""
    os.makedirs(self.blocks_dir, exist_ok=True)
    layout, parts = experts.split(block.params)
    for pid, part in parts.items():
      self._parts.write(pid, part)
    with atomic.temp_dir(self.tmp_dir) as tmp:
      staged = os.path.join(tmp, "block")
      blockio.save(staged, {} if layout else block.params)
      record = blockio.record(block, block_id)
      if layout:
        record["parts"] = layout
      atomic.write_json(os.path.join(staged, blockio.RECORD_FILE), record)
      return atomic.publish_dir(staged, os.path.join(self.blocks_dir, block_id))

  def _new_bytes(self, block: Block) -> int:
    """Param bytes storing this block adds: all of them, or its parts not yet stored."""
    layout, parts = experts.split(block.params)
    if not layout:
      return block.nbytes
    return sum(experts.part_nbytes(p) for pid, p in parts.items() if not self._parts.has(pid))

  # ---- models

  def _manifest_path(self, name: str) -> str:
    return os.path.join(self.models_dir, f"{manifests.check_name(name)}.json")

  def models(self) -> list[str]:
    """Names of the models in the zoo, sorted."""
    if not os.path.isdir(self.models_dir):
      return []
    return sorted(e[:-len(".json")] for e in os.listdir(self.models_dir) if e.endswith(".json"))

  list_models = models  # the name jblock.train.demo uses

  def manifest(self, name: str) -> dict[str, Any]:
    path = self._manifest_path(name)
    try:
      with open(path) as f:
        data = json.load(f)
      manifests.validate(data)
    except FileNotFoundError:
      raise NotFoundError(f"no model {name!r} in the zoo at {self.root}; "
                          f"known: {', '.join(self.models()) or 'none'}") from None
    except (OSError, ValueError) as e:
      raise CorruptedManifestError(f"corrupted manifest of model {name!r} ({path}): {e}") from e
    return data

  def tokenizer_dir(self, name: str) -> str | None:
    """Absolute path of the model's tokenizer files; None when it has no tokenizer.json
    (a checkpoint may bring only generation_config.json)."""
    rel = self.manifest(name).get("tokenizer")
    path = os.path.join(self.root, rel) if rel else None
    return path if path and os.path.isfile(os.path.join(path, "tokenizer.json")) else None

  def load_model(self, name: str) -> Model:
    """The model with every block loaded (and hash-checked) from the zoo."""
    data = self.manifest(name)
    loaded: dict[str, Block] = {}
    for block_id in data["chain"]:
      if block_id not in loaded:  # a block repeated in one chain is loaded once
        loaded[block_id] = self.load_block(block_id)
    return Model(ModelConfig.from_dict(data["config"]), [loaded[i] for i in data["chain"]],
                 name=name)

  def remove_model(self, name: str) -> None:
    """Removes the manifest and tokenizer files; its blocks stay until gc()."""
    path = self._manifest_path(name)
    if not os.path.isfile(path):
      raise NotFoundError(f"no model {name!r} in the zoo at {self.root}")
    os.remove(path)  # the model disappears here, atomically
    tokenizer = self._tokenizer_path(name)
    if os.path.isdir(tokenizer):
      atomic.remove_dir(tokenizer, self.tmp_dir)

  def _tokenizer_path(self, name: str) -> str:
    return os.path.join(self.models_dir, f"{name}.tokenizer")

  # ---- conversion

  def convert(self, hf_dir: str, name: str, dtype: str = "float32", layers_per_block: int = 1,
              overwrite: bool = False, lineage: dict[str, Any] | None = None,
              progress: Callable[[str], None] | None = None) -> ConvertReport:
    """Converts an HF checkpoint into the zoo: stores the blocks it lacks, then the manifest.

    lineage: recorded in the manifest (e.g. {"base_model": "llama-base"}); default: the HF
    dir's lineage.json when present. Converting the same model again writes nothing. A name
    held by a different chain raises ModelExistsError unless overwrite.
    """
    manifests.check_name(name)
    say = progress or (lambda _: None)
    converted = hf.convert(hf_dir, dtype=dtype, layers_per_block=layers_per_block,
                           progress=progress)
    chain = [b.id for b in converted.blocks]
    previous = self._chain_of(name)
    if previous is not None and previous != chain and not overwrite:
      raise ModelExistsError(f"model {name!r} already exists with a different chain; "
                             "pass overwrite=True (--overwrite) to replace it")

    written, reused = [], []
    new_bytes: dict[str, int] = {}
    with self.writing():
      for i, (block, block_id) in enumerate(zip(converted.blocks, chain)):
        if block_id in written or block_id in reused:
          continue
        if not self.has_block(block_id):
          new_bytes[block_id] = self._new_bytes(block)
          say(f"block {i + 1}/{len(chain)} {block.kind} {block_id[:12]}: writing "
              f"{new_bytes[block_id]} bytes")
          if self.write_block(block, block_id):
            written.append(block_id)
            continue
        say(f"block {i + 1}/{len(chain)} {block.kind} {block_id[:12]}: already stored")
        reused.append(block_id)
      manifest_written = False
      if overwrite or previous is None:
        data = manifests.build(
            name, converted.config, converted.hf_config, converted.blocks, chain, hf_dir, dtype,
            layers_per_block, lineage if lineage is not None else manifests.source_lineage(hf_dir),
            tokenizer=None)
        manifest_written = self.publish_model(name, data, hf_dir, overwrite)
        say(f"manifest models/{name}.json " + ("written" if manifest_written else "already there"))

    return ConvertReport(name=name, chain=chain, written=written, reused=reused,
                         bytes_written=sum(new_bytes[i] for i in written),
                         model_bytes=sum(b.nbytes for b in converted.blocks),
                         manifest_written=manifest_written)

  def convert_peft(self, peft_dir: str, base: str, name: str, overwrite: bool = False,
                   progress: Callable[[str], None] | None = None) -> ConvertReport:
    """Converts a PEFT LoRA adapter over model `base` into delta blocks (jblock.zoo.adapters)."""
    from jblock.zoo import adapters
    return adapters.convert_peft(self, peft_dir, base, name, overwrite=overwrite,
                                 progress=progress)

  def publish_manifest(self, name: str, data: dict[str, Any], tokenizer_dir: str | None = None,
                       overwrite: bool = False) -> bool:
    """Publishes a manifest whose chain holds only blocks already stored (an assembled model),
    with a copy of `tokenizer_dir`'s tokenizer files; False when the same chain is there."""
    manifests.check_name(name)
    manifests.validate(data)
    previous = self._chain_of(name)
    if previous is not None and previous != data["chain"] and not overwrite:
      raise ModelExistsError(f"model {name!r} already exists with a different chain; "
                             "pass overwrite=True (--overwrite) to replace it")
    with self.writing():
      missing = [i for i in data["chain"] if not self.has_block(i)]
      if missing:
        raise NotFoundError(f"model {name!r}: chain block {missing[0]} is not in the zoo")
      with atomic.temp_dir(self.tmp_dir) as empty:
        return self.publish_model(name, dict(data, name=name, tokenizer=None),
                                   tokenizer_dir or empty, overwrite)

  def _chain_of(self, name: str) -> list[str] | None:
    try:
      return self.manifest(name)["chain"]
    except NotFoundError:
      return None

  def publish_model(self, name: str, data: dict[str, Any], hf_dir: str, overwrite: bool) -> bool:
    """Publishes manifest `data` (under `writing()`, its blocks stored) with `hf_dir`'s tokenizer
    files: the tokenizer dir first, then the manifest, so a visible manifest has its tokenizer.
    False when the same chain is already there under `name`."""
    os.makedirs(self.models_dir, exist_ok=True)
    files = manifests.tokenizer_files(hf_dir)
    with atomic.temp_dir(self.tmp_dir) as tmp:
      tokenizer = self._tokenizer_path(name)
      if files:
        staged_tokenizer = os.path.join(tmp, "tokenizer")
        os.mkdir(staged_tokenizer)
        for f in files:
          shutil.copy2(os.path.join(hf_dir, f), staged_tokenizer)
        data["tokenizer"] = os.path.relpath(tokenizer, self.root)
      staged = os.path.join(tmp, "manifest.json")
      atomic.write_json(staged, data)
      final = self._manifest_path(name)
      if not overwrite and os.path.exists(final):
        return self._same_chain_or_raise(name, data["chain"])
      if files:
        atomic.replace_dir(staged_tokenizer, tokenizer, tmp)
      elif os.path.isdir(tokenizer):
        atomic.remove_dir(tokenizer, tmp)  # left over from an older model of this name
      if atomic.publish_file(staged, final, overwrite):
        return True
      # Another process created this name between our check and our link.
      return self._same_chain_or_raise(name, data["chain"])

  def _same_chain_or_raise(self, name: str, chain: list[str]) -> bool:
    if self._chain_of(name) != chain:
      raise ModelExistsError(f"model {name!r} was just created with a different chain by "
                             "another conversion; pass overwrite=True to replace it")
    return False

  # ---- accounting and integrity

  def _readable_manifests(self) -> dict[str, dict[str, Any]]:
    out = {}
    for name in self.models():
      try:
        out[name] = self.manifest(name)
      except (CorruptedManifestError, NotFoundError):
        continue  # unreadable (verify reports it) or removed meanwhile
    return out

  def stats(self) -> ZooStats:
    models = self._readable_manifests()
    stored = set(self.block_ids())
    referenced = {i for m in models.values() for i in m["chain"] + (m.get("deltas") or []) if i}
    stored_bytes, parts, part_blocks, part_block_bytes = 0, set(), 0, 0
    for block_id in stored:
      try:
        record = self.block_record(block_id)
      except JBlockError:
        continue  # unreadable record: verify reports it
      if record.get("parts"):
        parts.update(experts.part_ids(record["parts"]))
        part_blocks += 1
        part_block_bytes += int(record["nbytes"])
      else:
        stored_bytes += int(record["nbytes"])
    parts &= set(self._parts.ids())
    part_bytes = sum(self._parts.nbytes(pid) for pid in parts)
    stored_bytes += part_bytes
    return ZooStats(
        models=len(models), stored_blocks=len(stored), referenced_blocks=len(referenced),
        orphan_blocks=len(stored - referenced), missing_blocks=len(referenced - stored),
        logical_bytes=sum(sum(m["block_bytes"]) + sum(m.get("delta_bytes") or [])
                          for m in models.values()),
        stored_bytes=stored_bytes,
        disk_bytes=_dir_size(self.blocks_dir) + _dir_size(self._parts.dir),
        stored_parts=len(parts), part_blocks=part_blocks, part_block_bytes=part_block_bytes,
        part_bytes=part_bytes)

  def verify(self, progress: Callable[[str], None] | None = None) -> list[str]:
    """Re-hashes every stored block and checks every manifest; returns the problems found."""
    say = progress or (lambda _: None)
    problems = []
    entries = sorted(os.listdir(self.blocks_dir)) if os.path.isdir(self.blocks_dir) else []
    for n, entry in enumerate(entries):
      if not _BLOCK_ID.fullmatch(entry):
        problems.append(f"blocks/{entry}: not a block id (stray entry)")
      elif not self.has_block(entry):
        problems.append(f"block {entry}: no {blockio.RECORD_FILE} (incomplete block)")
      else:
        say(f"checking block {n + 1}/{len(entries)} {entry[:12]}")
        try:
          self.load_block(entry)
        except JBlockError as e:
          problems.append(str(e))
    for name in self.models():
      try:
        data = self.manifest(name)
      except JBlockError as e:
        problems.append(str(e))
        continue
      problems += self._manifest_problems(name, data)
    return problems

  def _manifest_problems(self, name: str, data: dict[str, Any]) -> list[str]:
    problems = []
    chain = data["chain"]
    for i, block_id in enumerate(chain):
      if not self.has_block(block_id):
        problems.append(f"model {name!r}: chain[{i}] block {block_id} is missing")
    for i, block_id in enumerate(data.get("deltas") or ()):
      if block_id and not self.has_block(block_id):
        problems.append(f"model {name!r}: deltas[{i}] block {block_id} is missing")
    if self.has_block(chain[0]) and self.has_block(chain[-1]):
      try:
        embed, head = self.block_record(chain[0]), self.block_record(chain[-1])
      except JBlockError:
        return problems  # already reported with the blocks
      if embed["kind"] != EMBED or head["kind"] != HEAD:
        problems.append(f"model {name!r}: chain does not run from an embed to a head block")
      elif head["config"].get("tied_to") not in (None, chain[0]):
        problems.append(f"model {name!r}: head is tied to {head['config']['tied_to']}, "
                        f"not to the chain's embed block {chain[0]}")
    if data.get("tokenizer") and not os.path.isdir(os.path.join(self.root, data["tokenizer"])):
      problems.append(f"model {name!r}: tokenizer directory {data['tokenizer']} is missing")
    return problems

  def gc(self) -> GcReport:
    """Removes blocks no manifest references, and leftovers of crashed writes in tmp/.

    Holds the zoo lock exclusively, so it waits for running conversions to finish. Refuses
    to run while some manifest is unreadable: it cannot know what that model references.
    """
    if not os.path.isdir(self.root):
      return GcReport([], 0, 0)
    with self._lock.exclusive():
      referenced, chains, deltas = set(), {}, {}
      for name in self.models():
        try:
          data = self.manifest(name)
          chains[name] = data["chain"]
          deltas[name] = data.get("deltas")
          referenced.update(chains[name])
          referenced.update(d for d in data.get("deltas") or () if d)  # LoRA delta blocks
        except CorruptedManifestError as e:
          raise JBlockError(f"gc refused: {e}") from e
        except NotFoundError:
          continue
      removed, freed = [], 0
      for block_id in self.block_ids():
        if block_id not in referenced:
          directory = self._block_dir(block_id)
          freed += _dir_size(directory)
          atomic.remove_dir(directory, self.tmp_dir)
          removed.append(block_id)
      pruned = records.prune(self.root, self.tmp_dir, set(self.block_ids()), chains,
                             deltas)
      freed += self._gc_parts()
      stale = 0
      for entry in os.listdir(self.tmp_dir) if os.path.isdir(self.tmp_dir) else []:
        path = os.path.join(self.tmp_dir, entry)
        if os.path.isdir(path):
          shutil.rmtree(path, ignore_errors=True)
        else:
          os.remove(path)
        stale += 1
    return GcReport(removed, freed, stale, pruned)


  def _gc_parts(self) -> int:
    """Removes expert-level parts no stored block lists; returns the bytes freed."""
    kept = set()
    for block_id in self.block_ids():
      try:
        layout = self.block_record(block_id).get("parts")
      except JBlockError:
        return 0  # cannot tell what an unreadable block lists: keep every part
      kept.update(experts.part_ids(layout) if layout else ())
    return sum(self._parts.remove(pid) for pid in self._parts.ids() if pid not in kept)


def _dir_size(path: str) -> int:
  total = 0
  for parent, _, files in os.walk(path):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(parent, f))
      except OSError:
        continue
  return total


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else ""
