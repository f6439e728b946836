"""Length predictors: learning a known rule, save/load round trips, the oracle's refusal, data
validation, metrics against brute-force references, and the CLI."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lengthwise.predict import (
    ConstantPredictor,
    LengthQuery,
    TrainConfig,
    kendall_tau,
    length_metrics,
    load_length_data,
    load_predictor,
    make_predictor,
    train_probe,
    train_proxy,
)
from lengthwise.predict.base import LengthPrediction
from lengthwise.predict.heads import LengthHead, default_edges, head_loss, readout_all
from lengthwise.predict.metrics import bin_accuracy
from lengthwise.predict.proxy import query_text
from lengthwise.predict.self_predict import binned_median, parse_length

# A synthetic task family with a known length rule: the adjective decides the length, the topic
# is noise. A predictor that learns the rule gets within a few tokens; the median is ~100 off.
RULE = {"tiny": 10, "short": 60, "medium": 150, "long": 300}
TOPICS = "rivers mountains cats trains music bread stars gardens clocks boats".split()
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "write", "a", "answer", "about", *RULE, *TOPICS]


def alpaca_prompt(instruction: str) -> str:
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def write_rule_data(path: Path, n: int, seed: int, noise: int = 5) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            kind, topic = rng.choice(list(RULE)), rng.choice(TOPICS)
            instruction = f"write a {kind} answer about {topic}"
            length = RULE[kind] + rng.randint(-noise, noise)
            f.write(json.dumps({"id": str(i), "instruction": instruction, "input": "",
                                "prompt": alpaca_prompt(instruction),
                                "lengths": {"t0.0": length - 3, "t0.7": length}, "L_max": length}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A tiny random BERT with a word-level vocabulary, saved as a Hugging Face encoder directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("encoder")
    BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(str(d))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def rule_data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("rule")
    return write_rule_data(d / "train.jsonl", 400, 0), write_rule_data(d / "dev.jsonl", 120, 1)


def _mae(predictor, path: Path) -> float:
    data = load_length_data(path)
    preds = predictor.predict(data.queries)
    return float(np.mean([abs(p.length - t) for p, t in zip(preds, data.lengths, strict=True)]))


FAST = TrainConfig(epochs=40, batch_size=32, lr=3e-3, val_fraction=0.1, progress=False)


def test_frozen_proxy_learns_the_length_rule_and_round_trips(tiny_encoder, rule_data, tmp_path):
    train, dev = rule_data
    proxy = train_proxy(load_length_data(train), tiny_encoder, FAST, finetune=False)
    assert _mae(proxy, dev) < 15, "the head did not learn a rule the median misses by ~100 tokens"
    out = proxy.save(tmp_path / "proxy")
    again = load_predictor(out)
    queries = load_length_data(dev).queries[:20]
    assert [p.length for p in again.predict(queries)] == [p.length for p in proxy.predict(queries)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "proxy" and manifest["target"] == "L_max"
    assert manifest["data_hash"].startswith("sha256:") and len(manifest["bins"]) >= 2
    assert set(manifest["metrics"]["heldout_mae"]) == {"bins", "ordinal", "regression", "mean"}


def test_finetuned_proxy_learns_the_rule_and_saves_its_encoder(tiny_encoder, rule_data, tmp_path):
    train, dev = rule_data
    cfg = TrainConfig(epochs=12, batch_size=16, lr=3e-3, encoder_lr=1e-3, val_fraction=0.1, progress=False)
    proxy = train_proxy(load_length_data(train), tiny_encoder, cfg, finetune=True)
    assert _mae(proxy, dev) < 20
    out = proxy.save(tmp_path / "ft")
    assert (out / "encoder" / "config.json").is_file()
    again = load_predictor(out)
    q = load_length_data(dev).queries[:10]
    assert [p.length for p in again.predict(q)] == [p.length for p in proxy.predict(q)]


def test_training_is_deterministic_for_a_seed(tiny_encoder, rule_data):
    data = load_length_data(rule_data[0])
    cfg = TrainConfig(epochs=3, batch_size=32, val_fraction=0.1, progress=False, seed=7)
    a = train_proxy(data, tiny_encoder, cfg, finetune=False)
    b = train_proxy(data, tiny_encoder, cfg, finetune=False)
    q = data.queries[:16]
    assert [p.length for p in a.predict(q)] == [p.length for p in b.predict(q)]


def test_proxy_embeds_instruction_and_input_not_the_template():
    q = LengthQuery(prompt=alpaca_prompt("name three colours"))
    assert query_text(q) == "name three colours"
    with_input = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                  "Summarise\n\n### Input:\nA long text.\n\n### Response:")
    assert query_text(LengthQuery(prompt=with_input)) == "Summarise\nA long text."
    assert query_text(LengthQuery(prompt="just a chat message")) == "just a chat message"
    assert query_text(LengthQuery(prompt="x", instruction="Do it", input="now")) == "Do it\nnow"


def test_probe_learns_a_linear_rule_from_features_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "features.jsonl"
    x = rng.normal(size=(600, 16))
    lengths = np.clip(150 + 60 * x[:, 0] - 30 * x[:, 3] + rng.normal(0, 3, 600), 1, None).round()
    with path.open("w") as f:
        for i in range(600):
            f.write(json.dumps({"id": str(i), "prompt": f"p{i}", "features": x[i].tolist(),
                                "length": int(lengths[i])}) + "\n")
    data = load_length_data(path, "length", need_features=True)
    probe = train_probe(data, TrainConfig(epochs=60, batch_size=64, lr=3e-3, progress=False))
    preds = probe.predict(data.queries[500:])
    mae = np.mean([abs(p.length - t) for p, t in zip(preds, data.lengths[500:], strict=True)])
    baseline = np.mean(np.abs(np.median(lengths[:500]) - lengths[500:]))
    assert mae < 0.35 * baseline, (mae, baseline)
    again = load_predictor(probe.save(tmp_path / "probe"))
    assert [p.length for p in again.predict(data.queries[:8])] == [p.length for p in probe.predict(data.queries[:8])]
    with pytest.raises(ValueError, match="features"):
        probe.predict([LengthQuery(prompt="no features")])


def test_constant_predicts_the_training_median_with_its_histogram(rule_data, tmp_path):
    data = load_length_data(rule_data[0])
    c = ConstantPredictor.fit(data)
    assert c.value == float(np.median(data.lengths))
    p = c.predict([LengthQuery(prompt="anything")])[0]
    assert p.length == c.value and abs(sum(p.probs) - 1) < 1e-9
    # The histogram's median is within one bin of the exact median.
    assert abs(p.quantile(0.5) - c.value) <= p.edges[1] - p.edges[0]
    again = load_predictor(c.save(tmp_path / "c"))
    assert again.predict([LengthQuery(prompt="x")])[0] == p


def test_oracle_is_refused_where_it_must_be(tmp_path):
    oracle = make_predictor("oracle")
    assert oracle.predict([LengthQuery(prompt="x", true_length=42)])[0].length == 42
    with pytest.raises(ValueError, match="needs true_length"):
        oracle.predict([LengthQuery(prompt="x")])
    with pytest.raises(ValueError, match="benchmarks only"):
        make_predictor("oracle", allow_benchmark_only=False)
    saved = oracle.save(tmp_path / "oracle")
    with pytest.raises(ValueError, match="benchmarks only"):
        load_predictor(saved, allow_benchmark_only=False)
    with pytest.raises(ValueError, match="benchmarks only"):
        make_predictor(str(saved), allow_benchmark_only=False)
    assert load_predictor(saved).kind == "oracle"


@pytest.mark.parametrize("lines, match", [
    ([], "no records"),
    (['{"prompt": "p", "L_max": -3}'], "negative"),
    (['{"L_max": 3}'], "'prompt'"),
    (['{"prompt": "p"}'], "'L_max' is missing"),
    (['{"prompt": "p", "L_max": "many"}'], "must be a number"),
    (['{"prompt": "p", "L_max": 3}', "{not json"], ":2: not valid JSON"),
    (['[1, 2]'], "JSON object"),
])
def test_bad_data_files_get_clear_errors(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(ValueError, match=match):
        load_length_data(path, "L_max")


def test_targets_and_feature_requirements(rule_data, tmp_path):
    d = load_length_data(rule_data[0], "t0.0")
    assert d.lengths[0] == load_length_data(rule_data[0], "L_max").lengths[0] - 3
    with pytest.raises(ValueError, match="'features'"):
        load_length_data(rule_data[0], need_features=True)
    with pytest.raises(ValueError, match="does not exist"):
        load_length_data(tmp_path / "missing.jsonl")


def _tau_bruteforce(x, y):
    c = d = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        a, b = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        if a == 0:
            tx += 1
        if b == 0:
            ty += 1
        if a * b > 0:
            c += 1
        elif a * b < 0:
            d += 1
    n = len(x) * (len(x) - 1) / 2
    return (c - d) / np.sqrt((n - tx) * (n - ty))


def test_metrics_match_brute_force_definitions():
    rng = np.random.default_rng(3)
    true = rng.integers(1, 40, 1500).astype(float)  # many ties; >1024 exercises the chunking
    pred = true + rng.integers(-60, 60, 1500)
    sub = slice(0, 300)
    assert kendall_tau(pred[sub], true[sub]) == pytest.approx(_tau_bruteforce(pred[sub], true[sub]), abs=1e-12)
    assert kendall_tau(true, true) == pytest.approx(1.0)
    m = length_metrics(pred, true)
    err = np.abs(pred - true)
    assert m["mae"] == pytest.approx(err.mean())
    assert m["acc50"] == pytest.approx((err <= 50).mean()) and m["acc100"] == pytest.approx((err <= 100).mean())
    assert bin_accuracy(true, true, 8) == 1.0
    assert bin_accuracy([1.0, 100.0], [100.0, 1.0], 2) == 0.0
    # On an edge (15, the median of the truths): the lower bin, as the multibin policy bins it.
    assert bin_accuracy([15.0, 10.0, 20.0, 20.0], [10.0, 10.0, 20.0, 20.0], 2) == 1.0


def test_head_readouts_find_the_median_of_a_point_mass():
    edges = torch.tensor(default_edges([0, 190], width=20.0))
    head = LengthHead(4, len(edges) - 1, hidden=8, dropout=0.0)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    x = torch.ones(64, 4)
    y = torch.full((64,), 70.0)
    for _ in range(300):
        opt.zero_grad()
        head_loss(head(x), y, edges).backward()
        opt.step()
    with torch.no_grad():
        points, probs = readout_all(head(x[:1]), edges)
    for name, v in points.items():
        assert abs(float(v) - 70) < 10, name  # inside the right 20-token bin
    assert probs.shape == (1, len(edges) - 1) and float(probs[0, 3]) > 0.9


def test_prediction_quantiles_and_probabilities():
    p = LengthPrediction(50.0, (0.0, 100.0, 200.0), (0.5, 0.5))
    assert p.quantile(0.5) == pytest.approx(100.0) and p.quantile(0.75) == pytest.approx(150.0)
    assert p.prob_at_most(50) == pytest.approx(0.25) and p.prob_at_most(500) == 1.0
    assert LengthPrediction(7.0).quantile(0.9) == 7.0
    with pytest.raises(ValueError, match="q must be"):
        p.quantile(1.5)


def test_binned_median_spreads_each_number_over_what_rounds_to_it():
    assert binned_median([20], [1.0], 10) == 20
    assert binned_median([20, 30], [1.0, 1.0], 10) == pytest.approx(25)  # torn between two: halfway
    # CDF: 0.25 over [15, 25), then 0.25 + 0.75 (x - 25) / 10 reaches 0.5 at 25 + 10/3
    assert binned_median([30, 20], [3.0, 1.0], 10) == pytest.approx(25 + 10 / 3)
    assert binned_median([20, 40, 400], [0.3, 0.3, 0.4], 10) == pytest.approx(35 + 10 * (0.2 / 0.3))
    # overlapping intervals: two uniforms on [10, 20) and [14, 24), equal weight; F(x) = 0.5 at 17
    assert binned_median([15, 19], [1.0, 1.0], 10) == pytest.approx(17)
    assert binned_median([20, 40], [1.0, 1.0], 10) == pytest.approx(30)  # even split, gap between: the middle
    assert binned_median([10, 20, 30], [1.0, 1.0, 3.0], 0) == 30  # width 0: the plain weighted median
    assert binned_median([10, 20, 30], [1.0, 1.0, 2.0], 0) == 25
    assert binned_median([10, 20, 30], [1.0, 0.0, 0.5], 0) == 10  # zero weights take no part
    with pytest.raises(ValueError, match="positive weight"):
        binned_median([10], [0.0], 10)
    with pytest.raises(ValueError, match="width"):
        binned_median([10], [1.0], -1)


def test_parse_length_reads_the_first_integer():
    assert parse_length(" 120 tokens") == 120
    assert parse_length("About 1,200.") == 1200
    assert parse_length("I cannot say") is None


def test_cli_train_eval_json_and_predictions(rule_data, tmp_path, capsys):
    from lengthwise.cli import main

    train, dev = rule_data
    out = tmp_path / "const"
    assert main(["predictor", "train", "--kind", "constant", "--data", str(train), "--out", str(out)]) == 0
    js, preds = tmp_path / "m.json", tmp_path / "p.jsonl"
    assert main(["predictor", "eval", "--predictor", str(out), "--data", str(dev), "--json", str(js),
                 "--predictions-out", str(preds)]) == 0
    printed = capsys.readouterr().out
    assert "Acc-50" in printed and "Kendall tau" in printed and "batch 64" in printed
    metrics = json.loads(js.read_text())
    for key in ("mae", "acc50", "acc100", "kendall_tau", "bin_acc_2", "bin_acc_4", "bin_acc_8",
                "latency_ms_b1", "latency_ms_b64"):
        assert isinstance(metrics[key], float), key
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    dev_data = load_length_data(dev)
    assert [r["id"] for r in rows] == [r.id for r in dev_data.records]
    recomputed = np.mean([abs(r["predicted"] - t) for r, t in zip(rows, dev_data.lengths, strict=True)])
    assert metrics["mae"] == pytest.approx(recomputed, abs=1e-2)
    assert main(["predictor", "eval", "--predictor", str(tmp_path / "nowhere"), "--data", str(dev)]) == 2
    assert "neither a predictor directory" in capsys.readouterr().err


def test_packed_bert_matches_transformers_bert(tiny_encoder):
    from lengthwise.predict.encoder import TextEncoder

    enc = TextEncoder(tiny_encoder)
    assert enc.packed is not None, "a plain BertModel must take the packed path"
    rng = random.Random(0)
    rows = [[2, *[rng.randrange(5, len(WORDS)) for _ in range(rng.randint(0, 20))], 3] for _ in range(37)]
    packed = enc.embed_ids(rows, max_rows=8)
    with torch.no_grad():
        reference = torch.cat([enc(*enc.collate([r])) for r in rows])
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-5)
    enc.packed = None  # the padded transformers path groups by length too and must agree
    torch.testing.assert_close(enc.embed_ids(rows, max_rows=8), reference, rtol=1e-5, atol=1e-5)


def test_length_groups_cover_in_order_and_minimise_padding():
    from lengthwise.predict.encoder import length_groups

    lengths = sorted([3, 3, 4, 4, 4, 5, 30, 31, 120])
    groups = length_groups(lengths, max_rows=4, overhead=5)
    assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:], strict=False))
    assert all(0 < hi - lo <= 4 for lo, hi in groups)
    assert (8, 9) in groups  # the 120-token row is alone: padding 3 short rows to 120 costs more than a call

    def cost(gs):
        return sum(5 + (hi - lo) * lengths[hi - 1] for lo, hi in gs)

    def all_splits(lo):
        if lo == len(lengths):
            yield []
            return
        for hi in range(lo + 1, min(lo + 4, len(lengths)) + 1):
            for rest in all_splits(hi):
                yield [(lo, hi), *rest]

    assert cost(groups) == min(cost(s) for s in all_splits(0))


def test_bench_predictors_writes_table_json_and_plot(rule_data, tmp_path, capsys):
    from lengthwise.cli import main

    train, dev = rule_data
    const = ConstantPredictor.fit(load_length_data(train)).save(tmp_path / "const")
    out = tmp_path / "bench"
    assert main(["bench", "predictors", "--predictor", "oracle", "--predictor", f"median={const}",
                 "--data", str(dev), "--tau-target", "t0.0", "--out-dir", str(out), "--no-latency"]) == 0
    records = json.loads((out / "predictors.json").read_text())["results"]
    assert [r["name"] for r in records] == ["oracle", "median"]
    assert records[0]["mae"] == 0.0 and records[0]["kendall_tau"] == pytest.approx(1.0)
    assert records[1]["mae"] == pytest.approx(length_metrics([ConstantPredictor.fit(load_length_data(train)).value]
                                                             * 120, load_length_data(dev).lengths)["mae"])
    assert records[0]["kendall_tau_t0.0"] == pytest.approx(1.0)  # t0.0 = L_max - 3 here: the same order
    assert (out / "predictors.png").stat().st_size > 0
    assert "| oracle | 0.0 |" in capsys.readouterr().out
