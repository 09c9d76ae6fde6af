"""Tokenization speed: tulu's parallel, cached tokenizer vs open-instruct's per-example approach.

Builds a JSONL of `--examples` chat records (default 490,000, the size of the Tulu v1 mixture)
by replicating 20 varied conversations (2-6 turns, some with a system turn; every copy gets
its own request number so no two records are identical), then:

- tulu: `tokenize_records` at max_seq_length 2048 with every core, into a fresh cache
  (examples/s and tokens/s), then the same call again (a cache hit: hashing the file and
  opening the memmaps);
- open-instruct: ``encode_with_messages_format`` re-typed here on transformers'
  ``PreTrainedTokenizerFast(tokenizer_file=...)`` (the full text and every prefix each
  encoded by its own tokenizer call, torch tensors as in open-instruct), one process, on a
  subset of `--peer-examples`; its output is checked against ours on that subset;
- the padded token fractions of padding-random, padding-sorted (batch size 8) and packing
  (rows of 2048) over the tokenized lengths.

Note: the records repeat 20 conversations, so the tokenizers' BPE word cache is warmer than on
real data, for both sides alike.

    python benchmarks/tokenization.py                  # 490,000 examples
    python benchmarks/tokenization.py --examples 50000
    python benchmarks/tokenization.py --examples 2000 --peer-examples 200 --mode-examples 500 \
        --output /tmp/tokenize.json                    # smoke test, a few seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
DEFAULT_TOKENIZER = REPO.parent / "shared/data/tokenizer/gpt-neox-20b/tokenizer.json"
EOS = "<|endoftext|>"


def S(text: str) -> dict:
    return {"role": "system", "content": text}


def U(text: str) -> dict:
    return {"role": "user", "content": text}


def A(text: str) -> dict:
    return {"role": "assistant", "content": text}


CONVERSATIONS: list[list[dict]] = [
    [
        U("How do I reverse a list in Python without modifying the original?"),
        A(
            "Use slicing with a negative step: `reversed_copy = items[::-1]`. It builds a new "
            "list and leaves `items` untouched. If you only need to iterate backwards, "
            "`for x in reversed(items):` avoids the copy altogether, because `reversed` returns "
            "an iterator that walks the list from the end. Avoid `items.reverse()` here: it "
            "reverses in place and returns None, which is a common source of bugs when "
            "people write `new = items.reverse()`."
        ),
        U("Which one is fastest for a list with a million elements?"),
        A(
            "All three are linear, so the differences are constant factors. In CPython, "
            "`items[::-1]` is usually the fastest way to get a reversed copy because the copy "
            "happens in C in one pass over the array of pointers. `list(reversed(items))` does "
            "the same work through the iterator protocol and is a little slower. "
            "`items.reverse()` is fastest of all when you may modify the list, since it swaps "
            "pointers in place and allocates nothing. Measure with `timeit` on your own data "
            "before optimizing: for a million elements each of these takes a few milliseconds, "
            "which rarely matters next to the work you do with the elements."
        ),
    ],
    [
        S("You are a patient math tutor. Explain each step."),
        U("Solve 3x + 7 = 22."),
        A(
            "Step 1: subtract 7 from both sides to isolate the term with x: 3x = 22 - 7 = 15.\n"
            "Step 2: divide both sides by 3: x = 15 / 3 = 5.\n"
            "Check: 3 * 5 + 7 = 15 + 7 = 22, so x = 5 is correct."
        ),
        U("And if it were 3x + 7 = 20?"),
        A(
            "Same steps: 3x = 20 - 7 = 13, then x = 13 / 3, which is about 4.333. The answer "
            "is not a whole number this time, so it is usually best to leave it as the exact "
            "fraction 13/3. Checking: 3 * (13/3) + 7 = 13 + 7 = 20."
        ),
    ],
    [
        U("Write a haiku about autumn rain."),
        A("Cold rain on maples,\nred leaves slide down the window,\nthe kettle answers."),
        U("Now one about the same rain, but hopeful."),
        A(
            "The gutters sing now;\nunder the soaked brown hillside\nnext spring's seeds drink deep."
        ),
        U("Can you explain the rules of a haiku, and whether you followed them?"),
        A(
            "A traditional Japanese haiku has three phrases of 5, 7 and 5 morae (sound units), "
            "a seasonal reference called a kigo, and often a cutting word that sets two images "
            "side by side. In English the morae are usually approximated by syllables. Both "
            "poems above follow the 5-7-5 syllable pattern: 'Cold rain on maples' has five, "
            "'red leaves slide down the window' has seven, and 'the kettle answers' has five. "
            "The seasonal words are the rain and red leaves in the first poem and the "
            "reference to next spring's seeds in the second. The shift from the window to the "
            "kettle plays the role of the cut, pairing the cold outside with the warmth inside."
        ),
    ],
    [
        U(
            "Summarize this paragraph in one sentence: The city council met on Tuesday to "
            "discuss the proposed bicycle lanes on Main Street. Supporters argued the lanes "
            "would reduce traffic accidents and encourage healthier commuting, while local "
            "business owners worried that removing parking spaces would hurt sales. After "
            "three hours of debate, the council voted to run a six-month pilot program and "
            "collect data on both traffic safety and retail revenue before deciding."
        ),
        A(
            "After a long debate between safety-minded supporters and business owners worried "
            "about lost parking, the council approved a six-month pilot of Main Street bike "
            "lanes to measure their effect on accidents and sales."
        ),
        U("What data should the pilot collect to settle the question fairly?"),
        A(
            "On safety: the number and severity of collisions involving cyclists, pedestrians "
            "and cars on Main Street, compared with the same months of previous years and with "
            "a similar street without lanes, plus counts of cyclists so that the rate per trip "
            "can be computed. On business: sales figures from participating shops (ideally "
            "anonymized and aggregated), foot traffic counts, and parking occupancy on nearby "
            "streets. A survey of how customers arrive, by car, bike, bus or on foot, would "
            "show whether the lost spaces actually served the shops' customers. Publishing the "
            "method before the pilot starts helps both sides trust the results."
        ),
    ],
    [
        S("You are a helpful assistant that answers concisely."),
        U("What is the boiling point of water at the top of Mount Everest?"),
        A(
            "About 70 degrees Celsius (roughly 158 degrees Fahrenheit). Air pressure at the "
            "summit is around a third of sea-level pressure, and water boils when its vapour "
            "pressure matches the surrounding pressure, so it boils at a lower temperature."
        ),
        U("So does pasta cook faster up there?"),
        A(
            "Slower. The water is cooler, so starch gelatinizes more slowly; climbers often "
            "use pressure cookers to raise the boiling point back up."
        ),
        U("Thanks!"),
        A("You're welcome. Stay warm up there."),
    ],
    [
        U("Translate to French: 'The library opens at nine and closes at six on weekdays.'"),
        A("« La bibliothèque ouvre à neuf heures et ferme à dix-huit heures en semaine. »"),
        U("And in German and Spanish? Also explain why you wrote 'dix-huit heures'."),
        A(
            "German: „Die Bibliothek öffnet werktags um neun Uhr und schließt um achtzehn Uhr.“"
            "\nSpanish: «La biblioteca abre a las nueve y cierra a las seis de la tarde entre "
            "semana.»\nIn French, official times such as opening hours are normally given on "
            "the 24-hour clock, so six in the evening becomes 'dix-huit heures' (often written "
            "18 h). Saying 'six heures' alone would usually be understood as six in the "
            "morning. Spanish speakers more often use the 12-hour clock in conversation, so "
            "'las seis de la tarde' sounds natural there, while German signs, like French "
            "ones, use the 24-hour form."
        ),
    ],
    [
        U(
            "I have a SQL table orders(id, customer_id, total, created_at). How do I get the "
            "top 5 customers by total spend in 2023?"
        ),
        A(
            "```sql\nSELECT customer_id, SUM(total) AS spend\nFROM orders\n"
            "WHERE created_at >= '2023-01-01' AND created_at < '2024-01-01'\n"
            "GROUP BY customer_id\nORDER BY spend DESC\nLIMIT 5;\n```\n"
            "The half-open date range keeps orders from the last day of 2023 regardless of "
            "their time of day, and it lets the database use an index on created_at, which a "
            "function like YEAR(created_at) = 2023 would prevent."
        ),
        U("What if two customers tie for fifth place?"),
        A(
            "LIMIT 5 keeps an arbitrary one of them. To keep every tied customer, rank them "
            "first:\n```sql\nSELECT customer_id, spend FROM (\n  SELECT customer_id, SUM(total) "
            "AS spend,\n         RANK() OVER (ORDER BY SUM(total) DESC) AS r\n  FROM orders\n"
            "  WHERE created_at >= '2023-01-01' AND created_at < '2024-01-01'\n"
            "  GROUP BY customer_id\n) ranked WHERE r <= 5;\n```"
        ),
    ],
    [
        U("Give me three ideas for a rainy Saturday with two kids aged 6 and 9."),
        A(
            "1. Build a blanket fort and turn it into a reading cave with flashlights; each "
            "child picks a book to read aloud to the other.\n2. Kitchen science: make a "
            "baking-soda volcano, grow salt crystals on a string, or test which household "
            "objects float.\n3. Host a home talent show: an hour to prepare an act (magic "
            "trick, song, joke routine), then a performance with homemade tickets and snacks."
        ),
        U("The younger one gets bored quickly. How do I keep the science one going?"),
        A(
            "Give each child a job with a visible result: the six-year-old can be the "
            "'chief pourer' for the volcano and the timekeeper with a kitchen timer, while the "
            "nine-year-old reads the steps and records what happens in a notebook. Keep each "
            "experiment under ten minutes and let the younger one predict the outcome first: "
            "'Will the grape float or sink?' Guessing turns every trial into a small game. "
            "Finish with something they can take away, like a crystal string that will keep "
            "growing overnight, so the activity has a reason to come back to tomorrow."
        ),
    ],
    [
        S("You are an expert in European history."),
        U("Why did the Hanseatic League decline?"),
        A(
            "Several forces combined over the fifteenth and sixteenth centuries. Territorial "
            "states such as Sweden, Denmark, Muscovy and England grew strong enough to protect "
            "their own merchants and to challenge the League's privileges. Atlantic trade "
            "routes shifted commerce away from the Baltic toward the Netherlands and England, "
            "and Dutch shipping undercut Hanseatic freight rates. The League also lacked a "
            "central government, army or treasury, so its member towns often pursued "
            "conflicting interests. The Thirty Years' War then devastated much of its "
            "hinterland; by the last diet in 1669 only a handful of cities still attended."
        ),
    ],
    [
        U("Is it safe to give my dog grapes?"),
        A(
            "No. Grapes and raisins can cause sudden kidney failure in dogs, and the toxic dose "
            "varies so much between dogs that no amount is considered safe. If your dog has "
            "eaten some, call a veterinarian or an animal poison hotline right away, even if "
            "it seems fine: treatment works best in the first few hours."
        ),
        U("He only ate two. He weighs 30 kg."),
        A(
            "Please still call your vet now. Two grapes may well be harmless for a 30 kg dog, "
            "but some dogs react to very small amounts, and the vet may want to induce "
            "vomiting as a precaution. Watch for vomiting, lethargy or reduced urination over "
            "the next 72 hours."
        ),
    ],
    [
        U("Explain recursion to a ten-year-old."),
        A(
            "Imagine you are standing in a long line and want to know how many people are in "
            "front of you. You ask the person ahead, who asks the person ahead of them, and so "
            "on. The first person in line has nobody in front, so they answer 'zero'. Each "
            "person then adds one and passes the answer back. That is recursion: solving a "
            "problem by asking a smaller copy of the same question, with a simple case where "
            "the asking stops."
        ),
        U("Can you show the line example as a tiny Python program?"),
        A(
            "```python\ndef people_in_front(person):\n    if person.ahead is None:\n"
            "        return 0  # the first person in line: the asking stops here\n"
            "    return 1 + people_in_front(person.ahead)\n```\n"
            "Each call asks the same question about the person ahead, and the answer grows by "
            "one on the way back. If the line had no first person, because someone made it a "
            "circle, the function would keep asking forever until Python stops it with a "
            "RecursionError. That is why every recursive function needs a case where it stops."
        ),
    ],
    [
        U("Write a function in JavaScript that debounces another function."),
        A(
            "```javascript\nfunction debounce(fn, waitMs) {\n  let timer = null;\n"
            "  return function (...args) {\n    clearTimeout(timer);\n"
            "    timer = setTimeout(() => fn.apply(this, args), waitMs);\n  };\n}\n```\n"
            "Every call restarts the timer, so `fn` runs only once the calls stop for `waitMs` "
            "milliseconds, with the arguments of the last call. A typical use is a search box: "
            "`input.addEventListener('input', debounce(search, 300))`."
        ),
        U("How would I cancel a pending call?"),
        A(
            "Attach a cancel method to the returned function:\n```javascript\n"
            "function debounce(fn, waitMs) {\n  let timer = null;\n"
            "  const debounced = function (...args) {\n    clearTimeout(timer);\n"
            "    timer = setTimeout(() => fn.apply(this, args), waitMs);\n  };\n"
            "  debounced.cancel = () => clearTimeout(timer);\n  return debounced;\n}\n```"
        ),
        U("Great, and a flush method that runs it immediately?"),
        A(
            "Keep the last arguments and context, and on flush clear the timer and call `fn` "
            "with them if a call is pending. Set a `pending` flag when a call is scheduled "
            "and clear it when `fn` actually runs, so that flush does nothing when there is "
            "nothing to run."
        ),
    ],
    [
        S("Answer as a friendly travel agent."),
        U("I have four days in Lisbon in April. What should I not miss?"),
        A(
            "Lovely choice! Day 1: wander Alfama, ride tram 28 and watch the sunset from the "
            "Miradouro da Senhora do Monte. Day 2: Belém for the Jerónimos Monastery, the tower "
            "and a pastel de nata at the original bakery. Day 3: a day trip to Sintra, starting "
            "early at Pena Palace before the crowds. Day 4: the LX Factory and Time Out Market, "
            "and a fado evening in Mouraria. April is mild but bring a light rain jacket."
        ),
    ],
    [
        U("What's the difference between a virus and a bacterium?"),
        A(
            "Bacteria are single-celled living organisms with their own metabolism; most are "
            "harmless or helpful, and they can reproduce on their own. Viruses are far smaller "
            "packages of genetic material in a protein coat that can only multiply inside a "
            "host cell. That is why antibiotics, which attack bacterial structures such as "
            "cell walls, do nothing against viral infections like the common cold."
        ),
        U("Then why do doctors sometimes prescribe antibiotics for a viral infection?"),
        A(
            "Usually because of a suspected or likely secondary bacterial infection. A viral "
            "illness such as the flu can weaken the airways enough for bacteria to cause "
            "pneumonia, sinusitis or an ear infection on top of it, and those do respond to "
            "antibiotics. Sometimes it is hard to tell a viral from a bacterial infection "
            "quickly, and a doctor weighs the risk of waiting. Prescribing antibiotics 'just "
            "in case' is discouraged, though: it does not help the viral part, causes side "
            "effects, and speeds up the spread of antibiotic-resistant bacteria."
        ),
    ],
    [
        U("Proofread: 'Their going to the park tomorow, weather or not it rains.'"),
        A("Corrected: 'They're going to the park tomorrow, whether or not it rains.'"),
        U("Explain the changes."),
        A(
            "'Their' is possessive; the sentence needs 'they're', short for 'they are'. "
            "'Tomorow' is misspelled. 'Weather' is the rain and sunshine; 'whether' introduces "
            "alternatives."
        ),
    ],
    [
        S("You are a careful assistant. If a question is ambiguous, ask for clarification."),
        U("How long does it take to get there?"),
        A(
            "Could you tell me where you are starting from, where you want to go, and how you "
            "plan to travel (car, train, on foot)? Then I can give you a useful estimate."
        ),
        U("From Boston to New York by train."),
        A(
            "Amtrak's Acela takes about 3 hours 40 minutes between Boston South Station and "
            "New York Penn Station; the Northeast Regional takes roughly 4 hours 15 minutes."
        ),
    ],
    [
        U("Give me a regular expression that matches a US ZIP code, with optional ZIP+4."),
        A(
            "`^\\d{5}(?:-\\d{4})?$` matches five digits, optionally followed by a hyphen and "
            "four more digits. The anchors make sure the whole string is a ZIP code rather "
            "than containing one; drop them to search inside longer text."
        ),
        U("How do I use it in Python to validate a list of codes and report the bad ones?"),
        A(
            '```python\nimport re\n\nZIP = re.compile(r"\\d{5}(?:-\\d{4})?")\n\n'
            "def bad_zip_codes(codes):\n    return [c for c in codes if not ZIP.fullmatch(c.strip())]\n\n"
            'print(bad_zip_codes(["02139", "10001-1234", "9021", "ABCDE"]))\n'
            "# ['9021', 'ABCDE']\n```\n`fullmatch` requires the whole string to match, so "
            "the anchors are not needed. Note that `\\d` also matches digits from other "
            "scripts, such as Arabic-Indic digits; pass `re.ASCII` if only 0-9 should count."
        ),
    ],
    [
        U("My sourdough is dense and flat. What am I doing wrong?"),
        A(
            "The most common causes are an under-active starter, under-fermented dough, and "
            "weak shaping. Feed your starter and use it at its peak, when it has doubled and "
            "is domed. Let the bulk fermentation go until the dough has grown by about half "
            "and shows bubbles on the sides, which can take 5 to 8 hours at room temperature. "
            "Build surface tension when shaping, and bake in a preheated covered pot so the "
            "loaf can spring before the crust sets."
        ),
        U("My kitchen is cold, about 17°C."),
        A(
            "That explains a lot: fermentation slows dramatically below 20°C. Use water at "
            "about 30°C when mixing, put the dough in the oven with only the light on, or "
            "simply allow a much longer bulk fermentation and judge by the dough, not the "
            "clock."
        ),
    ],
    [
        U("List the planets in order from the Sun with one fact each."),
        A(
            "Mercury: a year there lasts only 88 Earth days.\nVenus: the hottest planet, "
            "thanks to a runaway greenhouse effect.\nEarth: the only world known to host life."
            "\nMars: home to Olympus Mons, the tallest volcano in the solar system.\nJupiter: "
            "its Great Red Spot is a storm larger than Earth.\nSaturn: its density is lower "
            "than water's.\nUranus: it rotates on its side.\nNeptune: the strongest winds "
            "measured in the solar system, over 2,000 km/h."
        ),
        U("Why isn't Pluto on the list?"),
        A(
            "In 2006 the International Astronomical Union defined a planet as a body that "
            "orbits the Sun, is massive enough to be pulled into a nearly round shape, and has "
            "cleared the neighbourhood around its orbit of other objects of similar size. "
            "Pluto meets the first two conditions but not the third: it shares its region with "
            "many other Kuiper Belt objects, some of them comparable in size, such as Eris. It "
            "was therefore classified as a dwarf planet, along with Eris, Ceres, Haumea and "
            "Makemake. Some planetary scientists still argue for a definition based only on a "
            "body's own properties, which would make Pluto a planet again."
        ),
    ],
    [
        S("You are a concise assistant for a software team."),
        U("Draft a short message telling the team the release is delayed by two days."),
        A(
            "Hi all, a heads-up: the 4.2 release moves from Tuesday to Thursday. We found a "
            "data-migration issue in final testing and want to fix it properly rather than "
            "ship a workaround. Nothing else changes; the release checklist stays the same. "
            "Thanks for your patience, and ping me with any questions."
        ),
        U("Make it a bit more formal."),
        A(
            "Dear colleagues, please note that the 4.2 release has been rescheduled from "
            "Tuesday to Thursday. Final testing revealed an issue in the data migration, "
            "which we will resolve before release. All other plans remain unchanged. Please "
            "contact me with any questions. Kind regards."
        ),
        U("Perfect. Also a one-line version for the status page."),
        A(
            "Release 4.2 is now scheduled for Thursday to allow time for a final data-migration fix."
        ),
    ],
]


# ------------------------------------------------------------------------------ data
def write_records(path: Path, n: int) -> None:
    """`n` records cycling through CONVERSATIONS, each first user turn numbered."""
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n):
            conversation = CONVERSATIONS[i % len(CONVERSATIONS)]
            messages = [dict(m) for m in conversation]
            for m in messages:
                if m["role"] == "user":
                    m["content"] = f"(request {i}) {m['content']}"
                    break
            record = {"dataset": "bench", "id": f"bench_{i}", "messages": messages}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------ open-instruct
def open_instruct_encode(example: dict, tokenizer, max_seq_length: int) -> dict:
    """open-instruct's encode_with_messages_format, re-typed: one tokenizer call per text."""
    import torch

    messages = example["messages"]

    def concat(msgs):
        text = ""
        for m in msgs:
            if m["role"] == "system":
                text += "<|system|>\n" + m["content"].strip() + "\n"
            elif m["role"] == "user":
                text += "<|user|>\n" + m["content"].strip() + "\n"
            elif m["role"] == "assistant":
                text += "<|assistant|>\n" + m["content"].strip() + tokenizer.eos_token + "\n"
            else:
                raise ValueError(f"Invalid role: {m['role']}")
        return text

    text = concat(messages).strip()
    tokenized = tokenizer(text, return_tensors="pt", max_length=max_seq_length, truncation=True)
    input_ids = tokenized.input_ids
    labels = input_ids.clone()
    for idx, m in enumerate(messages):
        if m["role"] == "assistant":
            continue
        start = 0
        if idx > 0:
            start = tokenizer(
                concat(messages[:idx]),
                return_tensors="pt",
                max_length=max_seq_length,
                truncation=True,
            ).input_ids.shape[1]
        if idx < len(messages) - 1 and messages[idx + 1]["role"] == "assistant":
            so_far = concat(messages[: idx + 1]) + "<|assistant|>\n"
        else:
            so_far = concat(messages[: idx + 1])
        end = tokenizer(
            so_far, return_tensors="pt", max_length=max_seq_length, truncation=True
        ).input_ids.shape[1]
        labels[:, start:end] = -100
        if end >= max_seq_length:
            break
    attention_mask = torch.ones_like(input_ids)
    return {
        "input_ids": input_ids.flatten(),
        "labels": labels.flatten(),
        "attention_mask": attention_mask.flatten(),
    }


def run_peer(path: Path, tokenizer_file: Path, n: int, max_seq_length: int):
    import transformers

    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=EOS)
    examples = []
    with open(path, encoding="utf-8") as handle:
        for _, line in zip(range(n), handle, strict=False):
            examples.append(json.loads(line))
    start = time.perf_counter()
    encoded = [open_instruct_encode(e, tok, max_seq_length) for e in examples]
    seconds = time.perf_counter() - start
    # open-instruct then drops examples whose labels are all -100
    kept = [e for e in encoded if (e["labels"] != -100).any()]
    tokens = sum(len(e["input_ids"]) for e in kept)
    return kept, {
        "examples": len(examples),
        "seconds": seconds,
        "examples_per_s": len(examples) / seconds,
        "tokens_per_s": tokens / seconds,
        "transformers": transformers.__version__,
    }


# ------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=490_000)
    parser.add_argument("--peer-examples", type=int, default=20_000)
    parser.add_argument(
        "--mode-examples", type=int, default=50_000, help="subset for workers vs in-process"
    )
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="default: every core")
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS / "tokenize.json",
        help="results file (default: results/tokenize.json; trial runs: somewhere in /tmp)",
    )
    args = parser.parse_args()
    for name in ("examples", "peer_examples", "mode_examples", "max_seq_length", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be a positive integer")
    if args.output.is_dir():
        parser.error(f"--output {args.output}: is a directory, expected a JSON file name")

    from tulu.data.batching import padding_report
    from tulu.data.tokenize import _default_workers, tokenize_records
    from tulu.data.tokenized import TokenizedDataset
    from tulu.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(prefix="tulu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        tokenizer_file = args.tokenizer
        if tokenizer_file.is_file():
            tokenizer = Tokenizer.from_file(tokenizer_file)
            tokenizer_name = "gpt-neox-20b"
        else:
            from tulu.demo import corpus_text, train_tokenizer

            print(f"note: {tokenizer_file} absent; using the demo tokenizer instead")
            tokenizer = train_tokenizer(corpus_text())
            tokenizer_file = tmp / "tokenizer.json"
            tokenizer.backend.save(str(tokenizer_file))
            tokenizer_name = "demo"

        data = tmp / "records.jsonl"
        t0 = time.perf_counter()
        write_records(data, args.examples)
        print(
            f"wrote {args.examples:,} records ({data.stat().st_size / 2**20:,.0f} MiB) in "
            f"{time.perf_counter() - t0:.1f} s"
        )

        workers = args.workers or _default_workers()
        cache = tmp / "cache"

        def tokenize(records: Path, cache_dir: Path, num_workers: int) -> TokenizedDataset:
            """tulu's tokenization of `records`, as every run here times it."""
            return tokenize_records(
                records,
                tokenizer,
                args.max_seq_length,
                cache_dir=cache_dir,
                num_workers=num_workers,
                progress=False,
            )

        start = time.perf_counter()
        dataset = tokenize(data, cache, workers)
        fresh = time.perf_counter() - start
        assert not dataset.cache_hit
        start = time.perf_counter()
        again = tokenize(data, cache, workers)
        hit = time.perf_counter() - start
        assert again.cache_hit
        ours = {
            "examples": len(dataset),
            "workers": workers,
            "seconds": fresh,
            "examples_per_s": args.examples / fresh,
            "tokens_per_s": dataset.num_tokens / fresh,
            "tokens": dataset.num_tokens,
            "trained_tokens": dataset.num_trained_tokens,
            "mean_tokens_per_example": dataset.num_tokens / max(len(dataset), 1),
            "truncated": dataset.meta["num_truncated"],
            "dropped": dataset.meta["dropped"],
            "cache_hit_seconds": hit,
            "bytes_on_disk": sum(f.stat().st_size for f in dataset.directory.iterdir()),
        }

        n_peer = min(args.peer_examples, args.examples)
        peer_encoded, peer = run_peer(data, tokenizer_file, n_peer, args.max_seq_length)
        same = len(peer_encoded) == min(n_peer, len(dataset)) and all(
            e["input_ids"].tolist() == dataset[i].input_ids.tolist()
            and e["labels"].tolist() == dataset[i].labels.tolist()
            for i, e in enumerate(peer_encoded)
        )
        peer["identical_to_tulu"] = same

        # Worker processes vs one process (the tokenizers library's own threads), same subset.
        n_modes = min(args.mode_examples, args.examples)
        subset = tmp / "subset.jsonl"
        with open(data, "rb") as src, open(subset, "wb") as dst:
            for _, line in zip(range(n_modes), src, strict=False):
                dst.write(line)
        modes = {}
        for name, count in (("workers", workers), ("in_process", 1)):
            start = time.perf_counter()
            tokenize(subset, tmp / name, count)
            modes[name] = {
                "workers": count,
                "examples_per_s": n_modes / (time.perf_counter() - start),
            }

        report = padding_report(dataset.lengths, args.batch_size, args.max_seq_length)

    results = {
        "examples": args.examples,
        "max_seq_length": args.max_seq_length,
        "tokenizer": tokenizer_name,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "tulu": ours,
        "open_instruct": peer,
        "ratio_examples_per_s": ours["examples_per_s"] / peer["examples_per_s"],
        "modes_subset": {"examples": n_modes, **modes},
        "padding": {
            "batch_size": args.batch_size,
            "max_seq_length": args.max_seq_length,
            "modes": [s.as_dict() for s in report],
        },
    }

    print(
        f"\n{args.examples:,} examples, {tokenizer_name} tokenizer, max_seq_length "
        f"{args.max_seq_length}, {os.cpu_count()} CPUs"
    )
    print(f"{'':<34} {'examples/s':>12} {'tokens/s':>14} {'seconds':>9}")
    print(
        f"{f'tulu ({workers} workers, fresh)':<34} {ours['examples_per_s']:>12,.0f} "
        f"{ours['tokens_per_s']:>14,.0f} {fresh:>9.1f}"
    )
    print(f"{'tulu (cache hit)':<34} {'':>12} {'':>14} {hit:>9.2f}")
    print(
        f"{f'open-instruct (1 process, {n_peer:,})':<34} {peer['examples_per_s']:>12,.0f} "
        f"{peer['tokens_per_s']:>14,.0f} {peer['seconds']:>9.1f}"
    )
    print(
        f"ratio tulu / open-instruct: {results['ratio_examples_per_s']:.1f}x "
        f"(outputs identical on the subset: {same})"
    )
    print(
        f"on the first {n_modes:,}: {workers} worker processes "
        f"{modes['workers']['examples_per_s']:,.0f} examples/s, one process (tokenizers' own "
        f"threads) {modes['in_process']['examples_per_s']:,.0f} examples/s"
    )
    print(f"\n{'batching':<16} {'batches':>9} {'rows':>9} {'padded fraction':>16}")
    for s in report:
        print(f"{s.mode:<16} {s.batches:>9,} {s.rows:>9,} {s.padded_fraction:>16.2%}")
    out = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
