"""Builders for the tokenizer-import tests: a byte-level BPE trained with `tokenizers` on shipped text (Llama 3's
regex and id layout: BPE ids 0..N-1, specials above), saved by transformers with Llama 3's chat template next to
a tiny random LlamaForCausalLM, and the same BPE as an original MimixLM model folder (rank file)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mimix_jax.hf import layout
from mimix_jax.text import backends

DATA = Path(__file__).resolve().parents[1] / "data" / "corpus" / "train"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama 3's specials in Llama 3's order (reserved ones between the named ones), fewer of them.
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_2|>", "<|eot_id|>"]
# Meta-Llama-3-8B-Instruct's chat template, verbatim.
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
                   "<|end_header_id|>\n\n' }}{% endif %}")


def train_bpe(vocab_size: int = 700) -> Tokenizer:
  """A byte-level BPE (all 256 bytes, then merges; ids = ranks) trained on a shipped book, specials appended."""
  tk = Tokenizer(models.BPE(ignore_merges=True))
  tk.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tk.decoder = decoders.ByteLevel()
  text = gzip.open(DATA / "devils_dictionary.txt.gz", "rt", encoding="utf-8").read()[:300_000]
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False, min_frequency=2)
  tk.train_from_iterator(text.split("\n\n"), trainer)
  tk.add_special_tokens(SPECIALS)
  bos = SPECIALS[0]
  tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                    special_tokens=[(bos, tk.token_to_id(bos))])
  return tk


def save_hf_model(out: Path, tk: Tokenizer, seed: int = 0) -> transformers.PreTrainedTokenizerFast:
  """A tiny random float32 LlamaForCausalLM (tied) and the tokenizer, both saved by transformers, as a Llama 3
  Instruct model ships: eos <|eot_id|>, generation_config stopping on <|end_of_text|> and <|eot_id|>."""
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=SPECIALS[0], eos_token="<|eot_id|>",
                                                clean_up_tokenization_spaces=False)
  hf_tok.chat_template = LLAMA3_TEMPLATE
  ids = [tk.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")]
  cfg = transformers.LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                                 tie_word_embeddings=True, bos_token_id=ids[0], eos_token_id=ids[1:])
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg)
  model.generation_config = transformers.GenerationConfig(bos_token_id=ids[0], eos_token_id=ids[1:])
  model.save_pretrained(out)
  hf_tok.save_pretrained(out)
  return hf_tok


def save_mimixlm_folder(out: Path, tk: Tokenizer, hf_model_dir: Path) -> None:
  """The original's model folder for the same weights and BPE: model_weights (torch.save, its names),
  model_config.json (its three sections, the Llama 3 regex, specials at the ids above the ranks), and
  tokenizer.model as its rank file, written as its BPE trainer writes it (base64 bytes, rank)."""
  out.mkdir(parents=True)
  alphabet = backends.byte_level_alphabet()
  specials = {t: tk.token_to_id(t) for t in SPECIALS}
  ranks = {bytes(alphabet[c] for c in piece): i for piece, i in tk.get_vocab().items() if piece not in specials}
  backends.write_rank_file(out / "tokenizer.model", ranks)
  model = transformers.LlamaForCausalLM.from_pretrained(hf_model_dir)
  to_original = {layout.HF_EMBED: layout.MIMIXLM_EMBED, layout.HF_FINAL_NORM: layout.MIMIXLM_FINAL_NORM}
  for i in range(model.config.num_hidden_layers):
    for name, hf in layout.HF_LAYER_NAMES.items():
      to_original[hf.format(i=i)] = layout.MIMIXLM_LAYER_NAMES[name].format(i=i)
  state = {to_original[k]: v.to(torch.bfloat16) for k, v in model.state_dict().items() if k in to_original}
  torch.save(state, out / "model_weights")
  c = model.config
  config = {
      "model_config": {"model_name": "bpe_tiny", "vocab_size": c.vocab_size, "max_len": 128,
                       "share_emb_out_proj": True, "pad_id": specials["<|reserved_special_token_2|>"],
                       "eos_id": specials["<|eot_id|>"], "dtype": "bf16", "n_layers": c.num_hidden_layers,
                       "d_model": c.hidden_size, "d_ff": c.intermediate_size, "n_heads": c.num_attention_heads,
                       "n_kv_heads": c.num_key_value_heads, "attention_backend": "torch_native", "ln_eps": 1e-5},
      "tokenizer_config": {
          "tokenizer": "bpe", "pat_str": LLAMA3_PATTERN, "num_reserved_special_tokens": len(SPECIALS),
          "special_tokens": {role: [t, specials[t]] for role, t in (
              ("bos", "<|begin_of_text|>"), ("eos", "<|end_of_text|>"), ("eot", "<|eot_id|>"),
              ("start_header", "<|start_header_id|>"), ("end_header", "<|end_header_id|>"),
              ("pad", "<|reserved_special_token_2|>"))},
          "use_tiktoken": True},
      "generation_config": {"strategy": "sample", "top_p": 0.9, "temperature": 0.6, "max_decode_steps": 64,
                            "generation_mode": "chat", "system_message": "Be brief."},
  }
  (out / "model_config.json").write_text(json.dumps(config, indent=4, ensure_ascii=False))


# SmolLM2-Instruct's chat template, verbatim: ChatML with a default system message when the dialog has none.
CHATML_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                   "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")


def save_chatml_tokenizer(out: Path, tk: Tokenizer) -> transformers.PreTrainedTokenizerFast:
  """The BPE as SmolLM2-Instruct ships its tokenizer: <|im_start|> / <|im_end|>, eos <|im_end|>, no bos added."""
  tk = Tokenizer.from_str(tk.to_str())
  tk.post_processor = None
  tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                                pad_token="<|im_end|>", clean_up_tokenization_spaces=False)
  hf_tok.chat_template = CHATML_TEMPLATE
  hf_tok.save_pretrained(out)
  return hf_tok
