"""Tiny randomly initialised models of every architecture attention-export supports,
made offline with transformers' own config classes and a real fast tokenizer trained
with the `tokenizers` library on the probe corpus; and their export into a model
repository with the real exporter.

    build_tiny("gpt2", folder)          # an HF model folder: config, weights, tokenizer
    export_tiny("gpt2", repository)     # -> repository/tiny-gpt2 (model.json, model.onnx, ...)

2 layers, 4 heads, hidden 32, a vocabulary of up to 1,000 tokens, seed 0 (the same
weights on every run). The Llama-style model has grouped-query attention (4 query
heads, 2 key/value heads) and rotary positions. Weights are drawn wider than the
usual 0.02 (INIT_RANGE) so that attention is far from uniform and a wrong mask or a
wrong head order shows.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

ARCHITECTURES = ("bert", "roberta", "distilbert", "gpt2", "llama")
LAYERS, HEADS, KV_HEADS_LLAMA, HIDDEN, FFN = 2, 4, 2, 32, 64
MAX_POSITIONS = 512
VOCAB_SIZE = 1000
INIT_RANGE = 0.2
SEED = 0
ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "server" / "attention_server" / "data" / "probe_sentences.txt"


def model_name(arch: str) -> str:
    """The tiny model's name in a repository: tiny-<arch>."""
    return f"tiny-{arch}"


def source_of(repository: Path, arch: str) -> Path:
    """Where export_tiny builds the HF model folder of `arch` for `repository`."""
    return repository.parent / "tiny-sources" / arch


def _corpus() -> list[str]:
    return [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]


def _wordpiece() -> tuple[Any, dict[str, str]]:
    """A BERT-style tokenizer. Its vocabulary is counted, not trained (WordPiece training is
    not deterministic): the special tokens, every character alone and as a "##" piece, a few
    suffixes, and the corpus's most frequent words (ties alphabetical)."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for line in _corpus() for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line)))
    chars = sorted({c for w in words for c in w})
    vocab = list(dict.fromkeys([*special, *chars, *(f"##{c}" for c in chars), "##ed", "##ing", "##ly", "##er"]))
    ranked = [w for w, _ in sorted(words.items(), key=lambda item: (-item[1], item[0])) if w not in vocab]
    vocab += ranked[:VOCAB_SIZE - len(vocab)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                     continuing_subword_prefix="##"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = splitter
    tok.decoder = decoders.WordPiece(prefix="##")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok, {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                 "mask_token": "[MASK]"}


def _byte_level(roberta: bool) -> tuple[Any, dict[str, str]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if roberta else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=special,
                                                           show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if roberta:
        tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                          ("<s>", tok.token_to_id("<s>")), trim_offsets=True)
        return tok, {"bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>",
                     "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>"}
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # GPT-2's tokenizer has no padding token (the exporter picks one) and adds no special token.
    return tok, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


def _sentencepiece_like() -> tuple[Any, dict[str, str]]:
    """A Llama-style tokenizer: BPE over "▁"-marked words, <s> added in front, no padding token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    special = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted({c for line in _corpus() for c in line.replace(" ", "▁")} | {"▁"})
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=special,
                                                           show_progress=False,
                                                           initial_alphabet=alphabet))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                       special_tokens=[("<s>", bos)])
    return tok, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def _tokenizer(arch: str) -> tuple[Any, dict[str, str]]:
    if arch in ("bert", "distilbert"):
        return _wordpiece()
    if arch in ("roberta", "gpt2"):
        return _byte_level(roberta=arch == "roberta")
    if arch == "llama":
        return _sentencepiece_like()
    raise ValueError(f"no tiny model for {arch!r}; one of {ARCHITECTURES}")


def _model(arch: str, tok: Any, special: dict[str, str]) -> Any:
    import torch
    from transformers import (
        BertConfig,
        BertModel,
        DistilBertConfig,
        DistilBertModel,
        GPT2Config,
        GPT2Model,
        LlamaConfig,
        LlamaModel,
        RobertaConfig,
        RobertaModel,
    )

    ids = {k.removesuffix("_token") + "_token_id": tok.token_to_id(v) for k, v in special.items()
           if k in ("bos_token", "eos_token", "pad_token")}
    vocab = tok.get_vocab_size()
    common: dict[str, Any] = {"vocab_size": vocab, "initializer_range": INIT_RANGE, **ids}
    config: Any
    if arch == "bert":
        config, cls = BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                 intermediate_size=FFN, max_position_embeddings=MAX_POSITIONS, **common), BertModel
    elif arch == "roberta":
        config, cls = RobertaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                    intermediate_size=FFN, max_position_embeddings=MAX_POSITIONS + 2,
                                    type_vocab_size=1, **common), RobertaModel
    elif arch == "distilbert":
        config, cls = DistilBertConfig(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
                                       max_position_embeddings=MAX_POSITIONS, **common), DistilBertModel
    elif arch == "gpt2":
        config, cls = GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
                                 n_positions=MAX_POSITIONS, **common), GPT2Model
    else:
        config, cls = LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  num_key_value_heads=KV_HEADS_LLAMA, intermediate_size=FFN,
                                  max_position_embeddings=MAX_POSITIONS, **common), LlamaModel
    torch.manual_seed(SEED)
    model = cls(config).eval()
    # Bigger biases and LayerNorm scales than the init's zeros and ones: every parameter random.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.normal_(1.0 if name.endswith("weight") else 0.0, INIT_RANGE)
    return model


def build_tiny(arch: str, folder: Path) -> Path:
    """Write a tiny `arch` model folder (config.json, model.safetensors, tokenizer files) to `folder`."""
    from transformers import PreTrainedTokenizerFast

    tok, special = _tokenizer(arch)
    model = _model(arch, tok, special)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(folder)
    return folder


def export_tiny(arch: str, repository: Path, source: Path | None = None) -> Path:
    """Build the tiny `arch` model (in `source`, default repository/../tiny-sources/<arch>) and
    export it into repository/tiny-<arch> with the real exporter, in this process (a
    subprocess would import torch again: seconds per model)."""
    from attention_server.export import export

    source = source or source_of(repository, arch)
    with warnings.catch_warnings():
        # torch.export's own deprecations and its note on the dynamic axes' names: nothing to act on here
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
        build_tiny(arch, source)
        return export(source, repository, model_name(arch), f"tests/tiny_models.py ({arch}, seed {SEED})")
