"""The block zoo: content-addressed blocks on orbax-checkpoint, and model manifests over them.

Layout under the zoo root:
  blocks/<id>/              orbax checkpoint of the block's params, plus block.json
  parts/<id>/               blocks with experts are stored as parts, each expert once
                            (jblock.zoo.experts); their block.json lists the parts
  models/<name>.json        manifest: config, chain of block ids, hf_config, lineage
  models/<name>.tokenizer/  tokenizer files copied from the HF directory (when it has any)
  verified/<name>.json      the blocks of the model's last verified manifest: gc keeps them
                            unless forced (jblock.zoo.verified)
  equivalence/<model>/      equivalence records (jblock.zoo.records); gc removes them with
                            their blocks
  tmp/                      staging: everything is written here first, then renamed into place
  zoo.lock                  flock: conversions hold it shared, gc exclusively

Concurrency: blocks and manifests appear by atomic rename, so readers never see partial
files, and two conversions may write into one zoo at once (a block both write is the same
content; the second rename loses and its copy is dropped). gc takes the lock exclusively, so
it never deletes a block a running conversion has written or chosen to reuse but not yet
referenced from a manifest. Readers (load_*) take no lock: gc only removes unreferenced blocks.

Integrity (jblock.zoo.integrity): every manifest is sealed with the sha256 of its canonical
JSON when published; `checked_manifest` (loading, serving, verify) also checks its chain
against the blocks' configs and keeps its tokenizer path inside the zoo. Errors name the model
and its manifest's path relative to the zoo, never the zoo's absolute path.

Converting an HF checkpoint lives in jblock.zoo.hf_import, a PEFT adapter in
jblock.zoo.adapters, stats/verify/gc in jblock.zoo.upkeep; `Zoo` keeps their methods.
"""

import json
import os
import shutil
from typing import Any, Callable

from jblock.blocks import Block
from jblock.errors import CorruptedBlockError, NotFoundError
from jblock.models.config import ModelConfig
from jblock.models.reference import Model
from jblock.zoo import atomic, blockio, experts, hf_import, integrity, records, upkeep, verified
from jblock.zoo import manifest as manifests
from jblock.zoo.manifest import CorruptedManifestError, ModelExistsError
from jblock.zoo.reports import ConvertReport, GcReport, ZooStats


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
    if not isinstance(block_id, str) or not blockio.BLOCK_ID.fullmatch(block_id):
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
    return sorted(e for e in os.listdir(self.blocks_dir) if blockio.BLOCK_ID.fullmatch(e))

  def block_record(self, block_id: str) -> dict[str, Any]:
    """block.json: id, kind, config, nbytes, leaves {path: {dtype, shape}}."""
    directory = self._block_dir(block_id)
    if not self.has_block(block_id):
      raise NotFoundError(f"no block {block_id} in the zoo")
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
      raise NotFoundError(f"no model {name!r} in the zoo; "
                          f"known: {', '.join(self.models()) or 'none'}") from None
    except (OSError, ValueError) as e:
      raise CorruptedManifestError(f"corrupted manifest of {integrity.where(name)}: "
                                   f"{_first_line(e)}") from e
    return data

  def checked_manifest(self, name: str) -> dict[str, Any]:
    """The manifest, once its seal, its chain against the blocks' configs and its tokenizer
    path pass (jblock.zoo.integrity); else ManifestIntegrityError naming the model."""
    return integrity.check(self, name)

  def tokenizer_path(self, data: dict[str, Any]) -> str | None:
    """Absolute path of a manifest's tokenizer files (None when it names none); refuses a path
    that would leave the zoo (ManifestIntegrityError)."""
    try:
      return integrity.tokenizer_path(self.root, data)
    except ValueError as e:
      raise integrity.ManifestIntegrityError(str(data.get("name")), [str(e)]) from None

  def tokenizer_dir(self, name: str) -> str | None:
    """Absolute path of the model's tokenizer files; None when it has no tokenizer.json
    (a checkpoint may bring only generation_config.json)."""
    path = self.tokenizer_path(dict(self.manifest(name), name=name))
    return path if path and os.path.isfile(os.path.join(path, "tokenizer.json")) else None

  def load_model(self, name: str) -> Model:
    """The model with every block loaded (and hash-checked) from the zoo."""
    data = self.checked_manifest(name)
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
      raise NotFoundError(f"no model {name!r} in the zoo")
    os.remove(path)  # the model disappears here, atomically
    verified.remove(self.root, name)  # its blocks are no longer kept for it
    tokenizer = self._tokenizer_path(name)
    if os.path.isdir(tokenizer):
      atomic.remove_dir(tokenizer, self.tmp_dir)

  def _tokenizer_path(self, name: str) -> str:
    return os.path.join(self.models_dir, f"{name}.tokenizer")

  # ---- conversion

  def convert(self, hf_dir: str, name: str, dtype: str = "float32", layers_per_block: int = 1,
              overwrite: bool = False, lineage: dict[str, Any] | None = None,
              progress: Callable[[str], None] | None = None) -> ConvertReport:
    """Converts an HF checkpoint into the zoo: stores the blocks it lacks, then the manifest
    (jblock.zoo.hf_import). lineage: recorded in the manifest (default: the HF dir's
    lineage.json). Converting the same model again writes nothing; a name held by a different
    chain raises ModelExistsError unless overwrite."""
    return hf_import.convert(self, self._parts, hf_dir, name, dtype, layers_per_block,
                             overwrite, lineage, progress)

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
    previous = self.chain_of(name)
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

  def chain_of(self, name: str) -> list[str] | None:
    """The chain of model `name`; None when the zoo has no such model."""
    try:
      return self.manifest(name)["chain"]
    except NotFoundError:
      return None

  def publish_model(self, name: str, data: dict[str, Any], hf_dir: str, overwrite: bool) -> bool:
    """Publishes manifest `data` (under `writing()`, its blocks stored) with `hf_dir`'s tokenizer
    files: the tokenizer dir first, then the manifest, so a visible manifest has its tokenizer.
    The manifest is sealed (its own sha256) and its blocks recorded as verified; a chain its
    blocks' configs contradict is refused. False when the same chain is already there."""
    found = integrity.block_problems(data, self.has_block, self.block_record)
    if found:
      raise integrity.ManifestIntegrityError(name, found, verb="not published")
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
      else:
        data["tokenizer"] = None
      staged = os.path.join(tmp, "manifest.json")
      atomic.write_json(staged, integrity.seal(data))
      final = self._manifest_path(name)
      if not overwrite and os.path.exists(final):
        return self._same_chain_or_raise(name, data["chain"])
      if files:
        atomic.replace_dir(staged_tokenizer, tokenizer, tmp)
      elif os.path.isdir(tokenizer):
        atomic.remove_dir(tokenizer, tmp)  # left over from an older model of this name
      if atomic.publish_file(staged, final, overwrite):
        verified.write(self.root, self.tmp_dir, name, data)
        return True
      # Another process created this name between our check and our link.
      return self._same_chain_or_raise(name, data["chain"])

  def _same_chain_or_raise(self, name: str, chain: list[str]) -> bool:
    if self.chain_of(name) != chain:
      raise ModelExistsError(f"model {name!r} was just created with a different chain by "
                             "another conversion; pass overwrite=True to replace it")
    return False

  # ---- accounting and integrity (jblock.zoo.upkeep)

  def stats(self) -> ZooStats:
    return upkeep.stats(self, self._parts)

  def verify(self, progress: Callable[[str], None] | None = None) -> list[str]:
    """Re-hashes every stored block and checks every manifest (seal, chain, tokenizer path);
    returns the problems found, and records each model that passes as verified."""
    return upkeep.verify(self, progress)

  def reseal(self, name: str) -> str | None:
    """Seals model `name`'s manifest as it is now, on an operator's word (an old manifest, or
    one edited on purpose); its chain must still pass. Returns the seal it had (None: none)."""
    with self.writing():
      data = self.manifest(name)
      before = data.pop(integrity.HASH_FIELD, None)
      found = integrity.problems(self, name, data, sealed=False)
      if found:
        raise integrity.ManifestIntegrityError(name, found, verb="not re-sealed")
      with atomic.temp_dir(self.tmp_dir) as tmp:
        staged = os.path.join(tmp, "manifest.json")
        atomic.write_json(staged, integrity.seal(data))
        atomic.publish_file(staged, self._manifest_path(name), overwrite=True)
      verified.write(self.root, self.tmp_dir, name, data)
    return before

  def gc(self, force: bool = False) -> GcReport:
    """Removes blocks no manifest references, and leftovers of crashed writes in tmp/; waits
    for running conversions, and refuses while some manifest is unreadable. Blocks that a
    model's last verified manifest referenced are kept unless `force`."""
    return upkeep.gc(self, self._lock, self._parts, force=force)


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else ""
