"""Instruction data: convert the Tulu v1 sources to one record format, mix, and tokenize.

- `records`: the record format and how bad input is reported.
- `readers`: JSONL / JSON-array / Parquet readers that tag every item with ``file:line``.
- `sources`: one converter per source release (Dolly, Alpaca, FLAN, OASST1, ShareGPT, ...).
- `mixture`: a YAML recipe -> a sampled, de-duplicated, shuffled mixture with a stats report.
- `tokenize`: parallel, cached tokenization into memory-mapped arrays; `batching`: padding and
  packing for training.
"""
