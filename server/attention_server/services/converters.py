"""Protobuf <-> runtime types. The only module that knows both sides."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Mapping
from typing import cast

import numpy as np

from attention_client.protocol import attention_pb2 as pb
from attention_client.protocol import dtype_code

from ..errors import InvalidArgument
from ..runtime.engine import Limits
from ..runtime.heads import STATISTICS
from ..runtime.results import ATTENTIONS, ATTENTIONS_FP16, HIDDEN
from ..runtime.types import (
    FLOAT16,
    FLOAT32,
    AnalyzeOptions,
    HeadRole,
    ModelMetadata,
    PairTable,
    Plan,
    SequenceInput,
    SequenceOutput,
    Tokens,
    Words,
)

SEQUENCE_RESULT_ATTENTION = pb.SequenceResult.DESCRIPTOR.fields_by_name["attention"].number
SEQUENCE_RESULT_HIDDEN = pb.SequenceResult.DESCRIPTOR.fields_by_name["hidden_states"].number
SEQUENCE_RESULT_PAIRS = pb.SequenceResult.DESCRIPTOR.fields_by_name["pairs"].number
SEQUENCE_RESULT_WORD_PAIRS = pb.SequenceResult.DESCRIPTOR.fields_by_name["word_pairs"].number
SEQUENCE_RESULT_WORD_ATTENTION = pb.SequenceResult.DESCRIPTOR.fields_by_name["word_attention"].number
SEQUENCE_RESULT_ROLLOUT = pb.SequenceResult.DESCRIPTOR.fields_by_name["rollout"].number
SEQUENCE_RESULT_LAYER_HIDDEN = pb.SequenceResult.DESCRIPTOR.fields_by_name["layer_hidden_states"].number
SEQUENCE_RESULT_QUERIES = pb.SequenceResult.DESCRIPTOR.fields_by_name["queries"].number
SEQUENCE_RESULT_KEYS = pb.SequenceResult.DESCRIPTOR.fields_by_name["keys"].number
PAIR_KEY = pb.HeadPairs.DESCRIPTOR.fields_by_name["pairs"].number << 3 | 2
ANALYZE_RESPONSE_RESULTS = pb.AnalyzeResponse.DESCRIPTOR.fields_by_name["results"].number
_ROLLOUT = {pb.ROLLOUT_NONE: None, pb.ROLLOUT_MEAN: "mean", pb.ROLLOUT_MAX: "max", pb.ROLLOUT_MIN: "min"}
_ATTENTION_DTYPES = {pb.DATA_TYPE_UNSPECIFIED: FLOAT32, pb.DATA_TYPE_FLOAT32: FLOAT32, pb.DATA_TYPE_FLOAT16: FLOAT16}


def check_sequence_count(count: int, limit: int) -> None:
    """The engine's limit on sequences per request (same message), for a transport to check
    a count it has before converting a single sequence: a 16 MiB message holds 8 M empty ones."""
    if count > limit:
        raise InvalidArgument("sequences", f"{count} sequences exceed the limit of {limit} per request")


def sequences_from_pb(request: pb.AnalyzeRequest, max_sequences: int | None = None) -> list[SequenceInput]:
    """The request's sequences for the engine; with `max_sequences` (the engine's
    max_batch_size), more than that many are refused before any is converted."""
    if max_sequences is not None:
        check_sequence_count(len(request.sequences), max_sequences)
    out = []
    for seq in request.sequences:
        kind = seq.WhichOneof("input")
        if kind == "token_ids":
            # The repeated fields themselves: the engine checks their length before copying.
            out.append(SequenceInput(token_ids=seq.token_ids.ids, type_ids=seq.token_ids.type_ids,
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
        layers=options.layers,
        heads=options.heads,
        attention_dtype=dtype,
        attention=options.attention if options.HasField("attention") else True,
        hidden_states=options.hidden_states if options.HasField("hidden_states") else True,
        top_k=options.top_k if options.HasField("top_k") else None,
        min_strength=options.min_strength,
        exclude_special_tokens=options.exclude_special_tokens,
        word_level=options.word_level,
        head_statistics=options.head_statistics,
        rollout=_ROLLOUT.get(options.rollout, str(options.rollout)),
        hidden_states_layers=options.hidden_states_layers,
        query_key=options.query_key,
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


def _tensor_header(field: int, dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A Tensor field up to its data: key and length, dtype, shape, the data's key and length."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    head = pb.Tensor(dtype=cast("pb.DataType.ValueType", dtype_code(dtype)), shape=shape).SerializeToString()
    data_key = _len_key(3, nbytes)
    return _len_key(field, len(head) + len(data_key) + nbytes) + head + data_key


def _tensor_parts(field: int, array: np.ndarray) -> Parts:
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return [_tensor_header(field, array.dtype, array.shape), array.reshape(-1).view(np.uint8).data]


def _pair_table_pb(table: PairTable, field: int = SEQUENCE_RESULT_PAIRS) -> bytes:
    """`repeated HeadPairs pairs` (or `word_pairs`) through protobuf messages (reference encoding)."""
    msg = pb.SequenceResult()
    target = msg.pairs if field == SEQUENCE_RESULT_PAIRS else msg.word_pairs
    for row in range(table.from_index.shape[0]):
        entry = target.add()
        entry.head.layer = int(table.layers[row])
        entry.head.index = int(table.heads[row])
        entry.pairs.extend(pb.PairStrength(from_index=f, to_index=t, strength=s) for f, t, s in table.head_pairs(row))
    return msg.SerializeToString()


def _varint_columns(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Little-endian base-128 digits of non-negative values in `width` columns,
    and which columns belong to each value's minimal encoding."""
    values = values.astype(np.int64)
    digits = np.stack([(values >> (7 * i)) & 0x7F for i in range(width)], axis=1)
    used = np.stack([values >= (1 << (7 * i)) for i in range(width)], axis=1)
    used[:, 0] = True
    more = np.zeros_like(used)
    more[:, :-1] = used[:, 1:]
    return (digits | (more << 7)).astype(np.uint8), used


def _pair_table_bytes(table: PairTable, field: int = SEQUENCE_RESULT_PAIRS) -> bytes:
    """`repeated HeadPairs pairs = 8` of a SequenceResult, encoded with numpy for
    all heads and pairs at once (as Python messages, 72 heads x 5 pairs cost
    ~0.5 ms). Each head is a 10-byte header slot followed by 13-byte pair slots;
    a mask drops the varint bytes a value does not need."""
    rows = table.from_index.shape[0]
    counts = table.counts.astype(np.int64)
    valid = np.arange(table.from_index.shape[1])[None, :] < counts[:, None]
    frm, to = table.from_index[valid], table.to_index[valid]
    n_pairs = int(frm.size)
    if rows == 0 or max(int(table.layers.max()), int(table.heads.max()),
                        int(frm.max()) if n_pairs else 0, int(to.max()) if n_pairs else 0) >= 1 << 14:
        return _pair_table_pb(table, field)
    slots = np.zeros((rows + n_pairs, 13), dtype=np.uint8)
    keep = np.zeros(slots.shape, dtype=bool)
    head_of_pair = np.repeat(np.arange(rows), counts)
    pair_rows = np.arange(n_pairs) + head_of_pair + 1
    header_rows = np.arange(rows) + np.concatenate([[0], np.cumsum(counts)[:-1]])
    # PairStrength: 0x12 len | 0x08 from | 0x10 to | 0x1d float32
    f_digits, f_used = _varint_columns(frm, 2)
    t_digits, t_used = _varint_columns(to, 2)
    record = np.zeros((n_pairs, 13), dtype=np.uint8)
    record[:, 0] = PAIR_KEY
    record[:, 1] = 7 + f_used.sum(1) + t_used.sum(1)
    record[:, 2] = 0x08
    record[:, 3:5] = f_digits
    record[:, 5] = 0x10
    record[:, 6:8] = t_digits
    record[:, 8] = 0x1D
    record[:, 9:13] = table.strength[valid].astype("<f4").view(np.uint8).reshape(-1, 4)
    record_keep = np.ones((n_pairs, 13), dtype=bool)
    record_keep[:, 3:5] = f_used
    record_keep[:, 6:8] = t_used
    slots[pair_rows], keep[pair_rows] = record, record_keep
    # HeadPairs: key(8) len | 0x0a len Head{0x08 layer | 0x10 index} | pairs
    l_digits, l_used = _varint_columns(table.layers, 2)
    h_digits, h_used = _varint_columns(table.heads, 2)
    head_len = 2 + l_used.sum(1) + h_used.sum(1)
    body_len = 2 + head_len + np.bincount(head_of_pair, weights=record[:, 1].astype(np.int64) + 2,
                                          minlength=rows).astype(np.int64)
    b_digits, b_used = _varint_columns(body_len, 3)
    header = np.zeros((rows, 13), dtype=np.uint8)
    header_keep = np.ones((rows, 13), dtype=bool)
    header[:, 0] = field << 3 | 2
    header[:, 1:4], header_keep[:, 1:4] = b_digits, b_used
    header[:, 4] = 0x0A
    header[:, 5] = head_len
    header[:, 6] = 0x08
    header[:, 7:9], header_keep[:, 7:9] = l_digits, l_used
    header[:, 9] = 0x10
    header[:, 10:12], header_keep[:, 10:12] = h_digits, h_used
    header_keep[:, 12] = False
    slots[header_rows], keep[header_rows] = header, header_keep
    return slots[keep].tobytes()


def _parts_size(parts: Parts) -> int:
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)


def _small_fields(index: int, id: str, layers: list[int], heads: list[int], t: Tokens, words: Words | None = None,
                  head_statistics: np.ndarray | None = None, hidden_states_layers: list[int] | None = None) -> bytes:
    """A SequenceResult's fields but its pairs and tensors."""
    msg = pb.SequenceResult(index=index, id=id, layers=layers, heads=heads, hidden_states_layers=hidden_states_layers)
    msg.tokens.extend(
        pb.Token(id=i, text=text, start=s, end=e, word_index=w, special=sp, segment=g)
        for i, text, s, e, w, sp, g in zip(
            t.ids.tolist(), t.texts, t.starts.tolist(), t.ends.tolist(), t.word_index.tolist(),
            t.special.tolist(), t.segment.tolist(), strict=True,
        )
    )
    if words is not None:
        w = words
        msg.words.extend(
            pb.Word(text=text, start=s_, end=e, first_token=a, end_token=b, special=sp, segment=g)
            for text, s_, e, a, b, sp, g in zip(
                w.texts, w.starts.tolist(), w.ends.tolist(), w.token_start.tolist(), w.token_end.tolist(),
                w.special.tolist(), w.segment.tolist(), strict=True,
            )
        )
    if head_statistics is not None:
        names = STATISTICS
        for li, layer in enumerate(layers):
            for hi, head in enumerate(heads):
                values = head_statistics[li, hi].tolist()
                msg.head_statistics.add(layer=layer, index=head, statistics=dict(zip(names, values, strict=True)))
    return msg.SerializeToString()


def result_parts(out: SequenceOutput) -> Parts:
    """A SequenceResult's wire encoding as a list of buffers (join to get the message)."""
    parts: Parts = [_small_fields(out.index, out.id, out.layers, out.heads, out.tokens, out.words,
                                  out.head_statistics, out.hidden_states_layers)]
    if out.pairs is not None:
        parts.append(_pair_table_bytes(out.pairs))
    if out.word_pairs is not None:
        parts.append(_pair_table_bytes(out.word_pairs, SEQUENCE_RESULT_WORD_PAIRS))
    if out.word_attention is not None:
        parts += _tensor_parts(SEQUENCE_RESULT_WORD_ATTENTION, out.word_attention)
    if out.rollout is not None:
        parts += _tensor_parts(SEQUENCE_RESULT_ROLLOUT, out.rollout)
    if out.attention is not None:
        parts += _tensor_parts(SEQUENCE_RESULT_ATTENTION, out.attention)
    if out.hidden_states is not None:
        parts += _tensor_parts(SEQUENCE_RESULT_HIDDEN, out.hidden_states)
    for field, array in ((SEQUENCE_RESULT_LAYER_HIDDEN, out.layer_hidden_states),
                         (SEQUENCE_RESULT_QUERIES, out.queries), (SEQUENCE_RESULT_KEYS, out.keys)):
        if array is not None:
            parts += _tensor_parts(field, array)
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


# -- responses laid out before the model runs ---------------------------------------------
# A result that is only full matrices (no pairs, word-level view, statistics or rollout)
# has a size and layout known from the plan: the response is allocated whole, its small
# fields written, and ONNX Runtime writes the matrices into it (IOBinding). The bytes
# are those result_parts + join would give, without the copy from ONNX Runtime's output
# into the response (tens of ms for a 512-token sequence). Smaller results keep the
# ordinary path: the join costs less than a binding there.
PREENCODE_MIN_BYTES = 1 << 20

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]


def _uninitialized_bytes(size: int) -> tuple[bytes, int]:
    """A new bytes object of `size` bytes, not yet filled, and the address of its data.
    It is filled in place before anything else sees it (as C code does with
    PyBytes_FromStringAndSize(NULL, size)); zeroing it first would be a pass for nothing."""
    buffer = cast(bytes, _new_bytes(None, size))
    return buffer, int(np.frombuffer(buffer, np.uint8).ctypes.data)


def preencodable(plan: Plan, index: int) -> bool:
    """True when the result of sequence `index` can be laid out before it is computed."""
    options, meta = plan.options, plan.model.metadata
    return (sys.byteorder == "little"  # ONNX Runtime writes native order; the wire's is little-endian
            and options.top_k is None and not options.word_level and not options.head_statistics
            and options.rollout is None and (options.attention or options.hidden_states)
            and not options.hidden_states_layers and not options.query_key
            and plan.layers == list(range(meta.num_layers)) and plan.heads == list(range(meta.num_heads))
            and plan.sequence_bytes(index) >= PREENCODE_MIN_BYTES)


class Preencoder:
    """Lays out the responses of a plan's sequences before they are computed (see
    above): `into` for the engine (called in the compute thread when a sequence runs
    alone), then `finish` gives its bytes, or encodes a result the usual way when it
    ran with others. `model`: wrap the result in an AnalyzeResponse (a unary call of
    one sequence); None: the SequenceResult alone (a streamed message)."""

    def __init__(self, plan: Plan, model: str | None) -> None:
        self.plan = plan
        self.model = model
        self._laid_out: dict[int, tuple[bytes, dict[str, np.ndarray]]] = {}

    def into(self, index: int) -> Mapping[str, np.ndarray] | None:
        plan = self.plan
        if not preencodable(plan, index):
            return None
        options, meta, tokens = plan.options, plan.model.metadata, plan.tokens[index]
        n = len(tokens)
        tensors: list[tuple[str, int, np.dtype, tuple[int, ...]]] = []
        if options.attention:
            fp16 = options.attention_dtype == FLOAT16
            tensors.append((ATTENTIONS_FP16 if fp16 else ATTENTIONS, SEQUENCE_RESULT_ATTENTION,
                            np.dtype("<f2" if fp16 else "<f4"), (meta.num_layers, meta.num_heads, n, n)))
        if options.hidden_states:
            tensors.append((HIDDEN, SEQUENCE_RESULT_HIDDEN, np.dtype("<f4"), (n, meta.hidden_size)))
        small = _small_fields(index, plan.inputs[index].id, plan.layers, plan.heads, tokens)
        headers = [_tensor_header(field, dtype, shape) for _, field, dtype, shape in tensors]
        size = len(small) + sum(len(h) for h in headers) + sum(
            int(np.prod(shape)) * dtype.itemsize for _, _, dtype, shape in tensors)
        head = small
        if self.model is not None:
            head = pb.AnalyzeResponse(model=self.model).SerializeToString() + _len_key(ANALYZE_RESPONSE_RESULTS,
                                                                                      size) + small
        buffer, address = _uninitialized_bytes(len(head) + size - len(small))
        offset = 0
        arrays: dict[str, np.ndarray] = {}
        # Headers in place, each followed by the room its array is written into.
        pieces = [head + headers[0], *headers[1:]]
        for piece, (name, _, dtype, shape) in zip(pieces, tensors, strict=True):
            ctypes.memmove(address + offset, piece, len(piece))
            offset += len(piece)
            count = int(np.prod(shape))
            arrays[name] = np.frombuffer(buffer, dtype, count, offset).reshape((1, *shape))
            offset += count * dtype.itemsize
        assert offset == len(buffer)
        self._laid_out[index] = (buffer, arrays)
        return arrays

    def finish(self, out: SequenceOutput) -> bytes | Parts:
        """The laid-out response when `out`'s arrays are the ones written into it; else
        the result encoded as result_parts (unary) or one message (a stream)."""
        laid_out = self._laid_out.pop(out.index, None)
        if laid_out is not None:
            buffer, arrays = laid_out
            mine = [a for a in (out.attention, out.hidden_states) if a is not None]
            if len(mine) == len(arrays) and all(
                    any(a.ctypes.data == b.ctypes.data and a.nbytes == b.nbytes for b in arrays.values())
                    for a in mine):
                return buffer
        return result_parts(out) if self.model is not None else encode_result(out)


def model_info_to_pb(meta: ModelMetadata, limits: Limits, roles: list[HeadRole] | None = None) -> pb.ModelInfo:
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
        model_type=meta.model_type,
        causal=meta.causal,
        num_key_value_heads=meta.num_key_value_heads,
        position_embedding=meta.position_embedding,
        head_dim=meta.head_dim,
        supports_hidden_states_layers=bool(meta.hidden_states_outputs),
        supports_query_key=bool(meta.query_outputs),
        query_key_scaling=[meta.scaling(layer) for layer in range(meta.num_layers)],
    )
    for name, token in sorted(meta.special_tokens.items()):
        info.special_tokens.add(name=name, text=token["text"], id=int(token["id"]))
    by_head = {(r.layer, r.head): r for r in roles or []}
    for layer in range(meta.num_layers):
        for head in range(meta.num_heads):
            role = by_head.get((layer, head))
            kv_head = meta.kv_head(head)
            if role is None:
                info.heads.add(layer=layer, index=head, kv_head=kv_head)
            else:
                info.heads.add(layer=layer, index=head, role=role.role, family=role.family, role_score=role.score,
                               statistics=role.statistics, kv_head=kv_head)
    return info
