"""Shared fixtures of the Hugging Face interop tests: tiny transformers models with random
weights, perturbed so that biases and norm scales are not trivial, saved with save_pretrained
to temporary directories (no network)."""

import pytest
import torch
import transformers

from .lm_checks import BOS, EOS, VOCAB


def perturbed(model: "torch.nn.Module", seed: int) -> "torch.nn.Module":
    """`model` in eval mode, every parameter moved by Gaussian noise (0.1 for vectors: biases
    and norm scales; 0.02 for matrices)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            scale = 0.1 if param.ndim == 1 else 0.02
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> str:
    """A GPT2LMHeadModel (tied embeddings, n_inner not 4 x n_embd) saved with safetensors."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=160,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.05,  # Not the default: import and export must carry it.
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    path = str(tmp_path_factory.mktemp("hf_gpt2"))
    perturbed(transformers.GPT2LMHeadModel(config), seed=1).save_pretrained(path)
    _byte_level_bpe(VOCAB).save_pretrained(path)
    return path


def _tiny_task_texts() -> list[str]:
    from kiln.data import tasks

    task = tasks.load_task("wn_lexname", data_dir="data/tiny")
    return [f"{e.input}\n{e.target}" for e in task.splits["train"]]


def _byte_level_bpe(vocab_size: int) -> "transformers.PreTrainedTokenizerFast":
    """A GPT-2 style tokenizer (byte-level BPE, <|endoftext|> as bos, eos and unk) of exactly
    `vocab_size` tokens, trained on the tiny wn_lexname texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = _tiny_task_texts()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    assert tok.get_vocab_size() == vocab_size
    return transformers.GPT2TokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> str:
    """A LlamaForCausalLM with grouped-query attention (4 heads, 2 kv heads), an untied head
    and a non-default rope_theta, saved with safetensors."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=500.0,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    path = str(tmp_path_factory.mktemp("hf_llama"))
    perturbed(transformers.LlamaForCausalLM(config), seed=2).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> str:
    """A BertForMaskedLM (exact GELU, eps 1e-12, two token types) with an uncased WordPiece
    tokenizer trained on the tiny wn_lexname texts, saved with safetensors."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials)
    tok.train_from_iterator(_tiny_task_texts(), trainer)
    tokenizer = transformers.BertTokenizerFast(tokenizer_object=tok)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=160,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = str(tmp_path_factory.mktemp("hf_bert"))
    perturbed(transformers.BertForMaskedLM(config), seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
