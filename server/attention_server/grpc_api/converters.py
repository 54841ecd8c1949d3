"""Protobuf <-> runtime types. The only module that knows both sides."""

from __future__ import annotations

import numpy as np

from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_client.tensors import dtype_code

from ..errors import InvalidArgument
from ..runtime.engine import Limits
from ..runtime.repository import ModelMetadata
from ..runtime.types import FLOAT16, FLOAT32, AnalyzeOptions, PairTable, SequenceInput, SequenceOutput

SEQUENCE_RESULT_ATTENTION = pb.SequenceResult.DESCRIPTOR.fields_by_name["attention"].number
SEQUENCE_RESULT_HIDDEN = pb.SequenceResult.DESCRIPTOR.fields_by_name["hidden_states"].number
SEQUENCE_RESULT_PAIRS = pb.SequenceResult.DESCRIPTOR.fields_by_name["pairs"].number
PAIR_KEY = pb.HeadPairs.DESCRIPTOR.fields_by_name["pairs"].number << 3 | 2
ANALYZE_RESPONSE_RESULTS = pb.AnalyzeResponse.DESCRIPTOR.fields_by_name["results"].number
_ATTENTION_DTYPES = {pb.DATA_TYPE_UNSPECIFIED: FLOAT32, pb.DATA_TYPE_FLOAT32: FLOAT32, pb.DATA_TYPE_FLOAT16: FLOAT16}


def sequences_from_pb(request: pb.AnalyzeRequest) -> list[SequenceInput]:
    out = []
    for seq in request.sequences:
        kind = seq.WhichOneof("input")
        if kind == "token_ids":
            out.append(SequenceInput(token_ids=tuple(seq.token_ids.ids), type_ids=tuple(seq.token_ids.type_ids),
                                     text_pair=seq.text_pair or None, id=seq.id))
        else:
            out.append(SequenceInput(text=seq.text, text_pair=seq.text_pair or None, id=seq.id))
    return out


def options_from_pb(options: pb.AnalyzeOptions) -> AnalyzeOptions:
    dtype = _ATTENTION_DTYPES.get(options.attention_dtype)
    if dtype is None:
        name = pb.DataType.Name(options.attention_dtype) if options.attention_dtype in pb.DataType.values() \
            else str(options.attention_dtype)
        raise InvalidArgument("options.attention_dtype", f"{name} is not supported; use DATA_TYPE_FLOAT32 or "
                              "DATA_TYPE_FLOAT16")
    return AnalyzeOptions(
        layers=tuple(options.layers),
        heads=tuple(options.heads),
        attention_dtype=dtype,
        attention=options.attention if options.HasField("attention") else True,
        hidden_states=options.hidden_states if options.HasField("hidden_states") else True,
        top_k=options.top_k if options.HasField("top_k") else None,
        min_strength=options.min_strength,
        exclude_special_tokens=options.exclude_special_tokens,
    )


# -- responses as wire bytes ------------------------------------------------------------
# Results are encoded straight to protobuf wire format in the post-processing
# thread: the small fields through protobuf, the tensors' bytes appended as
# length-delimited fields (protobuf allows fields in any order). An attention
# array is copied once, into the response, instead of into a Tensor message and
# again by SerializeToString.

Parts = list[bytes | memoryview]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _len_key(field: int, length: int) -> bytes:
    """Key of a length-delimited field (wire type 2) and the payload length."""
    return _varint(field << 3 | 2) + _varint(length)


def _tensor_parts(field: int, array: np.ndarray) -> Parts:
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    head = pb.Tensor(dtype=dtype_code(array.dtype), shape=array.shape).SerializeToString()
    data_key = _len_key(3, array.nbytes)
    size = len(head) + len(data_key) + array.nbytes
    return [_len_key(field, size) + head + data_key, array.reshape(-1).view(np.uint8).data]


def _pair_table_bytes(table: PairTable) -> bytes:
    """`repeated HeadPairs pairs = 8` of a SequenceResult, encoded with numpy for
    all pairs at once (72 heads x k pairs as Python messages cost ~0.5 ms)."""
    rows = table.from_index.shape[0]
    valid = np.arange(table.from_index.shape[1])[None, :] < table.counts[:, None]
    frm = table.from_index[valid].astype(np.int64)
    to = table.to_index[valid].astype(np.int64)
    if frm.size and max(int(frm.max()), int(to.max())) >= 1 << 14:
        raise ValueError("token index beyond 16383: pair encoding supports two-byte varints")
    big_from, big_to = frm >= 128, to >= 128
    # One PairStrength record per pair: 0x12 len | 0x08 from | 0x10 to | 0x1d float32
    slots = np.zeros((frm.size, 13), dtype=np.uint8)
    slots[:, 0] = PAIR_KEY
    slots[:, 1] = 9 + big_from + big_to
    slots[:, 2] = 0x08
    slots[:, 3] = (frm & 0x7F) | (big_from << 7)
    slots[:, 4] = frm >> 7
    slots[:, 5] = 0x10
    slots[:, 6] = (to & 0x7F) | (big_to << 7)
    slots[:, 7] = to >> 7
    slots[:, 8] = 0x1D
    slots[:, 9:13] = table.strength[valid].astype("<f4").view(np.uint8).reshape(-1, 4)
    keep = np.ones_like(slots, dtype=bool)
    keep[:, 4] = big_from
    keep[:, 7] = big_to
    records = slots[keep].tobytes()
    ends = np.concatenate([[0], np.cumsum(slots[:, 1].astype(np.int64) + 2)])
    starts = np.concatenate([[0], np.cumsum(table.counts)])
    out = []
    for r in range(rows):
        head = b"\x08" + _varint(int(table.layers[r])) + b"\x10" + _varint(int(table.heads[r]))
        body = b"\x0a" + _varint(len(head)) + head + records[ends[starts[r]]:ends[starts[r + 1]]]
        out.append(_len_key(SEQUENCE_RESULT_PAIRS, len(body)) + body)
    return b"".join(out)


def _parts_size(parts: Parts) -> int:
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)


def result_parts(out: SequenceOutput) -> Parts:
    """A SequenceResult's wire encoding as a list of buffers (join to get the message)."""
    msg = pb.SequenceResult(index=out.index, id=out.id, layers=out.layers, heads=out.heads)
    t = out.tokens
    msg.tokens.extend(
        pb.Token(id=i, text=text, start=s, end=e, word_index=w, special=sp, segment=g)
        for i, text, s, e, w, sp, g in zip(
            t.ids.tolist(), t.texts, t.starts.tolist(), t.ends.tolist(), t.word_index.tolist(),
            t.special.tolist(), t.segment.tolist(), strict=True,
        )
    )
    parts: Parts = [msg.SerializeToString()]
    if out.pairs is not None:
        parts.append(_pair_table_bytes(out.pairs))
    if out.attention is not None:
        parts += _tensor_parts(SEQUENCE_RESULT_ATTENTION, out.attention)
    if out.hidden_states is not None:
        parts += _tensor_parts(SEQUENCE_RESULT_HIDDEN, out.hidden_states)
    return parts


def encode_result(out: SequenceOutput) -> bytes:
    """One SequenceResult message (a streamed response)."""
    return b"".join(result_parts(out))


def analyze_response_parts(model: str, results: list[Parts]) -> Parts:
    """AnalyzeResponse{model, results} from already-encoded results."""
    parts: Parts = [pb.AnalyzeResponse(model=model).SerializeToString()]
    for result in results:
        parts.append(_len_key(ANALYZE_RESPONSE_RESULTS, _parts_size(result)))
        parts.extend(result)
    return parts


def parts_size(parts: Parts) -> int:
    return _parts_size(parts)


def model_info_to_pb(meta: ModelMetadata, limits: Limits) -> pb.ModelInfo:
    info = pb.ModelInfo(
        name=meta.name,
        source=meta.source,
        architecture=meta.architecture,
        num_layers=meta.num_layers,
        num_heads=meta.num_heads,
        hidden_size=meta.hidden_size,
        max_positions=meta.max_positions,
        vocab_size=meta.vocab_size,
        input_names=meta.inputs,
        output_names=meta.outputs,
        opset=meta.opset,
        sha256=meta.sha256,
        max_batch_size=limits.max_batch_size,
    )
    for name, token in sorted(meta.special_tokens.items()):
        info.special_tokens.add(name=name, text=token["text"], id=int(token["id"]))
    for layer in range(meta.num_layers):
        for head in range(meta.num_heads):
            info.heads.add(layer=layer, index=head)
    return info
