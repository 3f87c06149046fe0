"""An F32 GGUF of a quantized GGUF's weights, for llama.cpp to run the same arithmetic as the others,
and a Q8_0 one of the same weights, llama.cpp's int8 (the peer of ``quantize="int8"``).

The default model ships as Q4_1; async_llm and the transformers systems load it de-quantized to
float32. Writing the same de-quantized tensors back as F32 gives llama.cpp exactly those weights,
with the file's metadata (architecture, tokenizer, chat template) unchanged; the Q8_0 copy quantizes
those float32 matrices as llama.cpp's own converter does (blocks of 32 with one scale each; vectors
such as norms stay F32).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: llama.cpp's ``general.file_type`` of each kind written here (its LLAMA_FTYPE_ALL_F32, _MOSTLY_Q8_0).
_FILE_TYPES = {"F32": 0, "Q8_0": 7}


def f32_copy(source: str | os.PathLike[str], folder: str | os.PathLike[str]) -> Path:
    """``folder/<name>.F32.gguf``, written once from ``source`` (later calls return it).

    Returns:
        The F32 file's path.
    """
    return requantized_copy(source, folder, "F32")


def q8_0_copy(source: str | os.PathLike[str], folder: str | os.PathLike[str]) -> Path:
    """``folder/<name>.Q8_0.gguf``: ``source``'s weights de-quantized to float32, then every matrix
    quantized to Q8_0 (written once; later calls return it)."""
    return requantized_copy(source, folder, "Q8_0")


def requantized_copy(source: str | os.PathLike[str], folder: str | os.PathLike[str], kind: str) -> Path:
    """``folder/<name>.<kind>.gguf`` (``kind`` ``"F32"`` or ``"Q8_0"``), written once from ``source``.

    Returns:
        The file's path.
    """
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize

    source = Path(source)
    target = Path(folder) / (source.name.removesuffix(".gguf").rsplit(".", 1)[0] + f".{kind}.gguf")
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(source)
    architecture = str(reader.fields["general.architecture"].contents())
    partial = target.with_suffix(".partial")
    writer = GGUFWriter(partial, architecture)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        if field.name == "general.file_type":
            writer.add_file_type(_FILE_TYPES[kind])
            continue
        value_type = field.types[0]
        sub = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub)
    for tensor in reader.tensors:
        data = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGML lists dimensions innermost first
        data = data.reshape(shape)
        if kind == "Q8_0" and data.ndim == 2 and shape[-1] % 32 == 0:
            q8 = GGMLQuantizationType.Q8_0
            writer.add_tensor(tensor.name, quantize(data, q8), raw_dtype=q8)
        else:
            writer.add_tensor(tensor.name, data, raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(target)
    return target
