"""Protobuf <-> runtime types. The only module that knows both sides."""

from __future__ import annotations

from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_client.tensors import to_tensor

from ..errors import InvalidArgument
from ..runtime.engine import Limits
from ..runtime.repository import ModelMetadata
from ..runtime.types import FLOAT16, FLOAT32, AnalyzeOptions, SequenceInput, SequenceOutput

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


def result_to_pb(out: SequenceOutput) -> pb.SequenceResult:
    msg = pb.SequenceResult(index=out.index, id=out.id, layers=out.layers, heads=out.heads)
    t = out.tokens
    msg.tokens.extend(
        pb.Token(id=i, text=text, start=s, end=e, word_index=w, special=sp, segment=g)
        for i, text, s, e, w, sp, g in zip(
            t.ids.tolist(), t.texts, t.starts.tolist(), t.ends.tolist(), t.word_index.tolist(),
            t.special.tolist(), t.segment.tolist(), strict=True,
        )
    )
    if out.attention is not None:
        to_tensor(out.attention, msg.attention)
    if out.hidden_states is not None:
        to_tensor(out.hidden_states, msg.hidden_states)
    for head in out.pairs:
        entry = msg.pairs.add()
        entry.head.layer = head.layer
        entry.head.index = head.head
        entry.pairs.extend(
            pb.PairStrength(from_index=f, to_index=t_, strength=s)
            for f, t_, s in zip(head.from_index.tolist(), head.to_index.tolist(), head.strength.tolist(), strict=True)
        )
    return msg


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
