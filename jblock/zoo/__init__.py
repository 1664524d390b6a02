"""The block zoo: content-addressed blocks (orbax-checkpoint) shared by model manifests."""

from jblock.zoo.manifest import CorruptedManifestError, ModelExistsError
from jblock.zoo.reports import ConvertReport, GcReport, ZooStats
from jblock.zoo.store import Zoo
