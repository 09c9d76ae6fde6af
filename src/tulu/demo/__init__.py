"""`tulu demo`: the whole life of a (tiny) Tulu model on a laptop CPU, with nothing downloaded.

For now: train a byte-level BPE tokenizer on the bundled conversations, build a tiny GPT-NeoX,
save both as a Hugging Face checkpoint directory, load it back (checking that the reloaded
model gives identical logits), describe it, and chat with it in the Tulu format. The weights
are random until the training pipeline joins the demo, so the reply is gibberish by design:
what the demo shows is every piece working end to end.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tulu.chat import generation_prompt
from tulu.engine.reference import generate_text
from tulu.engine.sampling import SamplingParams
from tulu.model.checkpoint import save_model
from tulu.model.config import preset
from tulu.model.gpt_neox import GPTNeoXForCausalLM
from tulu.pretrained import describe, load_pretrained
from tulu.tokenizer import Tokenizer

EOS = "<|endoftext|>"
PAD = "<|padding|>"


def corpus_text() -> str:
    return resources.files("tulu.demo").joinpath("corpus.txt").read_text(encoding="utf-8")


def train_tokenizer(text: str, vocab_size: int = 600) -> Tokenizer:
    """A byte-level BPE in the GPT-NeoX style (<|endoftext|> = 0, <|padding|> = 1)."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(text.split(EOS), trainer=trainer)
    return Tokenizer(backend, bos_token=EOS, eos_token=EOS, unk_token=EOS, model_max_length=512)


def tiny_model(vocab: int, seed: int) -> GPTNeoXForCausalLM:
    padded_vocab = -(-vocab // 64) * 64  # padded like Pythia's embeddings
    config = preset(
        "pythia-14m",
        vocab_size=padded_vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=512,
        torch_dtype="float32",
    )
    model = GPTNeoXForCausalLM(config)
    model.init_weights(seed)
    return model.eval()


def run_demo(
    output: Path, seed: int = 0, user_message: str = "What is the capital of France?"
) -> dict:
    started = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    checkpoint = output / "model"
    torch.manual_seed(seed)

    print("[1/4] training a byte-level BPE tokenizer on the bundled conversations")
    tokenizer = train_tokenizer(corpus_text())
    print(
        f"      {len(tokenizer)} tokens; eos = {tokenizer.eos_token!r} (id {tokenizer.eos_token_id})"
    )

    print("[2/4] building a tiny GPT-NeoX and saving it as a Hugging Face checkpoint")
    model = tiny_model(len(tokenizer), seed)
    save_model(model, checkpoint, tokenizer=tokenizer)
    print(f"      {checkpoint}: {', '.join(sorted(p.name for p in checkpoint.iterdir()))}")

    print("[3/4] loading it back")
    loaded = load_pretrained(checkpoint, device="cpu", dtype="float32")
    probe = torch.tensor([tokenizer.encode(corpus_text()[:200])])
    with torch.no_grad():
        same = torch.equal(model(probe), loaded.model(probe))
    if not same:
        raise RuntimeError("the reloaded model's logits differ from the saved model's")
    info = describe(checkpoint)
    print(
        f"      {info['parameters']:,} parameters, {info['layers']} layers, "
        f"KV cache {info['kv_cache_bytes_per_token']:,} bytes/token; reloaded logits identical"
    )

    print("[4/4] chatting in the Tulu format (random weights: expect gibberish)")
    messages = [{"role": "user", "content": user_message}]
    prompt = generation_prompt(messages, tokenizer.eos_token)
    print("      prompt: " + json.dumps(prompt))
    params = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.95, seed=seed)
    print("      reply:  ", end="", flush=True)
    result = generate_text(
        loaded.model,
        loaded.tokenizer,
        messages,
        params,
        on_text=lambda t: print(t, end="", flush=True),
    )
    print(f"\n      ({len(result.token_ids)} tokens, finish: {result.finish_reason})")

    summary = {
        "checkpoint": str(checkpoint),
        "prompt": prompt,
        "reply": result.text,
        "reply_tokens": len(result.token_ids),
        "finish_reason": result.finish_reason,
        "parameters": info["parameters"],
        "seconds": round(time.perf_counter() - started, 2),
    }
    (output / "demo.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"\nDone in {summary['seconds']} s. Everything is under {output}/")
    print(f"Next: tulu chat {checkpoint}   |   tulu info {checkpoint}")
    return summary
