"""Data side of NeVA: where images and conversations become tokens.

constants.py     IGNORE_INDEX, IMAGE_TOKEN
conversation.py  chat templates -> (text, trainable) segments; generation prompts; SteerLM labels
image_io.py      safe image loading (path/size checks before decode), aspect-ratio preprocessing
records.py       reading LLaVA JSON / JSONL annotation files
processor.py     NevaProcessor: tokenizer, image preprocessing, placeholder counts (data and inference)
settings.py      DatasetSettings (model.data, read once, the defaults; template included)
dataset.py       RecordEncoder / NevaDataset: tokens, exact labels, image placeholder run, counted skips
collate.py       NevaCollator: shift, pad, gather images; carries workers' skip counts (skip_tally.py)
blend.py         weighted data_path blends of map-style sets; blended_shards.py: of shard sources
packing.py       first-fit-decreasing packing, packed collator, THD / PackedSeqParams for the TE path
shards.py        tar shards: locating, streaming; shard_writer.py: conversion; packed_shards.py: packing windows
energon*.py      Megatron-Energon datasets through our task encoder (energon_encoding), with savable state
tokenizer.py     the demo byte-level BPE tokenizer (train / load locally)
shapes.py        synthetic coloured-shapes task; demo.py builds the shipped demo set
"""
