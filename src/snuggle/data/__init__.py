"""Data pipeline: find documents, tokenize them into a memory-mapped cache, pack rows, plan batches."""

from snuggle.data.loader import BatchPlan, grad_accum_for, iterate_eval, split_indices
from snuggle.data.packing import IGNORE_INDEX, PackedRows, collate
from snuggle.data.sources import iter_document_pieces, iter_documents, iter_text_pieces, resolve_files
from snuggle.data.tokenize import TokenStream, tokenize_corpus

__all__ = [
    "IGNORE_INDEX",
    "BatchPlan",
    "grad_accum_for",
    "PackedRows",
    "TokenStream",
    "collate",
    "iter_document_pieces",
    "iter_documents",
    "iter_text_pieces",
    "iterate_eval",
    "resolve_files",
    "split_indices",
    "tokenize_corpus",
]
