"""Preference data the way FiRe-MPO builds it: records, tags, pairs, lesion corruption, datasets.

    records      JSONL formats and validating loaders (every bad record reported at once)
    tags         <mask> span tags; span weights aligned with any fast tokenizer by offsets
    diff         word-level diff that tags exactly the differing phrases of two answers
    editors      judge-and-edit interface; rule-based and LLM-backed editors
    build_pairs  on-policy pairs: greedy answers, edits, the paper's chosen/rejected policy
    corrupt      lesion corruption, seeded per id: the paper's noise, or inpainting / blur that remove the lesion
    evidence     detectors that learn nothing: does the corrupted image still show the lesion?
    dataset      records -> trainer examples (PreferenceExample)
    hf_dataset   records -> Hugging Face datasets.Dataset in TRL's preference format (images decoded up front)
    synthetic    deterministic synthetic medical VQA set (the embedded default)
    embedded     offline word-level tokenizer, processor and tiny random Llava
"""

from .build_pairs import GreedyAnswerer, PairStats, make_pair, make_pairs
from .corrupt import MODES as CORRUPTION_MODES
from .corrupt import corrupt_array, corrupt_image_file, corrupt_records, lesion_region, record_seed
from .dataset import PreferenceDataset, PromptEncoder, load_image
from .diff import TaggedPair, tag_differences
from .editors import Edit, Editor, LLMEditor, RuleBasedEditor, load_editor
from .evidence import EvidenceReport, evidence_check
from .hf_dataset import (
    load_preference_dataset,
    preference_dataset_from_records,
    preference_features,
    preference_rows_from_records,
)
from .records import (
    PreferenceRecord,
    QARecord,
    RecordProblem,
    RecordValidationError,
    as_preference,
    load_preference_records,
    load_qa_records,
    write_records,
)
from .tags import EncodedResponse, SpanAlignmentError, TagError, TaggedText, encode_response, parse_tags

__all__ = [
    "CORRUPTION_MODES",
    "Edit",
    "Editor",
    "EncodedResponse",
    "EvidenceReport",
    "GreedyAnswerer",
    "LLMEditor",
    "PairStats",
    "PreferenceDataset",
    "PreferenceRecord",
    "PromptEncoder",
    "QARecord",
    "RecordProblem",
    "RecordValidationError",
    "RuleBasedEditor",
    "SpanAlignmentError",
    "TagError",
    "TaggedPair",
    "TaggedText",
    "as_preference",
    "corrupt_array",
    "corrupt_image_file",
    "corrupt_records",
    "encode_response",
    "evidence_check",
    "lesion_region",
    "load_editor",
    "load_image",
    "load_preference_dataset",
    "load_preference_records",
    "load_qa_records",
    "make_pair",
    "make_pairs",
    "parse_tags",
    "preference_dataset_from_records",
    "preference_features",
    "preference_rows_from_records",
    "record_seed",
    "tag_differences",
    "write_records",
]
