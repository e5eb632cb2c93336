"""The trainer's data stage: read records, check them, tokenize them with loss masks, pack and collate.

See docs/data-formats.md for the formats, the loss masking and the validation rules.
"""

from .formats import INSTRUCTION_TEMPLATE, INSTRUCTION_WITH_INPUT_TEMPLATE, detect_format
from .packing import PackedExample, collate, pack_examples
from .preference import PackedPairs, PreferencePair, blank_pairs, collate_pairs, pair_examples, pair_size
from .records import Record, load_records
from .tokenize import IGNORE, Example, tokenize_pair, tokenize_record
from .validate import DatasetReport, tokenize_dataset, validate_dataset

__all__ = [
    "IGNORE", "INSTRUCTION_TEMPLATE", "INSTRUCTION_WITH_INPUT_TEMPLATE", "DatasetReport", "Example",
    "PackedExample", "PackedPairs", "PreferencePair", "Record", "blank_pairs", "collate", "collate_pairs",
    "detect_format", "load_records", "pack_examples", "pair_examples", "pair_size",
    "tokenize_dataset", "tokenize_pair", "tokenize_record", "validate_dataset",
]
