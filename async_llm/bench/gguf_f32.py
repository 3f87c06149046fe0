"""An F32 GGUF of a quantized GGUF's weights, for llama.cpp to run the same arithmetic as the others.

The default model ships as Q4_1; async_llm and the transformers systems load it de-quantized to
float32. Writing the same de-quantized tensors back as F32 gives llama.cpp exactly those weights,
with the file's metadata (architecture, tokenizer, chat template) unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def f32_copy(source: str | os.PathLike[str], folder: str | os.PathLike[str]) -> Path:
    """``folder/<name>.F32.gguf``, written once from ``source`` (later calls return it).

    Returns:
        The F32 file's path.
    """
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    source = Path(source)
    target = Path(folder) / (source.name.removesuffix(".gguf").rsplit(".", 1)[0] + ".F32.gguf")
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
            writer.add_file_type(0)  # all F32
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for tensor in reader.tensors:
        data = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGML lists dimensions innermost first
        writer.add_tensor(tensor.name, data.reshape(shape), raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(target)
    return target
