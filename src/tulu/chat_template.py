"""The Tulu chat format as a Jinja chat template, for the tools that read checkpoints.

tulu renders conversations in Python (`tulu.chat`). Other tools do not run that code: a
transformers user calls ``tokenizer.apply_chat_template``, and vLLM's and TGI's chat endpoints
render messages with the ``chat_template`` of ``tokenizer_config.json``; without one they
refuse chat requests or fall back to a format the model never saw. Every tokenizer tulu saves
(`tulu export`, a training run's checkpoints and final model) therefore carries this template,
and the tests check that transformers renders it to exactly `tulu.chat.generation_prompt`
(with ``add_generation_prompt=True``) and `tulu.chat.conversation_text` (without), for
conversations with system turns, several turns, empty and whitespace-padded contents.

The template is written with ``{%- -%}`` everywhere, so it renders the same whether or not the
environment strips blocks (transformers sets ``trim_blocks`` and ``lstrip_blocks``). Jinja's
``trim`` is Python's ``str.strip()``, the strip `tulu.chat` applies to every content. Messages
the format refuses (no messages, an unknown role, content that is not a string) raise through
``raise_exception``, which transformers, vLLM and TGI provide to templates, with the message
`tulu.chat` gives.
"""

from __future__ import annotations

__all__ = ["CHAT_TEMPLATE"]

CHAT_TEMPLATE = (
    "{%- if messages | length == 0 -%}"
    "{{- raise_exception('messages: the conversation is empty (need at least one message)') -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is not string -%}"
    "{{- raise_exception('message ' ~ loop.index0 ~ \", field 'content': expected a string\") -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- '<|system|>\\n' + (message['content'] | trim) + '\\n' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<|user|>\\n' + (message['content'] | trim) + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\\n' + (message['content'] | trim) + eos_token + '\\n' -}}"
    "{%- else -%}"
    "{{- raise_exception('message ' ~ loop.index0 ~ \": unknown role '\" ~ message['role'] ~"
    ' "\' (expected one of system, user, assistant)") -}}'
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|assistant|>\\n' -}}"
    "{%- endif -%}"
)
