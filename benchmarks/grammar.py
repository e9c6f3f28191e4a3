"""Benchmark: the grammar engines for constrained decoding, on Mistral's real 32000-token vocabulary.

    python benchmarks/grammar.py [--tokens 300] [--seed 0]

For each engine installed (llguidance, which the project uses; xgrammar, if present: `pip install xgrammar`): the
import time, the time to build its view of the vocabulary and to compile a JSON schema, and the time to compute one
step's token mask (mean and 99th percentile), over a generation that samples from random logits under the mask until
the schema's document is complete, restarting as needed until `--tokens` masks are timed. The mask is what a decode
step waits for; a 7B int4 step on a 2-core CPU takes about 100-300 ms.

Needs the test extras (mistral-common, for the tokenizer file). Times are wall-clock, on whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tiny import tokenizer_path  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                    "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}  # fmt: skip


def ours(tokens: int, seed: int) -> dict:
    t0 = time.perf_counter()
    import llguidance  # noqa: F401

    from mistral_cli.engine import grammar
    from mistral_cli.text.output_format import OutputFormat
    from mistral_cli.text.tokenizer import Tokenizer

    t1 = time.perf_counter()
    tok = Tokenizer(tokenizer_path())
    grammar._ll_tokenizer(tok)
    t2 = time.perf_counter()
    g = grammar.Grammar(tok, OutputFormat("json_schema", json.dumps(SCHEMA), "bench"))
    t3 = time.perf_counter()

    def session():
        m = g.matcher()
        return m.mask_, m.accept, m.is_stopped

    times = _run(session, tok.eos_id, tokens, seed)
    return _row("llguidance (engine/grammar.py)", t1 - t0, t2 - t1, t3 - t2, times)


def xgrammar_engine(tokens: int, seed: int) -> dict | None:
    t0 = time.perf_counter()
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    t1 = time.perf_counter()
    from mistral_cli.text.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path())
    sp = tok._sp
    vocab = [sp.id_to_piece(i) for i in range(tok.vocab_size)]
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.BYTE_FALLBACK, stop_token_ids=[tok.eos_id],
                             add_prefix_space=True)  # fmt: skip
    compiler = xgr.GrammarCompiler(info)
    t2 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    t3 = time.perf_counter()
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)

    def session():
        m = xgr.GrammarMatcher(compiled)

        def mask_(logits):
            m.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits.view(1, -1), bitmask)

        return mask_, m.accept_token, m.is_terminated

    times = _run(session, tok.eos_id, tokens, seed)
    return _row("xgrammar", t1 - t0, t2 - t1, t3 - t2, times)


def _run(session, eos: int, tokens: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    times: list[float] = []
    while len(times) < tokens:
        mask_, accept, stopped = session()
        for _ in range(400):
            logits = torch.randn(32000, generator=g)
            t = time.perf_counter()
            mask_(logits)
            times.append(time.perf_counter() - t)
            token = int(torch.multinomial(torch.softmax(logits, 0), 1, generator=g))
            if token == eos:
                break
            accept(token)
            if stopped() or len(times) >= tokens:
                break
    return times


def _row(name: str, imported: float, vocabulary: float, compiled: float, times: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in times)
    return {
        "engine": name,
        "import_s": round(imported, 3),
        "vocabulary_s": round(vocabulary, 3),
        "compile_s": round(compiled, 4),
        "mask_ms_mean": round(statistics.mean(ms), 3),
        "mask_ms_p99": round(ms[int(0.99 * (len(ms) - 1))], 3),
        "masks": len(ms),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=300, help="masks to time per engine")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [ours(args.tokens, args.seed), xgrammar_engine(args.tokens, args.seed)]
    print("| engine | import | vocabulary | schema compile | mask mean | mask p99 | masks |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r is not None:
            print(f"| {r['engine']} | {r['import_s']} s | {r['vocabulary_s']} s | {r['compile_s']} s | "
                  f"{r['mask_ms_mean']} ms | {r['mask_ms_p99']} ms | {r['masks']} |")  # fmt: skip


if __name__ == "__main__":
    main()
