"""Embedded image-text data (digits, shapes, your folder), a word tokenizer, collators and sequence packing."""

from mmkern.data.collate import (
    IGNORE_INDEX,
    ImageTextCollator,
    instruction_example,
    mask_tokens,
    pack_examples,
    pad_examples,
)
from mmkern.data.datasets import ImageTextDataset, TaskData, digits, faded, from_folder, load_dataset, shapes
from mmkern.data.instruct import TASKS, InstructionCollator, InstructionDataset, instruction_data
from mmkern.data.tokenizer import WordTokenizer

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "ImageTextCollator",
    "ImageTextDataset",
    "InstructionCollator",
    "InstructionDataset",
    "TaskData",
    "WordTokenizer",
    "digits",
    "faded",
    "from_folder",
    "instruction_data",
    "instruction_example",
    "load_dataset",
    "mask_tokens",
    "pack_examples",
    "pad_examples",
    "shapes",
]
