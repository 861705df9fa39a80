"""The HuggingFace backbone: local directories, pooling, offline rebuilding, and loading that never hangs.

A tiny BERT (hidden 32, 2 layers, a character-level WordPiece vocabulary) built here drives the fast
tests; other test modules import `make_tiny_bert` from this one.
"""

import json
import shutil
import string
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from transfer_cli.backbones import HuggingFaceBackbone
from transfer_cli.backbones import huggingface as hf
from transfer_cli.errors import ConfigError, WeightsUnavailableError

TINY_MAX_LENGTH = 128


def make_tiny_bert(path: Path) -> Path:
    """A BertModel directory (config, safetensors, fast tokenizer) small enough for any test."""
    words = ["the", "a", "an", "is", "are", "was", "not", "no", "and", "of", "to", "in", "it", "that", "he", "she"]
    words += ["they", "i", "you", "we", "this", "there"]
    pieces = ["##" + c for c in string.ascii_lowercase + string.digits]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *string.ascii_lowercase, *string.digits]
    tokens += [*string.punctuation, *pieces]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    wordpiece = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    wordpiece.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=TINY_MAX_LENGTH,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=TINY_MAX_LENGTH,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _batch(backbone: HuggingFaceBackbone, first: list[str], second: list[str] | None = None) -> dict:
    return dict(backbone.tokenizer(first, second, padding=True, return_tensors="pt"))


def test_local_directory_gives_pooled_features_of_the_configs_width(tiny_dir):
    backbone = HuggingFaceBackbone(str(tiny_dir))
    assert backbone.num_features == 32
    assert backbone.training and backbone.model.training  # trains like any fresh nn.Module
    assert backbone.preprocessing() is backbone.tokenizer
    features = backbone(_batch(backbone, ["A man eats.", "Hi"], ["Someone eats food.", "Hello there"]))
    assert features.shape == (2, 32)
    assert features.requires_grad  # never run under no_grad: the backbone can always be unfrozen


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooling_ignores_padding(tiny_dir, pooling):
    backbone = HuggingFaceBackbone(str(tiny_dir), pooling=pooling).eval()
    with torch.no_grad():
        alone = backbone(_batch(backbone, ["it is"]))
        padded = backbone(_batch(backbone, ["it is", "a much longer sentence than the first one"]))
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


def test_cls_and_mean_pooling_differ(tiny_dir):
    cls = HuggingFaceBackbone(str(tiny_dir), pooling="cls").eval()
    mean = HuggingFaceBackbone(str(tiny_dir), pooling="mean").eval()
    with torch.no_grad():
        batch = _batch(cls, ["the cat sat on the mat"])
        assert not torch.allclose(cls(batch), mean(batch))


def test_output_object_is_read_by_name_even_when_the_config_asks_for_tuples(tiny_dir):
    backbone = HuggingFaceBackbone(str(tiny_dir)).eval()
    backbone.model.config.return_dict = False
    assert backbone(_batch(backbone, ["it is"])).shape == (1, 32)


def test_offline_init_args_rebuild_the_same_backbone_without_the_directory(tiny_dir, tmp_path):
    source = shutil.copytree(tiny_dir, tmp_path / "model")
    original = HuggingFaceBackbone(str(source)).eval()
    args = original.offline_init_args()
    assert set(args) == {"model_config", "tokenizer_files"}
    json.dumps(args)  # plain types only
    torch.save(args, tmp_path / "args.pt")
    args = torch.load(tmp_path / "args.pt", weights_only=True)
    shutil.rmtree(source)

    rebuilt = HuggingFaceBackbone(str(source), **args)
    rebuilt.load_state_dict(original.state_dict(), strict=True)
    rebuilt.eval()
    texts = (["A man is eating.", "Nobody"], ["Someone eats.", "is there?"])
    assert rebuilt.tokenizer(*texts)["input_ids"] == original.tokenizer(*texts)["input_ids"]
    with torch.no_grad():
        assert torch.equal(rebuilt(_batch(rebuilt, *texts)), original(_batch(original, *texts)))
    assert rebuilt.offline_init_args() == args  # a rebuilt backbone saves the same files again


def test_tokenizer_file_names_from_a_checkpoint_cannot_escape(tiny_dir):
    args = HuggingFaceBackbone(str(tiny_dir)).offline_init_args()
    files = {**args["tokenizer_files"], "../evil.json": next(iter(args["tokenizer_files"].values()))}
    with pytest.raises(ConfigError, match="evil"):
        HuggingFaceBackbone("x", model_config=args["model_config"], tokenizer_files=files)


def test_hub_name_not_in_the_cache_fails_at_once_offline(offline_env):
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as caught:
        HuggingFaceBackbone("transfer-tests/not-cached-anywhere")
    assert time.monotonic() - start < 10
    message = str(caught.value)
    assert "transfer-tests/not-cached-anywhere" in message and "HF_HUB_OFFLINE" in message
    assert "directory" in message  # says how to supply it


def test_unreachable_hub_fails_at_once(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    start = time.monotonic()
    assert not hf._hub_reachable()
    with pytest.raises(WeightsUnavailableError, match="cannot be reached"):
        HuggingFaceBackbone("transfer-tests/not-cached-anywhere")
    assert time.monotonic() - start < 10


def test_missing_local_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        HuggingFaceBackbone(str(tmp_path / "no" / "such" / "model"))


def test_cache_first_then_hub_with_revision_and_no_remote_code(tiny_dir, monkeypatch):
    real = hf._from_pretrained
    calls = []

    def spy(source, revision, trust_remote_code, local_only, what):
        calls.append((source, revision, trust_remote_code, local_only))
        if local_only:
            raise WeightsUnavailableError("not cached")
        return real(str(tiny_dir), None, trust_remote_code, True, what)

    monkeypatch.setattr(hf, "_from_pretrained", spy)
    monkeypatch.setattr(hf, "_offline", lambda: False)
    monkeypatch.setattr(hf, "_hub_reachable", lambda: True)
    HuggingFaceBackbone("org/model", revision="v1.0")
    assert calls == [("org/model", "v1.0", False, True), ("org/model", "v1.0", False, False)]


def test_trust_remote_code_reaches_every_loader_only_when_set(tiny_dir, monkeypatch):
    seen = []
    import transformers  # the backbone imports its loaders from transformers when it loads

    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModel):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs["trust_remote_code"])
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    HuggingFaceBackbone(str(tiny_dir))
    assert len(seen) >= 3 and not any(seen)
    seen.clear()
    HuggingFaceBackbone(str(tiny_dir), trust_remote_code=True)
    assert len(seen) >= 3 and all(seen)


def test_both_or_neither_of_the_offline_args(tiny_dir):
    args = HuggingFaceBackbone(str(tiny_dir)).offline_init_args()
    with pytest.raises(ConfigError, match="both"):
        HuggingFaceBackbone(str(tiny_dir), model_config=args["model_config"])
