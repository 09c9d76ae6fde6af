"""Evaluation: the model card's eleven numbers, by the paper's protocol.

One module per benchmark loads its data (open-instruct's layout), builds the prompts (with the
paper's quirks under ``protocol="paper"``, fixed under ``"clean"``) and scores outputs: MMLU
(0/5-shot), GSM (direct/CoT), BBH (direct/CoT), TyDi QA (gold passage/closed book), Codex-Eval
(HumanEval pass@1/10, run in `sandbox`) and AlpacaFarm (judged win rate).
"""
