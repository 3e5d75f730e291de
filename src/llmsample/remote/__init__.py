"""Serving engines (``--engine openai``): the same settings, sent to a server that speaks the OpenAI HTTP API.

Why not a ``LanguageModel``. The local decode loop's contract (``language_model.py``) is ``forward(ids, cache) ->
logits [batch, vocab]``: every stage of the chain, the candidate tables and the sampler's draw read the whole
distribution. A server returns none of that: it samples on its own side and reports, per token, the chosen text,
its log-probability and a top-N list (N ≤ 20 on vLLM, 5 on OpenAI). Wrapping that in ``forward()`` would mean
inventing logits for the rest of the vocabulary, so llmsample's own chain would run on a made-up distribution. So a
remote engine is not a ``LanguageModel``; it is a *step stream*: ``stream.py`` turns the server's chunks into
``ServerToken`` events, and ``generate.py`` feeds them into the same ``SampleRecord``s and the same renderer calls
(``token``, ``sample_done``, ``finish``) that the local loop feeds, so text, JSON and jsonl output, colours,
``--candidates`` and ``-n`` read the same. What differs is stated where it shows: a probability the server did not
report is ``null`` in JSON (never estimated), the candidate table is headed "raw top-N from the server" (or "after
the server's sampler chain" where llama-server reports ``post_sampling_probs``), and ``token_ids`` are ``null``
where the server names tokens only by their text.

The sampling itself happens on the server. ``dialects.py`` holds, as one table, which settings each server takes
and under which JSON names; a setting in use that the server cannot honour gets the "has no effect" warning of a
local run, and the server's sampler order is reported (vLLM's is fixed, temperature first; llama-server takes
llmsample's order as ``samplers``).

Modules: ``http`` (stdlib HTTP and server-sent events), ``dialects`` (the capability table), ``server``
(connect, detect the dialect, check the model), ``stream`` (chunks to events), ``generate`` (a run), ``lab``
(sweep and inspect against a server).
"""
