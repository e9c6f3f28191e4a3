"""The benchmark runs end to end on a tiny shape and writes a well-formed report (timings are never asserted)."""

from __future__ import annotations

import json

import bench


def test_bench_smoke_report(tmp_path, capsys):
    out = tmp_path / "report.json"
    args = ["--shape", "tiny", "--dtype", "fp32", "--quantize", "none", "int8", "--prompt", "12", "--decode", "3"]
    args += ["--accuracy-tokens", "6", "--bandwidth-gib", "0.0625", "--repeats", "1", "--json", str(out)]
    assert bench.main(args) == 0
    report = json.loads(out.read_text())
    assert report["shape"] == "tiny" and report["read_bandwidth_gbs"] > 0 and report["machine"]
    runs = {(r["engine"], r["quantize"]): r for r in report["runs"]}
    assert set(runs) == {("ours", "none"), ("ours", "int8"), ("transformers", "none")}
    for r in runs.values():
        assert not r["error"], r["error"]
        assert len(r["tokens"]) == 3
        for key in ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "weight_gb", "peak_gb", "load_peak_gb"):
            assert r[key] > 0, key
    # both engines run the same network on the same weights, so greedy decoding agrees
    assert runs[("ours", "none")]["tokens"] == runs[("transformers", "none")]["tokens"]
    assert runs[("ours", "int8")]["weight_gb"] < runs[("ours", "none")]["weight_gb"] / 2
    acc = {a["run"]: a for a in report["accuracy"]}
    assert set(acc) == {"ours-fp32-int8", "transformers-fp32-none"}
    assert acc["transformers-fp32-none"]["max_abs_logit_err"] < 1e-3
    assert 0 <= acc["ours-fp32-int8"]["top1_agreement"] <= 1 and acc["ours-fp32-int8"]["positions"] == 6
    assert set(report["ratios"]) == {
        "decode ours/transformers fp32",
        "prefill ours/transformers fp32",
        "decode int8/fp32 (ours)",
    }
    table = capsys.readouterr().out
    assert "| engine | dtype | quant |" in table and "top-1 agreement" in table
