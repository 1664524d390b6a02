"""Offline conversion of Hugging Face checkpoints into jblock blocks."""

from jblock.convert.hf import DTYPES, Converted, convert, export, read_hf_config
