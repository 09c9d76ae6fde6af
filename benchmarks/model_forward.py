"""Model-level speed: our GPT-NeoX vs transformers' on the same random weights, same run.

Measures prefill (one forward over a prompt) and single-stream greedy decoding with the
reference generator (contiguous KV cache) against transformers' `generate`. The batched
engine has its own benchmark (benchmarks/generation.py, engine issue).

    python benchmarks/model_forward.py                      # CPU: pythia-70m shape, float32
    python benchmarks/model_forward.py --preset pythia-6.9b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from tulu.engine.reference import generate_ids
from tulu.engine.sampling import SamplingParams
from tulu.model import GPTNeoXForCausalLM, preset
from tulu.model.config import parse_dtype

RESULTS = Path(__file__).parent / "results"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median wall time of `fn` over `repeats` runs after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pythia-70m")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--prompt-lengths", default="128,512")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    dtype = parse_dtype(args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    overrides = {"torch_dtype": str(dtype).removeprefix("torch.")}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    config = preset(args.preset, **overrides)
    torch.manual_seed(0)
    with torch.device("meta"):
        ours = GPTNeoXForCausalLM(config)
    ours = ours.to_empty(device=args.device).to(dtype)
    ours.init_weights(0)
    ours.eval().requires_grad_(False)
    hf_config = transformers.GPTNeoXConfig(**config.to_dict())
    with torch.device("meta"):
        theirs = transformers.GPTNeoXForCausalLM(hf_config)
    state = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state, assign=True, strict=False)
    theirs.gpt_neox.rotary_emb = type(theirs.gpt_neox.rotary_emb)(hf_config).to(args.device)
    theirs.eval()

    rows = []
    gen = torch.Generator().manual_seed(0)
    for length in (int(x) for x in args.prompt_lengths.split(",")):
        ids = torch.randint(0, 50000, (1, length), generator=gen).to(args.device)
        with torch.inference_mode():
            t_ours = timed(lambda: ours(ids, logits_to_keep=1), args.device, args.repeats)
            t_hf = timed(lambda: theirs(ids, logits_to_keep=1), args.device, args.repeats)
        rows.append({"metric": f"prefill {length} tokens (tokens/s)", "tulu": length / t_ours,
                     "transformers": length / t_hf, "ratio": t_hf / t_ours})

        prompt = ids[0].tolist()
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        t_ours = timed(lambda: generate_ids(ours, prompt, params), args.device, args.repeats)
        with torch.inference_mode():
            t_hf = timed(
                lambda: theirs.generate(ids, do_sample=False, max_new_tokens=args.new_tokens,
                                        min_new_tokens=args.new_tokens, pad_token_id=0),
                args.device, args.repeats,
            )
        n = args.new_tokens
        rows.append({"metric": f"greedy decode after {length} (tokens/s, incl. prefill)",
                     "tulu": n / t_ours, "transformers": n / t_hf, "ratio": t_hf / t_ours})

    print(f"\n{args.preset} ({config.num_hidden_layers} layers), {dtype}, {args.device}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'metric':<48} {'tulu':>12} {'transformers':>13} {'ratio':>7}")
    for row in rows:
        print(f"{row['metric']:<48} {row['tulu']:>12.1f} {row['transformers']:>13.1f} {row['ratio']:>6.2f}x")
    RESULTS.mkdir(exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    out = RESULTS / f"model_forward-{args.preset}-{args.device.split(':')[0]}.json"
    out.write_text(json.dumps({
        "preset": args.preset, "layers": config.num_hidden_layers, "dtype": str(dtype),
        "device": args.device, "device_name": device_name, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
