"""The block zoo: content-addressed blocks (orbax-checkpoint) shared by model manifests."""

from jblock.zoo.store import (ConvertReport, CorruptedManifestError, GcReport, ModelExistsError,
                              Zoo, ZooStats)
